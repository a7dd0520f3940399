"""Task heads: per task Linear(d, hidden) -> ReLU -> Linear(hidden, out) (docs/design.md §5), computed together.

The 31 heads of the paper, run one by one, cost ~1,700 kernel launches per step and left an H100
busy 9 ms of 61 (docs/design.md §6). Here every first layer is one wide Linear(d, tasks x hidden); the
second layers of all one-output tasks (binary, regression) are one batched product, and each
multiclass task keeps its own Linear. Parameters are exactly those of separate heads.

The output is one (galleries, columns) tensor: the one-output tasks first, then each multiclass
task's classes; `HeadLayout` says which columns belong to which task. Regression heads predict in
train-split standard units and map back (y = mean + std * h), so a head starts near its label's
scale and the loss is computed in the label's own units. Sigmoid/softmax live in the loss.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from gallery.data.labels import LabelStats
from gallery.data.tasks import Task


@dataclass(frozen=True)
class HeadLayout:
    """Which output columns belong to which task."""

    tasks: tuple[Task, ...]
    scalar_tasks: tuple[int, ...]             # task positions of the one-output columns 0..len-1
    class_tasks: tuple[tuple[int, int, int], ...]  # (task position, first column, end column) per multiclass task

    @staticmethod
    def of(tasks: list[Task]) -> "HeadLayout":
        """Metric tasks (no head, no columns) come after every attribute task."""
        kinds = [t.is_metric for t in tasks]
        if kinds != sorted(kinds):
            raise ValueError("metric tasks (identity, pairs) must follow the attribute tasks")
        scalar = tuple(k for k, t in enumerate(tasks) if t.kind != "multiclass" and not t.is_metric)
        classes, start = [], len(scalar)
        for k, t in enumerate(tasks):
            if t.kind == "multiclass":
                classes.append((k, start, start + t.out_dim))
                start += t.out_dim
        return HeadLayout(tuple(tasks), scalar, tuple(classes))

    @property
    def attributes(self) -> int:
        """How many tasks have a head (the first ones)."""
        return sum(not t.is_metric for t in self.tasks)

    @property
    def columns(self) -> int:
        return self.class_tasks[-1][2] if self.class_tasks else len(self.scalar_tasks)

    def task_output(self, outputs: torch.Tensor, position: int) -> torch.Tensor:
        """One task's predictions: (n,) for binary/regression, (n, classes) for multiclass."""
        if position in self.scalar_tasks:
            return outputs[:, self.scalar_tasks.index(position)]
        _, start, end = next(c for c in self.class_tasks if c[0] == position)
        return outputs[:, start:end]

    def split(self, outputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return {t.name: self.task_output(outputs, k) for k, t in enumerate(self.tasks)}


class TaskHeads(nn.Module):
    def __init__(self, dim: int, hidden: int, tasks: list[Task], stats: dict[str, LabelStats] | None = None):
        super().__init__()
        self.layout = HeadLayout.of(tasks)
        self.hidden = hidden
        scalar = self.layout.scalar_tasks
        if self.layout.attributes:
            self.first = nn.Linear(dim, self.layout.attributes * hidden)
            bound = 1 / math.sqrt(hidden)  # nn.Linear's default initialisation, per head
            self.scalar_weight = nn.Parameter(torch.empty(len(scalar), hidden).uniform_(-bound, bound))
            self.scalar_bias = nn.Parameter(torch.empty(len(scalar)).uniform_(-bound, bound))
        else:  # metric tasks only: no head, and no parameter that no loss reaches (data parallel refuses those)
            self.first = self.scalar_weight = self.scalar_bias = None
        self.class_heads = nn.ModuleList(nn.Linear(hidden, tasks[k].out_dim) for k, _, _ in self.layout.class_tasks)
        self.register_buffer("scalar_positions", torch.tensor(scalar, dtype=torch.int64), persistent=False)
        mean, std = [], []
        for k in scalar:
            s = (stats or {}).get(tasks[k].name)
            regression = tasks[k].kind == "regression"
            mean.append(s.mean if regression and s is not None and s.mean is not None else 0.0)
            std.append(s.variance ** 0.5 if regression and s is not None and s.variance else 1.0)
        self.register_buffer("label_mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("label_std", torch.tensor(std, dtype=torch.float32))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.first is None:  # metric tasks only: nothing to predict
            return z.new_zeros(len(z), 0)
        h = torch.relu(self.first(z)).view(len(z), -1, self.hidden)
        scalar = torch.einsum("bth,th->bt", h.index_select(1, self.scalar_positions), self.scalar_weight)
        scalar = self.label_mean + self.label_std * (scalar + self.scalar_bias)
        classes = [head(h[:, k]) for (k, _, _), head in zip(self.layout.class_tasks, self.class_heads)]
        return torch.cat([scalar] + classes, dim=1)
