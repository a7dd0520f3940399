"""Masked per-task losses and the two ways of adding them up (paper §3.3, docs/design.md §5).

A task's loss is averaged over only the galleries that carry its label. Missing labels are NaN in
the (galleries, tasks) target matrix; they are masked by weights, never by boolean indexing, so a
step has no host synchronisation per task. A task with no label in a batch contributes an exact
zero (with a gradient path), never NaN.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gallery.data.labels import LabelStats
from gallery.data.tasks import Task
from gallery.model.heads import HeadLayout


@dataclass
class TaskSums:
    """Per task (in task order): summed loss, labelled galleries, and correct predictions (classification)."""

    loss: torch.Tensor
    count: torch.Tensor
    correct: torch.Tensor

    def __add__(self, other: "TaskSums") -> "TaskSums":
        return TaskSums(self.loss + other.loss, self.count + other.count, self.correct + other.correct)

    def stacked(self) -> torch.Tensor:
        return torch.stack([self.loss, self.count, self.correct])

    @staticmethod
    def unstack(t: torch.Tensor) -> "TaskSums":
        return TaskSums(t[0], t[1], t[2])

    def means(self) -> torch.Tensor:
        """Each task's mean loss over its labelled galleries (0 where it has none)."""
        return self.loss / self.count.clamp(min=1)


class TaskLosses(nn.Module):
    """BCE (binary), cross-entropy (multiclass) or squared error (regression), summed over the
    labelled galleries of each task, with their count: a few batched operations for all tasks.

    The multiclass tasks' cross-entropies are one segmented log-softmax over all their columns
    (a per-task loop cost ~12 kernel launches per task and step, forward and backward)."""

    def __init__(self, layout: HeadLayout):
        super().__init__()
        self.layout = layout
        scalar, classes = layout.scalar_tasks, layout.class_tasks
        self.n_scalar, self.n_class = len(scalar), len(classes)
        self.register_buffer("scalar_positions", torch.tensor(scalar, dtype=torch.int64), persistent=False)
        self.register_buffer("scalar_binary", torch.tensor([layout.tasks[k].kind == "binary" for k in scalar],
                                                           dtype=torch.bool), persistent=False)
        self.register_buffer("class_positions", torch.tensor([k for k, _, _ in classes], dtype=torch.int64),
                             persistent=False)
        self.register_buffer("class_start", torch.tensor([a - len(scalar) for _, a, _ in classes], dtype=torch.int64),
                             persistent=False)  # within the multiclass columns
        segment = [m for m, (_, a, b) in enumerate(classes) for _ in range(a, b)]  # class task of each column
        self.register_buffer("segment", torch.tensor(segment, dtype=torch.int64), persistent=False)
        order = list(scalar) + [k for k, _, _ in classes]
        self.register_buffer("task_order", torch.tensor(order, dtype=torch.int64).argsort(), persistent=False)

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> TaskSums:
        outputs, targets = outputs.float(), targets.float()
        parts = []  # (loss, count, correct) per task: the one-output tasks, then the multiclass ones
        if self.n_scalar:
            pred, target = outputs[:, :self.n_scalar], targets.index_select(1, self.scalar_positions)
            weight = (~torch.isnan(target)).float()
            target = torch.nan_to_num(target)
            per = torch.where(self.scalar_binary, F.binary_cross_entropy_with_logits(pred, target, reduction="none"),
                              (pred - target) ** 2)
            hit = ((pred > 0).float() == target).float() * self.scalar_binary
            parts.append(torch.stack([(per * weight).sum(0), weight.sum(0), (hit * weight).sum(0)], 1))
        if self.n_class:
            parts.append(self._cross_entropies(outputs[:, self.n_scalar:], targets.index_select(1, self.class_positions)))
        table = torch.cat(parts).index_select(0, self.task_order)  # back to task order
        return TaskSums(table[:, 0], table[:, 1], table[:, 2])

    def _cross_entropies(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(loss, count, correct) of every multiclass task: log-sum-exp per task's segment of columns."""
        n, segment = len(logits), self.segment.expand(len(logits), -1)
        peak = logits.detach().new_full((n, self.n_class), -torch.inf).scatter_reduce(
            1, segment, logits.detach(), "amax")  # each task's largest logit (only for stability and accuracy)
        total = logits.new_zeros(n, self.n_class).scatter_add(1, segment, torch.exp(logits - peak.gather(1, segment)))
        weight = (~torch.isnan(target)).float()
        column = self.class_start + torch.nan_to_num(target).long()  # the true class's column (any, if missing)
        picked = logits.gather(1, column)
        per = (torch.log(total) + peak - picked) * weight
        hit = (picked.detach() >= peak).float() * weight
        return torch.stack([per.sum(0), weight.sum(0), hit.sum(0)], 1)


def task_metrics(sums: TaskSums, layout: HeadLayout) -> dict[str, float]:
    """Accuracy (classification) or MSE (regression) per task over its labelled galleries (NaN if none)."""
    loss, count, correct = (t.detach().cpu().double() for t in (sums.loss, sums.count, sums.correct))
    out = {}
    for k, task in enumerate(layout.tasks):
        n = count[k].item()
        value = loss[k].item() if task.kind == "regression" else correct[k].item()
        out[task.name] = value / n if n > 0 else float("nan")
    return out


class PseudoUniform(nn.Module):
    """Σ_bin L + Σ_cat L + Σ_reg L / σ²_k, σ²_k the train-split variance of regression label k."""

    def __init__(self, tasks: list[Task], stats: dict[str, LabelStats]):
        super().__init__()
        self.register_buffer("scale", torch.tensor(
            [1.0 / _variance(stats, t) if t.kind == "regression" else 1.0 for t in tasks]))

    def forward(self, losses: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
        return (self.scale * losses).sum()


class Kendall(nn.Module):
    """Kendall et al.: learned s_k = log σ²_k; regression ½·e^(−s)·L + ½·s, classification e^(−s)·L + ½·s.

    The ½·s term counts only for tasks that contribute a loss (`present`: labelled in the batch).
    Otherwise, on the batches where a sparsely labelled task has no label, ½·s alone would push its
    s down and its weight e^(−s) up, a drift that grows with the share of label-free batches.
    s_k starts at log σ²_k of the train split for regression (0 for classification), i.e. where
    the pseudo-uniform weighting starts; it is a parameter, optimised and checkpointed with the model.
    """

    def __init__(self, tasks: list[Task], stats: dict[str, LabelStats]):
        super().__init__()
        self.names = [t.name for t in tasks]
        self.log_vars = nn.Parameter(torch.tensor(
            [math.log(_variance(stats, t)) if t.kind == "regression" else 0.0 for t in tasks]))
        self.register_buffer("factor", torch.tensor([0.5 if t.kind == "regression" else 1.0 for t in tasks]))

    def forward(self, losses: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
        s = self.log_vars
        regulariser = 0.5 * s if present is None else 0.5 * s * present.to(s.dtype)
        return (self.factor * torch.exp(-s) * losses + regulariser).sum()


def _variance(stats: dict[str, LabelStats], task: Task) -> float:
    v = stats[task.name].variance if task.name in stats else None
    return v if v is not None and v > 0 else 1.0


WEIGHTINGS = {"pseudo_uniform": PseudoUniform, "kendall": Kendall}


def build_weighting(name: str, tasks: list[Task], stats: dict[str, LabelStats]) -> nn.Module:
    if name not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {name!r}; known: {sorted(WEIGHTINGS)}")
    return WEIGHTINGS[name](tasks, stats)


def weighted_loss(weighting: nn.Module, sums: TaskSums) -> torch.Tensor:
    """The weighting applied to each task's mean loss; only labelled tasks are `present`."""
    return weighting(sums.means(), sums.count > 0)
