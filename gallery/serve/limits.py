"""What a request may cost and reach: body size, photos per request, bytes per photo, the folders it may name.

The body limit is enforced while the body arrives (an ASGI middleware), before any parser buffers it:
a declared Content-Length over the limit is refused at once, a chunked body when it passes the limit.
Paths are resolved with realpath before they are checked, so `..` segments and symlinks that lead out
of an allowed root are refused like any other path outside it.
"""
from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass

import gallery.storage as storage
from gallery.errors import UserError
from gallery.serve.problems import Forbidden, NotFound, RequestProblem, TooLarge

MB = 1 << 20


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 64 * MB      # a whole request
    max_photos: int = 44               # seed photos in one request (the paper's largest gallery)
    max_photo_bytes: int = 16 * MB     # one uploaded or named photo
    allowed_roots: tuple[str, ...] = ()  # folders (or s3:// prefixes) whose photos a request may name
    workers: int = 4                   # requests computed at once (searches, embeddings, thumbnails)
    queue: int = 64                    # requests waiting for a worker before the server answers 503

    def __post_init__(self):
        small = [name for name in ("max_body_bytes", "max_photos", "max_photo_bytes", "workers") if getattr(self, name) < 1]
        if small or self.queue < 0:
            raise UserError(f"server limits {', '.join(small) or 'queue'} must be at least {0 if not small else 1}")

    def describe(self) -> dict:
        return {"max_body_bytes": self.max_body_bytes, "max_photos": self.max_photos,
                "max_photo_bytes": self.max_photo_bytes, "workers": self.workers, "queue": self.queue,
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
    """The location a request named, if it lies under an allowed root and is a regular file within the
    size limit; relative paths are taken from each root in turn. Anything else: 403, 404 or 413 naming it."""
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
    for root in (r for r in limits.allowed_roots if not storage.is_uri(r)):
        real = os.path.realpath(os.path.join(root, text))
        if os.path.commonpath([real, root]) == root:
            return _regular_file(text, real, limits)
    raise Forbidden(f"photo path {text!r} is not under an allowed root ({', '.join(limits.allowed_roots)}); "
                    "links out of a root count as outside")


def _regular_file(text: str, real: str, limits: Limits) -> str:
    try:
        info = os.stat(real)
    except OSError:
        raise NotFound(f"photo path {text!r} does not exist") from None
    if not stat.S_ISREG(info.st_mode):
        raise RequestProblem(f"photo path {text!r} is not a regular file (a folder, device or pipe)")
    if info.st_size > limits.max_photo_bytes:
        raise TooLarge(f"photo path {text!r} has {info.st_size:,} bytes, more than the {limits.max_photo_bytes:,} "
                       "allowed per photo")
    return real


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
        body = json.dumps({"detail": f"{what} is over this server's limit of {self.max_bytes:,} bytes: "
                                     "send fewer or smaller photos"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
