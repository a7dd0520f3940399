"""Loss weightings: how the per-task losses of a batch become one backward pass (see docs/design.md, "Model").

One class per method, behind one interface (LibMTL's `weighting/` is the model), so a new method is a
new class and a registry entry, never an edit to the training loop (gallery.training.engine). The loop
gives a weighting, at each step:
- `losses`: each task's mean loss over the galleries of the whole batch that carry its label (a
  task with no label in the batch has 0 there), and `present`: which tasks have a label in the batch;
- `representation`: the shared gallery embeddings the heads read (for methods that weigh tasks by
  their gradients there; `uses_representation` says whether it is needed);
and calls `backward` (the weighting backpropagates), then `after_step` once the optimiser stepped
(with a function that recomputes the batch's losses under the new weights) and `on_epoch_end` with
each task's mean training loss of the epoch. Every weighting must leave a task without labels in
the batch out (it contributes nothing, and no state of the weighting moves for it) and must hold the
same state on every data-parallel rank: what it computes from a batch comes from quantities the loop
has already made identical across ranks (`losses` are whole-batch means; `on_epoch_end` gets
all-reduced means), or it all-reduces them itself through `self.ranks`.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from gallery.data.labels import LabelStats
from gallery.data.tasks import Task


class Weighting(nn.Module):
    """The interface; subclasses define `loss` (a scalar to backpropagate) and may override the hooks."""

    uses_representation = False  # True: `backward` needs the shared gallery representation

    def __init__(self, tasks: list[Task], stats: dict[str, LabelStats]):
        super().__init__()
        self.names = [t.name for t in tasks]
        self.ranks = None  # the data-parallel group (gallery.training.distributed.Ranks), set by the loop

    def bind(self, ranks) -> "Weighting":
        self.ranks = ranks
        return self

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the data-parallel ranks (in place); unchanged when training alone."""
        return tensor if self.ranks is None else self.ranks.all_reduce(tensor)

    def loss(self, losses: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def backward(self, losses: torch.Tensor, present: torch.Tensor,
                 representation: torch.Tensor | None = None) -> torch.Tensor:
        """Backpropagate this batch; returns the objective's value (detached), for the log."""
        total = self.loss(losses, present)
        total.backward()
        return total.detach()

    def after_step(self, losses: torch.Tensor, present: torch.Tensor, recompute) -> None:
        """After the optimiser step. `recompute()` gives (losses, present) of the same batch under the
        updated model, without gradients (methods such as FAMO learn from that change)."""

    def on_epoch_end(self, epoch: int, train_losses: torch.Tensor) -> None:
        """After each epoch, with every task's mean training loss over the epoch (identical on all ranks)."""


def variance_scales(tasks: list[Task], stats: dict[str, LabelStats]) -> torch.Tensor:
    """1/σ²_k for regression tasks (σ²_k: train-split label variance), 1 otherwise: the paper's
    pseudo-uniform scaling, which puts a regression's squared error in units of its label's spread."""
    return torch.tensor([1.0 / _variance(stats, t) if t.kind == "regression" else 1.0 for t in tasks])


class PseudoUniform(Weighting):
    """The paper's: Σ_bin L + Σ_cat L + Σ_reg L / σ²_k."""

    def __init__(self, tasks: list[Task], stats: dict[str, LabelStats]):
        super().__init__(tasks, stats)
        self.register_buffer("scale", variance_scales(tasks, stats))

    def loss(self, losses, present):
        return (self.scale * losses).sum()


class Kendall(Weighting):
    """Kendall et al.: learned s_k = log σ²_k; regression ½·e^(−s)·L + ½·s, classification e^(−s)·L + ½·s.

    The ½·s term counts only for tasks that contribute a loss (`present`: labelled in the batch).
    Otherwise, on the batches where a sparsely labelled task has no label, ½·s alone would push its
    s down and its weight e^(−s) up, a drift that grows with the share of label-free batches.
    s_k starts at log σ²_k of the train split for regression (0 for classification), i.e. where
    the pseudo-uniform weighting starts; it is a parameter, optimised and checkpointed with the model.
    """

    def __init__(self, tasks: list[Task], stats: dict[str, LabelStats]):
        super().__init__(tasks, stats)
        self.log_vars = nn.Parameter(torch.tensor(
            [math.log(_variance(stats, t)) if t.kind == "regression" else 0.0 for t in tasks]))
        self.register_buffer("factor", torch.tensor([0.5 if t.kind == "regression" else 1.0 for t in tasks]))

    def loss(self, losses, present):
        s = self.log_vars
        return (self.factor * torch.exp(-s) * losses + 0.5 * s * present.to(s.dtype)).sum()


class DWA(Weighting):
    """Dynamic Weight Average (Liu et al. 2019, "End-to-End Multi-Task Learning with Attention"):
    w_k = K·exp(r_k / T) / Σ_j exp(r_j / T), r_k = L_k(e−1) / L_k(e−2) from the last two epochs' mean
    training losses; w = 1 for the first two epochs; T = 2. A task that learns slowly (r near or above
    1) gains weight. Applied to the pseudo-uniform terms (regression divided by its label variance), so
    that tasks of different units start from the paper's balance. A task with no label in a batch adds
    nothing; a task whose epoch losses are missing (no label in the epoch) keeps r = 1."""

    temperature = 2.0

    def __init__(self, tasks: list[Task], stats: dict[str, LabelStats]):
        super().__init__(tasks, stats)
        self.register_buffer("scale", variance_scales(tasks, stats))
        self.register_buffer("history", torch.full((2, len(tasks)), math.nan))  # epoch e-2, e-1
        self.register_buffer("weights", torch.ones(len(tasks)))

    def loss(self, losses, present):
        return (self.weights * self.scale * losses).sum()

    def on_epoch_end(self, epoch, train_losses):
        self.history = torch.stack([self.history[1], train_losses.to(self.history)])
        ratio = self.history[1] / self.history[0]
        if torch.isnan(self.history).all(1).any():  # fewer than two epochs seen
            return
        ratio = torch.where(torch.isfinite(ratio), ratio, torch.ones_like(ratio))
        self.weights = len(ratio) * torch.softmax(ratio / self.temperature, 0)


def _variance(stats: dict[str, LabelStats], task: Task) -> float:
    v = stats[task.name].variance if task.name in stats else None
    return v if v is not None and v > 0 else 1.0


WEIGHTINGS: dict[str, type[Weighting]] = {"pseudo_uniform": PseudoUniform, "kendall": Kendall, "dwa": DWA}


def build_weighting(name: str, tasks: list[Task], stats: dict[str, LabelStats]) -> Weighting:
    if name not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {name!r}; known: {sorted(WEIGHTINGS)}")
    return WEIGHTINGS[name](tasks, stats)
