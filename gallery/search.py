"""Nearest-gallery search over exported embeddings: float (cosine) or binary (Hamming on sign bits).

faiss does the indexing: exact inner product on L2-normalised float vectors, exact Hamming on the
packed sign bits (the Pinterest-style binarized embedding: d/8 bytes per gallery instead of 4d).
"""
from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from gallery import storage
from gallery.embed import embed_images, pack_sign_bits, read_embeddings
from gallery.errors import UserError
from gallery.images import ImageProblem, load_image


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


def recall_at_k(embeddings: np.ndarray, query_rows: np.ndarray, k: int = 10) -> float:
    """Share of float search's top-k (cosine) that binary search (Hamming) also returns in its top-k."""
    queries = embeddings[query_rows]
    exact = without_self(FloatIndex(embeddings).search(queries, k + 1), query_rows, k)
    binary = without_self(BinaryIndex(embeddings).search(queries, k + 1), query_rows, k)
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(exact, binary)]))


def attribute_agreement(neighbours: np.ndarray, labels: np.ndarray, query_rows: np.ndarray) -> float:
    """Mean share of a query's neighbours with the query's label (labelled queries and neighbours only)."""
    shares = []
    for row, found in zip(query_rows, neighbours):
        if labels[row] < 0:
            continue
        known = labels[found][labels[found] >= 0]
        if len(known):
            shares.append(float(np.mean(known == labels[row])))
    return float(np.mean(shares)) if shares else float("nan")


def neighbours(embeddings: np.ndarray, query_rows: np.ndarray, k: int, binary: bool) -> np.ndarray:
    index = BinaryIndex(embeddings) if binary else FloatIndex(embeddings)
    return without_self(index.search(embeddings[query_rows], k + 1), query_rows, k)


class SearchError(UserError):
    """A search that cannot run as asked; the message names the input and the fix."""


def search_embeddings(embeddings_location: str, k: int = 10, binary: bool = False, images=None,
                      gallery_id: str | None = None, run: str | None = None) -> list[tuple[str, float]]:
    """Top-k galleries of an embeddings file for seed images (embedded by a training run's model)
    or for one of its galleries. `run` defaults to the run that made the file."""
    if not storage.exists(embeddings_location):
        raise SearchError(f"embeddings file {embeddings_location} does not exist")
    table, meta = read_embeddings(embeddings_location)
    ids = table["gallery_id"].to_pylist()
    embeddings = np.stack(table["embedding"].to_numpy(zero_copy_only=False)).astype(np.float32)
    if (images is None) == (gallery_id is None):
        raise SearchError("give seed images (--images) or an existing gallery (--gallery-id), not both")
    if gallery_id is not None:
        if gallery_id not in ids:
            raise SearchError(f"gallery {gallery_id!r} is not in {embeddings_location} ({len(ids)} galleries)")
        query = embeddings[ids.index(gallery_id)]
    else:
        from gallery.runs import trained_run  # the Metaflow adapter; it imports pipeline, which imports this module

        model_run = trained_run(run or meta.get("run_id", "latest"))
        model = model_run.model()
        if int(meta.get("dimension", embeddings.shape[1])) != model.encoder.dim:
            raise SearchError(f"{embeddings_location} holds {meta.get('dimension')}-d embeddings "
                              f"({meta.get('backbone')}), but run {model_run.run_id}'s model makes {model.encoder.dim}-d "
                              f"ones ({model_run.settings.model.backbone}): search with the run that made the file "
                              f"(--run {meta.get('run_id')}) or embed the catalogue with flows/embed_flow.py")
        if meta.get("run_id") not in (None, model_run.run_id):
            raise SearchError(f"{embeddings_location} was made by run {meta['run_id']}, the seeds would be embedded by "
                              f"run {model_run.run_id}: two models, two spaces. Pass --run {meta['run_id']}, or embed "
                              f"the catalogue with run {model_run.run_id} (flows/embed_flow.py --train-run {model_run.run_id})")
        pictures = []
        for path in images:
            try:
                pictures.append(load_image(path, model_run.settings.model.image_size))
            except ImageProblem as e:
                raise SearchError(f"seed image {path}: {e}; pass readable JPEG/PNG/WEBP/GIF files") from None
        query = embed_images(model.encoder, pictures)
    index = BinaryIndex(embeddings) if binary else FloatIndex(embeddings)
    hits = index.search(query[None], min(k, len(ids)))
    return [(ids[r], float(s)) for r, s in zip(hits.rows[0], hits.scores[0]) if r >= 0]
