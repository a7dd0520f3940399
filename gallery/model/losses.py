"""Masked per-task losses and the two ways of adding them up (paper §3.3, DESIGN §5).

A task's loss is averaged over only the galleries that carry its label; a batch with none
contributes an exact zero (with a gradient path), never NaN.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gallery.data.labels import MISSING_CLASS, LabelStats
from gallery.data.tasks import Task


def labelled(target: torch.Tensor, kind: str) -> torch.Tensor:
    return target != MISSING_CLASS if kind == "multiclass" else ~torch.isnan(target)


def task_loss(output: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """BCE (binary), cross-entropy (multiclass) or MSE (regression) over labelled rows only."""
    mask = labelled(target, kind)
    if not mask.any():
        return output.sum() * 0.0
    output, target = output[mask].float(), target[mask]
    if kind == "binary":
        return F.binary_cross_entropy_with_logits(output, target.float())
    if kind == "multiclass":
        return F.cross_entropy(output, target.long())
    return F.mse_loss(output, target.float())


def task_losses(outputs: dict, targets: dict, tasks: list[Task]) -> dict[str, torch.Tensor]:
    return {t.name: task_loss(outputs[t.name], targets[t.name], t.kind) for t in tasks}


class PseudoUniform(nn.Module):
    """Σ_bin L + Σ_cat L + Σ_reg L / σ²_k, σ²_k the train-split variance of regression label k."""

    def __init__(self, tasks: list[Task], stats: dict[str, LabelStats]):
        super().__init__()
        self.scale = {t.name: 1.0 / _variance(stats, t) if t.kind == "regression" else 1.0 for t in tasks}

    def forward(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(self.scale[name] * loss for name, loss in losses.items())


class Kendall(nn.Module):
    """Kendall et al.: learned s_k = log σ²_k; regression ½·e^(−s)·L + ½·s, classification e^(−s)·L + ½·s.

    s_k starts at log σ²_k of the train split for regression (0 for classification), i.e. where
    the pseudo-uniform weighting starts; it is a parameter, optimised and checkpointed with the model.
    """

    def __init__(self, tasks: list[Task], stats: dict[str, LabelStats]):
        super().__init__()
        self.kinds = {t.name: t.kind for t in tasks}
        self.log_vars = nn.ParameterDict({
            t.name: nn.Parameter(torch.tensor(math.log(_variance(stats, t)) if t.kind == "regression" else 0.0))
            for t in tasks})

    def forward(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        total = 0.0
        for name, loss in losses.items():
            s = self.log_vars[name]
            factor = 0.5 if self.kinds[name] == "regression" else 1.0
            total = total + factor * torch.exp(-s) * loss + 0.5 * s
        return total


def _variance(stats: dict[str, LabelStats], task: Task) -> float:
    v = stats[task.name].variance if task.name in stats else None
    return v if v is not None and v > 0 else 1.0


WEIGHTINGS = {"pseudo_uniform": PseudoUniform, "kendall": Kendall}


def build_weighting(name: str, tasks: list[Task], stats: dict[str, LabelStats]) -> nn.Module:
    if name not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {name!r}; known: {sorted(WEIGHTINGS)}")
    return WEIGHTINGS[name](tasks, stats)
