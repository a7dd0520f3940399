"""How good are the neighbours? Binary against float search, and attribute agreement of top-k lists."""
from __future__ import annotations

import numpy as np

from gallery.data.ingest import Catalogue
from gallery.evaluation.projection import agreement_attributes
from gallery.retrieval.embeddings import read_embeddings
from gallery.retrieval.index import BinaryIndex, FloatIndex, neighbours, without_self


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


def binary_vs_float(catalogue: Catalogue, ids: list[str], embeddings: np.ndarray, imagenet_location: str,
                    k: int = 10) -> dict | None:
    """Recall@k of Hamming search on sign bits against float search, and attribute agreement of the
    top-k neighbours (float MTL, binary MTL, float ImageNet transfer), valid galleries as queries."""
    frame = catalogue.frame.set_index("gallery_id").loc[ids]
    queries = np.flatnonzero(frame["split"].to_numpy() == "valid")
    if len(queries) == 0 or len(ids) <= k:
        return None
    imagenet_table, _ = read_embeddings(imagenet_location)
    imagenet = np.stack(imagenet_table["embedding"].to_numpy(zero_copy_only=False))
    assert imagenet_table["gallery_id"].to_pylist() == ids, "ImageNet and MTL embeddings list the same galleries"
    found = {"float": neighbours(embeddings, queries, k, binary=False),
             "binary": neighbours(embeddings, queries, k, binary=True),
             "imagenet_float": neighbours(imagenet, queries, k, binary=False)}
    agreement = {t.name: {kind: attribute_agreement(rows, frame[t.name].to_numpy(), queries) for kind, rows in found.items()}
                 for t in agreement_attributes(catalogue)}
    return {"k": k, "queries": len(queries), "recall_binary_vs_float": recall_at_k(embeddings, queries, k),
            "attribute_agreement": agreement}
