"""`gallery bench search`: float against binary exact search, memory and latency side by side."""
from __future__ import annotations

import time

import numpy as np
import torch

from gallery.retrieval.index import BinaryIndex, FloatIndex


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def bench_search(sizes=(100_000, 1_000_000), dim: int = 1280, queries: int = 100, k: int = 10,
                 chunk: int = 50_000, log=print) -> list[dict]:
    """Float (cosine, 4·d bytes) vs binary (Hamming, d/8 bytes) exact search over synthetic
    embeddings: index storage (read from faiss), the process's resident-memory growth while
    adding (coarse: the allocator reuses freed memory), and query latency."""
    log(f"{dim}-d synthetic embeddings, {queries} queries, top {k}, exact search with faiss, "
        f"{torch.get_num_threads()} threads")
    results = []
    for n in sizes:
        rng = np.random.default_rng(0)
        row = {"n": n}
        for name, index in (("float", FloatIndex(dim=dim)), ("binary", BinaryIndex(dim=dim))):
            before = _rss_bytes()
            for start in range(0, n, chunk):
                index.add(rng.standard_normal((min(chunk, n - start), dim), dtype=np.float32))
            memory = _rss_bytes() - before
            q = np.random.default_rng(1).standard_normal((queries, dim), dtype=np.float32)
            index.search(q[:2], k)  # warm-up
            start = time.perf_counter()
            index.search(q, k)
            row[name] = {"index_bytes": index.storage_bytes(), "rss_growth_bytes": memory,
                         "ms_per_query": (time.perf_counter() - start) * 1000 / queries}
            del index
        f, b = row["float"], row["binary"]
        log(f"  {n:>9,} galleries: float index {f['index_bytes'] / 2**20:8.1f} MiB (process +{f['rss_growth_bytes'] / 2**20:.0f} MiB)"
            f" {f['ms_per_query']:8.3f} ms/query | binary index {b['index_bytes'] / 2**20:7.1f} MiB (process "
            f"+{b['rss_growth_bytes'] / 2**20:.0f} MiB) {b['ms_per_query']:8.3f} ms/query | ratio: binary holds "
            f"{f['index_bytes'] / b['index_bytes']:.1f}x less, queries {f['ms_per_query'] / b['ms_per_query']:.1f}x faster")
        results.append(row)
    return results
