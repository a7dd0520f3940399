"""Held-out task evaluation (paper §4.1, Table 2): does the embedding transfer to a task it never saw?

Three arms put the same 2-layer head on top and train it on the products carrying the holdout
label: (a) the exported MTL embeddings, frozen; (b) ImageNet transfer, the mean-pooled vectors of
the pretrained backbone; (c) end-to-end, the §5 architecture trained on the holdout task alone.
Rows: the valid-split metric after 20/40/60/80/100% of one epoch of the labelled train set and
after all epochs, with mean training time per instance and total training time per arm.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy.stats import binomtest
from torch import nn

from gallery.config import Settings
from gallery.data.ingest import Catalogue
from gallery.data.labels import is_labelled
from gallery.data.packed import PackedGalleries, iterate_batches
from gallery.data.tasks import Task
from gallery.model.gallery_model import GalleryModel, build_model
from gallery.model.losses import PseudoUniform
from gallery.training.loop import TrainData, pick_device, predict, task_metric, train_step

ARMS = {"mtl": "MTL embeddings", "imagenet": "ImageNet transfer", "end_to_end": "End-to-end model"}


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
    galleries_seen: int
    value: float
    ci_low: float | None = None   # 95% Clopper-Pearson interval of an accuracy
    ci_high: float | None = None


@dataclass
class ArmResult:
    arm: str
    rows: list[Row]
    train_seconds: float
    seconds_per_instance: float
    instances: int

    def as_dict(self) -> dict:
        return asdict(self)


def _row(label: str, seen: int, task: Task, outputs, targets) -> Row:
    value = task_metric(outputs, targets, task.kind)
    if task.kind == "regression" or math.isnan(value):
        return Row(label, seen, value)
    n = int(is_labelled(targets.numpy(), task.kind).sum())
    ci = binomtest(round(value * n), n).proportion_ci(0.95)
    return Row(label, seen, value, ci.low, ci.high)


def progressive_training(model: GalleryModel, data: TrainData, task: Task, stats, lr: float, batch_galleries: int,
                         fractions, epochs: int, seed: int, precision: str, device=None) -> ArmResult:
    """Train `model` on `task`, measuring the valid metric at fractions of the first epoch and at the end."""
    device = pick_device(device)
    model.to(device)
    loss = PseudoUniform([task], stats).to(device)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    valid_targets = data.targets[task.name][data.valid_rows]
    n = len(data.train_rows)
    marks = [(f, math.ceil(f * n)) for f in fractions]
    rows, seconds, instances = [], 0.0, 0

    def measure(label, seen):
        _, outputs = predict(model, data, data.valid_rows, batch_galleries, device, precision)
        rows.append(_row(label, seen, task, outputs[task.name], valid_targets))

    for epoch in range(epochs):
        order = np.random.default_rng([seed, epoch]).permutation(data.train_rows)
        for batch in iterate_batches(data.store, data.targets, order, batch_galleries):
            model.train()
            start = time.perf_counter()
            train_step(model, loss, optimizer, batch, data.from_features, device, precision)
            seconds += time.perf_counter() - start
            instances += batch.n
            while epoch == 0 and marks and instances >= marks[0][1]:
                fraction, _ = marks.pop(0)
                measure(f"{fraction:.0%} of one epoch", instances)
    measure(f"{epochs} epochs", instances)
    return ArmResult("", rows, seconds, seconds / max(instances, 1), instances)


def labelled_rows(data: TrainData, task: Task) -> TrainData:
    """Only the galleries that carry the task's label, in both splits."""
    labelled = is_labelled(data.targets[task.name].numpy(), task.kind)
    return TrainData(data.store, data.targets, data.train_rows[labelled[data.train_rows]],
                     data.valid_rows[labelled[data.valid_rows]], data.from_features)


def baseline(task: Task, data: TrainData) -> float:
    """Majority class (classification) or train mean (regression), scored on valid."""
    train = data.targets[task.name][data.train_rows]
    valid = data.targets[task.name][data.valid_rows]
    if task.kind == "regression":
        return float(torch.mean((valid - train.mean()) ** 2))
    majority = torch.mode(train.long()).values
    return float((valid.long() == majority).float().mean())


def evaluate_holdout(catalogue: Catalogue, task: Task, settings: Settings, stores: dict[str, PackedGalleries],
                     log=print) -> dict:
    """All three arms on one holdout task. `stores`: 'mtl' and 'imagenet' vectors, 'cache' features/pixels."""
    ev, stats = settings.evaluation, catalogue.stats
    results = {}
    for arm in ARMS:
        torch.manual_seed(settings.train.seed)
        if arm == "end_to_end":
            store, from_features = stores["cache"], settings.train.use_cache
            model = build_model(settings.model, [task], stats)
            lr = settings.train.lr
        else:
            store, from_features = stores[arm], True
            model = GalleryModel(VectorInput(store.data.shape[1]), [task], settings.model.hidden, stats)
            lr = ev.head_lr
        data = labelled_rows(TrainData.from_catalogue(catalogue.frame, [task], store, from_features), task)
        result = progressive_training(model, data, task, stats, lr, ev.batch_galleries, ev.holdout_fractions,
                                      ev.holdout_epochs, settings.train.seed, settings.train.precision)
        result.arm = arm
        results[arm] = result.as_dict()
        log(f"holdout {task.name} / {ARMS[arm]}: {metric_name(task)} {result.rows[-1].value:.4f} after "
            f"{ev.holdout_epochs} epochs, {result.seconds_per_instance * 1000:.2f} ms per instance")
    return {"task": task.name, "metric": metric_name(task), "train_galleries": len(data.train_rows),
            "valid_galleries": len(data.valid_rows), "baseline": baseline(task, data), "arms": results}

