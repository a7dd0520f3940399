"""Retrieval examples for the report (paper Fig. 1): a few photos embedded as one gallery, and the
galleries nearest to it by cosine similarity: `evaluation.retrieval_examples` queries (3), each an exact
search of the catalogue, so linear in it."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gallery.config import RetrievalSettings
from gallery.data.images import ImageProblem, load_image
from gallery.model.gallery_model import GalleryEncoder
from gallery.retrieval.embeddings import embed_images
from gallery.retrieval.search import FloatIndex


@dataclass
class RetrievalHit:
    gallery_id: str
    score: float                             # cosine similarity to the seeds' embedding
    images: list[str]                        # the photos shown: heaviest first with attention weights, else the first
    top_photo_weight: float | None = None    # the top photo's attention weight (attention poolings)


@dataclass
class RetrievalExample:
    source: str           # the test gallery the seed photos come from
    seeds: list[str]
    results: list[RetrievalHit]


def retrieval_examples(encoder: GalleryEncoder, frame, gallery_ids: list[str], embeddings: np.ndarray,
                       image_size: int, n_examples: int, seed: int, k: int = 4, seeds_per_example: int = 3,
                       photo_weights: dict[str, tuple[list[str], np.ndarray]] | None = None) -> list[RetrievalExample]:
    """Seed sets taken from random test galleries, each with its k nearest *other* galleries.

    With `photo_weights` (gallery -> its embedded photos and their attention weights, from an
    attention pooling's export), each result shows its photos heaviest first, the top-weighted one
    with its weight; otherwise its first photos. The search is exact (a flat index at every size: a few
    queries do not pay for building an approximate one over a large catalogue). Time O(N·d +
    n_examples·(N·d + the seed photos' encoding)), memory O(N·d)."""
    rng = np.random.default_rng(seed)
    position = {g: i for i, g in enumerate(gallery_ids)}
    images = frame.set_index("gallery_id")["images"]
    test = [g for g in frame.loc[frame["split"] == "test", "gallery_id"] if g in position]
    index = FloatIndex(embeddings, RetrievalSettings(approximate_above=len(embeddings)))
    examples = []
    for source in rng.choice(test, size=min(n_examples, len(test)), replace=False):
        seeds = list(images[source][:seeds_per_example])
        query = embed_images(encoder, [load_image(s, image_size) for s in seeds])
        hits = index.search(query, k + 1)
        found = [(int(i), float(s)) for i, s in zip(hits.rows[0], hits.scores[0]) if i != position[source]][:k]
        examples.append(RetrievalExample(str(source), seeds, [
            RetrievalHit(gallery_ids[i], s, *_shown_photos(gallery_ids[i], images[gallery_ids[i]], photo_weights))
            for i, s in found]))
    return examples


def _shown_photos(gallery_id: str, images: list[str], photo_weights, shown: int = 3) -> tuple[list[str], float | None]:
    """A result's photos: by weight, heaviest first, with the top one's weight; else the first ones.
    Time O(photos·log photos)."""
    if not photo_weights or gallery_id not in photo_weights:
        return list(images[:shown]), None
    photos, weights = photo_weights[gallery_id]
    order = np.argsort(-np.asarray(weights), kind="stable")[:shown]
    return [photos[j] for j in order], float(weights[order[0]])


def retrieval_figure(examples: list[RetrievalExample], thumb: int = 64):
    """One row per seed set: the seeds, then each result's photos, with its score."""
    import matplotlib.pyplot as plt

    def picture(path):
        try:
            return load_image(path, thumb)
        except ImageProblem:
            return np.full((thumb, thumb, 3), 230, np.uint8)

    n_cols = max(len(e.seeds) for e in examples) + sum(len(r.images) for r in examples[0].results)
    fig, axes = plt.subplots(len(examples), n_cols, figsize=(1.1 * n_cols, 1.35 * len(examples)), squeeze=False)
    for row, example in zip(axes, examples):
        cells = [(p, "seed" if j == 0 else "") for j, p in enumerate(example.seeds)]
        for r in example.results:
            top = f" · w {r.top_photo_weight:.2f}" if r.top_photo_weight is not None else ""
            cells += [(p, f"{r.gallery_id}\n{r.score:.2f}{top}" if j == 0 else "") for j, p in enumerate(r.images)]
        for ax in row:
            ax.axis("off")
        for ax, (path, title) in zip(row, cells):
            ax.imshow(picture(path))
            ax.set_title(title, fontsize=6)
    weighted = any(r.top_photo_weight is not None for e in examples for r in e.results)
    fig.suptitle("Seed images (left) and the nearest galleries by embedding"
                 + (", each shown by its top-weighted photos (w: the top photo's attention weight)" if weighted else ""),
                 fontsize=9)
    fig.tight_layout()
    return fig
