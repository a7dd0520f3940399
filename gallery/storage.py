"""Files by location: a local path or a URI any pyarrow filesystem understands (s3://, gs://, ...).

The run-scoped store (shards, caches, checkpoints, embeddings) and the inputs are all read and
written through here, so the same flow runs on a laptop (local folder) and on a cluster
(object store) without a step relying on another step's local disk. Local writes are atomic
(temp file + rename, the temp file removed on failure); object-store uploads are atomic by nature
(a multipart upload shows nothing until completed).

s3:// is reached with pyarrow's S3 filesystem, set up by `configure_s3` with the settings Metaflow's
datastore uses (gallery.runs passes them), so the store lives wherever the datastore does.

Faults (docs/bad-input.md): every S3 request is retried with AWS's standard backoff and abandoned when it
cannot connect or goes silent; gs:// reads are abandoned by a watchdog (pyarrow's GCS client has no
timeouts of its own). What still fails, and a full local disk, is a StorageError naming the location.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import io
import os
import random
import tempfile
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pyarrow.fs as pafs


def _fs():
    """pyarrow.fs, loaded on first use: the flow's light steps (join_shards, end) never import pyarrow."""
    import pyarrow.fs

    return pyarrow.fs


# Every S3 request (a HEAD, a GET, one part of an upload) is tried up to S3_ATTEMPTS times, retrying throttling
# (503 SlowDown), 5xx answers and network errors with AWS's standard backoff (random, up to 1 s, 2 s, 4 s,
# 8 s between tries). A try is abandoned when it cannot connect within S3_CONNECT_TIMEOUT, or when nothing
# moves either way for S3_REQUEST_TIMEOUT: on Linux pyarrow's request_timeout is curl's low-speed limit
# (under 1 byte/s for that long; some 5 s more once data has flowed, curl's speed being an average), not a
# cap on the whole request. pyarrow's defaults, the AWS SDK's: 3 tries, 1 s to connect, 3 s of silence.
S3_ATTEMPTS = 5
S3_CONNECT_TIMEOUT = 10.0
S3_REQUEST_TIMEOUT = 30.0

# pyarrow's GCS client takes no connect or read timeout, only how long it retries (its default: 15 min).
# A gs:// read is abandoned when it has no answer within GCS_CONNECT_TIMEOUT, or no data for GCS_READ_TIMEOUT.
GCS_CONNECT_TIMEOUT = 20.0
GCS_READ_TIMEOUT = 30.0
GCS_RETRY_LIMIT = 30
GCS_CHUNK = 8 << 20  # a gs:// read's data between two checks that it is still coming

FULL_DISK = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # no space, over quota, over the file-size limit

_S3_OPTIONS: dict = {}
_S3_LIMITS = {"attempts": S3_ATTEMPTS, "connect_timeout": S3_CONNECT_TIMEOUT, "request_timeout": S3_REQUEST_TIMEOUT}


class StorageError(OSError):
    """A store operation that failed for good (an object store's retries spent, a full disk): names the
    location, what was tried and the fix."""

    def __init__(self, message: str, location: str = "", code: int | None = None):  # defaults: unpickled from args
        super().__init__(message)
        self.location, self.errno = location, code


def configure_s3(endpoint_url: str | None = None, ca_bundle: str | bool | None = None, *,
                 attempts: int = S3_ATTEMPTS, connect_timeout: float = S3_CONNECT_TIMEOUT,
                 request_timeout: float = S3_REQUEST_TIMEOUT) -> None:
    """Reach s3:// through `endpoint_url` (an S3-compatible store: MinIO, Ceph, a company gateway)
    trusting the certificates in `ca_bundle` (a file; boto3's `verify`), as Metaflow's S3 client does,
    trying each request `attempts` times with those timeouts (seconds; see S3_ATTEMPTS).
    Credentials come from the standard AWS chain, which boto3 (Metaflow) and pyarrow both read:
    the environment, ~/.aws files (AWS_PROFILE), the machine's or pod's role."""
    _S3_OPTIONS.clear()
    if endpoint_url:
        _S3_OPTIONS["endpoint_override"] = endpoint_url  # with its scheme: http://127.0.0.1:9000
    if isinstance(ca_bundle, str) and ca_bundle:
        _S3_OPTIONS["tls_ca_file_path"] = ca_bundle
    _S3_LIMITS.update(attempts=attempts, connect_timeout=connect_timeout, request_timeout=request_timeout)
    _s3_filesystem.cache_clear()


@functools.lru_cache(maxsize=None)
def _s3_filesystem(bucket: str, timeout: float | None = None) -> pafs.S3FileSystem:
    options = dict(_S3_OPTIONS)
    if "endpoint_override" not in options:
        options["region"] = _fs().resolve_s3_region(bucket)  # AWS itself answers a bucket only in its region
    attempts, connect, request = _S3_LIMITS["attempts"], _S3_LIMITS["connect_timeout"], _S3_LIMITS["request_timeout"]
    if timeout is not None:  # a user's input: give up on a store that does not answer, after one retry
        attempts, connect, request = 2, timeout, timeout
    return _fs().S3FileSystem(**options, connect_timeout=connect, request_timeout=request,
                              retry_strategy=_fs().AwsStandardS3RetryStrategy(max_attempts=attempts))


def gcs_filesystem(retry_limit: float = GCS_RETRY_LIMIT) -> pafs.GcsFileSystem:
    """pyarrow's GCS client, retrying for `retry_limit` seconds; STORAGE_EMULATOR_HOST (the convention of
    Google's own clients) points it at an emulator or a private endpoint, without credentials."""
    from urllib.parse import urlsplit

    options = {"retry_time_limit": timedelta(seconds=max(1, round(retry_limit)))}
    emulator = os.environ.get("STORAGE_EMULATOR_HOST", "")
    if emulator:
        parts = urlsplit(emulator if "://" in emulator else f"http://{emulator}")
        options |= {"anonymous": True, "scheme": parts.scheme, "endpoint_override": parts.netloc}
    return _fs().GcsFileSystem(**options)


def is_uri(location: str) -> bool:
    return "://" in str(location) and not str(location).startswith("file://")


def filesystem(location: str, timeout: float | None = None) -> tuple[pafs.FileSystem, str]:
    """The filesystem of a location and the path in it; with `timeout`, an s3:// store that does not
    connect or answer within that many seconds is an error (gallery.data.inputs reads users' files so)."""
    location = str(location)
    if location.startswith("file://"):
        location = location[len("file://"):]
    if location.startswith("s3://"):
        path = location[len("s3://"):]
        return _s3_filesystem(path.split("/", 1)[0], timeout), path
    if location.startswith("gs://"):
        return gcs_filesystem(), location[len("gs://"):]
    if is_uri(location):
        return _fs().FileSystem.from_uri(location)
    return _fs().LocalFileSystem(), os.path.abspath(location)


def join(base: str, *parts: str) -> str:
    base = str(base)
    if is_uri(base):
        return "/".join([base.rstrip("/")] + [p.strip("/") for p in parts])
    return str(Path(base, *parts))


def parent(location: str) -> str:
    location = str(location)
    return location.rstrip("/").rsplit("/", 1)[0] if is_uri(location) else str(Path(location).resolve().parent)


def exists(location: str) -> bool:
    fs, path = filesystem(location)
    with _failing(location, "look up"):
        info = _gcs_bounded(lambda beat: fs.get_file_info(path)) if _is_gcs(location) else fs.get_file_info(path)
    return info.type != _fs().FileType.NotFound


def read_bytes(location: str) -> bytes:
    fs, path = filesystem(location)
    with _failing(location, "read"):
        if _is_gcs(location):
            return _gcs_bounded(lambda beat: _read_beating(fs, path, beat))
        for attempt in range(1, _S3_LIMITS["attempts"] + 1):
            try:
                with fs.open_input_stream(path) as f:
                    return f.read()
            except OSError as e:
                # The AWS SDK writes an error's XML (~300 bytes) into a buffer the size of the object: for a smaller
                # object a 503 SlowDown or a 500 overflows it, and the SDK calls that a final INTERNAL_FAILURE.
                if "Failed to flush response stream" not in str(e) or attempt == _S3_LIMITS["attempts"]:
                    raise
                time.sleep(random.uniform(0, 2 ** (attempt - 1)))  # the SDK's own backoff


def open_input_file(location: str):
    """A random-access file (pyarrow NativeFile): read a footer or a byte range without the rest."""
    fs, path = filesystem(location)
    with _failing(location, "open"):
        return fs.open_input_file(path)


def write_bytes(location: str, data: bytes) -> None:
    fs, path = filesystem(location)
    if isinstance(fs, _fs().LocalFileSystem):
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        try:
            with _failing(path, "write"):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
            raise
    else:
        with _failing(location, "write"), fs.open_output_stream(path) as f:
            f.write(data)  # one call: nothing can interrupt between parts, and close completes the upload whole


def delete(location: str) -> None:
    """Remove one file; a file that is already gone is fine."""
    fs, path = filesystem(location)
    with _failing(location, "delete"):
        if fs.get_file_info(path).type != _fs().FileType.NotFound:
            fs.delete_file(path)


def staging_dir(location: str) -> str:
    """A local folder to write files destined for `location` (a folder or prefix), then `publish` them:
    inside the destination for a local store (so publishing is a rename), a temporary folder otherwise."""
    fs, path = filesystem(location)
    if isinstance(fs, _fs().LocalFileSystem):
        with _failing(path, "write"):
            os.makedirs(path, exist_ok=True)
            return tempfile.mkdtemp(prefix=".staging-", dir=path)
    with _failing(tempfile.gettempdir(), "write"):
        return tempfile.mkdtemp(prefix="gallery-staging-")


def publish(local_path: str, location: str) -> None:
    """Move a finished local file to `location`: an atomic rename locally, an upload to an object store
    (by pyarrow's copy, not a Python loop: an exception between chunks would complete a partial upload)."""
    fs, path = filesystem(location)
    if isinstance(fs, _fs().LocalFileSystem):
        with _failing(path, "write"):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            os.replace(local_path, path)
        return
    fs_module = _fs()
    with _failing(location, "upload to"):
        fs_module.copy_files(os.path.abspath(local_path), path, source_filesystem=fs_module.LocalFileSystem(),
                             destination_filesystem=fs)
    os.remove(local_path)


def save_torch(location: str, obj) -> None:
    buffer = io.BytesIO()
    import torch  # here: storage is imported by a flow's light steps

    torch.save(obj, buffer)
    write_bytes(location, buffer.getvalue())


def load_torch(location: str, map_location="cpu"):
    """Load with weights_only=True: checkpoints and shards hold tensors and plain containers only."""
    import torch

    return torch.load(io.BytesIO(read_bytes(location)), map_location=map_location, weights_only=True)


def upload_dir(local_dir: str, location: str) -> None:
    """Copy a local folder to a location (an object-store prefix, or another folder)."""
    fs, path = filesystem(location)
    fs_module = _fs()
    with _failing(location, "upload to"):
        fs.create_dir(path, recursive=True)
        fs_module.copy_files(os.path.abspath(local_dir), path, source_filesystem=fs_module.LocalFileSystem(),
                             destination_filesystem=fs)


def full_disk(error: BaseException, path: str) -> StorageError | None:
    """`error` met writing `path`, when it is a full disk (or quota, or file-size limit): a StorageError
    naming the path and the fix; None for any other error."""
    if not isinstance(error, OSError) or isinstance(error, StorageError) or error.errno not in FULL_DISK:
        return None
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    return StorageError(f"could not write {path}: {error.strerror or error}; free space on the disk that holds "
                        f"{folder}, or choose another --store (--reports for reports, TMPDIR for files staged before "
                        "an upload); a retried or resumed step writes it again", path, error.errno)


@contextlib.contextmanager
def _failing(location: str, verb: str):
    """A store operation's failure as a StorageError naming the location: an object store's (what the client
    tried is said), a local disk's when it is full. A missing file stays FileNotFoundError."""
    started = time.monotonic()
    try:
        yield
    except (FileNotFoundError, StorageError):
        raise
    except OSError as e:
        if not is_uri(location):
            raise full_disk(e, location) or e
        cause = " ".join(str(e).split())[:400]
        raise StorageError(f"could not {verb} {location} (gave up after {time.monotonic() - started:.1f} s; "
                           f"{_patience(location)}): {cause}", location, e.errno) from e


def _patience(location: str) -> str:
    if location.startswith("s3://"):
        return (f"{_S3_LIMITS['attempts']} tries per request, each abandoned after {_S3_LIMITS['connect_timeout']:g} s "
                f"without connecting or {_S3_LIMITS['request_timeout']:g} s without data")
    if _is_gcs(location):
        return (f"a read is abandoned after {GCS_CONNECT_TIMEOUT:g} s without an answer or {GCS_READ_TIMEOUT:g} s "
                f"without data; the client retries for {GCS_RETRY_LIMIT:g} s")
    return "the client's own retries"


def _is_gcs(location: str) -> bool:
    return str(location).startswith("gs://")


def _read_beating(fs, path: str, beat) -> bytes:
    with fs.open_input_stream(path) as f:
        beat()
        chunks = []
        while chunk := f.read(GCS_CHUNK):
            chunks.append(chunk)
            beat()
    return b"".join(chunks)


def _gcs_bounded(read):
    """read(beat) on a daemon thread, abandoned (TimeoutError) when `beat` was not called within
    GCS_CONNECT_TIMEOUT of the start or GCS_READ_TIMEOUT of the last call: pyarrow's GCS client has no
    timeouts of its own. An abandoned thread ends when the client's retries do (GCS_RETRY_LIMIT)."""
    outcome: dict = {}
    beats = [0, time.monotonic()]

    def beat():
        beats[0], beats[1] = beats[0] + 1, time.monotonic()

    def run():
        try:
            outcome["value"] = read(beat)
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
            outcome["error"] = e

    worker = threading.Thread(target=run, name="gallery gs:// read", daemon=True)
    worker.start()
    while worker.is_alive():
        limit = GCS_READ_TIMEOUT if beats[0] else GCS_CONNECT_TIMEOUT
        left = beats[1] + limit - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no {'data' if beats[0] else 'answer'} for {limit:g} s")
        worker.join(left)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
