"""Paired statistics for every comparison the report makes (docs/design.md §7), and the sentence that reads
each one against the paper.

Everything is computed by scipy and statsmodels: paired bootstrap intervals over the same valid
galleries (scipy.stats.bootstrap), McNemar's exact test on paired right/wrong answers
(statsmodels), sign tests with Clopper-Pearson intervals (scipy.stats.binomtest), Pearson's r with
its Fisher interval and Spearman's rho with a bootstrap interval (scipy.stats). A reading says
"consistent with the paper" only when the 95% interval excludes no-effect on the paper's side,
"opposite to the paper" when it excludes it on the other side, and "not distinguishable from
noise here" otherwise.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace

import numpy as np
from scipy import stats
from statsmodels.stats.contingency_tables import mcnemar

CONFIDENCE = 0.95
RESAMPLES = 1999  # percentile intervals; the report's ~250 comparisons take 4 s, not 10
# resample x gallery cells a bootstrap holds at once (scipy's `batch`): its index and resampled arrays take
# O(BATCH_CELLS) memory, not O(RESAMPLES x n) (3 GB per array at 200k galleries). The resamples are drawn
# from one generator batch after batch, so the interval is the same whatever the batch size.
BATCH_CELLS = 1 << 21
CONSISTENT, NOISE, OPPOSITE = ("consistent with the paper", "not distinguishable from noise here",
                               "opposite to the paper")


@dataclass
class Effect:
    """An estimate with its 95% interval and, where a test applies, its p-value."""

    estimate: float
    low: float
    high: float
    p: float | None = None
    n: int = 0
    method: str = ""
    reading: str = ""   # against the paper, where a comparison has one (`read`)

    def read(self, paper_direction: int, null: float = 0.0) -> "Effect":
        """This effect with its reading against the paper (see `reading`)."""
        return replace(self, reading=reading(self, paper_direction, null))

    def side(self, null: float = 0.0) -> int:
        """+1 or -1 when the interval excludes `null` above or below it, 0 when it does not."""
        if math.isnan(self.low) or math.isnan(self.high):
            return 0
        return 1 if self.low > null else -1 if self.high < null else 0


SIGNIFICANCE = 0.05


def reading(effect: Effect, paper_direction: int, null: float = 0.0) -> str:
    """Where the paper reports an effect of sign `paper_direction` (+1 or -1): our interval's verdict.
    Where a test also gave a p-value (McNemar, sign test, Pearson), it must agree: on a few galleries a
    percentile bootstrap interval can exclude zero while the exact test does not reject."""
    side = effect.side(null) if effect.p is None or effect.p < SIGNIFICANCE else 0
    return CONSISTENT if side == paper_direction else OPPOSITE if side == -paper_direction else NOISE


def _bootstrap(data: tuple, statistic, seed: int) -> tuple[float, float]:
    """A paired percentile bootstrap interval (resampling galleries, or points, with replacement), its
    resamples computed `BATCH_CELLS // n` at a time. Time O(RESAMPLES·n), memory O(BATCH_CELLS + RESAMPLES)."""
    batch = max(1, BATCH_CELLS // max(len(data[0]), 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # resamples where a statistic is undefined: scipy warns, NaN bounds
        result = stats.bootstrap(data, statistic, paired=True, vectorized=True, n_resamples=RESAMPLES,
                                 batch=min(batch, RESAMPLES), confidence_level=CONFIDENCE, method="percentile",
                                 random_state=seed)
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def paired_difference(a, b, seed: int = 0) -> Effect:
    """mean(a) - mean(b) over the same galleries (per-gallery scores of two models): a paired
    bootstrap interval, and McNemar's exact test when the scores are right/wrong (1/0).
    Time O(RESAMPLES·n), memory O(n + BATCH_CELLS) (`_bootstrap`)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    estimate = float(a.mean() - b.mean()) if len(a) else math.nan
    if len(a) < 2:
        return Effect(estimate, math.nan, math.nan, None, len(a), "too few galleries")
    low, high = _bootstrap((a, b), lambda x, y, axis: x.mean(axis) - y.mean(axis), seed)
    p, method = None, "paired bootstrap"
    if set(np.unique(np.concatenate([a, b]))) <= {0.0, 1.0}:
        table = [[np.sum((a == 1) & (b == 1)), np.sum((a == 1) & (b == 0))],
                 [np.sum((a == 0) & (b == 1)), np.sum((a == 0) & (b == 0))]]
        p, method = float(mcnemar(table, exact=True).pvalue), "paired bootstrap; McNemar exact"
    return Effect(estimate, low, high, p, len(a), method)


def relative_increase(errors_a, errors_b, seed: int = 0) -> Effect:
    """(mean(e_a) - mean(e_b)) / mean(e_b), e per gallery (1 - right, or the squared error), with a
    paired bootstrap interval: the relative error increase of model a over model b.
    Time O(RESAMPLES·n), memory O(n + BATCH_CELLS) (`_bootstrap`)."""
    a, b = np.asarray(errors_a, float), np.asarray(errors_b, float)
    if len(a) < 2 or b.mean() == 0:
        return Effect(math.nan, math.nan, math.nan, None, len(a), "undefined (no error to compare with)")
    estimate = float((a.mean() - b.mean()) / b.mean())
    low, high = (_unbounded(x) for x in _bootstrap((a, b), _relative_increase, seed))
    return Effect(estimate, low, high, None, len(a), "paired bootstrap")


UNBOUNDED = np.finfo(float).max  # finite, so that percentiles between two of them stay defined


def _relative_increase(x, y, axis):
    """A resample where model b made no error gives an unbounded increase (+-UNBOUNDED by the sign of
    the difference, 0 where both made none), not NaN, so the interval stays defined (and wide)."""
    difference, base = x.mean(axis) - y.mean(axis), y.mean(axis)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(base > 0, difference / base, np.sign(difference) * UNBOUNDED)


def _unbounded(bound: float) -> float:
    return math.copysign(math.inf, bound) if abs(bound) >= UNBOUNDED / 2 else bound


def sign_test(wins: int, losses: int) -> Effect:
    """The share of wins among decided comparisons (ties left out), its Clopper-Pearson interval and
    the two-sided sign test's p-value (binomial, p = 0.5). Time O(wins + losses) at most; no per-gallery data."""
    n = wins + losses
    if n == 0:
        return Effect(math.nan, math.nan, math.nan, None, 0, "sign test")
    test = stats.binomtest(wins, n, 0.5)
    interval = test.proportion_ci(CONFIDENCE)
    return Effect(wins / n, float(interval.low), float(interval.high), float(test.pvalue), n, "sign test")


def _spearman(x, y, axis):
    """Spearman's rho of each resample (Pearson's r of the average ranks, as scipy's spearmanr); 0
    where a resample is constant (tasks with equal errors are common on small valid splits) and rho is
    undefined: no association measurable, which widens the interval toward 0 rather than leaving it
    undefined."""
    rx, ry = stats.rankdata(x, axis=axis), stats.rankdata(y, axis=axis)
    rx, ry = rx - rx.mean(axis, keepdims=True), ry - ry.mean(axis, keepdims=True)
    scale = np.sqrt((rx * rx).sum(axis) * (ry * ry).sum(axis))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(scale > 0, (rx * ry).sum(axis) / scale, 0.0)


def correlations(x, y, seed: int = 0) -> dict[str, Effect]:
    """Pearson's r (Fisher interval) and Spearman's rho (bootstrap interval over the points).
    Time O(RESAMPLES·n·log n) (each resample ranked), memory O(n + BATCH_CELLS) (`_bootstrap`)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 4 or np.ptp(x) == 0 or np.ptp(y) == 0:
        empty = Effect(math.nan, math.nan, math.nan, None, len(x), "too few points")
        return {"pearson": empty, "spearman": empty}
    pearson = stats.pearsonr(x, y)
    interval = pearson.confidence_interval(CONFIDENCE)
    spearman = stats.spearmanr(x, y)
    low, high = _bootstrap((x, y), _spearman, seed)
    return {"pearson": Effect(float(pearson.statistic), float(interval.low), float(interval.high),
                              float(pearson.pvalue), len(x), "Pearson, Fisher interval"),
            "spearman": Effect(float(spearman.statistic), low, high, float(spearman.pvalue), len(x),
                               "Spearman, bootstrap interval")}


@dataclass
class Spread:
    """One number across seeds."""

    mean: float
    sd: float
    min: float
    max: float
    seeds: int


def spread(values) -> Spread:
    """Mean and spread of one number across seeds."""
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], float)
    if not len(v):
        return Spread(math.nan, math.nan, math.nan, math.nan, 0)
    return Spread(float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, float(v.min()), float(v.max()), len(v))


def effect_text(e: Effect, digits: int = 3, percent: bool = False, change: bool = False) -> str:
    """An effect as `+0.031 [-0.012, +0.074]` (or a share `71%`, or a change `-12.3%`), its p-value where a
    test gave one."""
    if e.estimate is None or math.isnan(e.estimate):
        return "n/a"
    f = ((lambda x: f"{x:+.1%}") if change else (lambda x: f"{x:.0%}") if percent
         else (lambda x: f"{x:+.{digits}f}"))  # a change, a share, or a signed difference
    interval = f" [{f(e.low)}, {f(e.high)}]" if not math.isnan(e.low) else ""
    return f"{f(e.estimate)}{interval}" + (f", p = {e.p:.3g}" if e.p is not None else "")
