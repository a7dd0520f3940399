"""The one way user-given bytes come in: bounded, and every failure a typed error naming the input.

Manifests, task specs, settings files, images, seed photos, embeddings files and model files (an exported
model folder's, a `model.weights` file) are all read here, so that no input can hang a step or a server
worker, exhaust memory through one read, or end in a library's traceback:

- Local files: regular files only. The path is checked before it is opened and the open descriptor
  again after (opened non-blocking), so a FIFO, a device (`/dev/zero`), a socket or a folder is
  refused, never read.
- Sizes: at most the kind's limit is read (`Limits`, from GALLERY_MAX_<KIND>_BYTES); a larger input
  is refused, whatever size it claims.
- Remote objects (`s3://` through pyarrow's S3 client, `gs://` through pyarrow's GCS client,
  `http://` and `https://` through urllib): the client's own connect and read timeouts where it has
  them, and every remote read runs under a watchdog that gives up when no data came for `timeout`
  seconds or the read took longer than `deadline` (GALLERY_INPUT_TIMEOUT, GALLERY_INPUT_DEADLINE).
  pyarrow's GCS client has no connect timeout: a read it never returns from is abandoned to a
  background thread.
- URIs: `file://` URIs are decoded (percent-encoding, `file://localhost/...`); any other scheme
  is refused by `location_problem` when the inputs are validated, not when they are read.

A caller that already holds the bytes (a server's upload) passes them to `read_input`, which applies
the same limits.
"""
from __future__ import annotations

import codecs
import io
import os
import re
import stat
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

import gallery.storage as storage
from gallery.errors import UserError

if TYPE_CHECKING:
    import pyarrow.fs as pafs

REMOTE_SCHEMES = ("s3", "gs", "http", "https")
SUPPORTED_SCHEMES = ("file",) + REMOTE_SCHEMES
CHUNK = 1 << 16  # a remote read reports progress (to the watchdog) at least every CHUNK bytes
_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")  # a file named "a:b.jpg" is a path


# ---------------------------------------------------------------- limits

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4, "tb": 1000**4}


@dataclass(frozen=True)
class Limits:
    """How much of each kind of input is read, and how long a remote read may wait.

    Every field can be set from the environment: GALLERY_MAX_<KIND>_BYTES (a number of bytes, or with
    a unit: 64MiB, 2GB), GALLERY_INPUT_TIMEOUT and GALLERY_INPUT_DEADLINE (seconds)."""

    manifest: int = 2 * 1024**3      # a Parquet manifest of a few million products is a few hundred MB
    tasks: int = 1024**2             # a task spec is a few KB of YAML
    settings: int = 1024**2          # a settings JSON, the same
    image: int = 64 * 1024**2        # a product photo (and a seed photo): a 50-megapixel JPEG is ~25 MB
    embeddings: int = 64 * 1024**3   # an embeddings file (and its code); read in ranges where it can be
    model: int = 8 * 1024**3         # a file of an exported model folder (weights, ONNX graphs, config)
    timeout: float = 20.0            # seconds to connect, and the longest wait for the next bytes
    deadline: float = 600.0          # seconds for a whole remote read

    @staticmethod
    def from_env(env=None) -> "Limits":
        env = os.environ if env is None else env
        values = {}
        for f in fields(Limits):
            name = f"GALLERY_INPUT_{f.name.upper()}" if f.type == "float" else f"GALLERY_MAX_{f.name.upper()}_BYTES"
            if env.get(name, "").strip():
                values[f.name] = _seconds(name, env[name]) if f.type == "float" else _bytes(name, env[name])
        return replace(Limits(), **values)

    def of(self, kind: str) -> int:
        return getattr(self, kind)


def _bytes(name: str, text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match[2].lower() not in _UNITS or float(match[1]) <= 0:
        raise UserError(f"environment variable {name}={text[:40]!r}: expected a size in bytes, e.g. 67108864 or 64MiB")
    return int(float(match[1]) * _UNITS[match[2].lower()])


def _seconds(name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise UserError(f"environment variable {name}={text[:40]!r}: expected a number of seconds > 0")
    return value


def size_text(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


# ---------------------------------------------------------------- errors

KIND_NAMES = {"manifest": "manifest", "tasks": "task spec", "settings": "settings file", "image": "image",
              "embeddings": "embeddings file", "model": "model file"}
LIMIT_VARIABLES = {kind: f"GALLERY_MAX_{kind.upper()}_BYTES" for kind in KIND_NAMES}


class InputProblem(UserError):
    """An input that cannot be read: which one, why, and what to do about it; `category` is the kind of
    problem in a few words (the data-quality list counts skipped images by it)."""

    category = "unreadable input"

    def __init__(self, location: str, reason: str, fix: str):
        self.location, self.reason, self.fix = str(location), reason, fix
        super().__init__(f"{self.location}: {reason}; {fix}")


class MissingInput(InputProblem):
    """Nothing at that location."""

    category = "missing file"


class NotAFile(InputProblem):
    """A folder, FIFO, device or socket where a file is expected."""

    category = "not a regular file"


class TooLarge(InputProblem):
    """More bytes than the kind's limit."""

    category = "too large"


class Unreachable(InputProblem):
    """A remote store that refused, failed, or did not answer in time."""

    category = "unreachable"


class UnsupportedLocation(InputProblem):
    """A URI scheme (or a form of URI) that gallery does not read."""

    category = "unsupported location"


class Unreadable(InputProblem):
    """Permission denied, an I/O error, or text that is not UTF-8."""

    category = "unreadable"


class NotText(Unreadable):
    """A binary file (Parquet, an image, an archive) where text is expected: often arguments swapped."""

    def __init__(self, location: str, found: str, kind: str):
        self.found = found
        super().__init__(location, f"is {found}, not a text file", f"give the {KIND_NAMES[kind]} as UTF-8 text")


# ---------------------------------------------------------------- locations

def scheme_of(location: str) -> str:
    """'' for a plain path, else the URI's scheme in lower case (a Windows drive letter is a path)."""
    match = _URI.match(str(location))
    return match[1].lower() if match and len(match[1]) > 1 else ""


def location_problem(location: str) -> str | None:
    """Why gallery cannot read `location` (an unsupported scheme, a file:// URI of another host), or None."""
    location = str(location)
    scheme = scheme_of(location)
    if "\x00" in location:
        return "the path contains a NUL character"
    if not scheme:
        return None
    if scheme not in SUPPORTED_SCHEMES:
        return (f"URI scheme '{scheme}:' is not supported (supported: local paths, "
                f"{', '.join(s + '://' for s in SUPPORTED_SCHEMES)})")
    parts = urlsplit(location)
    if scheme == "file" and parts.netloc not in ("", "localhost"):
        return f"file:// URI of another host ({parts.netloc!r}): only this machine's files (file:///path) are read"
    if scheme != "file" and not (parts.netloc and parts.path.strip("/")):
        return f"{scheme}:// URI without a {'bucket and key' if scheme in ('s3', 'gs') else 'host and path'}"
    return None


def normalize(location) -> str:
    """A local path for a path or file:// URI (percent-decoded, file://localhost/ accepted); a remote URI as is."""
    location = str(location)
    if scheme_of(location) == "file" and urlsplit(location).netloc in ("", "localhost"):
        return unquote(urlsplit(location).path)
    return location  # (a file:// URI of another host stays one: location_problem refuses it)


def is_remote(location: str) -> bool:
    return scheme_of(location) in REMOTE_SCHEMES


def _check_location(location: str) -> str:
    problem = location_problem(location)
    if problem:
        raise UnsupportedLocation(location, problem, "give a local path, file:///absolute/path, s3://bucket/key, "
                                                     "gs://bucket/key or an http(s):// URL")
    return normalize(location)


# ---------------------------------------------------------------- reading

def read_bounded(location, kind: str, limits: Limits | None = None) -> bytes:
    """All bytes of a user's file or object of `kind` (manifest, tasks, settings, image, embeddings,
    model), bounded as the module docstring says; raises an InputProblem subclass naming `location`."""
    limits = limits or Limits.from_env()
    location = str(location)
    path = _check_location(location)
    if is_remote(path):
        return _remote(path, kind, limits, lambda beat: _read_remote(path, kind, limits, beat))
    return _read_local(path, location, kind, limits.of(kind))


def check_bounded(location, kind: str, limits: Limits | None = None) -> None:
    """What `read_bounded` checks before it reads, without reading: a readable location, a regular file (or
    object) no larger than the kind's limit. For a file read much later than it is named (a weights file
    checked when a run starts); raises the InputProblem the read would."""
    limits = limits or Limits.from_env()
    location = str(location)
    path = _check_location(location)
    if scheme_of(path) in ("http", "https"):
        _remote(path, kind, limits, lambda beat: _open_http(path, kind, limits, beat).close())
    elif is_remote(path):
        _remote(path, kind, limits, lambda beat: _remote_file(path, kind, limits))
    else:
        os.close(_open_local(path, location, kind, limits.of(kind)))


def read_input(source, kind: str = "image", limits: Limits | None = None) -> bytes:
    """Bytes a caller already received (a server's upload: `bytes`, `bytearray`, `memoryview`) checked
    against the kind's limit, or the bytes of a path or URI read by `read_bounded`."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        limits = limits or Limits.from_env()
        data = bytes(source)
        if len(data) > limits.of(kind):
            raise _too_large(f"uploaded {KIND_NAMES[kind]}", kind, len(data), limits.of(kind))
        return data
    return read_bounded(os.fspath(source), kind, limits)


def read_text(location, kind: str, limits: Limits | None = None) -> str:
    """A text file (task spec, settings) as str: UTF-8, a UTF-8 byte-order mark allowed; anything else
    (Latin-1, UTF-16, a Parquet file or an image given by mistake) is an Unreadable naming the file."""
    data = read_bounded(location, kind, limits)
    binary = binary_format(data)
    if binary:
        raise NotText(location, binary, kind)
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE, codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        raise Unreadable(location, "is UTF-16/UTF-32 text, not UTF-8", "save it as UTF-8")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise Unreadable(location, f"is not UTF-8 text (byte 0x{data[e.start]:02x} on line {line}; "
                                   "Latin-1 or Windows-1252?)", "save it as UTF-8") from None


_SIGNATURES = ((b"PAR1", "a Parquet file"), (b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"),
               (b"GIF8", "a GIF image"), (b"PK\x03\x04", "a ZIP archive (an Excel workbook?)"),
               (b"\x1f\x8b", "a gzip archive"), (b"\x93NUMPY", "a numpy array"))


def binary_format(data: bytes) -> str | None:
    """What a binary file is by its first bytes (for 'did you swap the arguments?' messages), or None."""
    for magic, name in _SIGNATURES:
        if data.startswith(magic):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "a WEBP image"
    return None


def open_random_access(location, kind: str, limits: Limits | None = None):
    """A random-access file (pyarrow NativeFile) of a user's file, checked like `read_bounded`: local files
    and s3:// objects are read in ranges (a Parquet footer, some columns), other URIs are read whole."""
    import pyarrow  # here: a flow's light steps import this module (settings files) and never need pyarrow

    limits = limits or Limits.from_env()
    location = str(location)
    path = _check_location(location)
    if scheme_of(path) == "s3":
        def open_s3(beat):
            fs, key = _remote_file(path, kind, limits)
            return fs.open_input_file(key)
        return _remote(path, kind, limits, open_s3)
    if is_remote(path):
        return pyarrow.BufferReader(read_bounded(path, kind, limits))
    fd = _open_local(path, location, kind, limits.of(kind))
    return pyarrow.PythonFile(os.fdopen(fd, "rb"), mode="r")


def _too_large(location: str, kind: str, size: int, limit: int) -> TooLarge:
    return TooLarge(location, f"is larger than the {KIND_NAMES[kind]} limit ({size_text(size)} > {size_text(limit)})",
                    f"give a smaller file, or raise the limit with {LIMIT_VARIABLES[kind]}")


def _not_a_file(location: str, mode: int) -> NotAFile:
    what = ("a folder" if stat.S_ISDIR(mode) else "a named pipe" if stat.S_ISFIFO(mode)
            else "a character device" if stat.S_ISCHR(mode) else "a block device" if stat.S_ISBLK(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "a special file")
    return NotAFile(location, f"is {what}", "give the path of a regular file")


def _os_problem(location: str, e: OSError) -> InputProblem:
    if isinstance(e, FileNotFoundError):
        return MissingInput(location, "does not exist", "check the path")
    if isinstance(e, PermissionError):
        return Unreadable(location, "permission denied", "make the file readable by this user")
    return Unreadable(location, f"cannot be read ({e.strerror or e})", "check the path and the disk")


def _open_local(path: str, location: str, kind: str, limit: int) -> int:
    """A read-only descriptor of a regular file no larger than `limit`: checked before opening (a device
    is never opened) and on the descriptor (a path swapped in between is caught)."""
    try:
        before = os.stat(path)
        if not stat.S_ISREG(before.st_mode):
            raise _not_a_file(location, before.st_mode)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except InputProblem:
        raise
    except ValueError:
        raise UnsupportedLocation(location, "the path contains a NUL character", "give a valid path") from None
    except OSError as e:
        raise _os_problem(location, e) from None
    opened = os.fstat(fd)
    problem = (_not_a_file(location, opened.st_mode) if not stat.S_ISREG(opened.st_mode)
               else _too_large(location, kind, opened.st_size, limit) if opened.st_size > limit else None)
    if problem:
        os.close(fd)
        raise problem
    return fd


def _read_local(path: str, location: str, kind: str, limit: int) -> bytes:
    fd = _open_local(path, location, kind, limit)
    chunks, total, size = [], 0, os.fstat(fd).st_size
    try:
        while True:  # a file that grows while read (or claims size 0, as /proc files do) stops at the limit
            chunk = os.read(fd, min(max(size + 1 - total, CHUNK), limit + 1 - total))
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise _too_large(location, kind, total, limit)
    except OSError as e:
        raise _os_problem(location, e) from None
    finally:
        os.close(fd)


# ---------------------------------------------------------------- remote reads

def _remote(location: str, kind: str, limits: Limits, read):
    """Run read(beat) in a watchdog thread: give up when `beat()` was not called for twice `limits.timeout`
    seconds and one more (the client's own timeouts, with one retry, answer first where it has them), or
    after `limits.deadline` seconds; an InputProblem from the read comes out as it is."""
    silence = 2 * limits.timeout + 1
    outcome: dict = {}
    last = [time.monotonic()]

    def beat():
        last[0] = time.monotonic()

    def run():
        try:
            outcome["value"] = read(beat)
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
            outcome["error"] = e

    start = time.monotonic()
    worker = threading.Thread(target=run, name=f"gallery input {location[:60]}", daemon=True)
    worker.start()
    while True:
        now = time.monotonic()
        stalled, overdue = now - last[0] >= silence, now - start >= limits.deadline
        if stalled or overdue:
            break
        worker.join(min(silence - (now - last[0]), limits.deadline - (now - start)))
        if not worker.is_alive():
            break
    if worker.is_alive():
        waited = f"no answer for {silence:g} s" if stalled else f"not read in {limits.deadline:g} s"
        raise Unreachable(location, waited,
                          "check the network, the endpoint and the URI; raise GALLERY_INPUT_TIMEOUT or "
                          "GALLERY_INPUT_DEADLINE for a slow store")
    if "error" in outcome:
        error = outcome["error"]
        if isinstance(error, InputProblem):
            raise error
        raise _remote_problem(location, error) from None
    return outcome["value"]


def _remote_problem(location: str, error: BaseException) -> InputProblem:
    text = str(error).replace("\n", " ")
    if isinstance(error, urllib.error.HTTPError):
        if error.code in (404, 410):
            return MissingInput(location, f"does not exist (HTTP {error.code})", "check the URL")
        return Unreachable(location, f"the server answered HTTP {error.code} {error.reason}",
                           "check the URL and that it is readable without a login")
    if isinstance(error, FileNotFoundError) or "NoSuchKey" in text or "NoSuchBucket" in text:
        return MissingInput(location, "does not exist", "check the bucket and key")
    if "AccessDenied" in text or "403" in text or "Forbidden" in text or "credentials" in text.lower():
        return Unreachable(location, f"access denied ({text[:160]})",
                           "check the credentials (AWS_PROFILE, GOOGLE_APPLICATION_CREDENTIALS) and the permissions")
    if "Could not connect" in text or "Connection refused" in text or isinstance(error, ConnectionRefusedError):
        return Unreachable(location, "could not connect", "check the endpoint (METAFLOW_S3_ENDPOINT_URL, "
                                                          "STORAGE_EMULATOR_HOST) or the URL, and the network")
    if "Timeout" in text or "timed out" in text or isinstance(error, TimeoutError):
        return Unreachable(location, "no answer in time", "check the network and the endpoint; raise GALLERY_INPUT_TIMEOUT "
                                                          "for a slow store")
    return Unreachable(location, f"cannot be read ({error.__class__.__name__}: {text[:200]})",
                       "check the network, the endpoint and the URI")


def _remote_file(location: str, kind: str, limits: Limits) -> tuple[pafs.FileSystem, str]:
    """The object's filesystem and key, after checking it is an object no larger than the limit."""
    import pyarrow.fs as pafs

    scheme = scheme_of(location)
    if scheme == "s3":
        fs, key = storage.filesystem(location, timeout=limits.timeout)
    else:
        fs, key = storage.gcs_filesystem(limits.timeout), location.split("://", 1)[1]
    info = fs.get_file_info(key)
    if info.type == pafs.FileType.NotFound:
        raise MissingInput(location, "does not exist", "check the bucket and key")
    if info.type == pafs.FileType.Directory:
        raise NotAFile(location, "is a folder (a prefix), not an object", "give the key of one object")
    if info.size is not None and info.size > limits.of(kind):
        raise _too_large(location, kind, info.size, limits.of(kind))
    return fs, key


def _open_http(location: str, kind: str, limits: Limits, beat):
    """The open response of an http(s) URL, refused (and closed) when it claims more than the kind's limit."""
    request = urllib.request.Request(location, headers={"User-Agent": "gallery", "Accept-Encoding": "identity"})
    response = urllib.request.urlopen(request, timeout=limits.timeout)
    beat()
    claimed = response.headers.get("Content-Length")
    if claimed and claimed.isdigit() and int(claimed) > limits.of(kind):
        response.close()
        raise _too_large(location, kind, int(claimed), limits.of(kind))
    return response


def _read_remote(location: str, kind: str, limits: Limits, beat) -> bytes:
    limit = limits.of(kind)
    if scheme_of(location) in ("http", "https"):
        with _open_http(location, kind, limits, beat) as response:
            return _read_capped(response, location, kind, limit, beat)
    fs, key = _remote_file(location, kind, limits)
    beat()
    with fs.open_input_stream(key) as stream:
        return _read_capped(stream, location, kind, limit, beat)


def _read_capped(stream, location: str, kind: str, limit: int, beat) -> bytes:
    buffer, total = io.BytesIO(), 0
    read = getattr(stream, "read1", stream.read)  # what has arrived, not a full chunk: progress as it comes
    while True:
        chunk = read(min(CHUNK, limit + 1 - total))
        beat()
        if not chunk:
            return buffer.getvalue()
        buffer.write(chunk)
        total += len(chunk)
        if total > limit:
            raise _too_large(location, kind, total, limit)

