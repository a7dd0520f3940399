"""Neighbour stability between two embeddings of the same galleries: how much of each gallery's top k
a user sees changes when model B replaces model A.

Both sides search the same galleries (the intersection, in one order), exactly: cosine over unit
vectors with a flat inner-product index, k+1 results so the gallery itself can be dropped. Every gallery
queries by default (the compare view shows any gallery's neighbours): time O(n² d) in faiss's blocked
matrix products on every core, memory O(n k) (faiss streams the queries, `QUERY_BLOCK` at a time here),
never an n×n matrix: 2,000 galleries of 1,280-d took 0.2 s on 2 cores; 500k would take about
n² d = 3.2e14 multiply-adds per side, hours on 2 cores. `queries` (a stable sample,
gallery.evaluation.relevance.sample_rows, capped by `evaluation.retrieval_queries`) brings it to
O(q n d): linear in the catalogue.
"""
from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from gallery.retrieval.index import normalize

K = 10  # the top-k compared: the neighbours a results page shows
QUERY_BLOCK = 65_536  # queries searched at once: their results, O(block k), are what a search holds


def top_k(vectors: np.ndarray, k: int = K, queries: np.ndarray | None = None) -> np.ndarray:
    """(q, k) rows of each query row's k nearest other galleries by cosine, best first (exact; ties by row;
    -1 where fewer exist); `queries`: rows of `vectors` (default: every row, in order).
    Time O(q·n·d), memory O(n·d + q·k)."""
    unit = normalize(vectors)
    queries = np.arange(len(unit)) if queries is None else np.asarray(queries, np.int64)
    out = np.full((len(queries), k), -1, np.int64)
    if not len(queries):
        return out
    index = faiss.IndexFlatIP(unit.shape[1])
    index.add(unit)
    for start in range(0, len(queries), QUERY_BLOCK):
        block = queries[start:start + QUERY_BLOCK]
        _, rows = index.search(unit[block], min(k + 1, len(unit)))
        for i, (query, found) in enumerate(zip(block, rows)):
            kept = found[(found != query) & (found >= 0)][:k]
            out[start + i, :len(kept)] = kept
    return out


@dataclass(frozen=True)
class NeighbourChange:
    """The top k of the query galleries (rows of the shared order; every gallery unless sampled) under A and
    under B, and their overlap, row i of each array being query `queries[i]`'s."""

    a: np.ndarray        # (q, k) rows
    b: np.ndarray        # (q, k) rows
    overlap: np.ndarray  # (q,) share of A's top k that is in B's top k, in [0, 1]
    queries: np.ndarray  # (q,) the query rows, ascending (every row: np.arange(n))

    @property
    def k(self) -> int:
        return self.a.shape[1]


def neighbour_change(a: np.ndarray, b: np.ndarray, k: int = K, queries: np.ndarray | None = None) -> NeighbourChange:
    """Top-k neighbours of the same galleries (row i of `a` and of `b` is one gallery) under each
    embedding, and for each query gallery (`queries`: rows, ascending; default every gallery) |top_k(A) ∩
    top_k(B)| / k (1: the same neighbours, in any order). Time O(q·n·d), memory O(n·d + q·k)."""
    if len(a) != len(b):
        raise ValueError(f"both embeddings must hold the same galleries in one order ({len(a)} and {len(b)} rows)")
    k = min(k, len(a) - 1)
    if k < 1:
        raise ValueError("neighbour stability needs at least two galleries in common")
    queries = np.arange(len(a)) if queries is None else np.asarray(queries, np.int64)
    rows_a, rows_b = top_k(a, k, queries), top_k(b, k, queries)
    overlap = np.array([len(set(x) & set(y)) for x, y in zip(rows_a.tolist(), rows_b.tolist())], np.float64) / k
    return NeighbourChange(rows_a, rows_b, overlap, queries)
