"""Nearest-neighbour indexes over gallery embeddings (faiss): cosine on float vectors, Hamming on binary codes.

Chosen by size: exact (flat) indexes up to `RetrievalSettings.approximate_above` galleries; above it
HNSW for float vectors and an inverted file (IVF) for codes, whose query breadth (efSearch, nprobe)
trades recall for speed. Codes search in two stages: Hamming distance finds `rerank` candidates,
exact cosine on the float vectors orders them.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import faiss
import numpy as np

from gallery.config import RetrievalSettings

IVF_TRAIN_PER_LIST = 64  # codes per list to train the IVF's centroids on (faiss warns below 39)
BLOCK_ROWS = 65_536      # rows normalised or encoded at once: bounds working memory on large catalogues


def normalize(x: np.ndarray, dtype=np.float32) -> np.ndarray:
    """Unit length rows, so inner product is cosine similarity."""
    x = np.asarray(x, dtype=dtype)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@contextmanager
def one_faiss_thread():
    """faiss on one thread. Its OpenMP threads spin while they wait: on two cores shared with other work,
    fitting ITQ took 60 s with two threads and 3 s with one (measured); and ITQ fitted with two threads is
    another rotation than with one, so one thread makes the fit the same on every machine. Also how query
    latency is measured: one query per core."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(threads)


@dataclass
class Hits:
    rows: np.ndarray    # (q, k) database rows, best first; -1 where fewer were found
    scores: np.ndarray  # (q, k) cosine similarity, or Hamming distance in bits (pure code search)


def float_index(dim: int, rows: int, settings: RetrievalSettings) -> faiss.Index:
    """An empty index for `rows` unit vectors: exact inner product, or HNSW above the size threshold."""
    if rows <= settings.approximate_above:
        return faiss.IndexFlatIP(dim)
    index = faiss.IndexHNSWFlat(dim, settings.hnsw_links, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = settings.hnsw_build_breadth
    return index


def code_index(codes: np.ndarray, settings: RetrievalSettings) -> faiss.IndexBinary:
    """An index holding packed `codes`: exact Hamming, or above the size threshold an IVF whose lists
    are centroids trained on a sample of the codes."""
    bits = codes.shape[1] * 8
    if len(codes) <= settings.approximate_above:
        index = faiss.IndexBinaryFlat(bits)
    else:
        lists = max(1, min(settings.ivf_lists, len(codes) // IVF_TRAIN_PER_LIST))
        index = faiss.IndexBinaryIVF(faiss.IndexBinaryFlat(bits), bits, lists)
        sample = np.random.default_rng(0).choice(len(codes), min(len(codes), lists * IVF_TRAIN_PER_LIST), replace=False)
        index.train(codes[np.sort(sample)])
    index.add(codes)
    return index


def set_query_breadth(index, settings: RetrievalSettings):
    """The query-time knobs, which a saved index does not keep: HNSW efSearch, IVF nprobe."""
    if isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = settings.hnsw_search_breadth
    elif isinstance(index, faiss.IndexBinaryIVF):
        index.nprobe = settings.ivf_probes
    return index


class FloatIndex:
    """Cosine similarity on float vectors: exact, or HNSW for more than `settings.approximate_above` of them."""

    def __init__(self, embeddings: np.ndarray | None = None, settings: RetrievalSettings = RetrievalSettings(),
                 index: faiss.Index | None = None):
        if index is None:
            index = float_index(embeddings.shape[1], len(embeddings), settings)
            for start in range(0, len(embeddings), BLOCK_ROWS):
                index.add(normalize(embeddings[start:start + BLOCK_ROWS]))
        self.index = set_query_breadth(index, settings)

    def vector(self, row: int) -> np.ndarray:
        """The unit vector stored at a row (the query for "galleries like this one")."""
        return self.index.reconstruct(int(row))

    def search(self, queries: np.ndarray, k: int) -> Hits:
        scores, rows = self.index.search(normalize(np.atleast_2d(queries)), k)
        return Hits(rows, scores)


class CodeIndex:
    """Hamming distance on packed binary codes. Given `vectors` (unit float rows, in RAM as float32 or
    float16, or a memory-mapped file) and `settings.rerank` > 0, a search re-orders the top `rerank`
    code candidates by exact cosine: two-stage search."""

    def __init__(self, codes: np.ndarray | None = None, settings: RetrievalSettings = RetrievalSettings(),
                 index: faiss.IndexBinary | None = None, vectors=None):
        self.index = set_query_breadth(index if index is not None else code_index(codes, settings), settings)
        self.vectors, self.rerank_depth = vectors, settings.rerank if vectors is not None else 0

    def search(self, query_codes: np.ndarray, k: int, query_vectors: np.ndarray | None = None) -> Hits:
        """Top k by Hamming distance, or, with query vectors and re-ranking on, by cosine among the top `rerank`."""
        if not self.rerank_depth or query_vectors is None:
            distances, rows = self.index.search(np.atleast_2d(query_codes), k)
            return Hits(rows, distances)
        _, candidates = self.index.search(np.atleast_2d(query_codes), max(k, self.rerank_depth))
        return rerank(candidates, self.vectors, normalize(np.atleast_2d(query_vectors)), k)


def rerank(candidates: np.ndarray, vectors, queries: np.ndarray, k: int) -> Hits:
    """Each query's candidate rows ordered by cosine with its unit vector (rows read in ascending order,
    which a memory-mapped file serves best)."""
    rows = np.full((len(queries), k), -1, np.int64)
    scores = np.full((len(queries), k), -np.inf, np.float32)
    for i, (found, query) in enumerate(zip(candidates, queries)):
        found = np.unique(found[found >= 0])
        similarity = np.asarray(vectors[found], np.float32) @ query
        best = np.argsort(-similarity, kind="stable")[:k]
        rows[i, :len(best)], scores[i, :len(best)] = found[best], similarity[best]
    return Hits(rows, scores)


def without_self(hits: Hits, query_rows: np.ndarray, k: int) -> np.ndarray:
    """The first k result rows of each query that are not the query itself."""
    out = np.empty((len(query_rows), k), dtype=np.int64)
    for i, (row, results) in enumerate(zip(query_rows, hits.rows)):
        out[i] = [r for r in results if r != row][:k]
    return out
