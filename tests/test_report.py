"""The report without a flow: `compare` on constructed training, holdout and task-optimal results, and
`lay_out` of what it computed (markdown in reading order, figures, CSVs, metrics.json with its splits)."""
import json
import math
import os

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from gallery.config import EvalSettings, Settings
from gallery.data.images import DataQuality, SkippedImage
from gallery.data.ingest import Catalogue
from gallery.data.labels import LabelStats
from gallery.data.tasks import Task
from gallery.evaluation.arms import END_TO_END_ARM, IMAGENET_ARM, EmbeddingArm, mtl_arm
from gallery.evaluation.comparisons import HELPS_IMBALANCED, WORSE_THAN_OPTIMAL
from gallery.evaluation.holdout import ArmResult, HoldoutResult, Row
from gallery.evaluation.neighbours import BinaryVsFloat, CodeCurveRow
from gallery.evaluation.render import lay_out
from gallery.evaluation.report import compare
from gallery.evaluation.statistics import CONSISTENT, NOISE
from gallery.evaluation.task_optimal import TaskOptimalResult
from gallery.evaluation.transfer import HeldOutTask, ProbeScores, TransferResult
from gallery.model.identity import ModelIdentity
from gallery.training.engine import EpochRecord, GalleryScores, TrainResult

N = 150
TASKS = [Task("B1_chain", "b1", "binary"), Task("B2_pool", "b2", "binary"), Task("B3_bar", "b3", "binary"),
         Task("C1_type", "c1", "multiclass", classes=("hotel", "villa")), Task("R1_price", "r1", "regression")]
IDS = [f"g{i}" for i in range(N)]
PU, KENDALL = (ModelIdentity(w, "mean", 0, "efficientnet_lite0") for w in ("pseudo_uniform", "kendall"))
MTL = mtl_arm(PU, PU)   # the exported model's arm (Settings(): pseudo-uniform, mean pooling, seed 0, lite0)


def catalogue(rng) -> Catalogue:
    frame = pd.DataFrame({"gallery_id": IDS, "images": [[f"{g}.jpg"] for g in IDS], "split": "test",
                          **{t.name: rng.integers(0, 2, N).astype(float) for t in TASKS[:4]},
                          "R1_price": rng.normal(10, 2, N), "star_rating": rng.integers(0, 3, N)})
    stats = {t.name: LabelStats("binary", {"train": 400, "valid": 50, "test": N}, [300, 100], f)
             for t, f in zip(TASKS[:3], (0.25, 0.1, 0.4))}
    stats["C1_type"] = LabelStats("multiclass", {"train": 400, "valid": 50, "test": N}, [250, 150], 0.375)
    stats["R1_price"] = LabelStats("regression", {"train": 400, "valid": 50, "test": N}, mean=10.0, variance=4.0)
    holdout = Task("star_rating", "star_rating", "multiclass", classes=("1", "2", "3"))
    stats["star_rating"] = LabelStats("multiclass", {"train": 400, "valid": 50, "test": N}, [100, 200, 100], 0.25)
    return Catalogue("manifest.parquet", "tasks.yaml", TASKS, [holdout], frame, stats)


def history(epochs: int) -> list[EpochRecord]:
    losses = {t.name: 1.0 for t in TASKS}
    return [EpochRecord(e, 2.0 - 0.2 * e, losses, losses, {t.name: 0.7 for t in TASKS}, [1.0 - 0.1 * e],
                        1.0, 100.0, 20.0) for e in range(epochs)]


def training(rng, shift: float, seed: int = 0) -> dict[ModelIdentity, TrainResult]:
    """Two weightings; each test gallery's score per task (right/wrong; a squared error for R1)."""
    out = {}
    for w, extra in ((PU.with_seed(seed), 0.0), (KENDALL.with_seed(seed), 0.1)):
        scores = (rng.random((N, len(TASKS))) < 0.75 - extra + shift).astype(float)
        scores[:, 4] = rng.normal(1.5 + extra, 0.1, N) ** 2
        out[w] = TrainResult(history(3), [1], [False], test=GalleryScores("test", IDS, [t.name for t in TASKS], scores))
    return out


def optimal(rng) -> dict[str, TaskOptimalResult]:
    out = {}
    for t in TASKS:
        scores = rng.normal(1.5, 0.1, N) ** 2 if t.kind == "regression" else (rng.random(N) < 0.8).astype(float)
        error = float(scores.mean() if t.kind == "regression" else 1 - scores.mean())
        out[t.name] = TaskOptimalResult(t.name, error, error, 3, 1, 12, 2, 0.5, IDS, scores.tolist())
    return out


def holdout(rng, mtl_gain: float, seed: int = 0) -> HoldoutResult:
    base = (rng.random(N) < 0.5).astype(float)
    better = np.maximum(base, rng.random(N) < mtl_gain).astype(float)
    labels = [("20% of one epoch", 0.2, None), ("100% of one epoch", 1.0, None), ("4 epochs", None, 4)]

    def arm(which: EmbeddingArm, scores):
        rows = [Row(label, f, e, 10, float(scores.mean()), None, None, scores) for label, f, e in labels]
        return ArmResult(which, rows, 2.0, 0.01, 200, 0.05 if which == END_TO_END_ARM else None)

    arms = [arm(MTL.with_seed(seed), better), arm(IMAGENET_ARM, base), arm(END_TO_END_ARM, base)]
    return HoldoutResult("star_rating", "multiclass", "accuracy", 400, N, IDS, arms, 0.4)


def transfer(rng, mtl_gain: float, seed: int = 0) -> TransferResult:
    """The star rating's 2-layer head (Table 2) and a linear probe, for MTL and ImageNet (and end-to-end)."""
    h = holdout(rng, mtl_gain, seed)
    mtl = MTL.with_seed(seed)
    scores = [ProbeScores("star_rating", "head", r.arm, IDS, r.rows[-1].scores) for r in h.arms]
    scores += [ProbeScores("star_rating", "linear", a, IDS, h.of(a).rows[-1].scores) for a in (mtl, IMAGENET_ARM)]
    return TransferResult([HeldOutTask("star_rating", "multiclass", "accuracy", 400, N)],
                          [mtl, IMAGENET_ARM, END_TO_END_ARM], scores, [h], {"head": 1.0, "linear": 0.5},
                          primary_task="star_rating")


@pytest.fixture
def data():
    rng = np.random.default_rng(7)
    cat = catalogue(rng)
    quality = DataQuality([SkippedImage("g3", "g3.jpg", "missing file")], [])
    return compare("run-1", Settings(), cat, quality, [training(rng, 0.0)], [transfer(rng, 0.3)], [optimal(rng)])


def test_compare_reads_table2_from_the_paired_test_scores(data):
    ((h, rows),) = data.table2
    assert [r.row for r in rows] == ["20% of one epoch", "100% of one epoch", "4 epochs"]
    for r in rows:
        diff = h.of(MTL).rows[0].scores.mean() - h.of(IMAGENET_ARM).rows[0].scores.mean()
        assert r.against(IMAGENET_ARM).estimate == pytest.approx(diff) and r.against(IMAGENET_ARM).reading == CONSISTENT
    assert rows[0].paper == (0.574, 0.515, 0.543) and rows[2].paper == (0.631, 0.542, 0.598)
    assert data.splits == {"train": 0, "valid": 0, "test": N}


def test_compare_gathers_figure5_and_6_and_sorts_the_findings(data):
    table = {r.task: r for r in data.per_task}
    for t in TASKS:  # each MTL error is 1 - mean score (classification) or the mean squared error
        scores = data.training[PU].test.scores[:, TASKS.index(t)]
        expected = scores.mean() if t.kind == "regression" else 1 - scores.mean()
        assert table[t.name].of(PU).error == pytest.approx(expected)
    assert data.vs_optimal[PU].tasks == 5 and data.wins.tasks == 5 and (data.wins.model, data.wins.against) == (PU, KENDALL)
    assert set(data.balance) == {PU, KENDALL} and data.balance[KENDALL].n == 3
    # the scorecard's aggregates (MTL against ImageNet, and end-to-end); Table 2 after one epoch and after
    # all, two arms each; share worse + B1 + B3 per weighting; wins; baseline and balance per weighting
    assert len(data.findings) == 2 + 4 + 2 * 3 + 1 + 2 + 2
    assert {f.reading for f in data.findings} <= {CONSISTENT, NOISE, "opposite to the paper"}


def test_seeds_are_averaged_gallery_by_gallery_and_their_spread_kept():
    rng = np.random.default_rng(3)
    cat = catalogue(rng)
    settings = Settings(evaluation=EvalSettings(seeds=2))
    # each seed's models and arms carry their own seed; the averages are named by the first seed's
    seeds = [(training(rng, s, seed), transfer(rng, g, seed), optimal(rng)) for seed, (s, g) in enumerate(((0.0, 0.3), (0.05, 0.1)))]
    data = compare("run-2", settings, cat, DataQuality([], []), *map(list, zip(*seeds)))
    finals = [t.holdouts[0].arms[0].rows[-1].value for _, t, _ in seeds]
    (spread,) = [s.spread for s in data.spread
                 if (s.number.measure, s.number.task, s.number.probe, s.number.arm) == ("transfer_score", "star_rating", "head", MTL)]
    assert spread.mean == pytest.approx(np.mean(finals)) and spread.sd == pytest.approx(np.std(finals, ddof=1))
    mean_scores = (seeds[0][1].holdouts[0].arms[0].rows[-1].scores + seeds[1][1].holdouts[0].arms[0].rows[-1].scores) / 2
    np.testing.assert_allclose(data.holdouts[0].of(MTL).rows[-1].scores, mean_scores)
    np.testing.assert_allclose(data.transfer.get("star_rating", "linear", MTL).scores, mean_scores)
    assert set(data.training) == {PU, KENDALL} and data.seeds == [0, 1]


def test_lay_out_in_reading_order_with_figures_tables_and_metrics(data):
    data.binary = BinaryVsFloat(10, N, "itq64", 64, 8, 512, 100, 0.98, 0.6, {"C1_type": {
        "float": 0.8, "binary": 0.79, "imagenet_float": 0.6}}, [
        CodeCurveRow("sign", skipped="needs more"),
        CodeCurveRow("itq64", 64, 8, True, {"hamming": 0.6, "two_stage": 0.98},
                     {"C1_type": {"hamming": 0.7, "two_stage": 0.79}})])
    report = lay_out(data)
    md = report.markdown()
    order = ["## Transfer scorecard", "## What this run reproduces", "## Data", "## Training",
             "## Held-out task `star_rating`: the paper's view (Table 2)",
             "## MTL vs task-optimal models (Figure 5)", "## Class balance vs MTL benefit (Figure 6)",
             "## Binarized embeddings (Pinterest)"]
    assert [md.index(h) for h in order] == sorted(md.index(h) for h in order)
    assert "`valid` selects each model's best epoch (0)" in md and f"`test` reports ({N})" in md
    assert "| 4 epochs (10 galleries) |" in md and "0.631 / 0.542 / 0.598" in md and "| g3 | g3.jpg | missing file |" in md
    assert "**0.980** two-stage" in md and "| sign | not fitted here: needs more |" in md
    assert "**Primary comparison** (`star_rating`, linear probe): MTL - ImageNet = " in md
    for name in ("transfer_scorecard.png", "training_curves.png", "relative_error.png", "class_balance.png",
                 "binary_codes.png"):
        assert report.files[name][:8] == b"\x89PNG\r\n\x1a\n", name
    assert len(pd.read_csv(pd.io.common.BytesIO(report.files["table2.csv"]))) == 3 * 3 + 1
    metrics = json.loads(json.dumps(report.metrics))  # plain JSON: NaN and arrays converted
    assert metrics["protocol"]["test"].startswith("reports") and metrics["galleries_per_split"]["test"] == N
    assert metrics["per_task"]["measured_on"] == "test" and metrics["per_task"]["selected_on"] == "valid"
    assert metrics["comparisons"]["table2"]["star_rating"]["measured_on"] == "valid+test"
    assert metrics["transfer"]["measured_on"].startswith("valid+test") and metrics["scorecard"]["primary"]["probe"] == "linear"
    transfer_csv = pd.read_csv(pd.io.common.BytesIO(report.files["transfer.csv"]))
    assert set(transfer_csv["row"]) == {"entry", "aggregate"} and len(transfer_csv) == len(data.scorecard.entries) + len(
        data.scorecard.aggregates)
    assert metrics["training"][1] == {"model": KENDALL.as_dict(), "epochs": 3, "best_epoch": 1, "stopped_early": False,
                                      "best_valid_relative_loss": pytest.approx(0.9), "selected_on": "valid"}
    (mtl,) = [a for a in metrics["holdout"]["tasks"][0]["arms"] if a["arm"]["kind"] == "mtl"]
    assert mtl["rows"][-1]["value"] == pytest.approx(data.holdouts[0].of(MTL).rows[-1].scores.mean())
    # the per-gallery scores are in Parquet files beside metrics.json, which names them and holds none
    assert (metrics["holdout"]["per_gallery"], metrics["transfer"]["per_gallery"], metrics["task_optimal"]["per_gallery"]
            ) == ("holdout_scores.parquet", "transfer_scores.parquet", "task_optimal_scores.parquet")
    assert "scored_ids" not in json.dumps(metrics) and "test_scores" not in json.dumps(metrics)
    holdout = pd.read_parquet(pd.io.common.BytesIO(report.files["holdout_scores.parquet"]))
    meta = pq.read_schema(pd.io.common.BytesIO(report.files["holdout_scores.parquet"])).metadata
    assert meta[b"score"] == b"1/0 for a right/wrong class, or the squared error"
    last = holdout[(holdout["arm_kind"] == "mtl") & (holdout["row"] == data.holdouts[0].of(MTL).rows[-1].label)]
    assert last["gallery_id"].tolist() == data.holdouts[0].scored_ids
    assert last["score"].tolist() == data.holdouts[0].of(MTL).rows[-1].scores.tolist()
    assert set(last["arm_weighting"]) == {"pseudo_uniform"} and set(last["arm_seed"]) == {0}
    transfer = pd.read_parquet(pd.io.common.BytesIO(report.files["transfer_scores.parquet"]))
    assert len(transfer) == sum(len(s.gallery_ids) for s in data.transfer.scores)
    linear = transfer[(transfer["probe"] == "linear") & (transfer["arm_kind"] == "imagenet")]
    assert linear["score"].tolist() == data.transfer.get("star_rating", "linear", IMAGENET_ARM).scores.tolist()
    optimal = pd.read_parquet(pd.io.common.BytesIO(report.files["task_optimal_scores.parquet"]))
    assert {t: g["score"].tolist() for t, g in optimal.groupby("task")} == {
        t: list(o.test_scores) for t, o in data.optimal.items()}
    kendall = next(b for b in metrics["comparisons"]["class_balance"]["models"] if b["model"]["weighting"] == "kendall")
    assert all(v is None or not (isinstance(v, float) and math.isnan(v)) for v in kendall["pearson"].values())


def test_a_run_without_task_optimal_models_or_end_to_end_says_what_it_skipped():
    """evaluation.task_optimal and evaluation.end_to_end off: the per-task errors against the baseline stay,
    Figures 5 and 6 and Table 2's end-to-end column go, and the report and metrics.json list what was skipped."""
    rng = np.random.default_rng(7)
    cat = catalogue(rng)
    settings = Settings(evaluation=EvalSettings(task_optimal=False, end_to_end=False))
    held = transfer(rng, 0.3)
    held.holdouts[0].arms = [a for a in held.holdouts[0].arms if a.arm != END_TO_END_ARM]
    held.arms, held.scores = held.arms[:2], [s for s in held.scores if s.arm != END_TO_END_ARM]
    data = compare("run-3", settings, cat, DataQuality([], []), [training(rng, 0.0)], [held], [{}])
    assert data.vs_optimal == {} and data.balance == {} and len(data.per_task) == len(TASKS)
    expected = float(np.mean(1 - data.training[PU].test.scores[:, 0]))  # B1: right/wrong, every test gallery
    assert data.per_task[0].of(PU).error == pytest.approx(expected) and math.isnan(data.per_task[0].error_task_optimal)
    assert {f.claim for f in data.findings}.isdisjoint({WORSE_THAN_OPTIMAL, HELPS_IMBALANCED})
    report = lay_out(data)
    md = report.markdown()
    assert "## MTL vs task-optimal models" not in md and "## MTL tasks on test" in md and "MTL - end-to-end" not in md
    assert "the task-optimal models, and with them Figures 5 and 6 (`evaluation.task_optimal` is false)" in md
    assert "the end-to-end arm of the held-out tasks (`evaluation.end_to_end` is false)" in md
    assert "no end-to-end arm (evaluation.end_to_end is off)" in md and "relative_error.png" not in report.files
    metrics = json.loads(json.dumps(report.metrics))
    assert metrics["task_optimal"] == {"measured_on": "test", "selected_on": "valid", "per_gallery": None, "models": {}}
    assert len(metrics["not_measured"]) == 4 and "task_optimal_scores.parquet" not in report.files  # + seeds, study
    per_task = pd.read_csv(pd.io.common.BytesIO(report.files["per_task.csv"]))
    assert per_task["error_task_optimal"].isna().all() and per_task["error_pseudo_uniform"].tolist() == pytest.approx(
        [r.of(PU).error for r in data.per_task])


def test_models_and_arms_round_trip_through_metrics_json_as_fields(data):
    """metrics.json names every trained model and every arm by its fields (never a name to split): they read
    back into the same identities, and the labels beside them are made from those fields."""
    from gallery.evaluation.arms import SPECIALISED, arm_label, baseline_arm
    from gallery.evaluation.report import jsonable

    metrics = json.loads(json.dumps(lay_out(data).metrics))
    assert ModelIdentity.from_dict(metrics["reference_model"]) == PU and metrics["primary_task"] == "star_rating"
    assert [ModelIdentity.from_dict(t["model"]) for t in metrics["training"]] == list(data.training) == [PU, KENDALL]
    assert metrics["transfer"]["arms"][0] == {"kind": "mtl", "model": {"weighting": "pseudo_uniform", "pooling": "mean",
                                                                       "seed": 0, "backbone": "efficientnet_lite0"},
                                              "reference": True, "backbone": None, "task": None, "label": "MTL embeddings"}
    arms = [EmbeddingArm.from_dict(a) for a in metrics["transfer"]["arms"]]
    assert arms == data.transfer.arms and [a["label"] for a in metrics["transfer"]["arms"]] == [arm_label(a) for a in arms]
    assert [(s["task"], s["probe"], EmbeddingArm.from_dict(s["arm"])) for s in metrics["transfer"]["scores"]] == [
        (s.task, s.probe, s.arm) for s in data.transfer.scores]
    primary = metrics["scorecard"]["primary"]
    assert (EmbeddingArm.from_dict(primary["arm"]), EmbeddingArm.from_dict(primary["baseline"])) == (MTL, IMAGENET_ARM)
    assert [[ModelIdentity.from_dict(m["model"]) for m in r["models"]] for r in metrics["per_task"]["rows"]] == [[PU, KENDALL]] * 5
    found = metrics["comparisons"]["findings"]["findings"]
    assert {ModelIdentity.from_dict(f["model"]) for f in found if f["model"]} == {PU, KENDALL}
    assert {EmbeddingArm.from_dict(f["baseline"]) for f in found if f["baseline"]} == {IMAGENET_ARM, END_TO_END_ARM}
    gem = ModelIdentity("kendall", "gem", 2, "vgg16")   # any arm, of any kind, reads back the same
    for arm in (mtl_arm(gem, PU), baseline_arm("timm:resnet50"), EmbeddingArm(SPECIALISED, PU, task="same_property")):
        assert EmbeddingArm.from_dict(json.loads(json.dumps(jsonable(arm)))) == arm
    assert arm_label(mtl_arm(gem, PU)) == "MTL embeddings (kendall+gem)" and gem.folder(first_seed=0) == "kendall+gem-seed2"
    with pytest.raises(TypeError, match="keyed by ModelIdentity"):   # an identity is never turned into a key's text
        jsonable({PU: 1.0})


@pytest.mark.flow  # a fresh process importing UMAP: ~25 s
def test_umaps_graph_and_layout_code_joins_numbas_cache(tmp_path):
    """UMAP leaves these numba functions out of numba's cache (~8 s of compiling in every report and
    evaluate process); after `cache_umaps_compiled_code` each has a file cache. In a fresh process: a
    function compiled before the call keeps no cache."""
    import subprocess
    import sys

    code = ("from gallery.evaluation.projection import cache_umaps_compiled_code\n"
            "import umap.layouts, umap.umap_\n"
            "functions = [umap.umap_.smooth_knn_dist, umap.umap_.compute_membership_strengths,\n"
            "             umap.layouts._nb_optimize_layout_euclidean_single_epoch]\n"
            "before = [type(f._cache).__name__ for f in functions]\n"
            "cache_umaps_compiled_code()\n"
            "print(before, [type(f._cache).__name__ for f in functions])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}).stdout
    assert out.split("] [") == ["['NullCache', 'NullCache', 'NullCache'", "'FunctionCache', 'FunctionCache', 'FunctionCache']\n"]


def test_capped_task_optimal_models_are_said_in_the_skipped_list_and_beside_figure_5(data):
    """Where evaluation.task_optimal_galleries bit (fewer train galleries than the split's), both places say so;
    where it did not, neither does."""
    assert data.optimal_capped_at is None and "**capped**" not in lay_out(data).markdown()
    data.splits["train"] = 400
    for o in data.optimal.values():
        o.train_galleries = 100
    md = lay_out(data).markdown()
    assert data.optimal_capped_at == 100
    assert "- the task-optimal models trained on 100 of the 400 train galleries (`evaluation.task_optimal_galleries`)" in md
    assert "**capped**: the task-optimal models trained on 100 of the 400 train galleries" in md
