"""Masked losses, weightings, the frozen-trunk cache, the training loop's resume and fit, and the
task-optimal models trained together."""
import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from gallery.config import ModelSettings, Settings, TrainSettings
from gallery.data.images import load_galleries
from gallery.data.ingest import ingest
from gallery.data.labels import LabelStats
from gallery.data.packed import PackedGalleries
from gallery.data.tasks import Task
from gallery.evaluation.task_optimal import train_task_optimal
from gallery.model.gallery_model import build_model
from gallery.model.heads import HeadLayout
from gallery.model.losses import Kendall, PseudoUniform, TaskLosses, build_weighting, weighted_loss
from gallery.retrieval.embeddings import embed_galleries, pack_sign_bits
from gallery.training.cache import trunk_features
from gallery.training.loop import TrainData, fit

SIZE = 32
MODEL = ModelSettings(weights="imagenet", image_size=SIZE, hidden=32)
NAN = float("nan")

# ---------------------------------------------------------------- masked losses

LOSS_TASKS = [Task("b", "b", "binary"), Task("c", "c", "multiclass", classes=("x", "y", "z")),
              Task("r", "r", "regression"), Task("b2", "b2", "binary"), Task("c2", "c2", "multiclass", classes=("p", "q"))]


def reference_losses(outputs: dict, targets: dict) -> dict:
    """The losses as first written: per task, boolean indexing of the labelled rows (a host sync each)."""
    out = {}
    for t in LOSS_TASKS:
        target = targets[t.name]
        mask = target != -1 if t.kind == "multiclass" else ~torch.isnan(target)
        if not mask.any():
            out[t.name] = outputs[t.name].sum() * 0.0
            continue
        o, y = outputs[t.name][mask].float(), target[mask]
        out[t.name] = (F.binary_cross_entropy_with_logits(o, y.float()) if t.kind == "binary"
                       else F.cross_entropy(o, y.long()) if t.kind == "multiclass" else F.mse_loss(o, y.float()))
    return out


def loss_case(seed=0, n=7):
    g = torch.Generator().manual_seed(seed)
    layout = HeadLayout.of(LOSS_TASKS)
    outputs = torch.randn(n, layout.columns, generator=g, requires_grad=True)
    targets = torch.stack([
        torch.tensor([1, 0, NAN, 1, 0, NAN, 1]),            # b
        torch.tensor([2, NAN, 0, 1, NAN, NAN, 2]),          # c (class indices)
        torch.tensor([3.5, NAN, -1.0, NAN, 0.25, 2.0, NAN]),  # r
        torch.full((n,), NAN),                              # b2: no label in this batch
        torch.tensor([NAN, 1, NAN, NAN, NAN, NAN, 0]),      # c2
    ], 1)
    return layout, outputs, targets


def test_masked_losses_equal_the_per_task_reference_in_values_and_gradients():
    layout, outputs, targets = loss_case()
    sums = TaskLosses(layout)(outputs, targets)
    ours = sums.means()
    assert sums.count.tolist() == [5, 4, 4, 0, 2]
    by_task = layout.split(outputs)
    as_given = {t.name: torch.nan_to_num(targets[:, k], nan=-1.0).long() if t.kind == "multiclass" else targets[:, k]
                for k, t in enumerate(LOSS_TASKS)}
    reference = reference_losses(by_task, as_given)
    torch.testing.assert_close(ours, torch.stack([reference[t.name] for t in LOSS_TASKS]))
    weights = torch.tensor([0.3, 1.7, 0.2, 5.0, 0.9])  # any weighting: compare gradients of a weighted sum
    (grad_ours,) = torch.autograd.grad((weights * ours).sum(), outputs)
    (grad_ref,) = torch.autograd.grad(sum(w * reference[t.name] for w, t in zip(weights, LOSS_TASKS)), outputs)
    torch.testing.assert_close(grad_ours, grad_ref)
    assert (grad_ours[:, layout.scalar_tasks.index(3)] == 0).all()  # the label-free task gets no gradient
    labelled = ~torch.isnan(targets[:, 0])
    assert sums.correct[0].item() == ((by_task["b"][labelled] > 0).float() == targets[labelled, 0]).sum().item()


class HostSyncs(TorchDispatchMode):
    """Records the ops that make the host wait for the device: a tensor's value read on the host
    (.item(), `if tensor`), and ops whose result size depends on the data (nonzero, bincount, unique,
    indexing by a boolean mask...)."""

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        boolean_index = "index" in name and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool
            for a in args if isinstance(a, (list, tuple)) for i in a)
        data_sized = ("nonzero", "_local_scalar_dense", "masked_select", "bincount", "unique", "repeat_interleave")
        if boolean_index or any(s in name for s in data_sized):
            self.found.append(name)
        return func(*args, **(kwargs or {}))


def test_masked_losses_need_no_host_synchronisation():
    """No op that must wait for the device (nonzero from boolean indexing, .item(), `if tensor`) in the
    forward and backward of the losses and weightings; the first implementation had one per task."""
    layout, outputs, targets = loss_case()
    stats = {"r": LabelStats("regression", {"train": 5}, mean=0.0, variance=4.0)}
    with HostSyncs() as ours:
        sums = TaskLosses(layout)(outputs, targets)
        for weighting in (PseudoUniform(LOSS_TASKS, stats), Kendall(LOSS_TASKS, stats)):
            weighted_loss(weighting, sums).backward(retain_graph=True)
    assert ours.found == []
    with HostSyncs() as old:  # the detector itself works: the boolean-indexing reference syncs per task
        as_given = {t.name: torch.nan_to_num(targets[:, k], nan=-1.0).long() if t.kind == "multiclass" else targets[:, k]
                    for k, t in enumerate(LOSS_TASKS)}
        reference_losses(layout.split(outputs), as_given)
    assert len(old.found) >= len(LOSS_TASKS)


def test_a_whole_forward_and_backward_needs_no_host_synchronisation(catalogue, features):
    """Top, pooling, 31 heads, masked losses, weighting and backward: the host never waits for the
    device, so on a GPU it queues the next kernels while the current ones run (Adam, fused on CUDA,
    keeps its step count on the device too)."""
    from gallery.data.readers import batches_of, stream
    from gallery.training.loop import Objective

    cat, _ = catalogue
    data = TrainData.from_catalogue(cat.frame, cat.tasks, features, from_features=True)
    batch = next(iter(stream(features, batches_of(data.train_rows, 8), data.targets)))
    objective = Objective(seeded_model(cat), build_weighting("kendall", cat.tasks, cat.stats), True, "fp32")
    with HostSyncs() as step:
        objective(batch.x, batch.index, batch.n, batch.targets).backward()
    assert step.found == []


@pytest.mark.parametrize("kind", ["binary", "multiclass", "regression"])
def test_batch_without_labels_contributes_zero_not_nan(kind):
    tasks = [Task("t", "t", kind, classes=("x", "y", "z") if kind == "multiclass" else None)]
    layout = HeadLayout.of(tasks)
    outputs = torch.randn(2, layout.columns, requires_grad=True)
    sums = TaskLosses(layout)(outputs, torch.full((2, 1), NAN))
    loss = sums.means().sum()
    assert loss.item() == 0.0 and sums.count.item() == 0
    loss.backward()
    assert torch.isfinite(outputs.grad).all() and (outputs.grad == 0).all()


TASKS = [Task("b", "b", "binary"), Task("c", "c", "multiclass", classes=("x", "y")), Task("r", "r", "regression")]
STATS = {"r": LabelStats("regression", {"train": 5}, mean=3.0, variance=4.0)}
LOSSES = torch.tensor([0.7, 1.3, 10.0])
ALL = torch.tensor([True, True, True])


def test_pseudo_uniform_by_hand():
    assert PseudoUniform(TASKS, STATS)(LOSSES, ALL).item() == pytest.approx(0.7 + 1.3 + 10.0 / 4.0)


def test_kendall_by_hand():
    weighting = Kendall(TASKS, STATS)
    assert weighting.log_vars[2].item() == pytest.approx(math.log(4.0))  # starts at the pseudo-uniform point
    with torch.no_grad():
        weighting.log_vars.copy_(torch.tensor([0.5, -0.2, 1.0]))
    expected = (math.exp(-0.5) * 0.7 + 0.25) + (math.exp(0.2) * 1.3 - 0.1) + (0.5 * math.exp(-1.0) * 10.0 + 0.5)
    assert weighting(LOSSES, ALL).item() == pytest.approx(expected, rel=1e-6)
    # a task without a label in the batch contributes neither its loss (0) nor its ½·s term
    absent = torch.tensor([True, False, True])
    assert weighting(LOSSES * absent, absent).item() == pytest.approx(expected - (math.exp(0.2) * 1.3 - 0.1), rel=1e-6)
    assert [n for n, _ in weighting.named_parameters()] == ["log_vars"]


def test_kendall_weight_of_a_task_does_not_drift_on_batches_without_its_label():
    """Trained on batches where task c never has a label, its s_c stays where it started; with the
    ½·s term counted on every batch (the first implementation) it would fall, raising c's weight."""
    weighting = Kendall(TASKS, STATS)
    start = weighting.log_vars.detach().clone()
    optimizer = torch.optim.Adam(weighting.parameters(), lr=0.05)
    for step in range(50):
        losses = torch.tensor([0.7, 0.0, 10.0]) * (1 + 0.1 * math.sin(step))
        present = torch.tensor([True, False, True])
        optimizer.zero_grad()
        weighting(losses, present).backward()
        optimizer.step()
    assert weighting.log_vars[1].item() == start[1].item()
    assert abs(weighting.log_vars[0].item() - start[0].item()) > 0.1  # the labelled ones do move
    every_batch = 0.5 * weighting.log_vars[1]  # what the old objective added for c: d/ds = 0.5 > 0
    assert torch.autograd.grad(every_batch, weighting.log_vars)[0][1].item() == 0.5


# ---------------------------------------------------------------- cache and training

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
    cache = pixels.map_data(lambda d: trunk_features(model.encoder.images, d, dtype=dtype))
    assert cache.data.dtype == getattr(torch, dtype) and len(cache.data) == len(pixels.data)
    from_pixels = embed_galleries(model.encoder, pixels, from_features=False)
    from_cache = embed_galleries(model.encoder, cache, from_features=True)
    assert np.abs(from_cache - from_pixels).max() / np.abs(from_pixels).max() < tolerance


def test_sign_bits():
    bits = pack_sign_bits(np.array([[0.5, -1.0, 0.0, 2.0, -0.1, 0.3, 0.3, -3.0, 1.0]]))
    assert bits.tolist() == [[0b10010110, 0b10000000]]


@pytest.fixture(scope="module")
def features(catalogue):
    cat, pixels = catalogue
    return pixels.map_data(lambda d: trunk_features(seeded_model(cat).encoder.images, d))


def train_once(cat, features, weighting, settings, ckpt, resume_from=None, tasks=None):
    tasks = tasks or cat.tasks
    model = seeded_model(cat, tasks)
    w = build_weighting(weighting, tasks, cat.stats)
    data = TrainData.from_catalogue(cat.frame, tasks, features, from_features=True)
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
        classification = [k for k, t in enumerate(cat.tasks) if t.kind != "regression"]
        assert (last["weighting"]["log_vars"][classification].abs() > 1e-4).any()


def test_tiny_catalogue_is_fitted(catalogue, features, tmp_path):
    """Trained long enough on little data, the training loss falls by a large factor."""
    cat, _ = catalogue
    settings = TrainSettings(max_epochs=25, patience=1000, batch_galleries=16, lr=3e-3, precision="fp32")
    _, _, result = train_once(cat, features, "pseudo_uniform", settings, tmp_path)
    first, last = result.history[0].train_loss, result.history[-1].train_loss
    assert last < first / 4, (first, last)
    assert result.best_valid_loss < result.history[0].valid_loss


def test_training_under_bf16_autocast(catalogue, features, tmp_path):
    """bf16 autocast (the default on CUDA and CPUs with native bf16) trains: the top runs in bf16 and
    the loss falls. Kept small: on CPUs without native bf16 it is emulated, ~50x slower than fp32."""
    cat, _ = catalogue
    model = seeded_model(cat)
    data = TrainData.from_catalogue(cat.frame, cat.tasks, features, from_features=True)
    data = replace(data, train_rows=data.train_rows[:32], valid_rows=data.valid_rows[:8])
    dtypes = []
    model.encoder.images.top.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    settings = TrainSettings(max_epochs=3, patience=1000, batch_galleries=8, lr=1e-2, precision="bf16")
    result = fit(model, build_weighting("pseudo_uniform", cat.tasks, cat.stats), data, settings, str(tmp_path),
                 log=lambda _: None)
    assert set(dtypes) == {torch.bfloat16}
    losses = [h.train_loss for h in result.history]
    assert losses[-1] < losses[0] and all(np.isfinite(losses)), losses


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


# ---------------------------------------------------------------- task-optimal models, trained together

def test_task_optimal_models_trained_together_equal_one_by_one(catalogue, features, tmp_path):
    """The grouped training gives each task the errors (per epoch, best epoch, early stop) of that
    task's model trained alone by `fit`, the MTL training loop, on the same batches and budget."""
    cat, _ = catalogue
    evaluable = [t for t in cat.tasks if cat.stats[t.name].labelled.get("valid", 0) > 0]
    tasks = [next(t for t in evaluable if t.kind == k) for k in ("binary", "multiclass", "regression")]
    tasks.append([t for t in evaluable if t.kind == "binary"][1])
    train = TrainSettings(max_epochs=4, patience=1, batch_galleries=16, lr=2e-3, precision="fp32")
    settings = Settings(model=MODEL, train=train)
    together = train_task_optimal(cat, tasks, features, settings, lambda name: str(tmp_path / "together" / name),
                                  lambda name: None, log=lambda _: None)
    for task in tasks:
        _, _, alone = train_once(cat, features, "pseudo_uniform", train, tmp_path / "alone" / task.name, tasks=[task])
        outcome = together[task.name]
        assert outcome["epochs"] == len(alone.history) and outcome["best_epoch"] == alone.best_epoch, task.name
        best = alone.history[alone.best_epoch].valid_metrics[task.name]
        assert outcome["error"] == pytest.approx(best if task.kind == "regression" else 1 - best, rel=1e-4, abs=1e-6)
        assert outcome["max_epochs"] == 4 and outcome["patience"] == 1  # the MTL budget, said in the report


def test_task_optimal_keeps_its_result_not_its_checkpoints(catalogue, features, tmp_path):
    """A finished task-optimal model leaves only result.json, and a resumed run reuses that result
    instead of training the task again."""
    cat, _ = catalogue
    settings = Settings(model=MODEL, train=TrainSettings(batch_galleries=16, max_epochs=2, precision="fp32"))
    task = next(t for t in cat.tasks if t.kind == "binary")
    first = train_task_optimal(cat, [task], features, settings, lambda name: str(tmp_path / "origin" / name),
                               lambda name: None, log=lambda _: None)[task.name]
    assert [p.name for p in (tmp_path / "origin" / task.name).iterdir()] == ["result.json"]
    assert 1 <= first["epochs"] <= 2 and 0 <= first["error"] <= 1 and first["valid_labelled"] > 0
    assert json.loads((tmp_path / "origin" / task.name / "result.json").read_text()) == first

    lines = []
    again = train_task_optimal(cat, [task], features, settings, lambda name: str(tmp_path / "resumed" / name),
                               lambda name: str(tmp_path / "origin" / name), log=lines.append)[task.name]
    assert again == first and lines == [f"task-optimal {task.name}: already evaluated in "
                                        f"{tmp_path / 'origin' / task.name}, error {first['error']:.4f}"]
    assert (tmp_path / "resumed" / task.name / "result.json").exists()
