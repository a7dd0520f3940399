"""The report's comparisons on constructed inputs: known arms, known per-task errors, known class
balance; each reading's three cases; the paper's figures only beside rows that mean the same."""
import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from gallery.data.ingest import Catalogue
from gallery.data.labels import LabelStats
from gallery.data.tasks import Task
from gallery.evaluation.arms import END_TO_END_ARM, IMAGENET_ARM, mtl_arm
from gallery.evaluation.comparisons import (BEATS_MAJORITY, NAMED_TASK_BETTER, PU_BEATS_KENDALL, TABLE2_BEATS,
                                            ModelOnTask, TaskRow, class_balance, findings, mtl_vs_baseline,
                                            mtl_vs_optimal, paper_row, per_task, table2_comparisons, weighting_wins)
from gallery.evaluation.holdout import ArmResult, HoldoutResult, Row
from gallery.evaluation.render import finding_sentence
from gallery.evaluation.statistics import CONSISTENT, NOISE, OPPOSITE, Effect
from gallery.evaluation.task_optimal import TaskOptimalResult
from gallery.model.identity import ModelIdentity
from gallery.training.engine import GalleryScores, TrainResult

N = 200
PU, KENDALL = (ModelIdentity(w, "mean", 0, "efficientnet_lite0") for w in ("pseudo_uniform", "kendall"))
FAMO = ModelIdentity("famo", "mean", 0, "efficientnet_lite0")
MTL = mtl_arm(PU, PU)   # the reference model's arm
ARMS = {"mtl": MTL, "imagenet": IMAGENET_ARM, "end_to_end": END_TO_END_ARM}  # Table 2's, by column


def row(label="row", fraction=None, epochs=None, scores=()):
    scores = np.asarray(scores, float)
    return Row(label, fraction, epochs, 0, float(scores.mean()) if len(scores) else math.nan, None, None, scores)


def arm(which, scores_per_row, rows=None):
    rows = rows or [{"label": f"row {i}"} for i in range(len(scores_per_row))]
    return ArmResult(which, [row(scores=s, **r) for r, s in zip(rows, scores_per_row)], 1.0, 0.5, 10)


def holdout_of(arms: dict, task="star_rating", metric="accuracy", rows=None, ids=None):
    """`arms`: Table 2's column ("mtl", "imagenet", "end_to_end") -> each row's scores."""
    n = len(next(iter(arms.values()))[0])
    return HoldoutResult(task, "multiclass", metric, 100, n, ids or [f"g{i}" for i in range(n)],
                         [arm(ARMS[a], s, rows) for a, s in arms.items()], 0.5)


def test_table2_readings_follow_paired_tests_on_the_same_galleries():
    rng = np.random.default_rng(0)
    base = (rng.random(N) < 0.5).astype(float)
    better = np.where(rng.random(N) < 0.3, 1.0, base)    # right wherever base is, and on 30% more
    worse = np.where(rng.random(N) < 0.3, 0.0, base)
    arms = {"mtl": [better, base, worse], "imagenet": [base, base, base], "end_to_end": [worse, base, better]}
    rows = table2_comparisons(holdout_of(arms), "star_rating", seed=1)
    assert [r.against(IMAGENET_ARM).reading for r in rows] == [CONSISTENT, NOISE, OPPOSITE]
    assert [r.against(END_TO_END_ARM).reading for r in rows] == [CONSISTENT, NOISE, OPPOSITE]
    assert [v.arm for v in rows[0].versus] == [IMAGENET_ARM, END_TO_END_ARM]  # Table 2's column order
    first = rows[0].against(IMAGENET_ARM)
    assert first.estimate == pytest.approx(better.mean() - base.mean())
    discordant = int(((better == 1) & (base == 0)).sum()), int(((better == 0) & (base == 1)).sum())
    assert first.p == pytest.approx(stats.binomtest(discordant[0], sum(discordant), 0.5).pvalue)
    # for an MSE holdout the paper's direction is "lower": a lower MTL error reads as consistent
    assert table2_comparisons(holdout_of(arms, metric="MSE"), "star_rating", seed=1)[2].against(IMAGENET_ARM).reading == CONSISTENT


def test_paper_figures_sit_only_beside_rows_that_mean_the_same():
    assert paper_row(row(fraction=0.2)) == (0.574, 0.515, 0.543)
    assert paper_row(row(fraction=1.0)) == (0.623, 0.534, 0.583)
    assert paper_row(row(epochs=4)) == (0.631, 0.542, 0.598)
    assert paper_row(row(epochs=2)) is None  # 2 epochs is not the paper's 4
    assert paper_row(row(fraction=0.5)) is None


TASKS = [Task("B1_chain", "b1", "binary"), Task("B2_pool", "b2", "binary"),
         Task("C1_city", "c1", "multiclass", classes=("x", "y", "z")), Task("R1_price", "r1", "regression")]


@pytest.fixture
def known():
    """Test galleries with labels; MTL twice as wrong as task-optimal on B2, equal on B1, a known
    squared error on R1; pseudo-uniform better than Kendall on 3 tasks."""
    rng = np.random.default_rng(4)
    ids = [f"g{i}" for i in range(N)]
    frame = pd.DataFrame({"gallery_id": ids, "split": "test", "B1_chain": rng.integers(0, 2, N).astype(float),
                          "B2_pool": np.ones(N), "C1_city": rng.integers(0, 3, N),
                          "R1_price": rng.normal(10, 2, N)})
    stats_ = {"B1_chain": LabelStats("binary", {"train": 100}, [60, 40], 0.4),
              "B2_pool": LabelStats("binary", {"train": 100}, [90, 10], 0.1),
              "C1_city": LabelStats("multiclass", {"train": 100}, [50, 30, 20], 0.2),
              "R1_price": LabelStats("regression", {"train": 100}, mean=10.0, variance=4.0)}
    catalogue = Catalogue("m", "t", TASKS, [], frame, stats_)
    opt_wrong = {"B1_chain": rng.random(N) < 0.2, "B2_pool": rng.random(N) < 0.1,
                 "C1_city": rng.random(N) < 0.3, "R1_price": None}
    mtl_wrong = {"B1_chain": opt_wrong["B1_chain"], "B2_pool": opt_wrong["B2_pool"] | (rng.random(N) < 0.12),
                 "C1_city": opt_wrong["C1_city"] & (rng.random(N) < 0.7), "R1_price": None}
    optimal, scores = {}, np.zeros((N, len(TASKS)))
    for k, t in enumerate(TASKS):
        if t.kind == "regression":
            opt, mtl = np.full(N, 1.0), np.full(N, 1.5) + rng.normal(0, 0.01, N)
        else:
            opt, mtl = 1.0 - opt_wrong[t.name], 1.0 - mtl_wrong[t.name]
        scores[:, k] = mtl
        error = float(np.mean(1 - opt) if t.kind != "regression" else 1.0)
        optimal[t.name] = TaskOptimalResult(t.name, error, error, 3, 2, 12, 2, 0.5, ids, list(opt))
    kendall = scores.copy()
    kendall[:, 0] -= 0.1  # Kendall worse on B1, B2, R1 (a lower score; for R1 a lower squared error is better)
    kendall[:, 1] -= 0.1
    kendall[:, 3] += 0.5
    names = [t.name for t in TASKS]
    training = {PU: TrainResult(test=GalleryScores("test", ids, names, scores)),
                KENDALL: TrainResult(test=GalleryScores("test", ids, names, kendall))}
    return catalogue, training, optimal, opt_wrong, mtl_wrong


def test_relative_error_increase_per_task_with_intervals(known):
    catalogue, training, optimal, opt_wrong, mtl_wrong = known
    rows = per_task(catalogue, training, optimal, seed=2)
    table = {r.task: r.of(PU).relative_error_increase for r in rows}
    for name in ("B1_chain", "B2_pool", "C1_city"):
        expected = (mtl_wrong[name].mean() - opt_wrong[name].mean()) / opt_wrong[name].mean()
        assert table[name].estimate == pytest.approx(expected)
    assert table["B1_chain"].estimate == 0.0  # the same answers
    assert table["R1_price"].estimate == pytest.approx(0.5, abs=0.01)
    assert 0 < table["B2_pool"].low < table["B2_pool"].estimate < table["B2_pool"].high
    assert [m.model for m in rows[0].models] == [PU, KENDALL]  # each model by its identity, never a column name
    summary = mtl_vs_optimal(rows, PU)
    assert (summary.clearly_worse, summary.clearly_better, summary.not_distinguishable) == (2, 1, 1)
    assert summary.paper_named_tasks["B1_chain"].reading == NOISE  # the paper: B1 better under MTL


def test_weighting_wins_is_a_sign_test(known):
    catalogue, training, optimal, _, _ = known
    wins = weighting_wins(per_task(catalogue, training, optimal), PU, KENDALL)
    assert (wins.wins, wins.losses, wins.ties) == (3, 0, 1)
    assert wins.share.p == pytest.approx(stats.binomtest(3, 3, 0.5).pvalue) and wins.share.reading == NOISE


def test_mtl_against_the_baseline(known):
    """The majority class of the train split (B2: negative, 90 of 100) scored on the test labels (B2: all
    positive, so the baseline is always wrong), the train mean for R1: MTL beats both on every task."""
    catalogue, training, optimal, _, mtl_wrong = known
    rows = per_task(catalogue, training, optimal)
    by_task = {r.task: r for r in rows}
    assert by_task["B2_pool"].of(PU).baseline_minus.estimate == pytest.approx(1.0 - mtl_wrong["B2_pool"].mean())
    price = catalogue.frame["R1_price"].to_numpy()
    mtl_squared = training[PU].test.scores[:, 3]
    assert by_task["R1_price"].of(PU).baseline_minus.estimate == pytest.approx(np.mean((price - 10.0) ** 2) - mtl_squared.mean())
    summary = mtl_vs_baseline(rows, PU)
    assert (summary.tasks, summary.clearly_better, summary.clearly_worse) == (4, 4, 0)
    assert summary.reading == CONSISTENT and summary.model == PU
    b2 = by_task["B2_pool"].of(PU)  # were MTL clearly worse than the baseline on one task:
    b2.baseline_minus = Effect(-0.2, -0.3, -0.1)
    assert mtl_vs_baseline(rows, PU).reading == OPPOSITE


@pytest.mark.parametrize("slope,expected", [(1.0, CONSISTENT), (-1.0, OPPOSITE), (0.0, NOISE)])
def test_class_balance_readings(slope, expected):
    rng = np.random.default_rng(5)
    minority = rng.uniform(0.02, 0.5, 17)
    noise = rng.normal(0, 0.02 if slope else 1.0, 17)
    if not slope:  # no relation at all: noise with its linear part in minority removed (Pearson r = 0)
        noise -= np.polyval(np.polyfit(minority, noise, 1), minority)
    y = slope * minority + noise
    table = [TaskRow(f"B{k}", "binary", x, 10, 0.3, 0.5, 3, [ModelOnTask(PU, 0.3, Effect(v, v - 0.1, v + 0.1), Effect(0, 0, 0))])
             for k, (x, v) in enumerate(zip(minority, y))]
    found = class_balance(table, [PU], seed=3)[PU]
    assert found.pearson.estimate == pytest.approx(np.corrcoef(minority, y)[0, 1], abs=1e-9)
    ranks = np.corrcoef(np.argsort(np.argsort(minority)), np.argsort(np.argsort(y)))[0, 1]
    assert found.spearman.estimate == pytest.approx(ranks)
    assert found.reading == expected and found.n == 17
    if slope:
        assert found.slope == pytest.approx(np.polyfit(minority, slope * minority + noise, 1)[0])
    assert not math.isnan(found.pearson.low)


@pytest.mark.parametrize("preset,seeds", [("smoke", [0]), ("default", [0]), ("study", [0]), ("paper", [0, 1, 2])])
def test_presets_repeat_training_with_their_seeds(preset, seeds):
    from gallery.config import load_settings
    from gallery.config import reference_model
    from gallery.evaluation.seeds import seeds_of, task_optimal_folder, with_seed

    settings = load_settings(preset)
    assert seeds_of(settings) == seeds
    assert [with_seed(settings, s).train.seed for s in seeds] == seeds
    kendall = replace(reference_model(settings), weighting="kendall")
    assert [kendall.with_seed(s).folder(settings.train.seed) for s in seeds] == ["kendall"] + [f"kendall-seed{s}" for s in seeds[1:]]
    assert [task_optimal_folder("B1", s, settings) for s in seeds] == ["B1"] + [f"B1-seed{s}" for s in seeds[1:]]
    assert replace(kendall, pooling="gem").folder(settings.train.seed) == "kendall+gem"  # a study's other pooling


def _errors_table(pu, kendall):
    """Per-task rows with only what weighting_wins and mtl_vs_optimal read."""
    def on(model, error):   # task-optimal error 0.3 everywhere
        return ModelOnTask(model, error, Effect(error - 0.3, error - 0.35, error - 0.25), Effect(0, 0, 0))

    return [TaskRow(f"B{k + 1}_t", "binary", 0.3, 10, 0.3, 0.5, 3, [on(PU, a), on(KENDALL, b)])
            for k, (a, b) in enumerate(zip(pu, kendall))]


@pytest.mark.parametrize("pu_wins,expected", [(28, CONSISTENT), (3, OPPOSITE), (16, NOISE)])
def test_weighting_wins_readings(pu_wins, expected):
    """31 tasks; pseudo-uniform lower on `pu_wins` of them (the paper: 22 of 31)."""
    pu = np.full(31, 0.3)
    kendall = np.where(np.arange(31) < pu_wins, 0.4, 0.2)
    wins = weighting_wins(_errors_table(pu, kendall), PU, KENDALL)
    assert (wins.wins, wins.losses) == (pu_wins, 31 - pu_wins)
    assert wins.share.p == pytest.approx(stats.binomtest(pu_wins, 31, 0.5).pvalue) and wins.share.reading == expected


def test_weighting_wins_with_no_decided_task_reads_as_noise():
    """Both weightings equally good on every task (a small, easy catalogue): no sign test, no crash."""
    errors = np.full(3, 0.2)
    wins = weighting_wins(_errors_table(errors, errors), PU, KENDALL)
    (found,) = findings(None, [], {}, wins, {}, {})
    assert found.claim == PU_BEATS_KENDALL and found.reading == NOISE and found.effect.n == 0
    assert "0 of 0 decided tasks (n/a; sign test)" in finding_sentence(found)[1]


@pytest.mark.parametrize("worse,expected", [(27, CONSISTENT), (4, OPPOSITE), (15, NOISE)])
def test_share_of_tasks_where_mtl_is_worse(worse, expected):
    """MTL's error 0.4 (worse than the task-optimal 0.3) on `worse` tasks of 31, 0.2 elsewhere."""
    errors = np.where(np.arange(31) < worse, 0.4, 0.2)
    summary = mtl_vs_optimal(_errors_table(errors, errors), PU)
    share = summary.share_worse
    assert share.estimate == pytest.approx(worse / 31) and share.reading == expected
    assert (summary.clearly_worse, summary.clearly_better) == (worse, 31 - worse)
    assert summary.paper_named_tasks["B1_t"].reading == (OPPOSITE if worse else CONSISTENT)


def test_findings_sort_each_paper_claim_by_its_reading(known):
    catalogue, training, optimal, _, _ = known
    table = per_task(catalogue, training, optimal)
    rng = np.random.default_rng(0)
    base = (rng.random(N) < 0.5).astype(float)
    holdout = holdout_of({"mtl": [np.maximum(base, rng.random(N) < 0.3)], "imagenet": [base], "end_to_end": [base]})
    models = [PU, KENDALL]
    found = findings(None, [(holdout, table2_comparisons(holdout, "star_rating"))],
                     {m: mtl_vs_optimal(table, m) for m in models}, weighting_wins(table, PU, KENDALL),
                     {m: mtl_vs_baseline(table, m) for m in models}, class_balance(table, models))
    claims = {(f.claim, f.model, f.task, f.baseline, f.row): f.reading for f in found}
    assert claims[(TABLE2_BEATS, None, "star_rating", IMAGENET_ARM, "row 0")] == CONSISTENT
    assert claims[(PU_BEATS_KENDALL, None, None, None, None)] == NOISE  # 3 of 3: too few
    assert claims[(BEATS_MAJORITY, PU, None, None, None)] == CONSISTENT
    assert claims[(NAMED_TASK_BETTER, PU, "B1_chain", None, None)] == NOISE
    assert len(claims) == len(found)  # each finding is told apart by its fields
    words = [finding_sentence(f)[0] for f in found]  # the layout side puts them into words, each its own
    assert "On a new task (`star_rating`), MTL embeddings beat ImageNet transfer (row 0)" in words
    assert len(set(words)) == len(words)
    assert len(found) == 2 + 2 * (1 + 1) + 1 + 2 + 2  # Table 2; per weighting share + B1; wins; baseline; balance
    optimal, baseline = ({m: f(table, m) for m in models} for f in (mtl_vs_optimal, mtl_vs_baseline))
    balance = class_balance(table, models)
    again = findings(None, [(holdout, table2_comparisons(holdout, "star_rating"))], {**optimal, FAMO: optimal[KENDALL]},
                     weighting_wins(table, PU, KENDALL), {**baseline, FAMO: baseline[KENDALL]},
                     {**balance, FAMO: balance[KENDALL]})
    assert [(f.claim, f.model, f.task, f.baseline, f.row) for f in again] == list(claims)  # famo: not the paper's


def test_seeds_average_each_gallerys_scores():
    """Two seeds' holdout rows: the combined row holds each gallery's mean score, its value their mean."""
    from gallery.evaluation.seeds import mean_holdout

    def holdout(scores, ids=("a", "b", "c")):
        result = holdout_of({a: [scores] for a in ("mtl", "imagenet", "end_to_end")}, ids=list(ids))
        result.of(MTL).rows[0].ci_low = 0.1
        return result

    second = holdout([1.0, 1.0, 0.0])
    second.arms[0].arm = mtl_arm(PU.with_seed(1), PU)  # the same model of the second seed: averaged with the first's
    combined = mean_holdout([holdout([1.0, 0.0, 1.0]), second])
    first = combined.of(MTL).rows[0]
    assert first.scores.tolist() == [1.0, 0.5, 0.5] and first.value == pytest.approx(2 / 3) and first.ci_low is None
    with pytest.raises(ValueError, match="different galleries"):
        mean_holdout([holdout([1.0, 0.0, 1.0]), holdout([1.0, 1.0, 0.0], ids=("a", "b", "d"))])


def test_table2_findings_after_one_epoch_and_after_all_quote_the_papers_row():
    rng = np.random.default_rng(2)
    base = (rng.random(N) < 0.5).astype(float)
    rows = [{"label": "100% of one epoch", "fraction": 1.0}, {"label": "4 epochs", "epochs": 4}]
    better = np.maximum(base, rng.random(N) < 0.3)
    arms = {"mtl": [better, better], "imagenet": [base, base], "end_to_end": [base, base]}
    holdout = holdout_of(arms, rows=rows)
    found = {(f.baseline, f.row): f for f in findings(None, [(holdout, table2_comparisons(holdout, "star_rating"))],
                                                      {}, None, {}, {})}
    one = found[(IMAGENET_ARM, "100% of one epoch")]
    assert one.paper == (0.623, 0.534) and one.reading == CONSISTENT and one.claim == TABLE2_BEATS
    assert finding_sentence(one)[2].startswith("0.623 vs 0.534 star-rating accuracy")
    assert one.probes == ("head",) and finding_sentence(one)[1].endswith("(2-layer head (the paper's))")  # what it rests on
    assert found[(END_TO_END_ARM, "4 epochs")].paper == (0.631, 0.598)
    other = holdout_of(arms, task="review_band", rows=rows)  # not the primary task: the paper has no figures for it
    assert all(f.paper is None and finding_sentence(f)[2] == "MTL embeddings best at every row of Table 2"
               for f in findings(None, [(other, table2_comparisons(other, "star_rating"))], {}, None, {}, {}))
    # the primary task is a setting: a catalogue's own star rating under another name gets the paper's figures
    assert table2_comparisons(other, "review_band")[0].paper == (0.623, 0.534, 0.583)


def test_every_trained_model_is_an_identity_and_its_folder_is_made_from_it():
    """The models a run trains (gallery.steps.Training): each weighting x pooling per seed, then retrieval's
    comparison models; folders and evaluation arms are made from the fields, never read back."""
    from gallery.config import load_settings, reference_model
    from gallery.evaluation.arms import ATTRIBUTES_ONLY, MTL as MTL_KIND, SPECIALISED, arm_label
    from gallery.steps import trainings

    settings = load_settings("paper")   # three seeds
    metric = [Task("same_property", "property_id", "identity")]
    found = trainings(settings, metric)
    reference = reference_model(settings)
    assert [t.folder(settings) for t in found] == ["pseudo_uniform", "kendall", "pseudo_uniform-seed1", "kendall-seed1",
                                                   "pseudo_uniform-seed2", "kendall-seed2", "attributes_only",
                                                   "specialised_same_property"]
    assert [t.role for t in found[-2:]] == [ATTRIBUTES_ONLY, SPECIALISED] and found[-1].model == reference
    assert {t.model.seed for t in found if t.role == MTL_KIND} == {0, 1, 2}
    arms = [t.arm(reference) for t in found]
    assert [a.reference for a in arms[:6]] == [True, False] * 3   # every seed's reference model is the reference arm
    assert [arm_label(a) for a in arms[-3:]] == ["MTL embeddings (kendall)", "attribute tasks only",
                                                 "`same_property` alone"]
    assert found[1].settings(settings).train.seed == 0 and found[3].settings(settings).train.seed == 1
