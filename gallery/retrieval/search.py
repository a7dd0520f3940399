"""Search an embeddings file: the nearest galleries to one of its galleries or to seed images.

Seed images are embedded together as one gallery by the model of a training run (the caller
resolves the run: gallery.runs.trained_run); a model whose space differs from the file's is refused.
"""
from __future__ import annotations

import numpy as np

import gallery.storage as storage
from gallery.data.images import ImageProblem, load_image
from gallery.errors import UserError
from gallery.retrieval.embeddings import embed_images, read_embeddings, read_embeddings_metadata
from gallery.retrieval.index import BinaryIndex, FloatIndex


class SearchError(UserError):
    """A search that cannot run as asked; the message names the input and the fix."""


def model_run_id(embeddings_location: str) -> str:
    """The training run whose model made an embeddings file ('latest' when the file does not say)."""
    _require(embeddings_location)
    return read_embeddings_metadata(embeddings_location).get("run_id", "latest")


def _require(embeddings_location: str) -> None:
    if not storage.exists(embeddings_location):
        raise SearchError(f"embeddings file {embeddings_location} does not exist")


def search_embeddings(embeddings_location: str, k: int = 10, binary: bool = False, images=None,
                      gallery_id: str | None = None, model_run=None) -> list[tuple[str, float]]:
    """Top-k galleries of an embeddings file for one of its galleries, or for seed images embedded
    by `model_run`'s model (a gallery.runs.TrainedRun; normally the run that made the file, whose id
    is in the file's metadata: `read_embeddings_metadata(location)["run_id"]`)."""
    _require(embeddings_location)
    table, meta = read_embeddings(embeddings_location)
    ids = table["gallery_id"].to_pylist()
    embeddings = np.stack(table["embedding"].to_numpy(zero_copy_only=False)).astype(np.float32)
    if (images is None) == (gallery_id is None):
        raise SearchError("give seed images (--images) or an existing gallery (--gallery-id), not both")
    if gallery_id is not None:
        if gallery_id not in ids:
            raise SearchError(f"gallery {gallery_id!r} is not in {embeddings_location} ({len(ids)} galleries)")
        query = embeddings[ids.index(gallery_id)]
    else:
        if model_run is None:
            raise ValueError("seed images need the training run whose model embeds them (model_run)")
        model = model_run.model()
        if int(meta.get("dimension", embeddings.shape[1])) != model.encoder.dim:
            raise SearchError(f"{embeddings_location} holds {meta.get('dimension')}-d embeddings "
                              f"({meta.get('backbone')}), but run {model_run.run_id}'s model makes {model.encoder.dim}-d "
                              f"ones ({model_run.settings.model.backbone}): search with the run that made the file "
                              f"(--run {meta.get('run_id')}) or embed the catalogue with flows/embed_flow.py")
        if meta.get("run_id") not in (None, model_run.run_id):
            raise SearchError(f"{embeddings_location} was made by run {meta['run_id']}, the seeds would be embedded by "
                              f"run {model_run.run_id}: two models, two spaces. Pass --run {meta['run_id']}, or embed "
                              f"the catalogue with run {model_run.run_id} (flows/embed_flow.py --train-run {model_run.run_id})")
        pictures = []
        for path in images:
            try:
                pictures.append(load_image(path, model_run.settings.model.image_size))
            except ImageProblem as e:
                raise SearchError(f"seed image {path}: {e}; pass readable JPEG/PNG/WEBP/GIF files") from None
        query = embed_images(model.encoder, pictures)
    index = BinaryIndex(embeddings) if binary else FloatIndex(embeddings)
    hits = index.search(query[None], min(k, len(ids)))
    return [(ids[r], float(s)) for r, s in zip(hits.rows[0], hits.scores[0]) if r >= 0]
