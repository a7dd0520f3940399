"""`gallery.load_model(folder)`: an exported model, usable with no Metaflow, run store or settings file."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from gallery.training.model_config import ModelConfig, ModelFolderError
from gallery.artifact.folder import WEIGHTS_FILE, read_config, read_model_file
from gallery.data.images import ImageProblem, load_image, photo_array
from gallery.data.shards import as_stored
from gallery.errors import UserError
from gallery.retrieval.codes import BinaryCode, parse_code

if TYPE_CHECKING:
    from gallery.model.gallery_model import GalleryModel


class PhotoError(UserError):
    """A photo given to `embed` that cannot be used: which gallery, which photo, why."""


@dataclass
class LoadedModel:
    """An exported gallery model: `embed` galleries of photos, `binarize` their vectors."""

    config: ModelConfig
    model: GalleryModel    # eval mode, on the CPU
    code: BinaryCode
    folder: str

    @property
    def identity(self):
        return self.config.identity

    @property
    def dim(self) -> int:
        return self.config.embedding_dim

    def photo(self, photo, where: str) -> np.ndarray:
        """A photo path (or URI), PIL image, or uint8 (H, W, 3) array as the encoder's input: resized, then
        stored and read back as training's shards did (gallery.training.model_config.Preprocessing)."""
        p = self.config.preprocessing
        try:
            if isinstance(photo, (str, os.PathLike, bytes)):
                pixels = load_image(photo, p.image_size)
            elif isinstance(photo, Image.Image):
                pixels = photo_array(photo, p.image_size)
            else:
                array = np.asarray(photo)
                if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
                    raise ImageProblem(f"an array must be uint8 (height, width, 3) RGB, not {array.dtype} {array.shape}")
                pixels = photo_array(Image.fromarray(array), p.image_size)
        except ImageProblem as e:
            raise PhotoError(f"{where} cannot be used: {e}; give a readable photo (JPEG, PNG, WEBP, GIF)") from None
        return as_stored(pixels, p.stored_as, p.stored_quality)

    def embed(self, galleries, batch_galleries: int = 64, with_photo_weights: bool = False):
        """(G, d) float32 embeddings, one per gallery (each a list of photos: paths, PIL images or arrays, or
        one uint8 (photos, H, W, 3) array), as the training run's export computes them from pixels; with
        `with_photo_weights`, also each gallery's photo weights (attention poolings; None otherwise).
        Photos are decoded `batch_galleries` galleries at a time, so memory does not grow with the catalogue."""
        from gallery.data.packed import PackedGalleries
        from gallery.retrieval.embeddings import embed_with_photo_weights

        galleries, vectors, weights = list(galleries), [], []
        for start in range(0, len(galleries), batch_galleries):
            arrays = [self._gallery(photos, start + g) for g, photos in enumerate(galleries[start:start + batch_galleries])]
            store = PackedGalleries.from_arrays([str(g) for g in range(len(arrays))], arrays)
            embedded = embed_with_photo_weights(self.model.encoder, store, from_features=False,
                                                batch_galleries=batch_galleries, device="cpu")
            vectors.append(embedded.vectors)
            weights += embedded.photo_weights or []
        out = np.concatenate(vectors) if vectors else np.zeros((0, self.dim), np.float32)
        return (out, weights if self.model.encoder.has_photo_weights else None) if with_photo_weights else out

    def _gallery(self, photos, g: int) -> np.ndarray:
        if isinstance(photos, (str, os.PathLike, Image.Image)) or (isinstance(photos, np.ndarray) and photos.ndim != 4):
            raise PhotoError(f"gallery {g} is one photo, not a list of photos: pass [[photo, ...], ...]")
        if not len(photos):
            raise PhotoError(f"gallery {g} has no photos: every gallery needs at least one")
        return np.stack([self.photo(p, f"photo {k} of gallery {g} ({_named(p)})") for k, p in enumerate(photos)])

    def binarize(self, vectors: np.ndarray) -> np.ndarray:
        """(G, d) embeddings -> (G, bytes) packed uint8 binary codes (the run's fitted code)."""
        vectors = np.atleast_2d(np.asarray(vectors, np.float32))
        if vectors.shape[1] != self.dim:
            raise UserError(f"vectors of width {vectors.shape[1]} cannot be binarized by a model of width {self.dim}")
        return self.code.encode(vectors)


def _named(photo) -> str:
    return os.fspath(photo) if isinstance(photo, (str, os.PathLike)) else type(photo).__name__


def load_model(folder) -> LoadedModel:
    """An exported model folder (`gallery export-model`), every file checked against config.json's SHA-256."""
    from safetensors.torch import load

    from gallery.model.gallery_model import build_model

    folder = os.fspath(folder)
    config = read_config(folder)
    model = build_model(config.building(), list(config.tasks), config.stats)
    files = {name: read_model_file(folder, name, config) for name in config.files}  # every file whole and unchanged
    weights = files[WEIGHTS_FILE]
    try:
        model.load_state_dict(load(weights))
    except Exception as e:  # safetensors' and torch's errors for a file that does not fit the config
        raise ModelFolderError(f"{folder}/{WEIGHTS_FILE} does not fit its {config.identity} config "
                               f"({type(e).__name__}: {str(e)[:200]}); export the model again") from None
    code = parse_code(files[config.code_file], os.path.join(folder, config.code_file))
    return LoadedModel(config, model.eval(), code, folder)
