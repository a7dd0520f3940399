"""Many single-task models trained as one (the task-optimal models, see docs/design.md "Training engine").

Model m predicts task m alone. The group is one module for the engine (gallery.training.engine.fit):
every batch is read and gathered once (from pixels the frozen trunk also runs once: it is the same
pretrained trunk in every model), each model still training runs its top on it, the group's outputs
are the models' outputs laid out as one multi-task head would lay them out, so the masked losses of
all models are one batched computation, and one backward serves all (their parameters are disjoint).
Each model is a member with its own early stopping; a stopped model is no longer run. So each model
gets exactly the updates it would get trained alone on the same batches (tested). Measured on CPU,
a loop over the models is 2-4x faster than vmapping them (grouped convolutions).
"""
from __future__ import annotations

import torch
from torch import nn

from gallery.model.gallery_model import GalleryModel
from gallery.model.heads import HeadLayout
from gallery.model.losses import TaskLosses


class ModelGroup(nn.Module):
    """Single-task models as one gallery.training.engine.Trainable: its layout and masked losses are the
    tasks', each model a member."""

    def __init__(self, models: list[GalleryModel]):
        super().__init__()
        if any(len(m.tasks) != 1 for m in models):
            raise ValueError("a model group holds single-task models")
        self.models = nn.ModuleList(models)
        self.tasks = [m.tasks[0] for m in models]
        self.layout = HeadLayout.of(self.tasks)
        self.losses = TaskLosses(self.layout)
        self.active = list(range(len(models)))
        # the group's outputs: the one-output tasks' columns first, then each multiclass task's classes
        self.order = list(self.layout.scalar_tasks) + [k for k, _, _ in self.layout.class_tasks]

    def members(self) -> list[tuple[str, list[int]]]:
        return [(f"models.{m}.", [m]) for m in range(len(self.models))]

    def set_active(self, members: list[int]) -> None:
        self.active = sorted(members)

    def forward(self, x, index, n: int, from_features: bool = False):
        if not from_features:
            with torch.no_grad():
                x = self.models[0].encoder.images.trunk_features(x)
        outputs = {}
        for m in self.active:
            _, outputs[m] = self.models[m](x, index, n, from_features=True)
        like = next(iter(outputs.values()))
        parts = [outputs[m] if m in outputs else like.new_zeros(n, self.tasks[m].out_dim) for m in self.order]
        return None, torch.cat(parts, dim=1)
