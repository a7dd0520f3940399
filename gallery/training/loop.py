"""Multi-task training (paper §3.4, docs/design.md §6): Adam, early stopping on validation total loss,
an atomic checkpoint every epoch, and resume that continues exactly where it stopped.

Determinism: the batch order of epoch e is a permutation seeded by (seed, e), so a resumed run
sees the same batches as an uninterrupted one; model initialisation is seeded by the caller.
Data parallel: every rank draws the same permutation and takes its part of each batch
(gallery.data.readers.batches_of); rank 0 writes the checkpoints.
A step never waits on the host: targets travel in one copy, losses are masked by weights, and the
running loss stays on the device until a progress line is printed.
"""
from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

import gallery.storage as storage
from gallery.config import TrainSettings
from gallery.data.labels import label_matrix
from gallery.data.readers import batches_of, stream
from gallery.model.gallery_model import GalleryModel
from gallery.model.losses import TaskSums, task_metrics, weighted_loss
from gallery.progress import Progress
from gallery.training.device import autocast, fast_layout, pick_device
from gallery.training.distributed import Ranks


@dataclass
class TrainData:
    """What one training run reads: a source of packed galleries (shards, or vectors in memory),
    their labels ((galleries, tasks), NaN = missing), and which rows are train and valid."""

    source: object               # gallery.data.readers.ShardSource or PackedGalleries: gather(rows)
    targets: torch.Tensor
    train_rows: np.ndarray
    valid_rows: np.ndarray
    from_features: bool = True
    workers: int = 0             # DataLoader worker processes (0: read in this process)

    @staticmethod
    def from_catalogue(frame, tasks, source, from_features: bool, workers: int = 0) -> "TrainData":
        """Labels of `tasks` aligned to `source`; train/valid rows from the catalogue's split."""
        split = frame.set_index("gallery_id").loc[source.gallery_ids, "split"].to_numpy()
        return TrainData(source, torch.from_numpy(label_matrix(frame, tasks, source.gallery_ids)),
                         np.flatnonzero(split == "train"), np.flatnonzero(split == "valid"), from_features, workers)

    def stream(self, batches: list[np.ndarray], device: torch.device):
        return stream(self.source, batches, self.targets, self.workers, pin_memory=device.type == "cuda")

    def images(self, rows) -> int:
        return int(self.source.lengths[torch.as_tensor(np.asarray(rows), dtype=torch.int64)].sum())


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
    weights_digest: str = ""  # SHA-1 of the final (best) weights: data-parallel ranks must agree
    valid: dict | None = None  # each valid gallery's score per task with the best weights (valid_scores)

    def as_dict(self) -> dict:
        return asdict(self)


def weights_digest(model: nn.Module) -> str:
    digest = hashlib.sha1()
    for name, value in model.state_dict().items():
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class Objective(nn.Module):
    """The model and its loss weighting as one module (Kendall's weights train too): what DDP wraps.

    Data parallel, each rank sees part of a batch: its task losses are divided by the labelled
    counts of the WHOLE batch (one small all-reduce), so that DDP's average of the ranks' gradients
    is exactly the gradient of the batch's masked means. Per-rank means would halve a sparse task's
    gradient whenever its few labels all fall on one rank."""

    def __init__(self, model: GalleryModel, weighting: nn.Module, from_features: bool, precision: str,
                 ranks: Ranks = Ranks()):
        super().__init__()
        self.model, self.weighting = model, weighting
        self.from_features, self.precision, self.ranks = from_features, precision, ranks

    def forward(self, x, index, n: int, targets) -> torch.Tensor:
        with autocast(x.device, self.precision):
            _, outputs = self.model(x, index, n, self.from_features)
        sums = self.model.losses(outputs, targets)
        if self.ranks.world > 1:
            count = self.ranks.all_reduce(sums.count.detach().clone())
            sums = TaskSums(sums.loss * self.ranks.world, count, sums.correct)
        return weighted_loss(self.weighting, sums)


def on_device(batch, device: torch.device):
    """A batch's tensors on the device (asynchronous copies from pinned memory on CUDA)."""
    return (batch.x.to(device, non_blocking=True), batch.index.to(device, non_blocking=True),
            batch.targets.to(device, non_blocking=True))


def train_step(objective: nn.Module, optimizer, batch, device) -> torch.Tensor:
    """One optimiser step on one packed batch; returns the weighted total loss, still on the device."""
    x, index, targets = on_device(batch, device)
    loss = objective(x, index, batch.n, targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def make_optimizer(params, settings: TrainSettings, device: torch.device) -> torch.optim.Optimizer:
    """Adam; fused into a few kernels on CUDA."""
    return torch.optim.Adam(params, lr=settings.lr, betas=tuple(settings.betas), fused=device.type == "cuda")


@torch.no_grad()
def predict(model: GalleryModel, data: TrainData, rows, batch_galleries: int, device,
            precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings and head outputs of galleries `rows`, on the CPU (eval mode): one row per gallery."""
    model.eval()
    zs, outs = [], []
    for batch in data.stream(batches_of(rows, batch_galleries), device):
        x, index = batch.x.to(device), batch.index.to(device)
        with autocast(device, precision):
            z, out = model(x, index, batch.n, data.from_features)
        zs.append(z.float().cpu())
        outs.append(out.float().cpu())
    if not zs:  # no galleries asked for
        return torch.zeros(0, model.encoder.dim), torch.zeros(0, model.heads.layout.columns)
    return torch.cat(zs), torch.cat(outs)


def gallery_scores(layout, outputs: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    """(galleries, tasks): 1/0 for a right/wrong class (classification), the squared error (regression),
    NaN where the gallery has no label: what paired statistics compare between two models."""
    targets = targets.float()
    out = np.full(tuple(targets.shape), np.nan, np.float32)
    for k, task in enumerate(layout.tasks):
        prediction = layout.task_output(outputs, k).float()
        if task.kind == "regression":
            score = (prediction - targets[:, k]) ** 2
        else:
            predicted = (prediction > 0).float() if task.kind == "binary" else prediction.argmax(1).float()
            score = (predicted == targets[:, k]).float()
        labelled = ~torch.isnan(targets[:, k])
        out[labelled.numpy(), k] = score[labelled].numpy()
    return out


def valid_scores(model: GalleryModel, data: TrainData, batch_galleries: int, device, precision: str = "fp32") -> dict:
    """Every valid gallery's score on every task (gallery_scores), with the galleries' ids."""
    _, outputs = predict(model, data, data.valid_rows, batch_galleries, device, precision)
    return {"gallery_ids": [data.source.gallery_ids[r] for r in data.valid_rows],
            "scores": gallery_scores(model.heads.layout, outputs, data.targets[data.valid_rows])}


@torch.no_grad()
def evaluate(model: GalleryModel, weighting, data: TrainData, batch_galleries: int, device, precision: str = "fp32",
             ranks: Ranks = Ranks()):
    """Validation total loss (the weighting applied to whole-split task losses) and per-task metrics.

    Each rank evaluates its share of the valid galleries; one all-reduce adds the sums up."""
    model.eval()
    sums = TaskSums(*(torch.zeros(len(model.tasks), device=device) for _ in range(3)))
    for batch in data.stream(batches_of(data.valid_rows[ranks.rank::ranks.world], batch_galleries), device):
        x, index, targets = on_device(batch, device)
        with autocast(device, precision):
            _, outputs = model(x, index, batch.n, data.from_features)
        sums = sums + model.losses(outputs, targets)
    sums = TaskSums.unstack(ranks.all_reduce(sums.stacked()))
    total = float(weighted_loss(weighting, sums))
    means = sums.means().tolist()
    return total, {t.name: m for t, m in zip(model.tasks, means)}, task_metrics(sums, model.heads.layout)


def fit(model: GalleryModel, weighting: torch.nn.Module, data: TrainData, settings: TrainSettings,
        checkpoints: str, resume_from: str | None = None, device=None, log=print, on_epoch_end=None,
        ranks: Ranks = Ranks()) -> TrainResult:
    """Train until the validation total loss stops falling; leaves the best weights in `model`.

    `checkpoints` is a folder in the store (local path or URI): after every epoch it gets
    `last.pt` (everything needed to resume) and, when the epoch is the best so far, `best.pt`.
    With `resume_from` (a checkpoints folder holding a last.pt, e.g. the failed origin run's),
    training continues at the next epoch with optimiser, weighting parameters, early-stopping
    state and history restored. `on_epoch_end(epoch)` runs after each epoch's checkpoint.
    With `ranks` of a data-parallel group, every rank runs this with the same arguments.
    """
    device = pick_device(device)
    fast_layout(model.to(device), device)
    weighting.to(device)
    objective = Objective(model, weighting, data.from_features, settings.precision, ranks)
    trainer = ranks.wrap(objective, device)
    optimizer = make_optimizer([p for p in objective.parameters() if p.requires_grad], settings, device)
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
        if str(resume_from) != str(checkpoints) and ranks.is_main:
            storage.save_torch(best_path, storage.load_torch(storage.join(resume_from, "best.pt")))
        ranks.barrier()  # best.pt is in place before any rank may read it
        log(f"resumed from {resume_from}: continuing at epoch {start_epoch + 1}")
        if result.stopped_early:
            start_epoch = settings.max_epochs  # it had already finished; only the best weights are reloaded

    n_train_images = data.images(data.train_rows)
    for epoch in range(start_epoch, settings.max_epochs):
        # ---- one epoch over the train galleries, in this epoch's seeded order (this rank's part of each batch)
        model.train()
        order = np.random.default_rng([settings.seed, epoch]).permutation(data.train_rows)
        batches = batches_of(order, settings.batch_galleries, ranks.rank, ranks.world)
        progress = Progress(sum(data.images(b) for b in batches), f"epoch {epoch + 1}/{settings.max_epochs}", "images", log)
        started, loss_sum = time.perf_counter(), torch.zeros((), device=device)
        for k, batch in enumerate(data.stream(batches, device)):
            loss_sum += train_step(trainer, optimizer, batch, device)
            progress.update(len(batch.x), lambda: f"loss {loss_sum.item() / (k + 1):.4f}")
        train_loss = ranks.all_reduce(loss_sum / max(len(batches), 1)).item() / ranks.world
        seconds = time.perf_counter() - started

        # ---- validation, early stopping, checkpoints
        valid_loss, valid_task_losses, metrics = evaluate(model, weighting, data, settings.batch_galleries, device,
                                                          settings.precision, ranks)
        result.history.append(EpochRecord(epoch, train_loss, valid_loss, valid_task_losses, metrics,
                                          seconds, n_train_images / seconds, len(order) / seconds))
        improved = valid_loss < result.best_valid_loss
        if improved:
            result.best_valid_loss, result.best_epoch, epochs_without_gain = valid_loss, epoch, 0
        else:
            epochs_without_gain += 1
        result.stopped_early = epochs_without_gain >= settings.patience
        log(f"epoch {epoch + 1}: train loss {train_loss:.4f}, valid total loss {valid_loss:.4f}"
            f"{' (best)' if improved else ''}, {len(order) / seconds:,.1f} galleries/s")
        if ranks.is_main:
            if improved:
                storage.save_torch(best_path, {"model": model.state_dict(), "weighting": weighting.state_dict(),
                                               "epoch": epoch})
            storage.save_torch(last_path, {
                "model": model.state_dict(), "weighting": weighting.state_dict(), "optimizer": optimizer.state_dict(),
                "epoch": epoch, "epochs_without_gain": epochs_without_gain, "torch_rng": torch.get_rng_state(),
                "result": result.as_dict(),
            })
        ranks.barrier()  # the checkpoint is written before any rank goes on (or is killed)
        if on_epoch_end is not None:
            on_epoch_end(epoch)
        if result.stopped_early:
            log(f"early stop: no lower validation total loss for {settings.patience} epoch(s)")
            break

    best = storage.load_torch(best_path, map_location=device)
    model.load_state_dict(best["model"])
    weighting.load_state_dict(best["weighting"])
    result.weights_digest = weights_digest(model)
    return result
