"""The one training engine: the frozen-trunk cache, fit's resume and early stopping on an unweighted
criterion, the task-optimal models trained together, and `valid` selecting while `test` reports."""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from gallery.config import ModelSettings, Settings, TrainSettings
from gallery.data.images import load_galleries
from gallery.data.ingest import ingest
from gallery.data.packed import PackedGalleries
from gallery.data.readers import batches_of, stream
from gallery.data.tasks import Task
from gallery.evaluation.holdout import VectorInput
from gallery.evaluation.statistics import CONSISTENT, NOISE, paired_difference
from gallery.evaluation.task_optimal import TaskOptimalResult, train_task_optimal
from gallery.model.gallery_model import GalleryModel, build_model
from gallery.model.weightings import PseudoUniform, build_weighting
from gallery.retrieval.embeddings import embed_galleries, pack_sign_bits
from gallery.training.cache import trunk_features
from gallery.training.engine import (EarlyStopping, FitConfig, FitHooks, FitOptions, Objective, TrainData, Trainable,
                                     fit, score)
from test_losses import HostSyncs

SIZE = 32
MODEL = ModelSettings(weights="imagenet", image_size=SIZE, hidden=16, trainable_blocks=0)  # the default's top: cheap


@pytest.fixture(scope="module")
def catalogue(small_catalogue):
    cat = ingest(small_catalogue / "manifest.parquet", small_catalogue / "tasks.yaml")
    ids, arrays, _ = load_galleries(cat.frame["gallery_id"], cat.frame["images"], SIZE)
    return cat, PackedGalleries.from_arrays(ids, arrays)


def seeded_model(cat, tasks=None, settings=MODEL):
    torch.manual_seed(0)
    return build_model(settings, tasks or cat.tasks, cat.stats)


@pytest.fixture(scope="module")
def features(catalogue):
    cat, pixels = catalogue
    return pixels.map_data(lambda d: trunk_features(seeded_model(cat).encoder.images, d))


@pytest.mark.parametrize("dtype,tolerance", [("float32", 1e-5), ("float16", 2e-3)])
def test_feature_cache_matches_recomputing_the_trunk(catalogue, dtype, tolerance):
    """Embeddings from the cache equal those from pixels: max error relative to the embedding scale."""
    cat, pixels = catalogue
    model = seeded_model(cat)
    cache = pixels.map_data(lambda d: trunk_features(model.encoder.images, d, dtype=dtype))
    assert cache.data.dtype == getattr(torch, dtype) and len(cache.data) == len(pixels.data)
    from_pixels = embed_galleries(model.encoder, pixels, from_features=False)
    from_cache = embed_galleries(model.encoder, cache, from_features=True)
    assert np.abs(from_cache - from_pixels).max() / np.abs(from_pixels).max() < tolerance


def test_sign_bits():
    bits = pack_sign_bits(np.array([[0.5, -1.0, 0.0, 2.0, -0.1, 0.3, 0.3, -3.0, 1.0]]))
    assert bits.tolist() == [[0b10010110, 0b10000000]]


def test_a_whole_forward_and_backward_needs_no_host_synchronisation(catalogue, features):
    """Top, pooling, 31 heads, masked losses, weighting and backward: the host never waits for the
    device, so on a GPU it queues the next kernels while the current ones run (Adam, fused on CUDA,
    keeps its step count on the device too)."""
    cat, _ = catalogue
    data = TrainData.from_catalogue(cat.frame, cat.tasks, features, from_features=True)
    batch = next(iter(stream(features, batches_of(data.train_rows, 8), data.targets)))
    weighting = build_weighting("kendall", cat.tasks, cat.stats)
    objective = Objective(seeded_model(cat), weighting, True, "fp32")
    with HostSyncs() as step:
        losses, present, _ = objective(batch.x, batch.index, batch.n, batch.targets)
        weighting.backward(losses, present)
    assert step.found == []


# ---------------------------------------------------------------- early stopping

def test_early_stopping_watches_each_members_loss_relative_to_its_first_epoch():
    """The criterion is the mean over a member's tasks of valid loss / first-epoch valid loss: a task in
    large units (a regression's MSE) counts as much as a binary one, and NaN (no label) is left out."""
    stopping = EarlyStopping([[0, 1, 2], [2]], patience=2)
    values, improved = stopping.update(0, np.array([0.5, 100.0, 2.0]))
    assert values == [1.0, 1.0] and improved == [0, 1]
    values, improved = stopping.update(1, np.array([0.25, 150.0, np.nan]))  # (0.5 + 1.5) / 2; task 2 unlabelled
    assert values[0] == pytest.approx(1.0) and np.isnan(values[1]) and improved == []
    values, improved = stopping.update(2, np.array([0.25, 90.0, 1.0]))   # (0.5 + 0.9 + 0.5) / 3
    assert values == pytest.approx([1.9 / 3, 0.5]) and improved == [0, 1]
    stopping.update(3, np.array([0.3, 95.0, 1.5]))
    stopping.update(4, np.array([0.3, 95.0, 1.5]))
    assert stopping.stopped == [True, True] and stopping.best_epoch == [2, 2] and stopping.active() == []
    assert EarlyStopping([[0]], patience=None, best_epoch=[0]).stopped == [False]  # a fixed budget never stops


# ---------------------------------------------------------------- fit

def test_fit_names_the_model_it_trains_and_takes_its_options_as_one_object(catalogue):
    """The MTL model and a group of single-task models are both what `fit` relies on (Trainable); a plain
    module is not. Where and how it runs is one typed FitOptions, its callbacks one FitHooks."""
    from gallery.training.group import ModelGroup

    cat, _ = catalogue
    assert isinstance(seeded_model(cat), Trainable)
    assert isinstance(ModelGroup([seeded_model(cat, [t]) for t in cat.tasks[:2]]), Trainable)
    assert not isinstance(torch.nn.Linear(2, 2), Trainable)
    options = FitOptions()
    assert (options.checkpoints, options.resume_from, options.select, options.time_steps) == (None, None, True, False)
    assert options.hooks == FitHooks() and options.ranks.world == 1



def train_once(cat, features, weighting, settings, ckpt, resume_from=None, tasks=None):
    tasks = tasks or cat.tasks
    model = seeded_model(cat, tasks)
    w = build_weighting(weighting, tasks, cat.stats)
    data = TrainData.from_catalogue(cat.frame, tasks, features, from_features=True)
    result = fit(model, w, data, FitConfig.of(settings),
                 FitOptions(checkpoints=str(ckpt), resume_from=resume_from, log=lambda _: None))
    return model, w, result


@pytest.mark.parametrize("weighting", ["pseudo_uniform", "kendall", "dwa"])
def test_resume_equals_uninterrupted(catalogue, features, tmp_path, weighting):
    cat, _ = catalogue
    settings = TrainSettings(max_epochs=3, patience=10, batch_galleries=16, lr=2e-3, precision="fp32")
    full_model, full_w, full = train_once(cat, features, weighting, settings, tmp_path / "full")
    # a run that died after its first epoch, then a fresh process resuming from its checkpoint
    train_once(cat, features, weighting, replace(settings, max_epochs=1), tmp_path / "died")
    model, w, resumed = train_once(cat, features, weighting, settings, tmp_path / "resumed",
                                   resume_from=str(tmp_path / "died"))
    assert resumed.resumed_at_epoch == 1 and [h.epoch for h in resumed.history] == [0, 1, 2]
    assert [h.valid_criterion for h in resumed.history] == [h.valid_criterion for h in full.history]
    for (name, a), b in zip(full_model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    for (name, a), b in zip(full_w.state_dict().items(), w.state_dict().values()):
        assert torch.equal(a, b), name
    last = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    assert set(last) >= {"model", "weighting", "optimizer", "epoch", "torch_rng", "result", "stopping"}
    if weighting == "kendall":
        classification = [k for k, t in enumerate(cat.tasks) if t.kind != "regression"]
        assert (last["weighting"]["log_vars"][classification].abs() > 1e-4).any()


def test_tiny_catalogue_is_fitted(catalogue, features, tmp_path):
    """Trained long enough on little data, the training loss falls by a large factor."""
    cat, _ = catalogue
    settings = TrainSettings(max_epochs=12, patience=1000, batch_galleries=16, lr=1e-2, precision="fp32")
    _, _, result = train_once(cat, features, "pseudo_uniform", settings, tmp_path)
    first, last = result.history[0].train_loss, result.history[-1].train_loss
    assert last < first / 4, (first, last)


def test_training_under_bf16_autocast(catalogue, features, tmp_path):
    """bf16 autocast (the default on CUDA and CPUs with native bf16) trains: the top runs in bf16 and
    the loss falls. Kept small: on CPUs without native bf16 it is emulated, ~50x slower than fp32."""
    cat, _ = catalogue
    model = seeded_model(cat)
    data = TrainData.from_catalogue(cat.frame, cat.tasks, features, from_features=True)
    data = replace(data, train_rows=data.train_rows[:32], valid_rows=data.valid_rows[:8])
    dtypes = []
    model.encoder.images.top.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    config = FitConfig(max_epochs=3, patience=1000, batch_galleries=8, lr=1e-2, precision="bf16")
    result = fit(model, build_weighting("pseudo_uniform", cat.tasks, cat.stats), data, config, FitOptions(log=lambda _: None))
    assert set(dtypes) == {torch.bfloat16}
    losses = [h.train_loss for h in result.history]
    assert losses[-1] < losses[0] and all(np.isfinite(losses)), losses


def test_early_stopping_restores_the_best_epoch(catalogue, features, tmp_path):
    cat, _ = catalogue
    settings = TrainSettings(max_epochs=30, patience=1, batch_galleries=16, lr=3e-2, precision="fp32")  # overfits fast
    model, w, result = train_once(cat, features, "kendall", settings, tmp_path)
    assert result.stopped_early == [True] and len(result.history) < 30
    criterion = [h.valid_criterion[0] for h in result.history]
    assert result.best_epoch == int(np.argmin(criterion)) and criterion[-1] > min(criterion)
    # the criterion is the unweighted mean relative valid loss, whatever Kendall's learned weights did
    first = np.array(list(result.history[0].valid_task_losses.values()))
    best = np.array(list(result.history[result.best_epoch].valid_task_losses.values()))
    assert criterion[result.best_epoch] == pytest.approx(np.nanmean(np.where(first > 0, best / first, np.nan)))
    saved = torch.load(tmp_path / "best.pt", weights_only=True)
    for name, value in model.state_dict().items():
        assert torch.equal(value, saved["model"][name]), name
    for name, value in w.state_dict().items():
        assert torch.equal(value, saved["weighting"][name]), name


# ---------------------------------------------------------------- task-optimal models, trained together

def test_task_optimal_models_trained_together_equal_one_by_one(catalogue, features, tmp_path):
    """The grouped training gives each task what that task's model trained alone by `fit` gives (the
    same batches and budget): the epochs it ran, the epoch valid selected, its test error."""
    cat, _ = catalogue
    evaluable = [t for t in cat.tasks if cat.stats[t.name].labelled.get("valid", 0) > 0
                 and cat.stats[t.name].labelled.get("test", 0) > 0]
    tasks = [next(t for t in evaluable if t.kind == k) for k in ("binary", "multiclass", "regression")]
    tasks.append([t for t in evaluable if t.kind == "binary"][1])
    train = TrainSettings(max_epochs=4, patience=1, batch_galleries=16, lr=2e-3, precision="fp32")
    settings = Settings(model=MODEL, train=train)
    together = train_task_optimal(cat, tasks, features, settings, lambda name: str(tmp_path / "together" / name),
                                  lambda name: None, log=lambda _: None)
    for task in tasks:
        model, _, alone = train_once(cat, features, "pseudo_uniform", train, tmp_path / "alone" / task.name, tasks=[task])
        data = TrainData.from_catalogue(cat.frame, [task], features, from_features=True)
        test = score(model, data, "test", 16).task(task.name)[1]
        outcome = together[task.name]
        assert outcome.epochs == len(alone.history) and outcome.best_epoch == alone.best_epoch, task.name
        expected = test.mean() if task.kind == "regression" else 1 - test.mean()
        assert outcome.error == pytest.approx(expected, rel=1e-4, abs=1e-6)
        np.testing.assert_allclose(outcome.test_scores, test, rtol=1e-4, atol=1e-6)
        assert outcome.max_epochs == 4 and outcome.patience == 1  # the MTL budget, said in the report


def test_task_optimal_models_train_on_a_stable_sample_of_the_train_galleries_when_capped(catalogue, features, tmp_path):
    """evaluation.task_optimal_galleries: the models train on that many train galleries, those with the lowest
    hash of their id (found here by hand), exactly as an uncapped training whose catalogue holds only them in
    train; valid and test stay whole."""
    from gallery.config import EvalSettings
    from gallery.data.split import hash_unit

    cat, _ = catalogue
    task = next(t for t in cat.tasks if t.kind == "binary")
    train = TrainSettings(batch_galleries=8, max_epochs=2, precision="fp32")
    ids = [g for g in features.gallery_ids if cat.frame.set_index("gallery_id").loc[g, "split"] == "train"]
    cap = len(ids) // 2
    kept = set(sorted(ids, key=lambda g: hash_unit(f"task_optimal:{g}"))[:cap])
    capped = train_task_optimal(cat, [task], features, Settings(model=MODEL, train=train,
                                                                evaluation=EvalSettings(task_optimal_galleries=cap)),
                                lambda name: str(tmp_path / "capped" / name), lambda name: None, log=lambda _: None)
    frame = cat.frame.assign(split=[s if s != "train" or g in kept else "left out"
                                    for g, s in zip(cat.frame["gallery_id"], cat.frame["split"])])
    only_kept = train_task_optimal(replace(cat, frame=frame), [task], features, Settings(model=MODEL, train=train),
                                   lambda name: str(tmp_path / "kept" / name), lambda name: None, log=lambda _: None)
    a, b = capped[task.name], only_kept[task.name]
    assert a.train_galleries == b.train_galleries == cap and a.test_ids == b.test_ids
    assert (a.epochs, a.best_epoch) == (b.epochs, b.best_epoch) and a.error == pytest.approx(b.error, abs=1e-6)


def test_task_optimal_keeps_its_result_not_its_checkpoints(catalogue, features, tmp_path):
    """A finished task-optimal model leaves only result.json, and a resumed run reuses that result
    instead of training the task again."""
    cat, _ = catalogue
    settings = Settings(model=MODEL, train=TrainSettings(batch_galleries=16, max_epochs=2, precision="fp32"))
    task = next(t for t in cat.tasks if t.kind == "binary")
    first = train_task_optimal(cat, [task], features, settings, lambda name: str(tmp_path / "origin" / name),
                               lambda name: None, log=lambda _: None)[task.name]
    assert [p.name for p in (tmp_path / "origin" / task.name).iterdir()] == ["result.json"]
    assert 1 <= first.epochs <= 2 and 0 <= first.error <= 1 and first.test_labelled > 0
    assert first.split == "test" and first.selected_on == "valid"
    assert TaskOptimalResult(**json.loads((tmp_path / "origin" / task.name / "result.json").read_text())) == first

    lines = []
    again = train_task_optimal(cat, [task], features, settings, lambda name: str(tmp_path / "resumed" / name),
                               lambda name: str(tmp_path / "origin" / name), log=lines.append)[task.name]
    assert again == first and lines == [f"task-optimal {task.name}: already evaluated in "
                                        f"{tmp_path / 'origin' / task.name}, error {first.error:.4f}"]
    assert (tmp_path / "resumed" / task.name / "result.json").exists()


# ---------------------------------------------------------------- valid selects, test reports

def test_valid_selects_the_epoch_and_test_only_reports_it():
    """Valid labels that disagree with train and test (flipped): the longer the model trains, the better
    it does on test and the worse on valid. Valid selects the first epoch; the reported test accuracy is
    that epoch's, not the better one a selection on test would pick, and the comparison with the majority
    baseline reads differently under the two selections: the reading comes from valid's choice."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(600, 6)).astype(np.float32)
    truth = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.float32)
    labels = truth.copy()
    labels[400:500] = 1 - truth[400:500]  # valid: flipped
    rows = np.arange(600)
    data = TrainData(PackedGalleries([str(i) for i in rows], torch.arange(601), torch.from_numpy(x)),
                     torch.from_numpy(labels[:, None]), rows[:400], rows[400:500], rows[500:])
    task = Task("t", "t", "binary")
    torch.manual_seed(0)
    model = GalleryModel(VectorInput(6), [task], 16)
    per_epoch = []
    result = fit(model, PseudoUniform([task], {}), data,
                 FitConfig(lr=3e-3, batch_galleries=50, max_epochs=6, patience=10, precision="fp32"),
                 FitOptions(log=lambda _: None, hooks=FitHooks(
                     on_epoch_end=lambda epoch: per_epoch.append(score(model, data, "test", 100).scores[:, 0]))))
    reported = score(model, data, "test", 100).scores[:, 0]
    accuracy = [s.mean() for s in per_epoch]
    assert result.best_epoch == 0 and np.array_equal(reported, per_epoch[0])
    assert int(np.argmax(accuracy)) > 0 and max(accuracy) > accuracy[0] + 0.1
    majority = (truth[500:] == float(labels[:400].mean() > 0.5)).astype(float)
    as_selected = paired_difference(reported, majority).read(+1).reading
    on_test = paired_difference(per_epoch[int(np.argmax(accuracy))], majority).read(+1).reading
    assert (as_selected, on_test) == (NOISE, CONSISTENT), (accuracy, majority.mean())
