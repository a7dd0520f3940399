"""Task heads: what turns a gallery embedding into each task's prediction."""
from __future__ import annotations

import torch
from torch import nn

from gallery.data.labels import LabelStats
from gallery.data.tasks import Task


class TaskHead(nn.Module):
    """Linear(d, hidden) -> ReLU -> Linear(hidden, out); sigmoid/softmax/identity live in the loss.

    Regression heads predict in train-split standard units and map back (y = mean + std * h), so
    a head starts near the label's scale; the loss is computed in the label's own units.
    """

    def __init__(self, dim: int, hidden: int, task: Task, stats: LabelStats | None = None):
        super().__init__()
        self.kind = task.kind
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, task.out_dim))
        mean = stats.mean if stats is not None and stats.mean is not None else 0.0
        std = stats.variance ** 0.5 if stats is not None and stats.variance else 1.0
        self.register_buffer("label_mean", torch.tensor(float(mean)))
        self.register_buffer("label_std", torch.tensor(float(std)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = self.net(z)
        if self.kind == "regression":
            return self.label_mean + self.label_std * out[:, 0]
        if self.kind == "binary":
            return out[:, 0]
        return out
