"""A trained model from its checkpoints folder: what export, evaluation, the embed flow and search load.

Training writes the model's `config.json` (gallery.training.model_config) into the folder before its first
checkpoint, so a folder rebuilds its model alone: a study's model its own pooling, a seed its seed.
"""
from __future__ import annotations

import gallery.storage as storage
from gallery.data.inputs import InputProblem, read_bounded
from gallery.training.model_config import CONFIG_FILE, ModelConfig, ModelFolderError
from gallery.model.gallery_model import GalleryModel, build_model


def save_config(checkpoints: str, config: ModelConfig) -> None:
    storage.write_bytes(storage.join(checkpoints, CONFIG_FILE), config.as_json().encode())


def checkpoint_config(checkpoints: str) -> ModelConfig:
    location = storage.join(checkpoints, CONFIG_FILE)
    if not storage.exists(location):
        raise ModelFolderError(f"{location} does not exist: {checkpoints} is not a checkpoints folder of this "
                               "version of gallery (training writes config.json there before its first epoch)")
    try:
        text = read_bounded(location, "model").decode("utf-8", "replace")
    except InputProblem as e:
        raise ModelFolderError(f"checkpoints folder {checkpoints}: {e}") from None
    return ModelConfig.from_json(text, location)


def load_checkpoint(checkpoints: str) -> tuple[GalleryModel, ModelConfig]:
    """The model as trained (best epoch) and its config; no pretrained weights are needed to rebuild it."""
    config = checkpoint_config(checkpoints)
    model = build_model(config.building(), list(config.tasks), config.stats)
    model.load_state_dict(storage.load_torch(storage.join(checkpoints, "best.pt"))["model"])
    return model.eval(), config


def load_trained(checkpoints: str) -> GalleryModel:
    """The model as trained (best epoch), rebuilt from its folder alone."""
    return load_checkpoint(checkpoints)[0]
