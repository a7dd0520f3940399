"""Nearest-neighbour indexes over gallery embeddings: float (cosine) and binary (Hamming on sign bits).

faiss does the indexing: exact inner product on L2-normalised float vectors, exact Hamming on the
packed sign bits (the Pinterest-style binarized embedding: d/8 bytes per gallery instead of 4d).
"""
from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from gallery.retrieval.embeddings import pack_sign_bits


def normalize(x: np.ndarray) -> np.ndarray:
    """Unit length rows, so inner product is cosine similarity."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@dataclass
class Hits:
    rows: np.ndarray    # (q, k) database rows, best first
    scores: np.ndarray  # (q, k) cosine similarity (float) or Hamming distance in bits (binary)


class FloatIndex:
    """Exact cosine similarity."""

    def __init__(self, embeddings: np.ndarray | None = None, dim: int | None = None):
        self.index = faiss.IndexFlatIP(dim or embeddings.shape[1])
        if embeddings is not None:
            self.add(embeddings)

    def add(self, embeddings: np.ndarray) -> None:
        self.index.add(normalize(embeddings))

    def search(self, queries: np.ndarray, k: int) -> Hits:
        scores, rows = self.index.search(normalize(np.atleast_2d(queries)), k)
        return Hits(rows, scores)

    def storage_bytes(self) -> int:
        """Bytes of vectors the index holds (faiss's own code storage)."""
        return self.index.codes.size()


class BinaryIndex:
    """Exact Hamming distance on sign bits: bit = value > 0, packed most significant bit first."""

    def __init__(self, embeddings: np.ndarray | None = None, dim: int | None = None):
        self.index = faiss.IndexBinaryFlat(8 * -(-(dim or embeddings.shape[1]) // 8))
        if embeddings is not None:
            self.add(embeddings)

    def add(self, embeddings: np.ndarray) -> None:
        self.index.add(pack_sign_bits(embeddings))

    def search(self, queries: np.ndarray, k: int) -> Hits:
        distances, rows = self.index.search(pack_sign_bits(np.atleast_2d(queries)), k)
        return Hits(rows, distances)

    def storage_bytes(self) -> int:
        return self.index.xb.size()


def without_self(hits: Hits, query_rows: np.ndarray, k: int) -> np.ndarray:
    """The first k result rows of each query that are not the query itself."""
    out = np.empty((len(query_rows), k), dtype=np.int64)
    for i, (row, results) in enumerate(zip(query_rows, hits.rows)):
        out[i] = [r for r in results if r != row][:k]
    return out


def neighbours(embeddings: np.ndarray, query_rows: np.ndarray, k: int, binary: bool) -> np.ndarray:
    index = BinaryIndex(embeddings) if binary else FloatIndex(embeddings)
    return without_self(index.search(embeddings[query_rows], k + 1), query_rows, k)
