"""The report's statistics against scipy/statsmodels called directly, and the readings' three cases."""
import math

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.contingency_tables import mcnemar

from gallery.evaluation.statistics import (CONSISTENT, NOISE, OPPOSITE, Effect, _spearman, correlations,
                                           paired_difference, reading, relative_increase, sign_test, spread)


@pytest.mark.parametrize("low,high,direction,expected", [
    (0.02, 0.10, +1, CONSISTENT), (-0.10, -0.02, +1, OPPOSITE), (-0.02, 0.10, +1, NOISE),
    (-0.10, -0.02, -1, CONSISTENT), (0.02, 0.10, -1, OPPOSITE), (-0.10, 0.02, -1, NOISE)])
def test_a_reading_follows_the_interval(low, high, direction, expected):
    assert reading(Effect((low + high) / 2, low, high), direction) == expected


def test_a_reading_of_a_correlation_is_against_zero_and_of_a_share_against_a_half():
    assert reading(Effect(0.4, 0.1, 0.7), +1) == CONSISTENT
    assert reading(Effect(0.55, 0.36, 0.73), +1, null=0.5) == NOISE
    assert reading(Effect(0.2, 0.05, 0.35), +1, null=0.5) == OPPOSITE
    assert reading(Effect(math.nan, math.nan, math.nan), +1) == NOISE


def paired_case(seed=0, n=120):
    rng = np.random.default_rng(seed)
    a = (rng.random(n) < 0.7).astype(float)
    b = np.where(rng.random(n) < 0.8, a, 1 - a)  # mostly the same answers: a paired design
    return a, b


def test_paired_difference_matches_mcnemar_and_a_direct_bootstrap():
    a, b = paired_case()
    effect = paired_difference(a, b, seed=7)
    assert effect.estimate == pytest.approx(a.mean() - b.mean()) and effect.n == len(a)
    only_a, only_b = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    assert effect.p == pytest.approx(stats.binomtest(only_a, only_a + only_b, 0.5).pvalue)  # exact McNemar
    assert effect.p == pytest.approx(mcnemar([[0, only_a], [only_b, 0]], exact=True).pvalue)
    direct = stats.bootstrap((a, b), lambda x, y, axis: x.mean(axis) - y.mean(axis), paired=True, vectorized=True,
                             n_resamples=4999, method="percentile", random_state=7).confidence_interval
    assert (effect.low, effect.high) == pytest.approx((direct.low, direct.high))
    # pairing matters: the unpaired interval of the same data is wider
    unpaired = stats.bootstrap((a, b), lambda x, y, axis: x.mean(axis) - y.mean(axis), paired=False,
                               vectorized=True, n_resamples=4999, method="percentile", random_state=7).confidence_interval
    assert effect.high - effect.low < unpaired.high - unpaired.low


def test_a_constant_shift_has_a_point_interval():
    a = np.linspace(0, 1, 50)
    effect = paired_difference(a + 0.25, a)
    assert (effect.estimate, effect.low, effect.high) == pytest.approx((0.25, 0.25, 0.25))
    assert effect.p is None  # squared errors, not right/wrong answers: no McNemar


def test_relative_increase_of_known_errors():
    rng = np.random.default_rng(1)
    optimal = (rng.random(200) < 0.1).astype(float)     # 1 = wrong
    mtl = np.maximum(optimal, (rng.random(200) < 0.1))  # wrong wherever optimal is, and more
    effect = relative_increase(mtl, optimal, seed=3)
    assert effect.estimate == pytest.approx((mtl.mean() - optimal.mean()) / optimal.mean())
    assert effect.low > 0 and effect.low <= effect.estimate <= effect.high
    assert math.isnan(relative_increase(mtl, np.zeros(200)).estimate)  # no error to compare with


def test_sign_test_by_hand():
    """22 wins in 31: the two-sided binomial p-value summed by hand, the Clopper-Pearson bounds from the
    beta quantiles that define them."""
    effect = sign_test(22, 9)
    tail = sum(math.comb(31, k) for k in range(22, 32)) / 2**31
    assert effect.estimate == pytest.approx(22 / 31) and effect.p == pytest.approx(2 * tail)
    assert effect.low == pytest.approx(stats.beta.ppf(0.025, 22, 10)) and effect.high == pytest.approx(stats.beta.ppf(0.975, 23, 9))
    assert reading(effect, +1, null=0.5) == CONSISTENT  # the paper's 22 of 31 would clear a half


def test_correlations_by_hand():
    """Pearson's r from its definition with Fisher's interval (atanh(r) +- 1.96 / sqrt(n - 3)); Spearman's
    rho as Pearson's r of the ranks."""
    rng = np.random.default_rng(2)
    x = rng.random(17)
    y = 0.8 * x + rng.normal(0, 0.1, 17)
    found = correlations(x, y, seed=5)
    dx, dy = x - x.mean(), y - y.mean()
    r = (dx * dy).sum() / math.sqrt((dx ** 2).sum() * (dy ** 2).sum())
    z, half = math.atanh(r), stats.norm.ppf(0.975) / math.sqrt(17 - 3)
    assert found["pearson"].estimate == pytest.approx(r)
    assert (found["pearson"].low, found["pearson"].high) == pytest.approx((math.tanh(z - half), math.tanh(z + half)))
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))  # no ties in continuous draws
    rho = np.corrcoef(rx, ry)[0, 1]
    assert found["spearman"].estimate == pytest.approx(rho)
    assert found["spearman"].low <= rho <= found["spearman"].high
    assert reading(found["pearson"], +1) == CONSISTENT


def test_spread_across_seeds():
    s = spread([0.6, 0.7, 0.8])
    assert (s.mean, s.sd, s.min, s.max, s.seeds) == pytest.approx((0.7, 0.1, 0.6, 0.8, 3))
    assert spread([0.5]).sd == 0.0 and spread([math.nan]).seeds == 0


def test_a_reading_needs_the_exact_test_too():
    """Where a test gave a p-value, an interval that excludes zero is not enough."""
    assert reading(Effect(0.3, 0.1, 0.5, p=0.25), +1) == NOISE
    assert reading(Effect(0.3, 0.1, 0.5, p=0.01), +1) == CONSISTENT
    assert reading(Effect(-0.3, -0.5, -0.1, p=0.01), +1) == OPPOSITE


def test_relative_increase_interval_stays_defined_when_a_resample_has_no_error():
    """A few labelled galleries, the task-optimal model wrong on one: resamples without that gallery
    have no error to divide by; the interval is then unbounded, not NaN."""
    optimal = np.array([1.0] + [0.0] * 9)
    mtl = np.array([1.0, 1.0] + [0.0] * 8)
    effect = relative_increase(mtl, optimal, seed=0)
    assert effect.estimate == pytest.approx(1.0)
    assert effect.high == math.inf and not math.isnan(effect.low) and effect.low <= 1.0


def test_each_resamples_rank_correlation_is_scipys_spearman():
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 6, (50, 12)).astype(float), rng.normal(size=(50, 12))  # ties in x
    x[3] = 1.0  # a constant resample: no rank correlation, 0
    want = [0.0 if i == 3 else stats.spearmanr(a, b).statistic for i, (a, b) in enumerate(zip(x, y))]
    assert _spearman(x, y, axis=-1) == pytest.approx(want)


def test_spearman_interval_stays_defined_when_resamples_are_constant():
    """Most tasks with the same relative error (common on small valid splits): some resamples are
    constant and have no rank correlation; the interval is still defined and holds the estimate."""
    x = np.linspace(0.05, 0.5, 15)
    y = np.array([0.0] * 11 + [0.4, 0.2, 0.9, 0.5])
    rho = correlations(x, y, seed=0)["spearman"]
    assert rho.estimate == pytest.approx(stats.spearmanr(x, y).statistic)
    assert not math.isnan(rho.low) and rho.low <= rho.estimate <= rho.high


@pytest.mark.parametrize("cells", [1, 120 * 7, 120 * 500])
def test_a_bootstrap_in_batches_is_the_bootstrap_in_one(monkeypatch, cells):
    """Memory bounded by batches of resamples (statistics.BATCH_CELLS; 1 cell: one resample a batch) gives
    the very interval of one batch of all RESAMPLES: the resamples come from one generator in turn."""
    import gallery.evaluation.statistics as statistics

    a, b = paired_case(seed=5)
    x, y = np.random.default_rng(6).normal(size=(2, 120))
    monkeypatch.setattr(statistics, "BATCH_CELLS", 1 << 30)
    whole = (paired_difference(a, b, 3), relative_increase(1 - a, 1 - b, 3), correlations(x, y, 3)["spearman"])
    monkeypatch.setattr(statistics, "BATCH_CELLS", cells)
    batched = (paired_difference(a, b, 3), relative_increase(1 - a, 1 - b, 3), correlations(x, y, 3)["spearman"])
    assert [(e.low, e.high) for e in batched] == [(e.low, e.high) for e in whole]
