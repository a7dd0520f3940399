"""How good are the neighbours? Binary codes against float search, and attribute agreement of top-k lists.

The yardstick is exact float (cosine) search; every code is searched exactly too (flat Hamming), so
the numbers measure the code, not an approximate index. Test galleries are the queries (codes are
fitted on train), at most `evaluation.retrieval_queries` of them (a stable sample beyond: exact search of
all is quadratic), so every search here is O(min(Q, cap)·N·d): linear in the catalogue.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from gallery.config import RetrievalSettings
from gallery.data.ingest import Catalogue
from gallery.evaluation.projection import agreement_attributes
from gallery.evaluation.relevance import QUERIES, sample_rows
from gallery.retrieval.codes import BinaryCode, CodeError, fit_code
from gallery.retrieval.embeddings import embedding_matrix, read_embeddings
from gallery.retrieval.index import CodeIndex, FloatIndex, normalize, without_self

def recall_at_k(exact: np.ndarray, found: np.ndarray) -> float:
    """Mean share of each query's exact top-k rows that `found` (same shape) also returns. Time O(Q·k)."""
    k = exact.shape[1]
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(exact, found)]))


def attribute_agreement(neighbours: np.ndarray, labels: np.ndarray, query_rows: np.ndarray) -> float:
    """Mean share of a query's neighbours with the query's label (labelled queries and neighbours only).
    Time O(Q·k)."""
    shares = []
    for row, found in zip(query_rows, neighbours):
        if labels[row] < 0:
            continue
        known = labels[found][labels[found] >= 0]
        if len(known):
            shares.append(float(np.mean(known == labels[row])))
    return float(np.mean(shares)) if shares else float("nan")


def float_neighbours(embeddings: np.ndarray, query_rows: np.ndarray, k: int) -> np.ndarray:
    """Each query's top k other galleries by exact cosine (a flat faiss index). Time O(Q·N·d), memory
    O(N·d + Q·k)."""
    index = FloatIndex(embeddings, RetrievalSettings(approximate_above=len(embeddings)))
    return without_self(index.search(embeddings[query_rows], k + 1), query_rows, k)


def code_neighbours(codes: np.ndarray, unit_vectors: np.ndarray | None, query_rows: np.ndarray, k: int,
                    rerank: int) -> np.ndarray:
    """Each query's top k other galleries by exact Hamming distance, or with `unit_vectors` its top `rerank`
    by Hamming re-ordered by cosine (two-stage search). The query's own row is asked for one more place.
    Time O(Q·N·bytes + Q·rerank·d), memory O(N·bytes + Q·(k + rerank))."""
    settings = RetrievalSettings(rerank=rerank + 1, approximate_above=len(codes))
    index = CodeIndex(codes, settings, vectors=unit_vectors)
    queries = None if unit_vectors is None else unit_vectors[query_rows]
    return without_self(index.search(codes[query_rows], k + 1, queries), query_rows, k)


SEARCHES = ("hamming", "two_stage")


@dataclass
class CodeCurveRow:
    """One code: its size, recall@k against exact float search and the neighbours' attribute agreement,
    for pure Hamming and two-stage search; or why it could not be fitted here."""

    code: str
    bits: int = 0
    bytes_per_gallery: int = 0
    run_code: bool = False
    recall: dict[str, float] = field(default_factory=dict)                 # search -> recall@k
    agreement: dict[str, dict[str, float]] = field(default_factory=dict)   # attribute -> search -> share
    skipped: str = ""


def code_curve(embeddings: np.ndarray, train_rows: np.ndarray, query_rows: np.ndarray, exact: np.ndarray,
               labels: dict[str, np.ndarray], names, run_code: BinaryCode, rerank: int) -> list[CodeCurveRow]:
    """Recall@k against exact float search and attribute agreement, for pure Hamming and two-stage search,
    per code (fitted on the train rows; the run's own code as exported). A code that cannot be fitted
    here (more bits than train galleries) is listed with the reason. Time per code O(train·d²) to fit,
    O(N·d·bits) to encode, O(Q·N·bytes + Q·rerank·d) to search; memory O(N·(d + bytes))."""
    k, unit = exact.shape[1], normalize(embeddings)
    rows = []
    for name in names:
        try:
            code = run_code if name == run_code.name else fit_code(embeddings[train_rows], name)
        except CodeError as e:
            rows.append(CodeCurveRow(name, skipped=str(e)))
            continue
        codes = code.encode(embeddings)
        found = {"hamming": code_neighbours(codes, None, query_rows, k, 0),
                 "two_stage": code_neighbours(codes, unit, query_rows, k, rerank)}
        rows.append(CodeCurveRow(name, code.bits, code.bytes_per_gallery, code is run_code,
                                 {kind: recall_at_k(exact, f) for kind, f in found.items()},
                                 {attr: {kind: attribute_agreement(f, values, query_rows) for kind, f in found.items()}
                                  for attr, values in labels.items()}))
    return rows


@dataclass
class BinaryVsFloat:
    """The run's binary code against float search on the test galleries, and the curve over codes."""

    k: int
    queries: int
    code: str
    code_bits: int
    code_bytes: int
    float_bytes: int
    rerank: int
    recall_two_stage: float
    recall_hamming: float
    agreement: dict[str, dict[str, float]]   # attribute -> float / binary / imagenet_float -> share
    curve: list[CodeCurveRow]
    split: str = "test"


def binary_vs_float(catalogue: Catalogue, ids: list[str], embeddings: np.ndarray, imagenet_location: str,
                    run_code: BinaryCode, settings: RetrievalSettings, k: int = 10,
                    max_queries: int | None = QUERIES) -> BinaryVsFloat | None:
    """Recall@k of the run's two-stage code search against float search, attribute agreement of the top-k
    neighbours (float MTL, code MTL, float ImageNet transfer), and the recall/size curve over
    `settings.curve_codes`; test galleries as queries, at most `max_queries` (`evaluation.retrieval_queries`:
    a stable sample beyond, `sample_rows`). Time O(codes·min(Q, max_queries)·N·d), memory O(N·d)."""
    frame = catalogue.frame.set_index("gallery_id").loc[ids]
    split = frame["split"].to_numpy()
    queries = sample_rows(np.flatnonzero(split == "test"), ids, max_queries)
    if len(queries) == 0 or len(ids) <= k:
        return None
    imagenet_table, _ = read_embeddings(imagenet_location)
    if imagenet_table["gallery_id"].to_pylist() != ids:
        raise ValueError("the ImageNet and MTL embeddings must list the same galleries in the same order")
    labels = {t.name: frame[t.name].to_numpy() for t in agreement_attributes(catalogue)}
    exact = float_neighbours(embeddings, queries, k)
    curve = code_curve(embeddings, np.flatnonzero(split == "train"), queries, exact, labels,
                       dict.fromkeys([*settings.curve_codes, run_code.name]), run_code, settings.rerank)
    ours = next(row for row in curve if row.run_code)
    imagenet = float_neighbours(embedding_matrix(imagenet_table), queries, k)
    agreement = {attr: {"float": attribute_agreement(exact, values, queries),
                        "binary": ours.agreement[attr]["two_stage"],
                        "imagenet_float": attribute_agreement(imagenet, values, queries)}
                 for attr, values in labels.items()}
    return BinaryVsFloat(k, len(queries), run_code.name, run_code.bits, run_code.bytes_per_gallery,
                         4 * embeddings.shape[1], settings.rerank, ours.recall["two_stage"], ours.recall["hamming"],
                         agreement, curve)
