"""`gallery serve` against hostile clients: its connections (gallery.serve.connections) through a real uvicorn,
and the server-wide budget of pixels decoded at once (gallery.serve.limits.DecodeBudget) through the app.

Requests that never finish are closed, and past the limits the answer is the service's JSON 503. The
connections' served app is a small ASGI app that reads each request's body and answers "ok": what is
tested is the protocol around it. Timeouts are a fraction of a second so those tests take about two
seconds. The budget's tests hold each decode until the test lets it end, and read the order of starts and
ends: no test asserts a time.
"""
import contextlib
import http.client
import io
import json
import select
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image

from gallery.serve.app import create_app
from gallery.serve.connections import server_options
from gallery.serve.limits import Limits
from gallery.serve.service import service_from_run

TIMEOUT_S = 0.3
NEVER_S = 10  # far past every deadline here: a connection still open then is never closed


async def reads_its_body(scope, receive, send):
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"ok"})


@contextlib.contextmanager
def serving(limits: Limits):
    """uvicorn with the service's connection options on a free port of 127.0.0.1, in a thread: its port."""
    listener = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(reads_its_body, lifespan="off", log_config=None, **server_options(limits)))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + NEVER_S
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started, "uvicorn did not start"
    try:
        yield listener.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(NEVER_S)
        listener.close()


@pytest.fixture(scope="module")
def port():
    with serving(Limits(header_timeout=TIMEOUT_S, body_timeout=TIMEOUT_S, min_body_rate=1000)) as p:
        yield p


def closed_by_server(connection: socket.socket, trickle: bytes = b"") -> bool:
    """Whether the server closes the connection within NEVER_S while the client sends `trickle` a byte every 20 ms."""
    deadline = time.monotonic() + NEVER_S
    while time.monotonic() < deadline:
        if trickle:
            try:
                connection.send(trickle[:1])
            except OSError:  # closed: the send found out first
                return True
            trickle = trickle[1:] or trickle
        if select.select([connection], [], [], 0.02)[0]:
            try:
                if connection.recv(1024) == b"":  # not an answer still on its way: the end
                    return True
            except ConnectionResetError:
                return True
    return False


def ask(port: int, path: str = "/") -> http.client.HTTPResponse:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=NEVER_S)
    connection.request("GET", path)
    response = connection.getresponse()
    response.body = response.read()
    return response


@pytest.mark.parametrize("sends, trickle", [
    (b"", b""),                                                          # connects, sends nothing
    (b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ", b"a"),                      # headers a byte at a time, never ending
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789", b""),  # a body that stops
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n", b"b"),         # a body a byte at a time
], ids=["silent", "slow headers", "stalled body", "trickled body"])
def test_a_request_that_never_arrives_is_closed(port, sends, trickle):
    with socket.create_connection(("127.0.0.1", port)) as connection:
        connection.sendall(sends)
        assert closed_by_server(connection, trickle)
    assert ask(port).status == 200  # the server goes on


def test_a_second_request_on_a_connection_has_its_own_header_deadline(port):
    with socket.create_connection(("127.0.0.1", port)) as connection:
        connection.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert connection.recv(1024).startswith(b"HTTP/1.1 200")
        connection.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        assert closed_by_server(connection, b"a")


def test_past_the_connection_limit_the_answer_is_json_503_with_retry_after():
    with serving(Limits(connections=3, header_timeout=NEVER_S)) as port:
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        try:
            time.sleep(0.1)  # the server has taken them (connection_made)
            response = ask(port)
            assert response.status == 503 and response.getheader("Retry-After") == "1"
            assert response.getheader("Content-Type") == "application/json"
            assert "limit of 3" in json.loads(response.body)["detail"]
        finally:
            for connection in idle:
                connection.close()
        deadline = time.monotonic() + NEVER_S
        while (status := ask(port).status) != 200 and time.monotonic() < deadline:
            time.sleep(0.02)  # until the server has seen them close
        assert status == 200


# ---------------------------------------------------------------- the decode budget


@pytest.fixture(scope="module")
def service(served_run):
    return service_from_run(served_run, log=lambda line: None)


@pytest.fixture(scope="module")
def photo(served_run) -> tuple[bytes, int]:
    """One of the served run's photos: its bytes and the pixels its header declares."""
    name = pd.read_parquet(served_run.manifest_location)["images"][0][0]
    data = (Path(served_run.manifest_location).parent / name).read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        return data, image.width * image.height


class HeldDecodes:
    """gallery.serve.limits.decode, instrumented: the n-th decode records its start, waits until the test
    opens gate n, records its end."""

    def __init__(self):
        self.events: list[tuple[str, int]] = []
        self.gates = [threading.Event() for _ in range(4)]
        self.lock = threading.Lock()

    def __call__(self, data: bytes, size: int) -> np.ndarray:
        with self.lock:
            n = sum(event == "start" for event, _ in self.events)
            self.events.append(("start", n))
        self.gates[n].wait(NEVER_S)
        with self.lock:
            self.events.append(("end", n))
        return np.zeros((size, size, 3), np.uint8)

    def open_all(self) -> None:
        for gate in self.gates:
            gate.set()


def until(condition) -> None:
    deadline = time.monotonic() + NEVER_S
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert condition()


@contextlib.contextmanager
def two_clients(service, limits: Limits, monkeypatch):
    """The app within `limits`, its decodes held (HeldDecodes), two threads to send requests: (app, decodes, submit)."""
    decodes = HeldDecodes()
    monkeypatch.setattr("gallery.serve.limits.decode", decodes)
    app = create_app(service, limits)
    try:
        with TestClient(app) as client, ThreadPoolExecutor(2) as threads:
            yield app, decodes, lambda photos: threads.submit(client.post, "/api/embed", files=[
                ("photos", (f"p{i}.png", data, "image/png")) for i, data in enumerate(photos)])
    finally:
        decodes.open_all()


def test_a_request_waits_for_the_pixels_another_is_decoding(service, photo, monkeypatch):
    data, pixels = photo
    with two_clients(service, Limits(decoding_pixels=pixels), monkeypatch) as (app, decodes, send):
        first = send([data])
        until(lambda: decodes.events == [("start", 0)])
        second = send([data, data])  # more than the whole budget: it decodes alone
        until(lambda: len(app.state.decode_budget.waiting) == 1)
        assert decodes.events == [("start", 0)]  # waiting for the pixels, not decoding
        decodes.gates[0].set()
        until(lambda: len(decodes.events) == 3)
        assert decodes.events == [("start", 0), ("end", 0), ("start", 1)]
        decodes.open_all()
        assert first.result().status_code == second.result().status_code == 200
    assert decodes.events[3:] == [("end", 1), ("start", 2), ("end", 2)]
    assert app.state.decode_budget.in_use == 0


def test_requests_within_the_budget_together_decode_at_once(service, photo, monkeypatch):
    data, pixels = photo
    with two_clients(service, Limits(decoding_pixels=2 * pixels), monkeypatch) as (app, decodes, send):
        first, second = send([data]), send([data])
        until(lambda: len(decodes.events) == 2)
        assert decodes.events == [("start", 0), ("start", 1)] and app.state.decode_budget.in_use == 2 * pixels
        decodes.open_all()
        assert first.result().status_code == second.result().status_code == 200


def test_a_request_that_waited_too_long_for_the_budget_is_json_503_with_retry_after(service, photo, monkeypatch):
    data, pixels = photo
    limits = Limits(decoding_pixels=pixels, decode_wait_seconds=0.05)
    with two_clients(service, limits, monkeypatch) as (app, decodes, send):
        first = send([data])
        until(lambda: decodes.events == [("start", 0)])
        refused = send([data]).result()
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
        assert refused.headers["Content-Type"] == "application/json"
        assert f"limit of {pixels:,} pixels at once" in refused.json()["detail"]
        assert decodes.events == [("start", 0)] and not app.state.decode_budget.waiting
        decodes.open_all()
        assert first.result().status_code == 200
    assert app.state.decode_budget.in_use == 0


def test_the_decode_budget_is_the_request_bound_unless_serve_is_told_otherwise(tmp_path):
    from gallery.cli import build_parser, serve_limits

    def limits(*options):
        return serve_limits(build_parser().parse_args(["serve", "--embeddings", str(tmp_path / "e.parquet"), *options]))

    assert limits().decode_budget == 100_000_000 and limits("--max-megapixels", "30").decode_budget == 30_000_000
    assert limits("--decoding-megapixels", "250").decode_budget == 250_000_000
    assert limits("--decoding-megapixels", "250").describe()["decoding_pixels"] == 250_000_000  # /health shows it
