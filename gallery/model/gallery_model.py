"""The gallery model (docs/design.md §5): image encoder -> symmetric pooling -> one small head per task."""
from __future__ import annotations

import torch
from torch import nn

from gallery.data.labels import LabelStats
from gallery.data.tasks import Task
from gallery.model.backbones import ImageEncoder, build_backbone
from gallery.model.heads import TaskHeads
from gallery.model.losses import TaskLosses
from gallery.model.pooling import build_pooling


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
    """Encoder, the task heads, and their masked losses: forward gives (embeddings, head outputs);
    `losses(outputs, targets)` the per-task sums (columns of the outputs: `heads.layout`)."""

    def __init__(self, encoder: GalleryEncoder, tasks: list[Task], hidden: int, stats: dict[str, LabelStats] | None = None):
        super().__init__()
        self.encoder = encoder
        self.tasks = list(tasks)
        self.heads = TaskHeads(encoder.dim, hidden, tasks, stats)
        self.losses = TaskLosses(self.heads.layout)

    def forward(self, x, index, n, from_features: bool = False):
        z = self.encoder(x, index, n, from_features)
        return z, self.heads(z)


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
