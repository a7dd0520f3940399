"""Many single-task models trained in one pass over the data (docs/design.md §6: the task-optimal models).

Model m predicts task m alone. Every batch is read and gathered once (from pixels, it also goes
through the frozen trunk once); each model still training runs its top on it with its loss masked
to its task's labels, one backward serves all (their parameters are disjoint) and one Adam steps
all, so each model gets exactly the updates it would get trained alone on the same batches with
`gallery.training.loop.fit` (tested). Each model keeps its own early
stopping on its own validation loss; a stopped model is no longer run. Measured on CPU, a loop over
the models is 2-4x faster than vmapping them (grouped convolutions).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from gallery.config import TrainSettings
from gallery.data.readers import batches_of
from gallery.model.gallery_model import GalleryModel
from gallery.model.losses import TaskSums, task_metrics, weighted_loss
from gallery.progress import Progress
from gallery.training.device import autocast, fast_layout, pick_device
from gallery.training.loop import Objective, TrainData, gallery_scores, make_optimizer, on_device


@dataclass
class SingleTaskResult:
    """One model's validation history (loss, and its task's metric), best epoch, when it stopped, and
    each valid gallery's score at the best epoch (gallery.training.loop.gallery_scores)."""

    valid_losses: list[float] = field(default_factory=list)
    valid_metrics: list[float] = field(default_factory=list)
    best_scores: np.ndarray | None = None
    best_epoch: int = -1
    epochs_without_gain: int = 0
    stopped_early: bool = False

    @property
    def best_valid_loss(self) -> float:
        return self.valid_losses[self.best_epoch]

    @property
    def best_metric(self) -> float:
        return self.valid_metrics[self.best_epoch]


def fit_single_task_models(models: list[GalleryModel], weightings: list, data: TrainData, settings: TrainSettings,
                           device=None, log=print, on_model_done=None) -> list[SingleTaskResult]:
    """Train `models[m]` on column m of `data.targets` until its validation loss stops falling.

    `on_model_done(m, result)` runs as soon as model m stops (early) or at the last epoch.
    """
    device = pick_device(device)
    objectives = [Objective(fast_layout(model.to(device), device), w.to(device), True, settings.precision)
                  for model, w in zip(models, weightings)]  # each runs its top on the shared trunk features
    optimizer = make_optimizer([p for o in objectives for p in o.parameters() if p.requires_grad], settings, device)
    results = [SingleTaskResult() for _ in models]
    active = list(range(len(models)))
    for epoch in range(settings.max_epochs):
        if not active:
            break
        for m in active:
            models[m].train()
        order = np.random.default_rng([settings.seed, epoch]).permutation(data.train_rows)
        batches = batches_of(order, settings.batch_galleries)
        progress = Progress(data.images(order), f"epoch {epoch + 1}/{settings.max_epochs}, {len(active)} models",
                            "images", log)
        started = time.perf_counter()
        for batch in data.stream(batches, device):
            x, index, targets = shared_input(models, data, batch, device, settings.precision)
            loss = sum(objectives[m](x, index, batch.n, targets[:, m:m + 1]) for m in active)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            progress.update(len(batch.x))

        for m, (sums, scores) in zip(active, _validation(models, active, data, settings, device)):
            r = results[m]
            r.valid_losses.append(float(weighted_loss(weightings[m], sums)))
            r.valid_metrics.append(next(iter(task_metrics(sums, models[m].heads.layout).values())))
            if r.best_epoch < 0 or r.valid_losses[-1] < r.best_valid_loss:
                r.best_epoch, r.epochs_without_gain, r.best_scores = epoch, 0, scores
            else:
                r.epochs_without_gain += 1
            r.stopped_early = r.epochs_without_gain >= settings.patience
        done = [m for m in active if results[m].stopped_early or epoch + 1 == settings.max_epochs]
        log(f"epoch {epoch + 1}: {len(active)} models trained in {time.perf_counter() - started:.1f} s; "
            f"{len(done)} done")
        for m in done:
            if on_model_done is not None:
                on_model_done(m, results[m])
        active = [m for m in active if m not in done]
    return results


@torch.no_grad()
def shared_input(models, data: TrainData, batch, device, precision: str):
    """A batch on the device, as frozen-trunk features: from pixels the trunk runs once for all models
    (it is frozen, and the same pretrained weights in each)."""
    x, index, targets = on_device(batch, device)
    if not data.from_features:
        with autocast(device, precision):
            x = models[0].encoder.images.trunk_features(x)
    return x, index, targets


@torch.no_grad()
def _validation(models, active, data: TrainData, settings: TrainSettings, device) -> list[tuple[TaskSums, np.ndarray]]:
    """Each active model's whole-valid-split task sums and per-gallery scores; every valid batch is
    read once for all of them."""
    sums, scores = [None] * len(active), [[] for _ in active]
    for m in active:
        models[m].eval()
    for batch in data.stream(batches_of(data.valid_rows, settings.batch_galleries), device):
        x, index, targets = shared_input(models, data, batch, device, settings.precision)
        for i, m in enumerate(active):
            with autocast(device, settings.precision):
                _, outputs = models[m](x, index, batch.n, from_features=True)
            s = models[m].losses(outputs, targets[:, m:m + 1])
            sums[i] = s if sums[i] is None else sums[i] + s
            scores[i].append(gallery_scores(models[m].heads.layout, outputs.cpu(), targets[:, m:m + 1].cpu())[:, 0])
    return [(s, np.concatenate(g)) for s, g in zip(sums, scores)]
