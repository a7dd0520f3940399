"""`gallery serve`'s connections against hostile clients (gallery.serve.connections), through a real uvicorn:
requests that never finish are closed, and past the limits the answer is the service's JSON 503.

The served app is a small ASGI app that reads each request's body and answers "ok": what is tested is the
protocol around it. Timeouts are a fraction of a second so the file takes about two seconds.
"""
import contextlib
import http.client
import json
import select
import socket
import threading
import time

import pytest
import uvicorn

from gallery.serve.connections import server_options
from gallery.serve.limits import Limits

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
