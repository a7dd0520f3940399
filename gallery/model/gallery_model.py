"""The gallery model (docs/design.md §5): image encoder -> symmetric pooling -> one small head per attribute
task; metric tasks (identity, pairs) train the pooled embedding itself."""
from __future__ import annotations

import torch
from torch import nn

from gallery.data.labels import LabelStats
from gallery.data.tasks import Task
from gallery.model.backbones import ImageEncoder, build_backbone
from gallery.model.heads import TaskHeads
from gallery.model.losses import TaskLosses
from gallery.model.metric import CosineClassifier, InBatchSoftmax
from gallery.model.pooling import AttentionPooling, build_pooling


class GalleryEncoder(nn.Module):
    """Packed galleries -> one embedding each. Takes pixels, or cached trunk features."""

    def __init__(self, images: ImageEncoder, pooling: nn.Module):
        super().__init__()
        self.images, self.pooling = images, pooling

    @property
    def dim(self) -> int:
        return self.images.dim

    @property
    def has_photo_weights(self) -> bool:
        """Whether the pooling weighs each photo (an attention pooling), so the export can show them."""
        return isinstance(self.pooling, AttentionPooling)

    def image_vectors(self, x: torch.Tensor, from_features: bool = False) -> torch.Tensor:
        return self.images.top_vectors(x) if from_features else self.images(x)

    def forward(self, x: torch.Tensor, index: torch.Tensor, n: int, from_features: bool = False) -> torch.Tensor:
        return self.pooling(self.image_vectors(x, from_features), index, n)

    def forward_with_weights(self, x: torch.Tensor, index: torch.Tensor, n: int,
                             from_features: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(embeddings (n, d), each photo's weight in its gallery (N,), or None without an attention pooling)."""
        vectors = self.image_vectors(x, from_features)
        if self.has_photo_weights:
            return self.pooling.pool_with_weights(vectors, index, n)
        return self.pooling(vectors, index, n), None


class GalleryModel(nn.Module):
    """Encoder, the task heads, and their masked losses: forward gives (embeddings, head outputs);
    `losses(outputs, targets, embeddings, ranks)` the per-task sums (columns of the outputs:
    `heads.layout`; the metric tasks, after the attribute tasks, read the embeddings)."""

    def __init__(self, encoder: GalleryEncoder, tasks: list[Task], hidden: int, stats: dict[str, LabelStats] | None = None,
                 metric: list[nn.Module] = ()):
        super().__init__()
        self.encoder = encoder
        self.tasks = list(tasks)
        self.heads = TaskHeads(encoder.dim, hidden, tasks, stats)
        self.losses = TaskLosses(self.heads.layout, metric)

    def set_pairs(self, task: str, keys: torch.Tensor, nodes: int) -> None:
        """The known pairs of a pairs task (gallery.model.metric.pair_keys), looked up by its loss."""
        first = self.layout.attributes
        position = next(k for k, t in enumerate(self.tasks) if t.name == task)
        self.losses.metric[position - first].set_pairs(keys, nodes)

    @property
    def layout(self):
        return self.heads.layout

    def members(self) -> list[tuple[str, list[int]]]:
        """What early stopping selects as one (gallery.training.engine): the whole model, all its tasks."""
        return [("", list(range(len(self.tasks))))]

    def set_active(self, members: list[int]) -> None:
        """A single model always runs whole."""

    def forward(self, x, index, n, from_features: bool = False):
        z = self.encoder(x, index, n, from_features)
        return z, self.heads(z)


def metric_losses(model_settings, tasks: list[Task], dim: int) -> list[nn.Module]:
    """The loss module of each metric task, in task order: a cosine classifier over an identity task's
    groups, an in-batch softmax for a pairs task (temperatures and class subsampling: model.*)."""
    return [CosineClassifier(dim, t.num_classes, model_settings.identity_temperature, model_settings.sampled_classes)
            if t.kind == "identity" else InBatchSoftmax(model_settings.pairs_temperature)
            for t in tasks if t.is_metric]


def build_model(model_settings, tasks: list[Task], stats: dict[str, LabelStats] | None = None) -> GalleryModel:
    images = build_backbone(model_settings.backbone, model_settings.weights, model_settings.trainable_blocks,
                            model_settings.image_size)
    return GalleryModel(GalleryEncoder(images, build_pooling(model_settings.pooling, images.dim)), tasks,
                        model_settings.hidden, stats, metric_losses(model_settings, tasks, images.dim))


def parameter_counts(model: GalleryModel) -> dict[str, int]:
    """Trainable and frozen parameters of encoder and heads, and the encoder's parts: the image trunk
    (frozen), the image top with its pool, the gallery pooling (what `gallery model-summary` prints)."""
    def count(module, trainable=None):
        return sum(p.numel() for p in module.parameters() if trainable is None or p.requires_grad == trainable)

    images = model.encoder.images
    return {
        "encoder_trainable": count(model.encoder, True), "encoder_frozen": count(model.encoder, False),
        "heads_trainable": count(model.heads, True), "heads_frozen": count(model.heads, False),
        "trunk": count(images.trunk), "top": count(images.top) + count(images.pool),
        "pooling": count(model.encoder.pooling),
    }
