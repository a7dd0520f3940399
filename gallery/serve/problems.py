"""What a request did wrong, with the HTTP status that says so: the app answers each with its message."""
from __future__ import annotations

from gallery.errors import UserError


class RequestProblem(UserError):
    """A request that cannot be answered as asked (400); the message names the input and the fix."""

    status = 400


class NotFound(RequestProblem):
    status = 404


class Forbidden(RequestProblem):
    status = 403


class TooLarge(RequestProblem):
    status = 413


class NotAnImage(RequestProblem):
    status = 415


class Unavailable(RequestProblem):
    """What this server was started without (a model, a catalogue, a kind of search)."""

    status = 409


class BadGateway(RequestProblem):
    """A store a named photo lives in (s3://) that failed or did not answer in time."""

    status = 502


class Busy(RequestProblem):
    """Every worker is busy and the queue is full, the connections are, or photo decoding waited too long:
    come back shortly."""

    status = 503
    retry_after_s = 1  # the Retry-After header every 503 carries
