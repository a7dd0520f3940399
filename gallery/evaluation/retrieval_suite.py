"""Retrieval against relevance (docs/design.md §7), Pinterest's evaluation: does the embedding find the
galleries the catalogue says belong together?

Each metric task gives a ground truth: an identity task's groups (a gallery's other listings), a pairs
task's engagement (its partners, pairs that cross splits included). The queries are the valid and test
galleries with something relevant (no model trained on them, nor on their pairs), at most
`evaluation.retrieval_queries` of them per task (a stable sample by a hash of the id beyond, so the cost
stays linear in the catalogue); the candidates are every other gallery of the catalogue, all splits. Every
arm ranks them by cosine, and by its binary code as search does (the `retrieval.rerank` nearest by Hamming
distance ordered by exact cosine; the code fitted on the arm's train galleries, as the export fits it):
recall@1/10/100 and the reciprocal rank of the first relevant gallery (gallery.evaluation.relevance).

Arms (gallery.evaluation.arms.EmbeddingArm): the reference MTL arm, *unified* (the exported model: attribute
and metric tasks), `attributes_only` (the same weighting on the attribute tasks alone: today's MTL),
`specialised` (one model per metric task, that task alone, through the same engine), `imagenet` and any
`evaluation.baselines` (pretrained features, mean-pooled). Pinterest's
claims are read on the same queries with paired bootstrap intervals: the unified embedding retrieves better
than the specialised one of each task, and binarised it loses nothing (read against a margin: a loss of at
most `NON_INFERIORITY` is "nothing").
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import numpy as np

from gallery.data.ingest import Catalogue
from gallery.evaluation.arms import ATTRIBUTES_ONLY, BASELINE, IMAGENET, MTL, SPECIALISED, EmbeddingArm, reference_arm
from gallery.evaluation.relevance import (QUERIES, RankingScores, compare_rankings, queries, ranking_scores,
                                          relevant_sets, sample_rows, summary)
from gallery.evaluation.statistics import CONSISTENT, NOISE, OPPOSITE, Effect
from gallery.retrieval.codes import BinaryCode

FLOAT, BINARY = "float", "binary"
CLAIM_METRICS = ("recall@10", "mrr")     # recall@10 is the headline, as in the paper
NON_INFERIORITY = 0.02                   # "binarised loses nothing": the interval's low end above -0.02
BEATS = {ATTRIBUTES_ONLY: "unified_beats_attributes_only", SPECIALISED: "unified_beats_specialised",
         IMAGENET: "unified_beats_imagenet", BASELINE: "unified_beats_pretrained",
         MTL: "unified_beats_another_mtl_model"}   # the claim against each kind of arm
LOSES_NOTHING = "binary_loses_nothing"


@dataclass(frozen=True)
class RetrievalArm:
    """An embedding retrieval compares: which arm, its vectors (in the embedded galleries' order) and its code."""

    arm: EmbeddingArm
    vectors: np.ndarray
    code: BinaryCode


@dataclass
class ArmRetrieval:
    """One arm's ranking quality on one metric task's queries, by one search."""

    arm: EmbeddingArm
    task: str
    search: str                        # float or binary
    means: dict[str, float]            # metric -> mean over the queries ("recall@10", "mrr", ...)
    scores: RankingScores = field(repr=False)


@dataclass
class RetrievalClaim:
    """A paired comparison on the same queries and its reading against Pinterest's claim."""

    claim: str        # BEATS[the baseline's kind], or LOSES_NOTHING
    task: str
    metric: str
    arm: EmbeddingArm       # the first term of the difference
    baseline: EmbeddingArm  # the second
    search: str       # both terms' search, or "binary - float"
    effect: Effect


@dataclass
class RetrievalResult:
    tasks: list[str]
    queries: dict[str, int]            # metric task -> its queries
    arms: list[EmbeddingArm]
    code: str                          # the binary code's name (each arm's own fit)
    rerank: int
    rows: list[ArmRetrieval]
    claims: list[RetrievalClaim]
    seconds: float = 0.0

    def row(self, arm: EmbeddingArm, task: str, search: str) -> ArmRetrieval:
        return next(r for r in self.rows if (r.arm, r.task, r.search) == (arm, task, search))


def ground_truth(catalogue: Catalogue, gallery_ids: list[str]) -> dict[str, list[np.ndarray]]:
    """Per metric task, each gallery's relevant galleries (positions in `gallery_ids`, the embedded ones).
    Time and memory O(N + pairs + Σ group size²) (`relevant_sets`)."""
    at = catalogue.frame.reset_index(drop=True).set_index("gallery_id").index.get_indexer(gallery_ids)
    out = {}
    for task in catalogue.metric:
        if task.kind == "identity":
            out[task.name] = relevant_sets(len(gallery_ids), groups=catalogue.groups[task.name][at])
        else:
            pairs = catalogue.pairs[task.name]
            position = np.full(len(catalogue.frame), -1)
            position[at] = np.arange(len(at))
            a, b = position[pairs.a], position[pairs.b]
            kept = (a >= 0) & (b >= 0)  # both ends embedded (a gallery without a readable image is not)
            out[task.name] = relevant_sets(len(gallery_ids), pairs=(a[kept], b[kept]))
    return out


def retrieval_suite(catalogue: Catalogue, gallery_ids: list[str], arms: list[RetrievalArm], rerank: int, code: str,
                    seed: int = 0, max_queries: int | None = QUERIES) -> RetrievalResult:
    """Every arm's recall@k and reciprocal rank on every metric task's queries (at most `max_queries`,
    `evaluation.retrieval_queries`: a stable sample, `sample_rows`; None: all), by float and by binary
    search, and the claims' paired comparisons. Time O(tasks·arms·min(Q, max_queries)·N·d), linear in the
    N galleries; memory O(N·d + relevance.BLOCK_CELLS)."""
    start = time.perf_counter()
    split = catalogue.frame.set_index("gallery_id").loc[gallery_ids, "split"].to_numpy()
    truth = ground_truth(catalogue, gallery_ids)
    rows, asked = [], {}
    for task, relevant in truth.items():
        asked[task] = sample_rows(queries(relevant, split != "train"), gallery_ids, max_queries)
        for arm in arms:
            for search, code_of in ((FLOAT, None), (BINARY, arm.code)):
                scores = ranking_scores(arm.vectors, asked[task], relevant, code=code_of, rerank=rerank)
                rows.append(ArmRetrieval(arm.arm, task, search, summary(scores), scores))
    result = RetrievalResult(list(truth), {t: len(q) for t, q in asked.items()}, [a.arm for a in arms], code,
                             rerank, rows, [])
    result.claims = claims(result, seed)
    result.seconds = time.perf_counter() - start
    return result


def claims(result: RetrievalResult, seed: int = 0) -> list[RetrievalClaim]:
    """Unified against each other arm on every task (float search), and binary against float for the
    unified arm, each on `CLAIM_METRICS`; tasks without a query have none. Time O(claims·RESAMPLES·Q)."""
    out = []
    unified_arm = reference_arm(result.arms)
    for task in result.tasks:
        if not result.queries[task] or unified_arm is None:
            continue
        for metric in CLAIM_METRICS:
            unified = result.row(unified_arm, task, FLOAT).scores
            for other in result.arms:
                if other == unified_arm or (other.kind == SPECIALISED and other.task != task):
                    continue  # a specialised model is compared on its own task only
                effect = compare_rankings(unified, result.row(other, task, FLOAT).scores, metric, seed).read(+1)
                out.append(RetrievalClaim(BEATS[other.kind], task, metric, unified_arm, other, FLOAT, effect))
            binary = compare_rankings(result.row(unified_arm, task, BINARY).scores, unified, metric, seed)
            out.append(RetrievalClaim(LOSES_NOTHING, task, metric, unified_arm, unified_arm,
                                      "binary - float", replace(binary, reading=no_loss_reading(binary))))
    return out


def no_loss_reading(effect: Effect, margin: float = NON_INFERIORITY) -> str:
    """A claim of no loss: consistent when the interval's low end is above -margin, opposite when its high
    end is below it, not distinguishable otherwise."""
    if math.isnan(effect.low) or math.isnan(effect.high):
        return NOISE
    return CONSISTENT if effect.low > -margin else OPPOSITE if effect.high < -margin else NOISE
