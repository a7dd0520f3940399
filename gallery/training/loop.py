"""Multi-task training (paper §3.4, DESIGN §6): Adam, early stopping on validation total loss,
an atomic checkpoint every epoch, and resume that continues exactly where it stopped.

Determinism: the batch order of epoch e is a permutation seeded by (seed, e), so a resumed run
sees the same batches as an uninterrupted one; model initialisation is seeded by the caller.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

import gallery.storage as storage
from gallery.config import TrainSettings
from gallery.data.packed import PackedGalleries, iterate_batches, label_tensors
from gallery.model.gallery_model import GalleryModel
from gallery.model.losses import labelled, task_losses
from gallery.progress import Progress
from gallery.training.device import autocast, pick_device


@dataclass
class TrainData:
    """What one training run reads: packed pixels or trunk features, labels aligned to them, and
    which galleries are train and valid."""

    store: PackedGalleries
    targets: dict[str, torch.Tensor]
    train_rows: np.ndarray
    valid_rows: np.ndarray
    from_features: bool = True

    @staticmethod
    def from_catalogue(frame, tasks, store: PackedGalleries, from_features: bool) -> "TrainData":
        """Labels of `tasks` aligned to `store`; train/valid rows from the catalogue's split."""
        split = frame.set_index("gallery_id").loc[store.gallery_ids, "split"].to_numpy()
        return TrainData(store, label_tensors(frame, tasks, store.gallery_ids),
                         np.flatnonzero(split == "train"), np.flatnonzero(split == "valid"), from_features)


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    valid_loss: float
    valid_task_losses: dict[str, float]
    valid_metrics: dict[str, float]   # accuracy (classification) or MSE (regression), per task
    seconds: float
    images_per_s: float
    galleries_per_s: float


@dataclass
class TrainResult:
    history: list[EpochRecord] = field(default_factory=list)
    best_epoch: int = -1
    best_valid_loss: float = math.inf
    stopped_early: bool = False
    resumed_at_epoch: int | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def task_metric(output: torch.Tensor, target: torch.Tensor, kind: str) -> float:
    """Accuracy for classification, MSE for regression, over labelled galleries (NaN if none)."""
    mask = labelled(target, kind)
    if not mask.any():
        return float("nan")
    output, target = output[mask].float(), target[mask]
    if kind == "binary":
        return ((output > 0).float() == target).float().mean().item()
    if kind == "multiclass":
        return (output.argmax(1) == target).float().mean().item()
    return torch.mean((output - target) ** 2).item()


@torch.no_grad()
def predict(model: GalleryModel, data: TrainData, rows, batch_galleries: int, device,
            precision: str = "fp32") -> tuple[torch.Tensor, dict]:
    """Embeddings and head outputs for galleries `rows` (eval mode, on CPU)."""
    model.eval()
    zs, outs = [], {t.name: [] for t in model.tasks}
    for batch in iterate_batches(data.store, {}, rows, batch_galleries):
        with autocast(device, precision):
            z, out = model(batch.x.to(device), batch.index.to(device), batch.n, data.from_features)
        zs.append(z.float().cpu())
        for name, o in out.items():
            outs[name].append(o.float().cpu())
    if not zs:  # no galleries asked for
        return torch.zeros(0, model.encoder.dim), {t.name: torch.zeros((0, t.out_dim) if t.kind == "multiclass" else 0)
                                                   for t in model.tasks}
    return torch.cat(zs), {k: torch.cat(v) for k, v in outs.items()}


def evaluate(model, weighting, data: TrainData, batch_galleries: int, device, precision: str = "fp32"):
    """Validation total loss (the weighting applied to whole-split task losses) and per-task metrics."""
    _, outputs = predict(model, data, data.valid_rows, batch_galleries, device, precision)
    targets = {k: v[data.valid_rows] for k, v in data.targets.items()}
    losses = task_losses(outputs, targets, model.tasks)
    with torch.no_grad():
        total = float(weighting({k: v.to(device) for k, v in losses.items()}))
    metrics = {t.name: task_metric(outputs[t.name], targets[t.name], t.kind) for t in model.tasks}
    return total, {k: float(v) for k, v in losses.items()}, metrics


def train_step(model: GalleryModel, weighting, optimizer, batch, from_features: bool, device, precision: str) -> float:
    """One optimiser step on one packed batch; returns the weighted total loss."""
    with autocast(device, precision):
        _, outputs = model(batch.x.to(device), batch.index.to(device), batch.n, from_features)
    targets = {k: v.to(device) for k, v in batch.targets.items()}
    loss = weighting(task_losses(outputs, targets, model.tasks))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def fit(model: GalleryModel, weighting: torch.nn.Module, data: TrainData, settings: TrainSettings,
        checkpoints: str, resume_from: str | None = None, device=None, log=print, on_epoch_end=None) -> TrainResult:
    """Train until the validation total loss stops falling; leaves the best weights in `model`.

    `checkpoints` is a folder in the store (local path or URI): after every epoch it gets
    `last.pt` (everything needed to resume) and, when the epoch is the best so far, `best.pt`.
    With `resume_from` (a checkpoints folder holding a last.pt, e.g. the failed origin run's),
    training continues at the next epoch with optimiser, weighting parameters, early-stopping
    state and history restored. `on_epoch_end(epoch)` runs after each epoch's checkpoint.
    """
    device = pick_device(device)
    model.to(device)
    weighting.to(device)
    params = [p for p in model.parameters() if p.requires_grad] + list(weighting.parameters())
    optimizer = torch.optim.Adam(params, lr=settings.lr, betas=tuple(settings.betas))
    result, epochs_without_gain, start_epoch = TrainResult(), 0, 0
    best_path, last_path = storage.join(checkpoints, "best.pt"), storage.join(checkpoints, "last.pt")

    if resume_from is not None and storage.exists(storage.join(resume_from, "last.pt")):
        state = storage.load_torch(storage.join(resume_from, "last.pt"), map_location=device)
        model.load_state_dict(state["model"])
        weighting.load_state_dict(state["weighting"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"].cpu())
        result = TrainResult(**{**state["result"], "history": [EpochRecord(**h) for h in state["result"]["history"]]})
        epochs_without_gain, start_epoch = state["epochs_without_gain"], state["epoch"] + 1
        result.resumed_at_epoch = start_epoch
        if str(resume_from) != str(checkpoints):
            storage.save_torch(best_path, storage.load_torch(storage.join(resume_from, "best.pt")))
        log(f"resumed from {resume_from}: continuing at epoch {start_epoch + 1}")
        if result.stopped_early:
            start_epoch = settings.max_epochs  # it had already finished; only the best weights are reloaded

    n_train_images = int(data.store.lengths[torch.as_tensor(data.train_rows)].sum())
    for epoch in range(start_epoch, settings.max_epochs):
        # ---- one epoch over the train galleries, in this epoch's seeded order
        model.train()
        order = np.random.default_rng([settings.seed, epoch]).permutation(data.train_rows)
        progress = Progress(n_train_images, f"epoch {epoch + 1}/{settings.max_epochs}", "images", log)
        started, loss_sum, batches = time.perf_counter(), 0.0, 0
        for batch in iterate_batches(data.store, data.targets, order, settings.batch_galleries):
            loss = train_step(model, weighting, optimizer, batch, data.from_features, device, settings.precision)
            loss_sum, batches = loss_sum + loss, batches + 1
            progress.update(len(batch.x), f"loss {loss_sum / batches:.4f}")
        seconds = time.perf_counter() - started

        # ---- validation, early stopping, checkpoints
        valid_loss, valid_task_losses, metrics = evaluate(model, weighting, data, settings.batch_galleries, device,
                                                          settings.precision)
        result.history.append(EpochRecord(epoch, loss_sum / max(batches, 1), valid_loss, valid_task_losses, metrics,
                                          seconds, n_train_images / seconds, len(order) / seconds))
        if valid_loss < result.best_valid_loss:
            result.best_valid_loss, result.best_epoch, epochs_without_gain = valid_loss, epoch, 0
            storage.save_torch(best_path, {"model": model.state_dict(), "weighting": weighting.state_dict(), "epoch": epoch})
        else:
            epochs_without_gain += 1
        result.stopped_early = epochs_without_gain >= settings.patience
        log(f"epoch {epoch + 1}: train loss {result.history[-1].train_loss:.4f}, valid total loss {valid_loss:.4f}"
            f"{' (best)' if result.best_epoch == epoch else ''}, {len(order) / seconds:,.1f} galleries/s")
        storage.save_torch(last_path, {
            "model": model.state_dict(), "weighting": weighting.state_dict(), "optimizer": optimizer.state_dict(),
            "epoch": epoch, "epochs_without_gain": epochs_without_gain, "torch_rng": torch.get_rng_state(),
            "result": result.as_dict(),
        })
        if on_epoch_end is not None:
            on_epoch_end(epoch)
        if result.stopped_early:
            log(f"early stop: no lower validation total loss for {settings.patience} epoch(s)")
            break

    best = storage.load_torch(best_path, map_location=device)
    model.load_state_dict(best["model"])
    weighting.load_state_dict(best["weighting"])
    return result
