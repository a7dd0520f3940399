"""Does the embedding retrieve what is relevant? Recall@k and reciprocal rank against a ground truth of
relevance (Pinterest, KDD 2019, judged its embeddings by what they retrieve, not only by probes).

Relevance comes from an identity column (galleries of one group are relevant to each other) or a table
of pairs. Each query gallery (the evaluation takes valid and test galleries with something relevant)
ranks every other gallery of the catalogue, all splits: by cosine on the float vectors, or as the binary
code searches (the `rerank` nearest by Hamming distance ordered by cosine, then the rest by Hamming).
The reciprocal rank is that of the first relevant gallery in the full ranking, however deep, so it needs
every candidate's score: plain numpy over all galleries, not faiss, whose top-k search stops at k.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from gallery.evaluation.statistics import Effect, paired_difference
from gallery.retrieval.codes import BinaryCode
from gallery.retrieval.index import normalize

BLOCK_CELLS = 1 << 22  # query x gallery scores held at once (~32 MB per float64 array): memory O(block x N)
POPCOUNT = np.array([bin(byte).count("1") for byte in range(256)], np.int32)  # set bits of each byte value


def relevant_sets(size: int, groups: Sequence | np.ndarray | None = None,
                  pairs: tuple[np.ndarray, np.ndarray] | None = None) -> list[np.ndarray]:
    """Each of `size` galleries' relevant rows (sorted, never itself), from either source or both (union).
    `groups`: a group per row, None/NaN/"" for none; rows of one group are relevant to each other.
    `pairs`: two arrays of row indices, each end relevant to the other (a self-pair adds nothing, a repeated
    pair counts once). A gallery with nothing relevant is no query (see `queries`)."""
    parts: list[list[np.ndarray]] = [[np.empty(0, np.int64)] for _ in range(size)]
    if groups is not None:
        if len(groups) != size:
            raise ValueError(f"{len(groups)} groups for {size} galleries")
        for members in _group_members(groups):
            for row in members:
                parts[row].append(members)
    if pairs is not None:
        for row, linked in enumerate(_pair_ends(*pairs, size)):
            parts[row].append(linked)
    relevant = [np.unique(np.concatenate(p)) for p in parts]
    return [rows[rows != row] for row, rows in enumerate(relevant)]


def _group_members(groups: Sequence | np.ndarray) -> list[np.ndarray]:
    """The rows of each group with more than one member (None, NaN and "" are no group)."""
    values = pd.Series(list(groups), dtype=object)
    known = ~(values.isna() | (values == "")).to_numpy()
    codes, _ = pd.factorize(values[known])
    rows = np.flatnonzero(known)[np.argsort(codes, kind="stable")]
    members = np.split(rows, np.cumsum(np.bincount(codes))[:-1]) if len(codes) else []
    return [m for m in members if len(m) > 1]


def _pair_ends(a: np.ndarray, b: np.ndarray, size: int) -> list[np.ndarray]:
    """Per row, the rows paired with it (either way round; repeats and itself left for the caller to drop)."""
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"pairs must be two 1-d arrays of the same length, not {a.shape} and {b.shape}")
    if len(a) and (min(a.min(), b.min()) < 0 or max(a.max(), b.max()) >= size):
        raise ValueError(f"pairs name rows outside 0..{size - 1}")
    ends, others = np.concatenate([a, b]), np.concatenate([b, a])
    return np.split(others[np.argsort(ends, kind="stable")], np.cumsum(np.bincount(ends, minlength=size))[:-1])


def queries(relevant: list[np.ndarray], eligible: np.ndarray) -> np.ndarray:
    """The rows that query: eligible (a boolean mask per row, e.g. valid and test) with something relevant."""
    has_relevant = np.array([len(r) > 0 for r in relevant], bool)
    return np.flatnonzero(np.asarray(eligible, bool) & has_relevant)


@dataclass(frozen=True)
class RankingScores:
    """Per-query scores of one ranking, kept per query so two rankings of the same queries pair up."""

    query_rows: np.ndarray            # (Q,) the queries' rows
    recall: dict[int, np.ndarray]     # k -> (Q,) share of each query's relevant galleries in its top k
    reciprocal_rank: np.ndarray       # (Q,) 1 / rank of its first relevant gallery in the full ranking

    @property
    def metrics(self) -> list[str]:
        return [f"recall@{k}" for k in self.recall] + ["mrr"]

    def values(self, metric: str) -> np.ndarray:
        """The per-query values of "recall@<k>" or "mrr" (reciprocal ranks, whose mean is the MRR)."""
        named = {**{f"recall@{k}": values for k, values in self.recall.items()}, "mrr": self.reciprocal_rank}
        if metric in named:   # names made from the k's, looked up: never read back into a k
            return named[metric]
        raise ValueError(f"no metric {metric!r} here: one of {', '.join(self.metrics)}")


def ranking_scores(vectors: np.ndarray, query_rows: np.ndarray, relevant: list[np.ndarray],
                   ks: tuple[int, ...] = (1, 10, 100), code: BinaryCode | None = None,
                   rerank: int = 50) -> RankingScores:
    """Recall@k and reciprocal rank of each query row, which ranks every other row of `vectors`
    (`relevant`: per row, as relevant_sets gives). Without `code`: by decreasing cosine. With it: the
    `rerank` nearest by Hamming distance of the code's bits ordered by cosine, then all the others by
    Hamming distance. Ties go to the lower row, so the ranking is exact and the same on every machine.

    Time O(Q·N·d) for the cosines (plus O(Q·N·bytes) Hamming distances and an O(Q·N·log N) sort), memory
    O(block·N): queries are ranked `BLOCK_CELLS // N` at a time."""
    query_rows = np.asarray(query_rows, np.int64)
    ks = tuple(dict.fromkeys(int(k) for k in ks))
    if any(k < 1 for k in ks):
        raise ValueError(f"recall@k needs k >= 1, not {ks}")
    for row in query_rows:
        if not len(relevant[row]) or (relevant[row] == row).any():
            raise ValueError(f"row {row} cannot query: a query needs relevant rows other than itself")
    unit = normalize(vectors, np.float64)
    n = len(unit)
    codes = None if code is None else code.encode(vectors)
    ranks = []  # per query: the 0-based ranks of its relevant rows
    block = max(1, BLOCK_CELLS // n)
    for start in range(0, len(query_rows), block):
        rows = query_rows[start:start + block]
        local = np.arange(len(rows))
        cosine = unit[rows] @ unit.T
        cosine[local, rows] = -np.inf  # the query itself ranks last, behind every other gallery
        if codes is None:
            order = np.argsort(-cosine, axis=1, kind="stable")
        else:
            distance = _hamming(codes[rows], codes)
            distance[local, rows] = code.bits + 1
            order = _code_order(distance, cosine, min(rerank, n - 1))
        position = np.empty_like(order)
        position[local[:, None], order] = np.arange(n)
        ranks.extend(position[i, relevant[row]] for i, row in enumerate(rows))
    return RankingScores(query_rows, {k: np.array([np.mean(r < k) for r in ranks], float) for k in ks},
                         np.array([1 / (r.min() + 1) for r in ranks], float))


def _hamming(query_codes: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """(q, N) Hamming distances between packed codes, a byte at a time (memory q x N)."""
    distance = np.zeros((len(query_codes), len(codes)), np.int32)
    for byte in range(codes.shape[1]):
        distance += POPCOUNT[query_codes[:, byte, None] ^ codes[None, :, byte]]
    return distance


def _code_order(distance: np.ndarray, cosine: np.ndarray, rerank: int) -> np.ndarray:
    """Two-stage search's full ranking: the `rerank` first by (Hamming, row) re-ordered by (cosine, row),
    then the rest by (Hamming, row)."""
    by_code = np.argsort(distance, axis=1, kind="stable")
    head = np.sort(by_code[:, :rerank], axis=1)  # by row, so that the stable sort breaks cosine ties by row
    head = np.take_along_axis(head, np.argsort(-np.take_along_axis(cosine, head, 1), axis=1, kind="stable"), 1)
    return np.concatenate([head, by_code[:, rerank:]], axis=1)


def compare_rankings(a: RankingScores, b: RankingScores, metric: str, seed: int = 0) -> Effect:
    """mean(a) - mean(b) of `metric` over the same queries, with a paired bootstrap interval over queries."""
    if not np.array_equal(a.query_rows, b.query_rows):
        raise ValueError("compare_rankings pairs queries: both rankings must score the same query rows")
    return paired_difference(a.values(metric), b.values(metric), seed)


def summary(scores: RankingScores) -> dict[str, float]:
    """The mean over queries of each metric ("recall@10", "mrr", ...); NaN without queries."""
    return {m: float(scores.values(m).mean()) if len(scores.query_rows) else math.nan for m in scores.metrics}
