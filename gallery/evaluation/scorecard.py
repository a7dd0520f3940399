"""The transfer scorecard: every held-out task x probe, MTL minus each baseline arm, paired on the same
scored galleries, and an aggregate over tasks that can decide (see docs/design.md, "Evaluation protocol").

Per task and probe, two effects: the metric difference (accuracy, or MSE: the paper's direction is
higher accuracy, lower MSE) and the error change err_MTL / err_baseline - 1, which puts tasks of
every kind on one scale (error: 1 - accuracy, or MSE). The aggregate is the
geometric mean of the error ratios err_MTL / err_baseline over the tasks and probes it covers, shown
as a percentage change (bounded below by -100%, and not dominated by a task every arm nearly
solves), with a paired bootstrap that resamples the scored galleries, each gallery with all its
tasks, so the correlation between tasks of one gallery stays in the interval. Readings are against the claim that MTL embeddings transfer better.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from gallery.evaluation.arms import IMAGENET_ARM, MTL, EmbeddingArm, arm_label
from gallery.evaluation.statistics import CONFIDENCE, RESAMPLES, Effect, paired_difference
from gallery.evaluation.transfer import ProbeScores, TransferResult

# The primary comparison: the Table 2 question (the reference MTL arm against ImageNet transfer on the primary
# held-out task, gallery.config.primary_task), asked of the lowest-variance probe
PRIMARY_PROBE, PRIMARY_BASELINE = "linear", IMAGENET_ARM


def errors_of(kind: str, scores: np.ndarray) -> np.ndarray:
    return scores if kind == "regression" else 1.0 - scores


@dataclass
class ScoreEntry:
    """One task x probe: an MTL arm against a baseline arm on the same galleries."""

    task: str
    kind: str
    metric: str
    probe: str
    arm: EmbeddingArm
    baseline: EmbeddingArm
    n: int
    value: float           # the MTL arm's accuracy or MSE
    baseline_value: float
    difference: Effect     # MTL - baseline in the metric, read against the paper's direction
    error_change: Effect   # err_MTL / err_baseline - 1, read against "MTL errs less" (< 0)
    difference_on_test: Effect  # the same difference on the test galleries alone


@dataclass
class Aggregate:
    """How much an MTL arm's errors change against a baseline's, over tasks (and probes): the geometric
    mean of the error ratios, minus 1 (`error_change`; < 0: the MTL arm errs less)."""

    arm: EmbeddingArm | None
    baseline: EmbeddingArm | None
    probe: str             # one probe, or "all"
    entries: int
    effect: Effect


@dataclass
class Scorecard:
    entries: list[ScoreEntry]
    aggregates: list[Aggregate]
    primary: ScoreEntry | None    # PRIMARY_PROBE on the primary task, the reference MTL arm against PRIMARY_BASELINE
    split: str = "valid+test"


def _on_test(a: ProbeScores, b: ProbeScores, test_ids: set, seed: int) -> Effect:
    """The paired difference on the test galleries alone. Time O(RESAMPLES·n), memory O(n + BATCH_CELLS)."""
    keep = np.array([g in test_ids for g in a.gallery_ids], bool)
    return paired_difference(a.scores[keep], b.scores[keep], seed)


def compare_arms(result: TransferResult, arm: EmbeddingArm, baseline: EmbeddingArm, test_ids: set, seed: int = 0) -> list[ScoreEntry]:
    """Every task x probe the two arms share, as a ScoreEntry. Time O(tasks·probes·RESAMPLES·n) (three
    bootstraps each), memory O(n + WEIGHT_CELLS + statistics.BATCH_CELLS) over a task's n scored galleries."""
    out = []
    for task in result.tasks:
        better = -1 if task.kind == "regression" else 1
        for probe in ("head", "linear", "knn"):
            a, b = result.get(task.name, probe, arm), result.get(task.name, probe, baseline)
            if a is None or b is None:
                continue
            if a.gallery_ids != b.gallery_ids:
                raise ValueError(f"{task.name}/{probe}: {arm_label(arm)} and {arm_label(baseline)} were scored on "
                                 "different galleries")
            change = error_change([(task.kind, a.gallery_ids, a.scores, b.scores)], seed, "task x probe")
            out.append(ScoreEntry(task.name, task.kind, task.metric, probe, arm, baseline, len(a.scores), a.value,
                                  b.value, paired_difference(a.scores, b.scores, seed).read(better), change.read(-1),
                                  _on_test(a, b, test_ids, seed).read(better)))
    return out


# resample x gallery weights drawn at once (32 MB of float64): memory O(WEIGHT_CELLS), not the RESAMPLES x n
# matrix (3.2 GB at 200k scored galleries); draws that fit are kept for the next comparison over as many galleries
WEIGHT_CELLS = 1 << 22


def resample_weights(n: int, seed: int) -> Iterator[np.ndarray]:
    """How often each of n galleries is drawn in each bootstrap resample: RESAMPLES rows in all, yielded in
    batches of `WEIGHT_CELLS // n` rows, every batch drawn from one generator, so the rows are those of one
    RESAMPLES x n multinomial draw whatever the batch size (the same for every comparison over n galleries
    with one seed). Where the whole draw fits in one batch (n up to 2,098) it is drawn once and kept (0.1 s
    for the default's 800). Time O(RESAMPLES·n) per pass, memory O(WEIGHT_CELLS)."""
    batch = max(1, WEIGHT_CELLS // max(n, 1))
    if batch >= RESAMPLES:
        yield _all_weights(n, seed)
        return
    rng, p = np.random.default_rng(seed), np.full(n, 1 / n)
    for start in range(0, RESAMPLES, batch):
        yield rng.multinomial(n, p, size=min(batch, RESAMPLES - start)).astype(float)


@functools.lru_cache(maxsize=8)
def _all_weights(n: int, seed: int) -> np.ndarray:
    """All RESAMPLES x n weights at once, for an n small enough (at most WEIGHT_CELLS cells: 8 x 32 MB kept at most)."""
    weights = np.random.default_rng(seed).multinomial(n, np.full(n, 1 / n), size=RESAMPLES).astype(float)
    weights.flags.writeable = False
    return weights


def error_change(pairs: list[tuple[str, list[str], np.ndarray, np.ndarray]], seed: int = 0,
                 what: str = "task x probe pairs") -> Effect:
    """The geometric mean over `pairs` (kind, gallery ids, scores of a, scores of b) of a's error over b's,
    minus 1: -0.12 when a makes 12% fewer errors. Ratios are averaged as logs, so a task where b barely
    errs moves the summary by its ratio, not by an unbounded difference over a tiny error (the mean
    relative reduction it replaces blew up on saturated tasks). A mean error of 0 counts as half an
    error of one gallery (classification), so a ratio stays finite. The interval is a paired bootstrap
    that resamples the galleries of all pairs together (a gallery keeps all its tasks), its resample
    weights streamed in batches (`resample_weights`). Time O(RESAMPLES·(n + Σ pair sizes)) over the n
    galleries of all pairs, memory O(WEIGHT_CELLS + RESAMPLES·pairs + n)."""
    pool = sorted({g for _, ids, _, _ in pairs for g in ids})
    position = {g: i for i, g in enumerate(pool)}
    estimates, errors = [], []
    for kind, ids, scores_a, scores_b in pairs:
        err_a, err_b = errors_of(kind, np.asarray(scores_a, float)), errors_of(kind, np.asarray(scores_b, float))
        if not len(err_b):
            continue
        floor = 0.5 / len(err_b) if kind != "regression" else np.finfo(float).tiny
        estimates.append(np.log(max(err_a.mean(), floor)) - np.log(max(err_b.mean(), floor)))
        errors.append((np.array([position[g] for g in ids], np.int64), err_a, err_b, floor))
    if not estimates:
        return Effect(math.nan, math.nan, math.nan, None, 0, "no pairs")
    resampled, done = np.empty((len(errors), RESAMPLES)), 0   # per pair, each resample's log error ratio
    for weights in resample_weights(len(pool), seed):
        rows = slice(done, done + len(weights))
        for i, (columns, err_a, err_b, floor) in enumerate(errors):
            w = weights[:, columns]
            total = w.sum(1)
            with np.errstate(invalid="ignore", divide="ignore"):
                mean_a, mean_b = (w @ err_a) / total, (w @ err_b) / total
            resampled[i, rows] = np.log(np.maximum(mean_a, floor)) - np.log(np.maximum(mean_b, floor))
        done += len(weights)
    means = np.nanmean(resampled, 0)
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = (float(np.expm1(np.nanpercentile(means, q))) for q in (tail, 100 - tail))
    return Effect(float(np.expm1(np.mean(estimates))), low, high, None, len(pool),
                  f"geometric mean of error ratios over {len(estimates)} {what}; paired bootstrap over {len(pool)} galleries")


def aggregate(entries: list[ScoreEntry], result: TransferResult, probe: str = "all", seed: int = 0) -> Aggregate:
    """The change of errors over `entries` (`error_change`), read against "MTL errs less" (< 0).
    Time O(RESAMPLES·Σ entry sizes), memory O(WEIGHT_CELLS + RESAMPLES·entries + n)."""
    pairs = []
    for e in entries:
        a, b = result.get(e.task, e.probe, e.arm), result.get(e.task, e.probe, e.baseline)
        pairs.append((e.kind, a.gallery_ids, a.scores, b.scores))
    effect = error_change(pairs, seed)
    return Aggregate(entries[0].arm if entries else None, entries[0].baseline if entries else None, probe,
                     len(entries), effect.read(-1))


def scorecard(result: TransferResult, test_ids: set, seed: int = 0) -> Scorecard:
    """Every MTL arm against every baseline arm (ImageNet, other backbones, and end-to-end for the
    2-layer head), per task and probe, with aggregates over tasks per probe and over all.
    Time O(MTL arms·baselines·tasks·probes·RESAMPLES·n): linear in the n scored galleries; memory
    O(n + WEIGHT_CELLS)."""
    mtl = [a for a in result.arms if a.kind == MTL]
    baselines = [a for a in result.arms if a.kind != MTL]
    entries, aggregates = [], []
    for arm in mtl:
        for baseline in baselines:
            found = compare_arms(result, arm, baseline, test_ids, seed)
            entries += found
            if not found:
                continue
            aggregates.append(aggregate(found, result, "all", seed))
            for probe in ("head", "linear", "knn"):
                chosen = [e for e in found if e.probe == probe]
                if chosen:
                    aggregates.append(aggregate(chosen, result, probe, seed))
    primary = next((e for e in entries if (e.task, e.probe, e.arm, e.baseline)
                    == (result.primary_task, PRIMARY_PROBE, result.reference, PRIMARY_BASELINE)), None)
    return Scorecard(entries, aggregates, primary)
