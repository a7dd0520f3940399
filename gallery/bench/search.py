"""`gallery bench search`: exact and approximate search over float vectors and binary codes, side by side.

The data are clustered synthetic embeddings (`structured_vectors`), not uniform Gaussian vectors:
in 1280 uniform dimensions every point is nearly equally far from every other, so no index can
tell neighbours apart and an ANN recall would measure noise. Real embeddings lie near a
low-dimensional set of families; so do these.

Every variant is built with the library's own indexes (gallery.retrieval.index) from the settings,
and measured the same way: build seconds, bytes of the saved index (faiss's serialization), the
process's resident-memory growth while building (coarse: the allocator reuses freed memory),
single-query latency p50/p99 on one core (one query at a time, faiss on one thread), and recall@k
against exact float search and against exact search of the same kind.
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import replace

import faiss
import numpy as np

from gallery.config import RetrievalSettings
from gallery.evaluation.neighbours import recall_at_k
from gallery.retrieval.codes import fit_code
from gallery.retrieval.index import CodeIndex, FloatIndex, one_faiss_thread

LATENT_DIM, FAMILY_SIZE = 64, 100  # the synthetic embeddings' structure (see structured_vectors)
CHUNK = 100_000                     # rows generated and encoded at once
CODE_TRAIN_ROWS = 50_000            # galleries the code is fitted on (a train split)
FLOAT_MEMORY_FACTOR = 2.3           # float vectors + an index holding them + a float16 copy, as a multiple of n·d·4
CATALOGUE, CODE_TRAIN, QUERIES = 0, 1, 2  # independent streams of galleries from the same families


def structured_vectors(rows: int, dim: int, families: int, stream: int, start: int = 0, seed: int = 0) -> np.ndarray:
    """Rows start..start+rows of a deterministic synthetic catalogue (any slice gives the same rows): each
    gallery belongs to one of `families` (a centre in a 64-d latent space; about 100 galleries each) and
    sits near its centre; a fixed random map takes the latent space to `dim` dimensions, plus isotropic
    noise, and rows are L2-normalised. Streams draw different galleries from the same families."""
    structure = np.random.default_rng([seed, 0])
    centres = structure.standard_normal((families, LATENT_DIM), dtype=np.float32)
    mapping = structure.standard_normal((LATENT_DIM, dim), dtype=np.float32) / np.sqrt(LATENT_DIM)
    out = np.empty((rows, dim), np.float32)
    for begin in range(start - start % CHUNK, start + rows, CHUNK):  # whole chunks, each from its own stream
        rng = np.random.default_rng([seed, 1, stream, begin])
        family = rng.integers(families, size=CHUNK)
        latent = centres[family] + 0.6 * rng.standard_normal((CHUNK, LATENT_DIM), dtype=np.float32)
        lo, hi = max(begin, start), min(begin + CHUNK, start + rows)
        # the noise is the chunk's last draw, filled row by row: its first rows are drawn alone, and a
        # small slice does not pay for the whole chunk's CHUNK x dim draws
        noise = rng.standard_normal((hi - begin, dim), dtype=np.float32)[lo - begin:]
        x = latent[lo - begin:hi - begin] @ mapping + 0.5 * noise
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[lo - start:hi - start] = x
    return out


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def _saved_bytes(index) -> int:
    """Bytes of the index as saved (written to a temporary file: no second copy in memory)."""
    with tempfile.NamedTemporaryFile(suffix=".faiss") as f:
        (faiss.write_index_binary if isinstance(index, faiss.IndexBinary) else faiss.write_index)(index, f.name)
        return os.path.getsize(f.name)


def _timed_build(build):
    before, start = _rss_bytes(), time.perf_counter()
    built = build()
    return built, time.perf_counter() - start, _rss_bytes() - before


def _latency(search, index, queries: int) -> tuple[np.ndarray, np.ndarray]:
    """Each query alone on one core, `search(index, query number)`: (rows found, seconds per query)."""
    rows, seconds = [], []
    with one_faiss_thread():
        search(index, 0)  # warm-up
        for q in range(queries):
            start = time.perf_counter()
            rows.append(search(index, q).rows[0])
            seconds.append(time.perf_counter() - start)
    return np.array(rows), np.array(seconds)


def _encode_catalogue(code, n: int, dim: int, families: int, seed: int) -> np.ndarray:
    """Codes of the synthetic catalogue, generated a chunk at a time (its float vectors never all in memory)."""
    return np.concatenate([code.encode(structured_vectors(min(CHUNK, n - s), dim, families, CATALOGUE, s, seed))
                           for s in range(0, n, CHUNK)])


def _memory_mapped_float16(vectors: np.ndarray, folder: str) -> np.ndarray:
    mapped = np.lib.format.open_memmap(os.path.join(folder, "rerank.npy"), "w+", np.float16, vectors.shape)
    mapped[:] = vectors
    mapped.flush()
    return np.load(mapped.filename, mmap_mode="r")


def _at_breadths(index, settings: RetrievalSettings):
    """(label, index) for an approximate index at several query breadths around the setting, sharing the
    built faiss index; an exact index or a two-stage variant as it is."""
    if isinstance(index.index, faiss.IndexHNSW):
        key, label = "hnsw_search_breadth", "efSearch"
    elif isinstance(index.index, faiss.IndexBinaryIVF) and getattr(index, "vectors", None) is None:
        key, label = "ivf_probes", "nprobe"
    else:
        yield "", index
        return
    for value in sorted({getattr(settings, key) * factor for factor in (0.25, 0.5, 1, 2, 4)} - {0}):
        view = replace(settings, **{key: int(value)})
        yield f" ({label} {int(value)})", type(index)(settings=view, index=index.index)


def bench_search(sizes=(1_000_000,), dim: int = 1280, queries: int = 100, k: int = 10, code_name: str = "itq256",
                 settings: RetrievalSettings = RetrievalSettings(), seed: int = 0, log=print) -> list[dict]:
    """Exact float, approximate float (HNSW), exact binary, approximate binary (IVF), the approximate ones at
    several query breadths, and two-stage search (IVF candidates re-ranked with float vectors in RAM, in RAM
    as float16, or memory-mapped float16), per catalogue size; float variants only where the vectors fit in memory."""
    log(f"{dim}-d structured synthetic embeddings (families of ~{FAMILY_SIZE} in a {LATENT_DIM}-d latent space); code "
        f"{code_name} fitted on {CODE_TRAIN_ROWS:,} others; {queries} queries (new galleries of the same families), "
        f"top {k}; latency: one query at a time on one core. HNSW {settings.hnsw_links} links, efConstruction "
        f"{settings.hnsw_build_breadth}; IVF up to {settings.ivf_lists} lists; two-stage: IVF nprobe "
        f"{settings.ivf_probes}, the top {settings.rerank} re-ranked")
    return [_bench_size(n, dim, queries, k, code_name, settings, seed, log) for n in sizes]


def _bench_size(n: int, dim: int, queries: int, k: int, code_name: str, settings: RetrievalSettings, seed: int,
                log) -> dict:
    exact, approximate = replace(settings, approximate_above=2**62), replace(settings, approximate_above=0)
    start, families = time.perf_counter(), max(1, n // FAMILY_SIZE)
    code = fit_code(structured_vectors(CODE_TRAIN_ROWS, dim, families, CODE_TRAIN, seed=seed), code_name)
    query_vectors = structured_vectors(queries, dim, families, QUERIES, seed=seed)
    query_codes = code.encode(query_vectors)
    floats_fit = n * dim * 4 * FLOAT_MEMORY_FACTOR < _available_bytes()
    vectors = structured_vectors(n, dim, families, CATALOGUE, seed=seed) if floats_fit else None
    codes = code.encode(vectors) if floats_fit else _encode_catalogue(code, n, dim, families, seed)
    log(f"{n:,} galleries generated and encoded in {time.perf_counter() - start:.0f} s" + (
        "" if floats_fit else f"; their float vectors ({n * dim * 4 / 2**30:.0f} GiB) do not fit in the "
                              f"{_available_bytes() / 2**30:.0f} GiB available: codes only"))
    by_vectors = lambda index, q: index.search(query_vectors[q], k)
    by_codes = lambda index, q: index.search(query_codes[q], k)
    two_stage = lambda index, q: index.search(query_codes[q], k, query_vectors[q])
    ivf = lambda: built["approximate binary"].index
    variants = [("exact float", "float", lambda: FloatIndex(vectors, exact), by_vectors),
                ("approximate float", "float", lambda: FloatIndex(vectors, approximate), by_vectors)] if floats_fit else []
    variants += [("exact binary", "binary", lambda: CodeIndex(codes, exact), by_codes),
                 ("approximate binary", "binary", lambda: CodeIndex(codes, approximate), by_codes)]
    if floats_fit:
        variants += [(f"two-stage, {where}", "two-stage",
                      lambda store=store: CodeIndex(settings=approximate, index=ivf(), vectors=store()), two_stage)
                     for where, store in (("float32 in RAM", lambda: vectors),
                                          ("float16 in RAM", lambda: vectors.astype(np.float16)),
                                          ("float16 mapped", lambda: _memory_mapped_float16(vectors, folder)))]
    built, rows = {}, {}
    with tempfile.TemporaryDirectory() as folder:
        for name, kind, build, search in variants:
            built[name], build_s, rss = _timed_build(build)
            rerank_store = getattr(built[name], "vectors", None)
            for label, index in _at_breadths(built[name], settings):
                found, seconds = _latency(search, index, queries)
                rows[name + label] = {"kind": kind, "build_s": build_s, "index_bytes": _saved_bytes(index.index),
                                      "rerank_bytes": 0 if rerank_store is None else rerank_store.nbytes,
                                      "rss_growth_bytes": rss, "p50_ms": 1000 * np.median(seconds),
                                      "p99_ms": 1000 * np.percentile(seconds, 99), "found": found}
            if name != "approximate binary":  # the two-stage variants reuse its IVF; the rest go before the next
                del built[name]
    truth = {kind: rows[name]["found"] for name, kind in (("exact binary", "binary"), ("exact float", "float"))
             if name in rows}
    for row in rows.values():
        found = row.pop("found")
        row["recall_vs_exact_float"] = recall_at_k(truth["float"], found) if "float" in truth else None
        row["recall_vs_exact_same_kind"] = None if row["kind"] == "two-stage" else recall_at_k(truth[row["kind"]], found)
    result = {"n": n, "dim": dim, "code": code_name, "variants": rows}
    log(format_table(result))
    return result


def format_table(result: dict) -> str:
    """One line per variant: what it costs and what it finds, with ratios to exact float search."""
    base = result["variants"].get("exact float")
    lines = [(f"{result['n']:,} galleries, {result['dim']}-d, code {result['code']}; recall@10 against exact float "
              "search and against exact search of the same kind; ratios to exact float search:"),
             (f"  {'variant':<36} {'build s':>8} {'index MiB':>10} {'re-rank MiB':>11} {'RSS +MiB':>9} {'p50 ms':>8} "
              f"{'p99 ms':>8} {'recall float':>12} {'recall same':>11} {'x smaller':>9} {'x faster':>8}")]
    for name, v in result["variants"].items():
        recall, same = ("-" if r is None else f"{r:.3f}" for r in (v["recall_vs_exact_float"], v["recall_vs_exact_same_kind"]))
        smaller, faster = (f"{base['index_bytes'] / v['index_bytes']:.0f}", f"{base['p50_ms'] / v['p50_ms']:.0f}") if base else ("-", "-")
        lines.append(f"  {name:<36} {v['build_s']:>8.1f} {v['index_bytes'] / 2**20:>10.1f} {v['rerank_bytes'] / 2**20:>11.0f} "
                     f"{v['rss_growth_bytes'] / 2**20:>9.0f} {v['p50_ms']:>8.3f} {v['p99_ms']:>8.3f} {recall:>12} {same:>11} "
                     f"{smaller:>9} {faster:>8}")
    return "\n".join(lines)
