"""The gallery model (DESIGN §5): image encoder -> symmetric pooling -> one small head per task."""
from __future__ import annotations

import torch
from torch import nn

from gallery.backbones import ImageEncoder, build_backbone
from gallery.contracts import Task
from gallery.labels import LabelStats
from gallery.pooling import build_pooling


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


class GalleryEncoder(nn.Module):
    """Packed galleries -> one embedding each. Takes pixels, or cached trunk features."""

    def __init__(self, images: ImageEncoder, pooling: nn.Module):
        super().__init__()
        self.images, self.pooling = images, pooling

    @property
    def dim(self) -> int:
        return self.images.dim

    def forward(self, x: torch.Tensor, index: torch.Tensor, n: int, from_features: bool = False) -> torch.Tensor:
        vectors = self.images.top_vectors(x) if from_features else self.images(x)
        return self.pooling(vectors, index, n)


class GalleryModel(nn.Module):
    def __init__(self, encoder: GalleryEncoder, tasks: list[Task], hidden: int, stats: dict[str, LabelStats] | None = None):
        super().__init__()
        self.encoder = encoder
        self.tasks = list(tasks)
        self.heads = nn.ModuleDict({t.name: TaskHead(encoder.dim, hidden, t, (stats or {}).get(t.name)) for t in tasks})

    def forward(self, x, index, n, from_features: bool = False):
        z = self.encoder(x, index, n, from_features)
        return z, {name: head(z) for name, head in self.heads.items()}


def build_model(model_settings, tasks: list[Task], stats: dict[str, LabelStats] | None = None) -> GalleryModel:
    images = build_backbone(model_settings.backbone, model_settings.weights, model_settings.trainable_blocks,
                            model_settings.image_size)
    return GalleryModel(GalleryEncoder(images, build_pooling(model_settings.pooling)), tasks, model_settings.hidden, stats)


def parameter_counts(model: GalleryModel) -> dict[str, int]:
    """Trainable and frozen parameters of encoder and heads (what `gallery model-summary` prints)."""
    def count(module, trainable):
        return sum(p.numel() for p in module.parameters() if p.requires_grad == trainable)

    return {
        "encoder_trainable": count(model.encoder, True), "encoder_frozen": count(model.encoder, False),
        "heads_trainable": count(model.heads, True), "heads_frozen": count(model.heads, False),
    }
