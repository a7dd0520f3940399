"""Does the embedding retrieve what is relevant? Recall@k and reciprocal rank against a ground truth of
relevance (Pinterest, KDD 2019, judged its embeddings by what they retrieve, not only by probes).

Relevance comes from an identity column (galleries of one group are relevant to each other) or a table
of pairs. Each query gallery (the evaluation takes valid and test galleries with something relevant)
ranks every other gallery of the catalogue, all splits: by cosine on the float vectors, or as the binary
code searches (the `rerank` nearest by Hamming distance ordered by cosine, then the rest by Hamming).
The reciprocal rank is that of the first relevant gallery in the full ranking, however deep, so it needs
every candidate's score: plain numpy over all galleries, not faiss, whose top-k search stops at k. No
ranking is sorted whole: a relevant gallery's rank is the number of galleries ranked ahead of it, counted,
and only the first max(k) (or `rerank`) places are sorted. The queries are capped (`sample_rows`,
`evaluation.retrieval_queries`), so the cost is linear in the catalogue: O(min(Q, cap)·N·d).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from gallery.config import EvalSettings
from gallery.data.split import stable_sample
from gallery.evaluation.statistics import Effect, paired_difference
from gallery.retrieval.codes import BinaryCode
from gallery.retrieval.index import normalize

QUERIES = EvalSettings().retrieval_queries  # queries of an exact search over the catalogue (the setting's default)
BLOCK_CELLS = 1 << 22  # query x gallery scores held at once (~32 MB per float64 array): memory O(block x N)
POPCOUNT = np.array([bin(byte).count("1") for byte in range(256)], np.int32)  # set bits of each byte value


def relevant_sets(size: int, groups: Sequence | np.ndarray | None = None,
                  pairs: tuple[np.ndarray, np.ndarray] | None = None) -> list[np.ndarray]:
    """Each of `size` galleries' relevant rows (sorted, never itself), from either source or both (union).
    `groups`: a group per row, None/NaN/"" for none; rows of one group are relevant to each other.
    `pairs`: two arrays of row indices, each end relevant to the other (a self-pair adds nothing, a repeated
    pair counts once). A gallery with nothing relevant is no query (see `queries`).
    Time and memory O(N + pairs + Σ group size²): linear where groups stay small (a listing's few copies)."""
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
    """The rows that query: eligible (a boolean mask per row, e.g. valid and test) with something relevant.
    Time and memory O(N)."""
    has_relevant = np.array([len(r) > 0 for r in relevant], bool)
    return np.flatnonzero(np.asarray(eligible, bool) & has_relevant)


def sample_rows(rows: np.ndarray, gallery_ids: Sequence[str], cap: int | None, purpose: str = "query") -> np.ndarray:
    """At most `cap` of `rows` (positions in `gallery_ids`), in their order: all of them up to `cap`, else
    gallery.data.split.stable_sample's (the lowest hashes of `purpose` and the id). The same galleries on every
    machine, in every run and seed, whatever the catalogue's order, so two runs' queries pair up (`gallery
    compare`); a larger cap keeps them and adds more. The capped query sets of the evaluation (retrieval
    against relevance, binary codes against float search, neighbour stability) are drawn here. Time
    O(len(rows)) hashes, memory O(len(rows))."""
    rows = np.asarray(rows, np.int64)
    if cap is None or len(rows) <= cap:
        return rows
    return rows[stable_sample([gallery_ids[row] for row in rows], cap, purpose)]


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

    No ranking is sorted whole (`_float_ranks`, `_code_ranks`): the first max(ks) places (with a code, at
    least `rerank`) are found by a partition and sorted, and the first relevant gallery's rank, when it
    lies deeper, is counted. Time O(Q·N·d) for the cosines (plus O(Q·N·bytes) Hamming distances) and
    O(Q·N) to rank, memory O(block·N): queries are ranked `BLOCK_CELLS // N` at a time."""
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
    depth, rerank = min(max(ks), n), min(rerank, n - 1)
    recall = {k: np.empty(len(query_rows)) for k in ks}
    reciprocal_rank = np.empty(len(query_rows))
    block = max(1, BLOCK_CELLS // n)
    for start in range(0, len(query_rows), block):
        rows = query_rows[start:start + block]
        local = np.arange(len(rows))
        cosine = unit[rows] @ unit.T
        cosine[local, rows] = -np.inf  # the query itself ranks last, behind every other gallery
        if codes is not None:
            distance = _hamming(codes[rows], codes)
            distance[local, rows] = code.bits + 1
        for i, row in enumerate(rows):
            if codes is None:
                ranks, first = _float_ranks(cosine[i], relevant[row], depth)
            else:
                ranks, first = _code_ranks(distance[i], cosine[i], relevant[row], max(depth, rerank), rerank)
            for k in ks:
                recall[k][start + i] = np.mean(ranks < k)
            reciprocal_rank[start + i] = 1 / (first + 1)
    return RankingScores(query_rows, recall, reciprocal_rank)


def _float_ranks(cosine: np.ndarray, relevant: np.ndarray, depth: int) -> tuple[np.ndarray, int]:
    """One query's ranking by (cosine descending, row): each relevant row's 0-based rank where it is among the
    first `depth`, else `depth` (deeper), and the exact rank of the first relevant row, however deep.
    The galleries at or above the `depth`-th cosine are the first `depth` places (and any ties at the last):
    only they are sorted. Time O(N + depth·log depth + |relevant|), memory O(N)."""
    n = len(cosine)
    threshold = np.partition(cosine, n - depth)[n - depth]  # the depth-th highest cosine
    top = np.flatnonzero(cosine >= threshold)
    top = top[np.lexsort((top, -cosine[top]))][:depth]  # ranks 0 .. depth-1, ties to the lower row
    ranks = _ranks_within(top, relevant)
    if (ranks < depth).any():
        return ranks, int(ranks.min())
    scores = cosine[relevant]
    best = relevant[np.argmax(scores)]  # the highest cosine, the lowest row among equals (relevant is sorted)
    value = cosine[best]
    return ranks, int(np.count_nonzero(cosine > value) + np.count_nonzero(cosine[:best] == value))


def _code_ranks(distance: np.ndarray, cosine: np.ndarray, relevant: np.ndarray, depth: int,
                rerank: int) -> tuple[np.ndarray, int]:
    """One query's two-stage ranking, as search does it: the `rerank` first by (Hamming, row) re-ordered by
    (cosine, row), then the rest by (Hamming, row). Each relevant row's 0-based rank where it is among the
    first `depth` (>= `rerank`), else `depth`; and the first relevant row's exact rank. (Hamming, row) is one
    integer key, distance·N + row, unique, so the first `depth` places are a partition away; a row behind
    them ranks after exactly the rows whose key is smaller. Time O(N + depth·log depth + |relevant|),
    memory O(N)."""
    n = len(distance)
    key = distance.astype(np.int64) * n + np.arange(n)
    top = np.flatnonzero(key <= np.partition(key, depth - 1)[depth - 1])
    top = top[np.argsort(key[top])]
    head = np.sort(top[:rerank])  # by row, so that the stable sort breaks cosine ties by row
    top = np.concatenate([head[np.argsort(-cosine[head], kind="stable")], top[rerank:]])
    ranks = _ranks_within(top, relevant)
    if (ranks < depth).any():
        return ranks, int(ranks.min())
    return ranks, int(np.count_nonzero(key < key[relevant].min()))


def _ranks_within(top: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """Each relevant row's position in `top` (the first places of a ranking, best first), len(top) if absent."""
    order = np.argsort(top)
    at = np.minimum(np.searchsorted(top, relevant, sorter=order), len(top) - 1)
    found = top[order[at]] == relevant
    return np.where(found, order[at], len(top))


def _hamming(query_codes: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """(q, N) Hamming distances between packed codes, a byte at a time. Time O(q·N·bytes), memory O(q·N)."""
    distance = np.zeros((len(query_codes), len(codes)), np.int32)
    for byte in range(codes.shape[1]):
        distance += POPCOUNT[query_codes[:, byte, None] ^ codes[None, :, byte]]
    return distance


def compare_rankings(a: RankingScores, b: RankingScores, metric: str, seed: int = 0) -> Effect:
    """mean(a) - mean(b) of `metric` over the same queries, with a paired bootstrap interval over queries.
    Time O(RESAMPLES·Q), memory O(Q + BATCH_CELLS)."""
    if not np.array_equal(a.query_rows, b.query_rows):
        raise ValueError("compare_rankings pairs queries: both rankings must score the same query rows")
    return paired_difference(a.values(metric), b.values(metric), seed)


def summary(scores: RankingScores) -> dict[str, float]:
    """The mean over queries of each metric ("recall@10", "mrr", ...); NaN without queries. Time O(Q·metrics)."""
    return {m: float(scores.values(m).mean()) if len(scores.query_rows) else math.nan for m in scores.metrics}
