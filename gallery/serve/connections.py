"""The HTTP connections of `gallery serve`: uvicorn's h11 protocol with the read deadlines uvicorn lacks and
limits that answer in the service's own JSON.

uvicorn (0.55) times out only the idle time between two requests (`timeout_keep_alive`), and that timer
is cancelled by every byte received and is not armed at all before a connection's first request: a
client that opens a connection and sends its headers a byte at a time, or nothing, holds it forever. Its
`limit_concurrency` counts those connections too, so 90 of them made every other request a plain-text
503. Nothing in uvicorn's configuration closes them (`h11_max_incomplete_event_size` bounds a head's
bytes, not its time) and an ASGI middleware runs only once a head is complete, so the deadlines live
in a small subclass of uvicorn's h11 protocol (its pure-Python parser, the one it picks without
httptools), passed to uvicorn as `http=`: a few dozen lines on the server the service already runs,
where another server would change more than these rules need. They are Go's ReadHeaderTimeout and
Apache's mod_reqtimeout:

- a request's line and headers must arrive within `Limits.header_timeout` of its first byte (of the
  connection's opening for its first request), however many bytes trickle in meanwhile;
- its body may go at most `Limits.body_timeout` without a byte, and must be complete by
  `body_timeout` after the headers plus one second per `Limits.min_body_rate` bytes received.

A connection past its deadline is closed. Requests are limited in flight (`Limits.requests`) and
connections open (`Limits.connections`); past either the request is answered 503 with a `detail` and
`Retry-After`, as the app's own 503 (gallery.serve.app.WorkerPool). Connections still sending their
headers hold no request place, so they never make the server refuse others before `connections`.
"""
from __future__ import annotations

import asyncio
from functools import partial

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from gallery.serve.limits import Limits, send_problem
from gallery.serve.problems import Busy


def _busy(detail: str):
    async def app(scope, receive, send):
        await send_problem(send, Busy.status, detail, [(b"retry-after", str(Busy.retry_after_s).encode())])

    return app


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with read deadlines and JSON 503s (see the module's docstring)."""

    def __init__(self, *args, limits: Limits, **kwargs):
        super().__init__(*args, **kwargs)
        self.limits = limits
        self.deadline: asyncio.TimerHandle | None = None
        self.body_started: float | None = None
        self.body_received = 0

    @property
    def app(self):
        """The app a complete request head is given (uvicorn's handle_events reads it once per request): the
        service's, or a JSON 503 past the limits."""
        if len(self.connections) > self.limits.connections:
            return _busy(f"this server holds {len(self.connections)} connections, more than its limit of "
                         f"{self.limits.connections}: retry in a moment")
        if len(self.tasks) >= self.limits.requests:
            return _busy(f"this server is answering {len(self.tasks)} requests, its limit: retry in a moment")
        return self._app

    @app.setter
    def app(self, app) -> None:
        self._app = app

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm(self.limits.header_timeout)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch(len(data))

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _watch(self, received: int) -> None:
        """After bytes arrived: arm the deadline of what the client is sending now, or none while the server answers."""
        state = self.conn.their_state
        if state is h11.IDLE:  # a request head on its way: its deadline runs from its first byte, never extended
            if self.deadline is None:
                self._arm(self.limits.header_timeout)
        elif state is h11.SEND_BODY:
            now = self.loop.time()
            if self.body_started is None:
                self.body_started, self.body_received = now, 0
            self.body_received += received
            complete_by = self.body_started + self.limits.body_timeout + self.body_received / self.limits.min_body_rate
            self._arm(min(self.limits.body_timeout, complete_by - now))
        else:
            self._disarm()
            self.body_started = None

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self.deadline = self.loop.call_later(max(seconds, 0), self._expired)

    def _disarm(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def _expired(self) -> None:
        self.deadline = None
        if self.flow.read_paused:  # the app has not read what came: the wait is the server's, not the client's
            self._arm(self.limits.body_timeout)
            return
        self.logger.debug("closing a connection that took too long to send its request")
        self.transport.close()


def server_options(limits: Limits) -> dict:
    """uvicorn's options (uvicorn.run, uvicorn.Config) for serving within `limits`: the guarded protocol,
    uvicorn's own concurrency limit off (the protocol's replaces it), idle keep-alive connections closed after 5 s."""
    return {"http": partial(GuardedH11Protocol, limits=limits), "timeout_keep_alive": 5, "limit_concurrency": None}
