"""A fault-injecting HTTP proxy in front of an S3-compatible server (the tests' moto server): what an object
store does to a client on a bad day, on demand.

Requests pass through to the server unless a scheduled fault matches them (by method and a substring of the
path): it then answers instead, for the next `times` matching requests, with
- "500": 500 InternalError, S3's XML error body;
- "503": 503 SlowDown (S3's throttling answer);
- "reset": the connection reset (RST: SO_LINGER 0) once the request's head is read;
- "stall": the request read, then nothing sent until the client gives up (or the proxy stops);
- "stall-body": the server's answer with its full Content-Length, half its body, then nothing;
- "cut-body": the same half answer, then the connection reset;
- "cut-upload": half the request body forwarded to the server, then both connections reset.
"""
from __future__ import annotations

import http.client
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

ERRORS = {"500": (500, "Internal Server Error", "InternalError", "We encountered an internal error. Please try again."),
          "503": (503, "Slow Down", "SlowDown", "Please reduce your request rate.")}
FAULTS = {*ERRORS, "reset", "stall", "stall-body", "cut-body", "cut-upload"}
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "server", "date"}


@dataclass
class Fault:
    method: str
    key: str
    fault: str
    times: int


class FaultyS3:
    """The proxy, on 127.0.0.1; `endpoint` is its URL. `log` lists (time.monotonic(), method, path, what was
    done: "passed" or the fault) per request."""

    def __init__(self, upstream: str):
        self.upstream = urlsplit(upstream)
        self.faults: list[Fault] = []
        self.log: list[tuple[str, str, str]] = []
        self.stopped = threading.Event()
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, name="faulty-s3", daemon=True).start()

    def fail(self, method: str, key: str, fault: str, times: int = 1) -> None:
        """Answer the next `times` requests with this method whose path holds `key` with `fault`."""
        assert fault in FAULTS, fault
        with self.lock:
            self.faults.append(Fault(method, key, fault, times))

    def clear(self) -> None:
        with self.lock:
            self.faults.clear()

    def faulted(self, fault: str | None = None) -> int:
        """How many requests met a fault (that fault)."""
        return sum(1 for *_, done in self.log if done != "passed" and (fault is None or done == fault))

    def gaps(self) -> list[float]:
        """Seconds between consecutive requests (a retry's wait, with the failed try's own time)."""
        return [b[0] - a[0] for a, b in zip(self.log, self.log[1:])]

    def _take(self, method: str, path: str) -> str | None:
        with self.lock:
            for f in self.faults:
                if f.method == method and f.key in path and f.times > 0:
                    f.times -= 1
                    return f.fault
        return None

    def close(self) -> None:
        self.stopped.set()
        self.server.shutdown()
        self.server.server_close()


def _handler(proxy: FaultyS3):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, and Expect: 100-continue answered as a server would

        def log_message(self, *args):  # quiet
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while (size := int(self.rfile.readline().split(b";")[0], 16)):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                while self.rfile.readline() not in (b"\r\n", b""):
                    pass
                return b"".join(chunks)
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _handle(self):
            fault = proxy._take(self.command, self.path)
            proxy.log.append((time.monotonic(), self.command, self.path, fault or "passed"))
            if fault == "reset":
                return self._reset()
            if fault == "cut-upload":
                return self._cut_upload()
            body = self._body()
            if fault in ERRORS:
                return self._error(*ERRORS[fault])
            if fault == "stall":
                return self._stall()
            status, reason, headers, answer = self._forward(body)
            self.send_response(status, reason)
            for name, value in headers:
                if name.lower() not in HOP_HEADERS:
                    self.send_header(name, value)
            length = next((v for n, v in headers if n.lower() == "content-length"), None)
            self.send_header("Content-Length", length if self.command == "HEAD" and length else str(len(answer)))
            self.end_headers()
            if fault in ("stall-body", "cut-body"):
                self.wfile.write(answer[:len(answer) // 2])
                self.wfile.flush()
                if fault == "stall-body":
                    return self._stall()
                time.sleep(0.1)  # the half has reached the client before the reset
                return self._reset()
            self.wfile.write(answer)

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        def _forward(self, body: bytes):
            connection = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=30)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS | {"expect"}}
                connection.request(self.command, self.path, body=body, headers=headers)
                response = connection.getresponse()
                return response.status, response.reason, response.getheaders(), response.read()
            finally:
                connection.close()

        def _error(self, status: int, reason: str, code: str, message: str) -> None:
            xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
                   f"<Resource>{self.path}</Resource><RequestId>faulty-s3</RequestId></Error>").encode()
            self.send_response(status, reason)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(xml)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(xml)

        def _stall(self) -> None:
            """Send nothing more; return (closing the connection) once the client has given up or the proxy stops."""
            self.close_connection = True
            self.connection.setblocking(True)
            while not proxy.stopped.is_set():
                if select.select([self.connection], [], [], 0.05)[0]:
                    try:
                        if not self.connection.recv(65536):
                            return
                    except OSError:
                        return

        def _reset(self, *sockets) -> None:
            self.close_connection = True
            for s in (self.connection, *sockets):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()

        def _cut_upload(self) -> None:
            """Half the body to the server over a raw connection that then breaks, as a network cut would."""
            length = int(self.headers.get("Content-Length") or 0)
            upstream = socket.create_connection((proxy.upstream.hostname, proxy.upstream.port), timeout=30)
            head = [f"{self.command} {self.path} HTTP/1.1"]
            head += [f"{k}: {v}" for k, v in self.headers.items() if k.lower() != "expect"]
            upstream.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
            upstream.sendall(self.rfile.read(length // 2))
            time.sleep(0.2)  # the server has read what it got
            self._reset(upstream)

    return Handler
