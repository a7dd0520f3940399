"""The one training loop (see docs/design.md, "Training engine"): every model the pipeline trains goes
through `fit` — the MTL model, the task-optimal models (trained together, gallery.training.group) and
the held-out arms (gallery.evaluation.holdout).

Read top to bottom, an epoch is: the train galleries in an order seeded by (seed, epoch); for each
packed batch, the model's per-task mean losses, the weighting's backward (gallery.model.weightings),
one optimiser step and the weighting's `after_step`; then the weighting's `on_epoch_end` with the
epoch's per-task training losses; a validation pass; early stopping; checkpoints. `valid` selects
(best epoch, early stopping); the caller scores `test` with the selected weights (`score`).

Early stopping watches an unweighted criterion per *member* (a part of the model with its own
tasks and best epoch: the MTL model is one member, each task-optimal model is one): the mean over
the member's tasks of each task's validation loss divided by that task's validation loss after the
first epoch. Learned loss weights (Kendall) do not move it, only the model's predictions do, and
each task counts the same whatever its units.

Determinism: the batch order of epoch e is a permutation seeded by (seed, e), so a resumed run sees
the same batches as an uninterrupted one; model initialisation is seeded by the caller.
Data parallel: every rank draws the same permutation and takes its part of each batch
(gallery.data.readers.batches_of); losses are divided by the whole batch's label counts, so DDP's
average of the ranks' gradients is exactly the gradient of the whole batch; rank 0 writes checkpoints.
A step never waits on the host: targets travel in one copy, losses are masked by weights, and the
running sums stay on the device until an epoch ends.
"""
from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Protocol, runtime_checkable

import numpy as np
import pandas as pd
import torch
from torch import nn

import gallery.storage as storage
from gallery.data.labels import label_matrix
from gallery.data.readers import PairedLabels, PairRows, batches_of, stream, with_pairs
from gallery.model.heads import HeadLayout
from gallery.model.losses import TaskSums, task_metrics
from gallery.model.weightings import Weighting
from gallery.progress import Progress
from gallery.training.device import autocast, fast_layout, pick_device
from gallery.training.distributed import Ranks

SPLITS = ("train", "valid", "test")


@runtime_checkable
class Trainable(Protocol):
    """What `fit` (and `validate`, `score`, `predict`) rely on in the model they train: a
    gallery.model.gallery_model.GalleryModel, or a gallery.training.group.ModelGroup of single-task models.
    Besides these, the torch module's own: `to`, `train`, `eval`, `training`, `parameters`, `buffers`,
    `state_dict` and `load_state_dict`."""

    layout: HeadLayout   # which output columns are which task's (`layout.tasks`: the model's tasks, in order)
    training: bool       # the torch module's mode

    def __call__(self, x: torch.Tensor, index: torch.Tensor, n: int,
                 from_features: bool = False) -> tuple[torch.Tensor | None, torch.Tensor]:
        """A packed batch -> (gallery representation, or None; head outputs laid out by `layout`)."""

    def losses(self, outputs: torch.Tensor, targets: torch.Tensor, representation: torch.Tensor | None,
               ranks: Ranks) -> TaskSums:
        """Per-task loss sums and label counts of a batch (gallery.model.losses.TaskLosses)."""

    def members(self) -> list[tuple[str, list[int]]]:
        """The parts early stopping selects apart: (state-dict prefix, their task columns) each."""

    def set_active(self, members: list[int]) -> None:
        """Run only these members (the others are done)."""

    def to(self, *args, **kwargs) -> "Trainable": ...

    def train(self, mode: bool = True) -> "Trainable": ...

    def eval(self) -> "Trainable": ...

    def parameters(self) -> Iterator[nn.Parameter]: ...

    def buffers(self) -> Iterator[torch.Tensor]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict, strict: bool = True): ...


@dataclass(frozen=True)
class FitHooks:
    """Callbacks of `fit`: `on_step(StepInfo)` after each optimiser step; `on_epoch_end(epoch)` after each
    epoch's checkpoint (with that epoch's weights); `on_members_done(members, result)` when members finish
    (their best weights loaded)."""

    on_step: Callable[["StepInfo"], None] | None = None
    on_epoch_end: Callable[[int], None] | None = None
    on_members_done: Callable[[list[int], "TrainResult"], None] | None = None


@dataclass(frozen=True)
class FitOptions:
    """Where and how `fit` runs, beside what it trains (FitConfig): checkpoints, resuming, the device and
    data-parallel group, logging, hooks, and whether steps are timed and epochs selected on `valid`."""

    checkpoints: str | None = None     # a store folder for last.pt / best.pt, or None to keep nothing on disk
    resume_from: str | None = None     # a checkpoints folder holding a last.pt to continue from
    device: torch.device | str | None = None   # None: gallery.training.device.pick_device's choice
    ranks: Ranks = Ranks()             # the data-parallel group (every rank calls fit alike)
    log: Callable[[str], None] = print
    hooks: FitHooks = FitHooks()
    time_steps: bool = False           # synchronise the device after each step, for StepInfo.seconds
    select: bool = True                # False: a fixed budget, no validation, the last epoch's weights kept


@dataclass
class TrainData:
    """What one training run reads: a source of packed galleries (shards, or vectors in memory),
    their labels ((galleries, tasks), NaN = missing), and which rows are train, valid and test."""

    source: object               # gallery.data.readers.ShardSource or PackedGalleries: gather(rows)
    targets: torch.Tensor
    train_rows: np.ndarray
    valid_rows: np.ndarray
    test_rows: np.ndarray
    from_features: bool = True
    workers: int = 0             # DataLoader worker processes (0: read in this process)
    pairs: dict[str, list[PairRows]] = field(default_factory=dict)  # split -> each pairs task's pairs within it
    pair_columns: torch.Tensor | None = None   # (tasks,) bool: the pairs tasks' target columns
    pairs_per_batch: int = 0

    @staticmethod
    def from_catalogue(frame, tasks, source, from_features: bool, workers: int = 0, pairs: dict | None = None,
                       pairs_per_batch: int = 0) -> "TrainData":
        """Labels of `tasks` aligned to `source`; the rows of each split from the catalogue's `split`; the
        pairs tasks' pairs within each split (`pairs`: the catalogue's, by task) as source rows."""
        split = frame.set_index("gallery_id").loc[source.gallery_ids, "split"].to_numpy()
        rows = [np.flatnonzero(split == s) for s in SPLITS]
        paired = [t for t in tasks if t.kind == "pairs"]
        if not paired:
            return TrainData(source, torch.from_numpy(label_matrix(frame, tasks, source.gallery_ids)), *rows,
                             from_features, workers)
        at = pd.Index(source.gallery_ids).get_indexer(frame["gallery_id"])  # frame row -> source row (-1: excluded)
        within = {s: [_source_pairs(pairs[t.name], at, split, s) for t in paired] for s in SPLITS}
        columns = torch.tensor([t.kind == "pairs" for t in tasks])
        return TrainData(source, torch.from_numpy(label_matrix(frame, tasks, source.gallery_ids)), *rows,
                         from_features, workers, within, columns, pairs_per_batch)

    def rows(self, split: str) -> np.ndarray:
        return {"train": self.train_rows, "valid": self.valid_rows, "test": self.test_rows}[split]

    def labelled(self, column: int = 0) -> "TrainData":
        """Only the galleries that carry the label of task `column`, in every split."""
        has = ~torch.isnan(self.targets[:, column]).numpy()
        return replace(self, train_rows=self.train_rows[has[self.train_rows]],
                       valid_rows=self.valid_rows[has[self.valid_rows]], test_rows=self.test_rows[has[self.test_rows]])

    def batches(self, order: np.ndarray, batch_galleries: int, split: str, seed: list[int],
                ranks: "Ranks") -> tuple[list[np.ndarray], PairedLabels | None]:
        """This rank's part of each batch of `order`; with pairs tasks, each batch also holds
        `pairs_per_batch` pairs of each within `split` (both ends, drawn by `seed`: gallery.data.readers.with_pairs)."""
        if self.pair_columns is None:
            return batches_of(order, batch_galleries, ranks.rank, ranks.world), None
        rows, drawn = with_pairs(order, batch_galleries, self.pairs[split], self.pairs_per_batch, seed,
                                 ranks.rank, ranks.world)
        return rows, PairedLabels(drawn, self.pair_columns)

    def stream(self, batches: list[np.ndarray], device: torch.device, paired: PairedLabels | None = None):
        return stream(self.source, batches, self.targets, self.workers, pin_memory=device.type == "cuda",
                      paired=paired)

    def images(self, rows) -> int:
        return int(self.source.lengths[torch.as_tensor(np.asarray(rows), dtype=torch.int64)].sum())


def _source_pairs(pairs, at: np.ndarray, split: np.ndarray, name: str) -> PairRows:
    """The pairs (catalogue frame rows) whose both ends were preprocessed and lie in split `name`, as source rows."""
    a, b = at[pairs.a], at[pairs.b]
    keep = (a >= 0) & (b >= 0)
    keep[keep] &= (split[a[keep]] == name) & (split[b[keep]] == name)
    return PairRows(a[keep], b[keep], pairs.weight[keep])


@dataclass(frozen=True)
class FitConfig:
    """How long and how one model trains: what `fit` reads of the settings (train.*), and what the
    held-out arms change (their learning rate, batch, epochs; no early stopping: patience None)."""

    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    batch_galleries: int = 32
    max_epochs: int = 12
    patience: int | None = 2
    seed: int = 0
    precision: str = "auto"
    weight_decay: float = 0.0     # Adam's L2 penalty: the held-out arms tune it, the run's models train without

    @staticmethod
    def of(train, **changes) -> "FitConfig":
        """From the run's `train` settings, with `changes`."""
        values = {f.name: getattr(train, f.name) for f in fields(FitConfig) if hasattr(train, f.name)}
        return FitConfig(**{**values, "betas": tuple(values["betas"]), **changes})


def make_optimizer(params, config: FitConfig, device: torch.device) -> torch.optim.Optimizer:
    """The optimiser of every model: Adam with the run's betas, fused into a few kernels (on the CPU 7x
    faster than the default per-tensor loop: 7 vs 56 ms a step for the default's 5.6M parameters)."""
    return torch.optim.Adam(params, lr=config.lr, betas=tuple(config.betas), weight_decay=config.weight_decay,
                            fused=device.type in ("cuda", "cpu"))


def epoch_order(seed: int, epoch: int, rows: np.ndarray) -> np.ndarray:
    """The train galleries' order in one epoch: the same on every rank, run, resume and machine."""
    return np.random.default_rng([seed, epoch]).permutation(rows)


# ---------------------------------------------------------------- results

@dataclass
class GalleryScores:
    """Each gallery's score per task on one split: 1/0 for a right/wrong class, the squared error for
    regression, NaN where the gallery has no label. What paired statistics compare between models."""

    split: str
    gallery_ids: list[str]
    tasks: list[str]
    scores: np.ndarray  # (galleries, tasks)

    def task(self, name: str) -> tuple[list[str], np.ndarray]:
        """The labelled galleries of one task and their scores."""
        column = self.scores[:, self.tasks.index(name)]
        keep = ~np.isnan(column)
        return [g for g, k in zip(self.gallery_ids, keep) if k], column[keep]


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float                     # the weighting's objective, mean over the epoch's batches
    train_task_losses: dict[str, float]   # each task's mean loss over the batches that labelled it
    valid_task_losses: dict[str, float]
    valid_metrics: dict[str, float]       # accuracy (classification) or MSE (regression), per task
    valid_criterion: list[float]          # per member: what early stopping watches (lower is better)
    seconds: float
    images_per_s: float
    galleries_per_s: float


@dataclass
class TrainResult:
    """A training's history and what `valid` selected, per member (one for the MTL model)."""

    history: list[EpochRecord] = field(default_factory=list)
    best_epochs: list[int] = field(default_factory=list)
    stopped_early: list[bool] = field(default_factory=list)
    resumed_at_epoch: int | None = None
    weights_digest: str = ""   # SHA-1 of the final (best) weights: data-parallel ranks must agree
    test: GalleryScores | None = None  # the selected weights' scores on test (filled by the caller: `score`)

    @property
    def best_epoch(self) -> int:
        return self.best_epochs[0]

    @property
    def best_criterion(self) -> float:
        return self.history[self.best_epoch].valid_criterion[0] if self.history else math.nan

    def as_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "TrainResult":
        """As `as_dict` wrote it into a checkpoint (before any test scores)."""
        return TrainResult(**{**d, "history": [EpochRecord(**h) for h in d["history"]]})


# ---------------------------------------------------------------- early stopping

@dataclass
class EarlyStopping:
    """Best epoch and patience per member, on the unweighted relative validation loss (module docstring).

    `members[m]`: the task columns of member m. `patience` None: never stop early (fixed budgets)."""

    members: list[list[int]]
    patience: int | None
    reference: list[float] | None = None   # each task's validation loss after the first epoch
    best: list[float] = field(default_factory=list)
    best_epoch: list[int] = field(default_factory=list)
    waited: list[int] = field(default_factory=list)
    stopped: list[bool] = field(default_factory=list)

    def __post_init__(self):
        n = len(self.members)
        self.best = self.best or [math.inf] * n
        self.best_epoch = self.best_epoch or [-1] * n
        self.waited = self.waited or [0] * n
        self.stopped = self.stopped or [False] * n

    def active(self) -> list[int]:
        return [m for m, s in enumerate(self.stopped) if not s]

    def criterion(self, task_losses: np.ndarray) -> list[float]:
        """Per member: the mean over its tasks that have validation labels of loss / first-epoch loss (a
        task whose first-epoch loss was 0, e.g. one class only, has nothing left to learn: left out)."""
        reference = np.asarray(self.reference, float)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(reference > 0, task_losses / reference, np.nan)
        return [float(np.nanmean(ratio[cols])) if not np.isnan(ratio[cols]).all() else math.nan
                for cols in self.members]

    def update(self, epoch: int, task_losses: np.ndarray) -> tuple[list[float], list[int]]:
        """Record one epoch's validation losses (NaN: no label); return every member's criterion and the
        active members that improved. A member without any validation label keeps its first epoch."""
        if self.reference is None:
            self.reference = task_losses.tolist()
        values, improved = self.criterion(task_losses), []
        for m in self.active():
            value = values[m]
            if value < self.best[m] or (self.best_epoch[m] < 0 and math.isnan(value)):
                self.best[m], self.best_epoch[m], self.waited[m] = value, epoch, 0
                improved.append(m)
            else:
                self.waited[m] += 1
            self.stopped[m] = self.patience is not None and self.waited[m] >= self.patience
        return values, improved


# ---------------------------------------------------------------- one step

class Objective(nn.Module):
    """The model and its loss weighting as one module (Kendall's weights train too): what DDP wraps.

    forward gives each task's loss, which tasks are present in the whole batch, and the shared gallery
    representation (for weightings that use it). Alone, a task's loss is its mean over the batch's
    labelled galleries. Data parallel, each rank sees part of a batch: its task losses are divided by
    the labelled counts of the WHOLE batch (one small all-reduce) and multiplied by the world size, so
    that DDP's average of the ranks' gradients is exactly the gradient of the batch's masked means (and
    the ranks' losses average to them: `Weighting.batch_means`). Per-rank means would halve a sparse
    task's gradient whenever its few labels all fall on one rank."""

    def __init__(self, model: Trainable, weighting: Weighting, from_features: bool, precision: str,
                 ranks: Ranks = Ranks()):
        super().__init__()
        self.model, self.weighting = model, weighting
        self.from_features, self.precision, self.ranks = from_features, precision, ranks

    def forward(self, x, index, n: int, targets):
        with autocast(x.device, self.precision):
            representation, outputs = self.model(x, index, n, self.from_features)
        sums = self.model.losses(outputs, targets, representation, self.ranks)
        count = self.ranks.all_reduce(sums.count.detach().clone()) if self.ranks.world > 1 else sums.count
        return sums.loss * self.ranks.world / count.clamp(min=1), count > 0, representation


def on_device(batch, device: torch.device):
    """A batch's tensors on the device (asynchronous copies from pinned memory on CUDA)."""
    return (batch.x.to(device, non_blocking=True), batch.index.to(device, non_blocking=True),
            batch.targets.to(device, non_blocking=True))


def train_step(trainer: nn.Module, weighting: Weighting, optimizer, batch, device):
    """One optimiser step on one packed batch: (objective value, per-task losses, present), on the device."""
    x, index, targets = on_device(batch, device)
    losses, present, representation = trainer(x, index, batch.n, targets)
    optimizer.zero_grad(set_to_none=True)
    total = weighting.backward(losses, present, representation)
    optimizer.step()

    def recompute():
        with torch.no_grad():
            again, now_present, _ = trainer(x, index, batch.n, targets)
        return again, now_present

    weighting.after_step(losses.detach(), present, recompute)
    return total, losses.detach(), present


@dataclass
class StepInfo:
    """What an `on_step` hook learns after each optimiser step."""

    epoch: int
    step: int
    galleries: int          # in this step (the whole batch, all ranks)
    galleries_seen: int     # in this epoch so far
    seconds: float | None   # the step's time, with `time_steps` (device synchronised)


# ---------------------------------------------------------------- evaluation

@torch.no_grad()
def predict(model: Trainable, data: TrainData, rows, batch_galleries: int, device,
            precision: str = "fp32") -> tuple[torch.Tensor | None, torch.Tensor]:
    """Representations and head outputs of galleries `rows` on the CPU, in eval mode (restored after)."""
    was_training = model.training
    model.eval()
    zs, outs = [], []
    for batch in data.stream(batches_of(rows, batch_galleries), device):
        x, index = batch.x.to(device), batch.index.to(device)
        with autocast(device, precision):
            z, out = model(x, index, batch.n, data.from_features)
        if z is not None:
            zs.append(z.float().cpu())
        outs.append(out.float().cpu())
    model.train(was_training)
    if not outs:  # no galleries asked for
        return None, torch.zeros(0, model.layout.columns)
    return (torch.cat(zs) if zs else None), torch.cat(outs)


def gallery_scores(layout, outputs: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    """(galleries, tasks): 1/0 for a right/wrong class (classification), the squared error (regression),
    NaN where the gallery has no label."""
    targets = targets.float()
    out = np.full(tuple(targets.shape), np.nan, np.float32)
    for k, task in enumerate(layout.tasks[:layout.attributes]):  # a metric task has no per-gallery score
        prediction = layout.task_output(outputs, k).float()
        if task.kind == "regression":
            score = (prediction - targets[:, k]) ** 2
        else:
            predicted = (prediction > 0).float() if task.kind == "binary" else prediction.argmax(1).float()
            score = (predicted == targets[:, k]).float()
        labelled = ~torch.isnan(targets[:, k])
        out[labelled.numpy(), k] = score[labelled].numpy()
    return out


def score(model: Trainable, data: TrainData, split: str, batch_galleries: int, device=None,
          precision: str = "fp32") -> GalleryScores:
    """Every gallery of `split` scored on every task by the model as it is (after `fit`: as selected)."""
    device = pick_device(device)
    rows = data.rows(split)
    _, outputs = predict(model, data, rows, batch_galleries, device, precision)
    return GalleryScores(split, [data.source.gallery_ids[r] for r in rows], [t.name for t in model.layout.tasks],
                         gallery_scores(model.layout, outputs, data.targets[rows]))


@torch.no_grad()
def validate(model: Trainable, data: TrainData, batch_galleries: int, device, precision: str = "fp32",
             ranks: Ranks = Ranks()):
    """Whole-valid-split task losses (NaN where a task has no valid label) and per-task metrics. Each
    rank evaluates its share of the valid galleries; one all-reduce adds the sums up."""
    model.eval()
    sums = None
    tasks = model.layout.tasks
    if not any(t.is_metric for t in tasks):  # each rank its share of the galleries: the sums add up exactly
        batches, paired = batches_of(data.valid_rows[ranks.rank::ranks.world], batch_galleries), None
    else:  # every rank its part of the same batches (metric losses gather them), the same pairs each epoch,
        order = data.valid_rows  # and an identity task's groups together, so their galleries share batches
        groups = next((k for k, t in enumerate(tasks) if t.kind == "identity"), None)
        if groups is not None:
            order = order[np.argsort(data.targets[order, groups].numpy(), kind="stable")]
        batches, paired = data.batches(order, batch_galleries, "valid", [0], ranks)
    for batch in data.stream(batches, device, paired):
        x, index, targets = on_device(batch, device)
        with autocast(device, precision):
            z, outputs = model(x, index, batch.n, data.from_features)
        s = model.losses(outputs, targets, z, ranks)
        sums = s if sums is None else sums + s
    if sums is None:  # no valid gallery on this rank
        sums = TaskSums(*(torch.zeros(len(model.layout.tasks), device=device) for _ in range(3)))
    sums = TaskSums.unstack(ranks.all_reduce(sums.stacked()))
    losses = torch.where(sums.count > 0, sums.loss / sums.count.clamp(min=1), torch.nan)
    return losses.cpu().double().numpy(), task_metrics(sums, model.layout)


def weights_digest(model: Trainable) -> str:
    digest = hashlib.sha1()
    for name, value in model.state_dict().items():
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------- the loop

class BestWeights:
    """Each member's weights at its best epoch so far (in memory; `best.pt` on disk when checkpointing).

    A member's weights are the objective's state entries under its prefix ("" for the whole model,
    its weighting included)."""

    def __init__(self, objective: Objective, prefixes: list[str]):
        self.objective, self.prefixes = objective, prefixes
        self.state = {k: v.detach().clone() for k, v in objective.state_dict().items()}

    def _keys(self, member: int) -> list[str]:
        prefix = "model." + self.prefixes[member] if self.prefixes[member] else ""
        return [k for k in self.state if k.startswith(prefix)]

    def keep(self, members: list[int]) -> None:
        now = self.objective.state_dict()
        for m in members:
            for k in self._keys(m):
                self.state[k] = now[k].detach().clone()

    def restore(self, members: list[int]) -> None:
        state = dict(self.objective.state_dict())
        for m in members:
            for k in self._keys(m):
                state[k] = self.state[k]
        self.objective.load_state_dict(state)

    def split(self) -> dict:
        """As `best.pt` stores it: the model's and the weighting's state apart."""
        return {part: {k[len(part) + 1:]: v for k, v in self.state.items() if k.startswith(part + ".")}
                for part in ("model", "weighting")}


def fit(model: Trainable, weighting: Weighting, data: TrainData, config: FitConfig,
        options: FitOptions = FitOptions()) -> TrainResult:
    """Train `model` (a GalleryModel, or a ModelGroup of single-task models: what `Trainable` names) until
    every member stops improving on `valid` or `config.max_epochs`; leaves each member's best weights in `model`.

    `options.checkpoints` (a folder in the store, or None to keep nothing on disk) gets `last.pt` after every
    epoch (everything needed to resume) and `best.pt` when a member improved. With `options.resume_from` (a
    checkpoints folder holding a last.pt, e.g. the failed origin run's), training continues at the next
    epoch with optimiser, weighting, early-stopping state and history restored. `options.hooks` (FitHooks)
    are called after each step, each epoch and when members finish. With `options.ranks` of a data-parallel
    group, every rank runs this with the same arguments. `options.select` False trains a fixed budget: no
    validation pass, the last epoch's weights are kept.
    """
    checkpoints, resume_from, ranks, log, hooks = (options.checkpoints, options.resume_from, options.ranks,
                                                   options.log, options.hooks)
    device = pick_device(options.device)
    fast_layout(model.to(device), device)
    weighting.to(device).bind(ranks)
    objective = Objective(model, weighting, data.from_features, config.precision, ranks)
    trainer = ranks.wrap(objective, device)
    optimizer = make_optimizer([p for p in objective.parameters() if p.requires_grad], config, device)
    members = model.members()
    stopping = EarlyStopping([cols for _, cols in members], config.patience)
    best = BestWeights(objective, [prefix for prefix, _ in members])
    result, start_epoch, names = TrainResult(), 0, [t.name for t in model.layout.tasks]
    best_path = storage.join(checkpoints, "best.pt") if checkpoints else None
    last_path = storage.join(checkpoints, "last.pt") if checkpoints else None

    if resume_from is not None and storage.exists(storage.join(resume_from, "last.pt")):
        state = storage.load_torch(storage.join(resume_from, "last.pt"), map_location=device)
        model.load_state_dict(state["model"])
        weighting.load_state_dict(state["weighting"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"].cpu())
        stopping = EarlyStopping(**state["stopping"])
        result = TrainResult.from_dict(state["result"])
        start_epoch = result.resumed_at_epoch = state["epoch"] + 1
        saved = storage.load_torch(storage.join(resume_from, "best.pt"), map_location=device)
        best.state = {f"{part}.{k}": v for part in ("model", "weighting") for k, v in saved[part].items()}
        if str(resume_from) != str(checkpoints) and ranks.is_main:
            storage.save_torch(best_path, saved)
        ranks.barrier()  # best.pt is in place before any rank may read it
        log(f"resumed from {resume_from}: continuing at epoch {start_epoch + 1}")

    n_train_images = data.images(data.train_rows)
    for epoch in range(start_epoch, config.max_epochs):
        active = stopping.active()
        if not active:
            break
        # ---- one epoch over the train galleries, in this epoch's seeded order (this rank's part of each batch)
        model.set_active(active)
        objective.train()
        order = epoch_order(config.seed, epoch, data.train_rows)
        batches, paired = data.batches(order, config.batch_galleries, "train", [config.seed, epoch], ranks)
        progress = Progress(sum(data.images(b) for b in batches), f"epoch {epoch + 1}/{config.max_epochs}", "images", log)
        started, seen = time.perf_counter(), 0
        total_sum = torch.zeros((), device=device)
        task_sum, task_batches = (torch.zeros(len(names), device=device) for _ in range(2))
        for k, batch in enumerate(data.stream(batches, device, paired)):
            step_start = time.perf_counter()
            total, losses, present = train_step(trainer, weighting, optimizer, batch, device)
            if options.time_steps and device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - step_start if options.time_steps else None
            total_sum += total
            task_sum += losses * present
            task_batches += present
            galleries = min(config.batch_galleries, len(order) - k * config.batch_galleries)
            seen += galleries
            progress.update(len(batch.x), lambda: f"loss {total_sum.item() / (k + 1):.4f}")
            if hooks.on_step is not None:
                hooks.on_step(StepInfo(epoch, k, galleries, seen, seconds))
        seconds = time.perf_counter() - started
        train_loss = ranks.all_reduce(total_sum / max(len(batches), 1)).item() / ranks.world
        train_losses = ranks.all_reduce(task_sum) / ranks.world / task_batches.clamp(min=1)
        train_losses = torch.where(task_batches > 0, train_losses, torch.nan)
        weighting.on_epoch_end(epoch, train_losses)
        ranks.share_buffers(model)

        # ---- validation, early stopping, checkpoints
        if options.select:
            valid_losses, metrics = validate(model, data, config.batch_galleries, device, config.precision, ranks)
            criterion, improved = stopping.update(epoch, valid_losses)
        else:  # a fixed budget: the last epoch is the one kept
            valid_losses, metrics, criterion, improved = np.full(len(names), np.nan), {}, [], active
            stopping.best_epoch = [epoch] * len(members)
        best.keep(improved)
        done = [m for m in active if stopping.stopped[m] or epoch + 1 == config.max_epochs]
        result.history.append(EpochRecord(
            epoch, train_loss, dict(zip(names, train_losses.tolist())), dict(zip(names, valid_losses.tolist())),
            metrics, criterion, seconds, n_train_images / seconds, len(order) / seconds))
        result.best_epochs, result.stopped_early = list(stopping.best_epoch), list(stopping.stopped)
        if len(members) == 1:
            valid = f", valid relative loss {criterion[0]:.4f}{' (best)' if improved else ''}" if options.select else ""
            log(f"epoch {epoch + 1}: train loss {train_loss:.4f}{valid}, {len(order) / seconds:,.1f} galleries/s")
        else:
            log(f"epoch {epoch + 1}: {len(active)} models trained in {seconds:.1f} s; {len(done)} done")
        if checkpoints and ranks.is_main:
            if improved:
                storage.save_torch(best_path, best.split())
            storage.save_torch(last_path, {
                "model": model.state_dict(), "weighting": weighting.state_dict(), "optimizer": optimizer.state_dict(),
                "epoch": epoch, "stopping": asdict(stopping), "torch_rng": torch.get_rng_state(),
                "result": result.as_dict()})
        ranks.barrier()  # the checkpoint is written before any rank goes on (or is killed)
        if hooks.on_epoch_end is not None:
            hooks.on_epoch_end(epoch)
        if done:
            best.restore(done)
            if hooks.on_members_done is not None:
                model.set_active(done)
                hooks.on_members_done(done, result)
        if len(members) == 1 and stopping.stopped[0]:
            log(f"early stop: the validation relative loss did not fall for {config.patience} epoch(s)")

    best.restore(list(range(len(members))))
    model.set_active(list(range(len(members))))
    result.weights_digest = weights_digest(model)
    return result
