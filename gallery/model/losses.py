"""Masked per-task losses (paper §3.3); how they are added up is a weighting (gallery.model.weightings).

A task's loss is averaged over only the galleries that carry its label. Missing labels are NaN in
the (galleries, tasks) target matrix; they are masked by weights, never by boolean indexing, so a
step has no host synchronisation per task. A task with no label in a batch contributes an exact
zero (with a gradient path), never NaN.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

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
    labelled galleries of each task, with their count: a few batched operations for all tasks. Then each
    metric task's loss on the gallery embeddings (gallery.model.metric), whose modules (an identity
    task's class weights) live here: they are the metric tasks' heads.

    The multiclass tasks' cross-entropies are one segmented log-softmax over all their columns
    (a per-task loop cost ~12 kernel launches per task and step, forward and backward)."""

    def __init__(self, layout: HeadLayout, metric: list[nn.Module] = ()):
        super().__init__()
        self.layout = layout
        self.metric = nn.ModuleList(metric)  # one per metric task, in task order after the attribute tasks
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

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor, embeddings: torch.Tensor | None = None,
                ranks=None) -> TaskSums:
        """Per-task sums of a batch; `embeddings` (the gallery embeddings) and `ranks` (the data-parallel
        group, whose batch the metric losses draw negatives from) serve the metric tasks."""
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
        table = torch.cat(parts).index_select(0, self.task_order) if parts else outputs.new_zeros(0, 3)  # task order
        if len(self.metric):
            first = self.layout.attributes
            metric = [loss(embeddings, targets[:, first + m], ranks) for m, loss in enumerate(self.metric)]
            table = torch.cat([table, torch.stack(metric)])
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
    for k, task in enumerate(layout.tasks):  # metric tasks: the share whose nearest candidate is right
        n = count[k].item()
        value = loss[k].item() if task.kind == "regression" else correct[k].item()
        out[task.name] = value / n if n > 0 else float("nan")
    return out
