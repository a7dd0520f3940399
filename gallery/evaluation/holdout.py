"""Held-out task evaluation (paper §4.1, Table 2): does the embedding transfer to a task it never saw?

Three arms put the same 2-layer head on top and train it on the products carrying the holdout
label: (a) the exported MTL embeddings, frozen; (b) ImageNet transfer, the mean-pooled vectors of
the pretrained backbone; (c) end-to-end, the §5 architecture trained on the holdout task alone.
Rows: the valid-split metric after 20/40/60/80/100% of one epoch of the labelled train set and
after all epochs; every row keeps each valid gallery's score, so arms are compared pair by pair
on the same galleries (gallery.evaluation.statistics). Time per instance: training steps only.
When the end-to-end arm trains from the feature cache, a few of its steps are also timed from
pixels, through every layer an end-to-end model runs, and both figures are reported.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from scipy.stats import binomtest
from torch import nn

from gallery.config import Settings
from gallery.data.ingest import Catalogue
from gallery.data.packed import PackedGalleries
from gallery.data.readers import batches_of
from gallery.data.tasks import Task
from gallery.model.gallery_model import GalleryModel, build_model
from gallery.model.losses import PseudoUniform
from gallery.training.device import fast_layout, pick_device
from gallery.training.loop import Objective, TrainData, gallery_scores, predict, train_step

ARMS = {"mtl": "MTL embeddings", "imagenet": "ImageNet transfer", "end_to_end": "End-to-end model"}
PIXEL_TIMING_STEPS = 5


class VectorInput(nn.Module):
    """Galleries that are already one vector each: the 'encoder' of the embedding arms."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, x, index, n, from_features=False):
        return x.float()


def vectors_as_galleries(gallery_ids, vectors) -> PackedGalleries:
    """One row per gallery, so the embedding arms run through the same batching as the others."""
    data = torch.as_tensor(np.asarray(vectors, dtype=np.float32))
    return PackedGalleries(list(gallery_ids), torch.arange(len(data) + 1, dtype=torch.int64), data)


def metric_name(task: Task) -> str:
    return "MSE" if task.kind == "regression" else "accuracy"


@dataclass
class Row:
    label: str
    fraction: float | None        # of one epoch; None for the row after all epochs
    epochs: int | None            # all epochs; None for the fractions of the first
    galleries_seen: int
    value: float
    ci_low: float | None = None   # 95% Clopper-Pearson interval of an accuracy
    ci_high: float | None = None
    scores: list | None = None    # each valid gallery's 1/0 (or squared error), in the holdout's valid order


@dataclass
class ArmResult:
    arm: str
    rows: list[Row]
    train_seconds: float
    seconds_per_instance: float
    instances: int
    seconds_per_instance_from_pixels: float | None = None  # end-to-end from the cache: timed from pixels too

    def as_dict(self) -> dict:
        return asdict(self)


def _row(label: str, seen: int, model: GalleryModel, outputs, targets, fraction=None, epochs=None) -> Row:
    task = model.tasks[0]
    scores = gallery_scores(model.heads.layout, outputs, targets[:, None])[:, 0]
    value = float(scores.mean()) if len(scores) else math.nan
    if task.kind == "regression" or math.isnan(value):
        return Row(label, fraction, epochs, seen, value, scores=scores.tolist())
    ci = binomtest(int(scores.sum()), len(scores)).proportion_ci(0.95)
    return Row(label, fraction, epochs, seen, value, ci.low, ci.high, scores.tolist())


def progressive_training(model: GalleryModel, data: TrainData, task: Task, stats, lr: float, batch_galleries: int,
                         fractions, epochs: int, seed: int, precision: str, device=None) -> ArmResult:
    """Train `model` on `task`, measuring the valid metric at fractions of the first epoch and at the end."""
    device = pick_device(device)
    fast_layout(model.to(device), device)
    objective = Objective(model, PseudoUniform([task], stats).to(device), data.from_features, precision)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    valid_targets = data.targets[data.valid_rows, 0]
    n = len(data.train_rows)
    marks = [(f, math.ceil(f * n)) for f in fractions]
    rows, seconds, instances = [], 0.0, 0

    def measure(label, seen, **meaning):
        _, outputs = predict(model, data, data.valid_rows, batch_galleries, device, precision)
        rows.append(_row(label, seen, model, outputs, valid_targets, **meaning))

    for epoch in range(epochs):
        order = np.random.default_rng([seed, epoch]).permutation(data.train_rows)
        for batch in data.stream(batches_of(order, batch_galleries), device):
            model.train()
            seconds += _timed(lambda: train_step(objective, optimizer, batch, device), device)
            instances += batch.n
            while epoch == 0 and marks and instances >= marks[0][1]:
                fraction, _ = marks.pop(0)
                measure(f"{fraction:.0%} of one epoch", instances, fraction=fraction)
    measure(f"{epochs} epochs", instances, epochs=epochs)
    return ArmResult("", rows, seconds, seconds / max(instances, 1), instances)


def _timed(step, device) -> float:
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def seconds_per_instance_from_pixels(model: GalleryModel, data: TrainData, task: Task, stats, lr: float,
                                     batch_galleries: int, precision: str, device=None) -> float:
    """A few training steps of the end-to-end model from pixels (frozen trunk, top, head: every layer it
    runs), after one untimed warm-up step: seconds per gallery."""
    device = pick_device(device)
    fast_layout(model.to(device), device).train()
    objective = Objective(model, PseudoUniform([task], stats).to(device), False, precision)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    batches = batches_of(data.train_rows, batch_galleries)[:PIXEL_TIMING_STEPS + 1]
    seconds, instances = 0.0, 0
    for k, batch in enumerate(data.stream(batches, device)):
        took = _timed(lambda: train_step(objective, optimizer, batch, device), device)
        if k:
            seconds, instances = seconds + took, instances + batch.n
    return seconds / max(instances, 1)


def labelled_rows(data: TrainData, column: int = 0) -> TrainData:
    """Only the galleries that carry the label of task `column`, in both splits."""
    labelled = ~torch.isnan(data.targets[:, column]).numpy()
    return replace(data, train_rows=data.train_rows[labelled[data.train_rows]],
                   valid_rows=data.valid_rows[labelled[data.valid_rows]])


def baseline(kind: str, train: torch.Tensor, valid: torch.Tensor) -> float:
    """Majority class (classification) or train mean (regression), scored on the valid labels."""
    train, valid = train[~torch.isnan(train)], valid[~torch.isnan(valid)]
    if len(valid) == 0 or len(train) == 0:
        return math.nan
    if kind == "regression":
        return float(torch.mean((valid - train.mean()) ** 2))
    majority = torch.mode(train.long()).values
    return float((valid.long() == majority).float().mean())


def evaluate_holdout(catalogue: Catalogue, task: Task, settings: Settings, stores: dict, log=print) -> dict:
    """All three arms on one holdout task. `stores`: 'mtl' and 'imagenet' vectors (PackedGalleries),
    'shards' the preprocessed galleries as the preset trains (features or pixels) and 'pixels' as pixels
    (gallery.data.readers.ShardSource)."""
    ev, stats, seed = settings.evaluation, catalogue.stats, settings.train.seed
    results, valid_ids = {}, None
    for arm in ARMS:
        torch.manual_seed(seed)
        if arm == "end_to_end":
            store, from_features, workers = stores["shards"], settings.train.use_cache, settings.data.loader_workers
            model = build_model(settings.model, [task], stats)
            lr = settings.train.lr
        else:
            store, from_features, workers = stores[arm], True, 0
            model = GalleryModel(VectorInput(store.data.shape[1]), [task], settings.model.hidden, stats)
            lr = ev.head_lr
        data = labelled_rows(TrainData.from_catalogue(catalogue.frame, [task], store, from_features, workers))
        ids = [store.gallery_ids[r] for r in data.valid_rows]
        if valid_ids is not None and ids != valid_ids:
            raise ValueError(f"holdout arms disagree on the valid galleries ({arm}); they must be paired")
        valid_ids = ids
        result = progressive_training(model, data, task, stats, lr, ev.batch_galleries, ev.holdout_fractions,
                                      ev.holdout_epochs, seed, settings.train.precision)
        result.arm = arm
        if arm == "end_to_end":
            result.seconds_per_instance_from_pixels = result.seconds_per_instance
            if from_features:
                torch.manual_seed(seed)
                pixels = replace(data, source=stores["pixels"], from_features=False)
                result.seconds_per_instance_from_pixels = seconds_per_instance_from_pixels(
                    build_model(settings.model, [task], stats), pixels, task, stats, lr, ev.batch_galleries,
                    settings.train.precision)
        results[arm] = result.as_dict()
        log(f"holdout {task.name} / {ARMS[arm]}: {metric_name(task)} {result.rows[-1].value:.4f} after "
            f"{ev.holdout_epochs} epochs, {result.seconds_per_instance * 1000:.2f} ms per instance")
    return {"task": task.name, "kind": task.kind, "metric": metric_name(task), "train_galleries": len(data.train_rows),
            "valid_galleries": len(data.valid_rows), "valid_ids": valid_ids, "arms": results,
            "baseline": baseline(task.kind, data.targets[data.train_rows, 0], data.targets[data.valid_rows, 0])}
