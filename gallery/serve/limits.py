"""What a request may cost and reach: body size, photos and pixels per request, bytes per photo, decode
time, pixels decoded at once by all requests together, the folders it may name, and how long a client may
take to send a request (gallery.serve.connections).

The body limit is enforced while the body arrives (an ASGI middleware), before any parser buffers it:
a declared Content-Length over the limit is refused at once, a chunked body when it passes the limit.
Seed photos are counted by the pixels their headers declare before any is decoded: a few kilobytes of
PNG can declare 64 million pixels, and four requests of 44 such photos held every worker for 40 s and
1 GiB that the process kept. Requests each within that bound still decoded at once: four clients each
uploading one photo of 63.8 million pixels took the server to 1.92x its idle memory, so the pixels being
decoded are counted server-wide too (DecodeBudget).
Seed photos, uploaded or named, are read through the project's bounded input layer (gallery.data.inputs),
as every other input is; its errors become the HTTP answers that say the same (photo_bytes).
Paths are resolved with realpath before they are checked, so `..` segments and symlinks that lead out
of an allowed root are refused like any other path outside it.
"""
from __future__ import annotations

import ctypes
import io
import json
import os
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, replace

import anyio
import numpy as np
from PIL import Image

import gallery.storage as storage
from gallery.data import inputs
from gallery.data.images import ImageProblem, decode
from gallery.errors import UserError
from gallery.serve.problems import BadGateway, Busy, Forbidden, NotAnImage, NotFound, RequestProblem, TooLarge

MB = 1 << 20
REQUESTS_BEYOND_QUEUE = 16  # requests in flight past the workers and their queue: the cheap ones (/health, a gallery)


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 64 * MB      # a whole request
    max_photos: int = 44               # seed photos in one request (the paper's largest gallery)
    max_photo_bytes: int = 16 * MB     # one uploaded or named photo
    allowed_roots: tuple[str, ...] = ()  # folders (or s3:// prefixes) whose photos a request may name
    max_request_pixels: int = 100_000_000  # pixels of all seed photos of one request, as their headers declare
    max_decode_seconds: float = 10.0   # decoding one request's seed photos
    decoding_pixels: int | None = None  # pixels all requests together decode at once (None: max_request_pixels)
    decode_wait_seconds: float = 10.0  # a request's longest wait for those pixels before the server answers 503
    workers: int = 4                   # requests computed at once (searches, embeddings, thumbnails)
    queue: int = 64                    # requests waiting for a worker before the server answers 503
    connections: int = 512             # open connections; past them every request is answered 503 (below the
                                       # usual 1,024 open files a process may hold)
    header_timeout: float = 10.0       # seconds a client has to send a request's line and headers
    body_timeout: float = 10.0         # seconds a request body may go without a byte
    min_body_rate: int = 16 * 1024     # bytes/s: a body is due body_timeout after its headers, plus 1 s per this many bytes

    def __post_init__(self):
        wrong = [f"{name} must be at least 1" for name in ("max_body_bytes", "max_photos", "max_photo_bytes",
                 "max_request_pixels", "workers", "connections", "min_body_rate") if getattr(self, name) < 1]
        wrong += [f"{name} must be more than 0 s" for name in ("max_decode_seconds", "decode_wait_seconds",
                  "header_timeout", "body_timeout") if not getattr(self, name) > 0]
        wrong += ["queue must be at least 0"] if self.queue < 0 else []
        wrong += ["decoding_pixels must be at least 1"] if self.decoding_pixels is not None and self.decoding_pixels < 1 else []
        if wrong:
            raise UserError(f"server limits: {'; '.join(wrong)}")

    @property
    def requests(self) -> int:
        """Requests in flight at once, beyond which the server answers 503 (gallery.serve.connections)."""
        return self.workers + self.queue + REQUESTS_BEYOND_QUEUE

    @property
    def decode_budget(self) -> int:
        """Pixels all requests together decode at once: by default one request at the pixel bound."""
        return self.max_request_pixels if self.decoding_pixels is None else self.decoding_pixels

    def photo_input(self) -> inputs.Limits:
        """The input layer's limits for a seed photo: this server's bytes per photo, the environment's remote timeouts."""
        return replace(inputs.Limits.from_env(), image=self.max_photo_bytes)

    def describe(self) -> dict:
        return {"max_body_bytes": self.max_body_bytes, "max_photos": self.max_photos,
                "max_photo_bytes": self.max_photo_bytes, "max_request_pixels": self.max_request_pixels,
                "max_decode_seconds": self.max_decode_seconds, "decoding_pixels": self.decode_budget,
                "decode_wait_seconds": self.decode_wait_seconds, "workers": self.workers, "queue": self.queue,
                "paths_readable": bool(self.allowed_roots)}


def resolved_roots(roots) -> tuple[str, ...]:
    """Allowed roots as they will be compared: folders by realpath (which must exist), URI prefixes ending in '/'."""
    out = []
    for root in roots:
        root = str(root)
        if storage.is_uri(root):
            out.append(root.rstrip("/") + "/")
            continue
        real = os.path.realpath(root.removeprefix("file://"))
        if not os.path.isdir(real):
            raise RequestProblem(f"allowed root {root} is not a folder: pass existing folders with --allow-root")
        out.append(real)
    return tuple(out)


def readable_location(text: str, limits: Limits) -> str:
    """The location a request named, if it lies under an allowed root (else 403 naming it); a relative path
    is looked for under every root, the first that holds it wins. What is there (a regular file within the
    photo limit) is the input layer's to check when it is read (photo_bytes)."""
    if not limits.allowed_roots:
        raise Forbidden(f"photo path {text!r}: this server reads no paths (start it with --allow-root FOLDER "
                        "to allow the photos under a folder), upload the photos instead")
    if not text or "\x00" in text:
        raise RequestProblem(f"photo path {text!r} is empty or holds a NUL character")
    if storage.is_uri(text):
        if ".." in text.split("/") or not any(text.startswith(r) for r in limits.allowed_roots if storage.is_uri(r)):
            raise Forbidden(f"photo URI {text!r} is not under an allowed root ({', '.join(limits.allowed_roots)})")
        return text
    text = text.removeprefix("file://")
    inside = []
    for root in (r for r in limits.allowed_roots if not storage.is_uri(r)):
        real = os.path.realpath(os.path.join(root, text))
        if os.path.commonpath([real, root]) == root:
            inside.append(real)
    if not inside:
        raise Forbidden(f"photo path {text!r} is not under an allowed root ({', '.join(limits.allowed_roots)}); "
                        "links out of a root count as outside")
    return next((real for real in inside if os.path.exists(real)), inside[0])


class BodySizeLimit:
    """ASGI middleware: 413 for a request body over `max_bytes`, counted as it arrives. Past the limit the
    app is told the client left (it stops reading) and whatever it answers after that is dropped."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and not declared.isdigit():
            return await self._refuse(send, f"a request whose Content-Length is {declared.decode(errors='replace')!r}")
        if declared is not None and int(declared) > self.max_bytes:
            return await self._refuse(send, f"request body of {int(declared):,} bytes")
        received, started, refused = 0, False, False

        async def counted_receive():
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    refused = True
                    if not started:
                        await self._refuse(send, f"request body of more than {received:,} bytes")
                    return {"type": "http.disconnect"}
            return message

        async def tracked_send(message):
            nonlocal started
            if refused:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, counted_receive, tracked_send)

    async def _refuse(self, send, what: str):
        await send_problem(send, 413, f"{what} is over this server's limit of {self.max_bytes:,} bytes: "
                                      "send fewer or smaller photos")


async def send_problem(send, status: int, detail: str, headers=()) -> None:
    """An answer in the app's error shape, {"detail": ...}, sent on a raw ASGI `send` by what runs before the
    app (or instead of it); the connection is closed after it."""
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *headers]})
    await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------------------- seed photos


PHOTO_PROBLEMS = ((inputs.MissingInput, NotFound), (inputs.TooLarge, TooLarge), (inputs.Unreachable, BadGateway))


def photo_bytes(what: str, source: bytes | str, bounds: inputs.Limits) -> bytes:
    """A seed photo's bytes through the project's bounded input layer: an upload checked against the photo
    limit, a path or URI read as every input is (regular files only, never more than the limit, remote reads
    under a deadline). Its errors as HTTP answers naming the photo as the request did (never the server's
    path): 404 missing, 413 too large, 502 a store that failed or did not answer, 400 anything else (a
    folder, device or pipe, an unreadable file)."""
    try:
        return inputs.read_input(source, "image", bounds)
    except inputs.InputProblem as e:
        answer = next((http for problem, http in PHOTO_PROBLEMS if isinstance(e, problem)), RequestProblem)
        fix = f"; this server takes at most {bounds.image:,} bytes per photo" if answer is TooLarge else ""
        raise answer(f"{what}: {e.category} ({e.reason}){fix}") from None


@dataclass(frozen=True)
class SeedPhotos:
    """A request's seed photos, read and within its pixel bound, not yet decoded."""

    photos: list[tuple[str, bytes]]  # what to call each, its bytes
    pixels: int                      # all of them together, as their headers declare


def read_photos(photos: list[tuple[str, bytes | str]], limits: Limits) -> SeedPhotos:
    """Seed photos, (what to call each, its bytes or an allowed location), read (photo_bytes) and counted by
    the pixels their headers declare: 413 over `max_request_pixels`, before anything is decoded."""
    bounds = limits.photo_input()
    read = [(what, photo_bytes(what, data, bounds)) for what, data in photos]
    pixels = sum(_declared_pixels(data) for _, data in read)
    if pixels > limits.max_request_pixels:
        raise TooLarge(f"the request's {len(read)} photos hold {pixels:,} pixels, more than this server's limit of "
                       f"{limits.max_request_pixels:,} per request: send fewer or smaller photos, or start the server "
                       f"with a larger --max-megapixels (now {limits.max_request_pixels / 1e6:g})")
    return SeedPhotos(read, pixels)


@dataclass(eq=False)
class _Turn:
    pixels: int
    granted: anyio.Event


class DecodeBudget:
    """The pixels all requests together decode at once. A request takes its photos' declared pixels (at
    most the whole budget, so one larger than it decodes alone) once they fit, first come first served; one
    that waited `wait_s` is answered Busy (503, Retry-After). It waits on the event loop, holding no worker."""

    def __init__(self, pixels: int, wait_s: float):
        self.pixels, self.wait_s, self.in_use = pixels, wait_s, 0
        self.waiting: deque[_Turn] = deque()

    @asynccontextmanager
    async def hold(self, pixels: int) -> AsyncIterator[None]:
        """Hold `pixels` of the budget while the block runs (waiting for them first)."""
        turn = _Turn(min(pixels, self.pixels), anyio.Event())
        self.waiting.append(turn)
        self._grant()
        try:
            with anyio.move_on_after(self.wait_s):
                await turn.granted.wait()
            if not turn.granted.is_set():
                raise Busy(f"photo decoding is at this server's limit of {self.pixels:,} pixels at once, and this "
                           f"request's {turn.pixels:,} did not fit within {self.wait_s:g} s: retry in a moment")
            yield
        finally:
            if turn.granted.is_set():
                self.in_use -= turn.pixels
            else:
                self.waiting.remove(turn)
            self._grant()

    def _grant(self) -> None:
        while self.waiting and self.in_use + self.waiting[0].pixels <= self.pixels:
            turn = self.waiting.popleft()
            self.in_use += turn.pixels
            turn.granted.set()


def decode_photos(photos: SeedPhotos, size: int, limits: Limits) -> list[np.ndarray]:
    """Seed photos decoded at `size`: 413 when decoding passes `max_decode_seconds`, 415 naming one that is
    not an image. Decoding's memory is given back to the system afterwards (release_memory)."""
    start, out = time.monotonic(), []
    try:
        for what, data in photos.photos:
            with _named(what):
                out.append(decode(data, size))
            if time.monotonic() - start > limits.max_decode_seconds:
                raise TooLarge(f"decoding the request's photos took more than this server's limit of "
                               f"{limits.max_decode_seconds:g} s per request (Limits.max_decode_seconds): send fewer "
                               "or smaller photos")
    finally:
        release_memory()
    return out


@contextmanager
def _named(what: str):
    """A photo that cannot be decoded as a 415 naming it."""
    try:
        yield
    except ImageProblem as e:
        raise NotAnImage(f"{what}: {e}; send JPEG, PNG, WEBP or GIF photos") from None


def _declared_pixels(data: bytes) -> int:
    """Width x height as the image's header declares them (nothing is decoded); 0 when there is no readable
    header: decode then says what is wrong with the file."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.width * img.height
    except Exception:  # noqa: BLE001 - any unreadable header is decode's to report, with its reason
        return 0


def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # the C library this process already runs on
    except (OSError, AttributeError, TypeError):  # not glibc: nothing to call
        return None


MALLOC_TRIM = _malloc_trim()


def release_memory() -> None:
    """Give freed memory back to the system. Decoding runs on worker threads, and glibc keeps what a thread's
    arena freed for that thread's next use: four workers decoding large photos held 1 GiB that no request
    used again. malloc_trim(0) returns it (about 0.15 s after such decoding, microseconds otherwise)."""
    if MALLOC_TRIM is not None:
        MALLOC_TRIM(0)
