"""A trained model from its checkpoints: what export, evaluation, the embed flow and search load."""
from __future__ import annotations

from dataclasses import replace

import gallery.storage as storage
from gallery.config import Settings
from gallery.model.gallery_model import GalleryModel, build_model


def load_trained(tasks, stats, settings: Settings, checkpoints: str) -> GalleryModel:
    """The model as trained (best epoch); no pretrained weights are needed to rebuild it."""
    model = build_model(replace(settings.model, weights="random"), tasks, stats)
    model.load_state_dict(storage.load_torch(storage.join(checkpoints, "best.pt"))["model"])
    return model.eval()
