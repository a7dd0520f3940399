"""Masked losses, weightings, the frozen-trunk cache, and the training loop's resume and fit."""
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from gallery.config import EvalSettings, ModelSettings, Settings, TrainSettings
from gallery.data.images import load_galleries
from gallery.data.ingest import ingest
from gallery.data.labels import LabelStats
from gallery.data.packed import PackedGalleries
from gallery.data.tasks import Task
from gallery.evaluation.task_optimal import train_task_optimal
from gallery.model.gallery_model import build_model
from gallery.model.losses import Kendall, PseudoUniform, build_weighting, task_loss
from gallery.retrieval.embeddings import embed_galleries, pack_sign_bits
from gallery.training.cache import trunk_features
from gallery.training.loop import TrainData, fit

SIZE = 32
MODEL = ModelSettings(weights="imagenet", image_size=SIZE, hidden=32)


def test_masked_losses_ignore_missing_labels():
    out = torch.tensor([0.3, -1.2, 2.0], requires_grad=True)
    loss = task_loss(out, torch.tensor([1.0, float("nan"), 0.0]), "binary")
    loss.backward()
    assert out.grad[1] == 0 and out.grad[0] != 0 and out.grad[2] != 0
    expected = torch.nn.functional.binary_cross_entropy_with_logits(torch.tensor([0.3, 2.0]), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(loss, expected)

    logits = torch.randn(3, 4, requires_grad=True)
    task_loss(logits, torch.tensor([2, -1, 0]), "multiclass").backward()
    assert (logits.grad[1] == 0).all() and (logits.grad[0] != 0).any()

    pred = torch.tensor([1.0, 5.0, 3.0], requires_grad=True)
    loss = task_loss(pred, torch.tensor([2.0, float("nan"), 1.0]), "regression")
    assert loss.item() == pytest.approx((1 + 4) / 2)


@pytest.mark.parametrize("kind,target", [("binary", [np.nan, np.nan]), ("multiclass", [-1, -1]), ("regression", [np.nan, np.nan])])
def test_batch_without_labels_contributes_zero_not_nan(kind, target):
    out = torch.randn(2, 3, requires_grad=True) if kind == "multiclass" else torch.randn(2, requires_grad=True)
    loss = task_loss(out, torch.tensor(target), kind)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(out.grad).all() and (out.grad == 0).all()


TASKS = [Task("b", "b", "binary"), Task("c", "c", "multiclass", classes=("x", "y")), Task("r", "r", "regression")]
STATS = {"r": LabelStats("regression", {"train": 5}, mean=3.0, variance=4.0)}
LOSSES = {"b": torch.tensor(0.7), "c": torch.tensor(1.3), "r": torch.tensor(10.0)}


def test_pseudo_uniform_by_hand():
    assert PseudoUniform(TASKS, STATS)(LOSSES).item() == pytest.approx(0.7 + 1.3 + 10.0 / 4.0)


def test_kendall_by_hand():
    weighting = Kendall(TASKS, STATS)
    assert weighting.log_vars["r"].item() == pytest.approx(math.log(4.0))  # starts at the pseudo-uniform point
    with torch.no_grad():
        for name, s in (("b", 0.5), ("c", -0.2), ("r", 1.0)):
            weighting.log_vars[name].fill_(s)
    expected = (math.exp(-0.5) * 0.7 + 0.25) + (math.exp(0.2) * 1.3 - 0.1) + (0.5 * math.exp(-1.0) * 10.0 + 0.5)
    assert weighting(LOSSES).item() == pytest.approx(expected, rel=1e-6)
    assert {n for n, _ in weighting.named_parameters()} == {"log_vars.b", "log_vars.c", "log_vars.r"}


@pytest.fixture(scope="module")
def catalogue(small_catalogue):
    cat = ingest(small_catalogue / "manifest.parquet", small_catalogue / "tasks.yaml")
    ids, arrays, _ = load_galleries(cat.frame["gallery_id"], cat.frame["images"], SIZE)
    return cat, PackedGalleries.from_arrays(ids, arrays)


def seeded_model(cat, tasks=None, settings=MODEL):
    torch.manual_seed(0)
    return build_model(settings, tasks or cat.tasks, cat.stats)


@pytest.mark.parametrize("dtype,tolerance", [("float32", 1e-5), ("float16", 2e-3)])
def test_feature_cache_matches_recomputing_the_trunk(catalogue, dtype, tolerance):
    """Embeddings from the cache equal those from pixels: max error relative to the embedding scale."""
    cat, pixels = catalogue
    model = seeded_model(cat)
    cache = trunk_features(model.encoder.images, pixels, dtype=dtype, log=lambda _: None)
    assert cache.data.dtype == getattr(torch, dtype) and cache.gallery_ids == pixels.gallery_ids
    from_pixels = embed_galleries(model.encoder, pixels, from_features=False)
    from_cache = embed_galleries(model.encoder, cache, from_features=True)
    assert np.abs(from_cache - from_pixels).max() / np.abs(from_pixels).max() < tolerance


def test_sign_bits():
    bits = pack_sign_bits(np.array([[0.5, -1.0, 0.0, 2.0, -0.1, 0.3, 0.3, -3.0, 1.0]]))
    assert bits.tolist() == [[0b10010110, 0b10000000]]


@pytest.fixture(scope="module")
def features(catalogue):
    cat, pixels = catalogue
    return trunk_features(seeded_model(cat).encoder.images, pixels, log=lambda _: None)


def train_once(cat, features, weighting, settings, ckpt, resume_from=None):
    model = seeded_model(cat)
    w = build_weighting(weighting, cat.tasks, cat.stats)
    data = TrainData.from_catalogue(cat.frame, cat.tasks, features, from_features=True)
    result = fit(model, w, data, settings, str(ckpt), resume_from=resume_from, log=lambda _: None)
    return model, w, result


@pytest.mark.parametrize("weighting", ["pseudo_uniform", "kendall"])
def test_resume_equals_uninterrupted(catalogue, features, tmp_path, weighting):
    cat, _ = catalogue
    settings = TrainSettings(max_epochs=3, patience=10, batch_galleries=16, lr=2e-3, precision="fp32")
    full_model, full_w, full = train_once(cat, features, weighting, settings, tmp_path / "full")
    # a run that died after its first epoch, then a fresh process resuming from its checkpoint
    train_once(cat, features, weighting, replace(settings, max_epochs=1), tmp_path / "died")
    model, w, resumed = train_once(cat, features, weighting, settings, tmp_path / "resumed",
                                   resume_from=str(tmp_path / "died"))
    assert resumed.resumed_at_epoch == 1 and [h.epoch for h in resumed.history] == [0, 1, 2]
    assert [h.valid_loss for h in resumed.history] == [h.valid_loss for h in full.history]
    for (name, a), b in zip(full_model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    for a, b in zip(full_w.parameters(), w.parameters()):
        assert torch.equal(a, b)
    last = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    assert set(last) >= {"model", "weighting", "optimizer", "epoch", "torch_rng", "result"}
    if weighting == "kendall":
        assert any(abs(v.item()) > 1e-4 for k, v in last["weighting"].items() if not k.endswith(".r"))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_tiny_catalogue_is_fitted(catalogue, features, tmp_path, precision):
    """Trained long enough on little data, the training loss falls by a large factor (in full
    precision and under bf16 autocast, the default on CPUs with native bf16)."""
    cat, _ = catalogue
    settings = TrainSettings(max_epochs=25, patience=1000, batch_galleries=16, lr=3e-3, precision=precision)
    _, _, result = train_once(cat, features, "pseudo_uniform", settings, tmp_path)
    first, last = result.history[0].train_loss, result.history[-1].train_loss
    assert last < first / 4, (first, last)
    assert result.best_valid_loss < result.history[0].valid_loss


def test_early_stopping_restores_the_best_epoch(catalogue, features, tmp_path):
    cat, _ = catalogue
    settings = TrainSettings(max_epochs=30, patience=1, batch_galleries=16, lr=3e-2, precision="fp32")  # overfits fast
    model, w, result = train_once(cat, features, "pseudo_uniform", settings, tmp_path)
    assert result.stopped_early and len(result.history) < 30
    losses = [h.valid_loss for h in result.history]
    assert result.best_epoch == int(np.argmin(losses)) and losses[-1] > min(losses)
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    for name, value in model.state_dict().items():
        assert torch.equal(value, best["model"][name]), name


def test_task_optimal_keeps_its_result_not_its_checkpoints(catalogue, features, tmp_path):
    """A finished task-optimal model leaves only result.json (not ~50 MB of checkpoints per task),
    and a resumed run reuses that result instead of training the task again."""
    cat, _ = catalogue
    settings = Settings(model=MODEL, train=TrainSettings(batch_galleries=16, precision="fp32"),
                        evaluation=EvalSettings(task_optimal_epochs=2))
    task = next(t for t in cat.tasks if t.kind == "binary")
    first = train_task_optimal(cat, task, features, settings, str(tmp_path / "origin"), log=lambda _: None)
    assert [p.name for p in (tmp_path / "origin").iterdir()] == ["result.json"]
    assert 1 <= first["epochs"] <= 2 and 0 <= first["error"] <= 1 and first["valid_labelled"] > 0

    lines = []
    again = train_task_optimal(cat, task, features, settings, str(tmp_path / "resumed"),
                               resume_from=str(tmp_path / "origin"), log=lines.append)
    assert again == first and lines == [f"task-optimal {task.name}: already evaluated in {tmp_path / 'origin'}, "
                                        f"error {first['error']:.4f}"]
    assert (tmp_path / "resumed" / "result.json").exists()
