"""Galleries by seed images (paper Fig. 1): embed a few photos as one gallery, rank all galleries
by cosine similarity of their embeddings."""
from __future__ import annotations

import numpy as np
import torch

from gallery.images import load_image
from gallery.models import GalleryEncoder
from gallery.packed import PackedGalleries
from gallery.train import pick_device


def normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def nearest(query: np.ndarray, embeddings: np.ndarray, k: int, exclude=()) -> list[tuple[int, float]]:
    """Top-k rows by cosine similarity, leaving out `exclude` rows."""
    scores = normalize(embeddings) @ normalize(query)
    scores[list(exclude)] = -np.inf
    top = np.argsort(-scores)[:k]
    return [(int(i), float(scores[i])) for i in top]


@torch.no_grad()
def embed_images(encoder: GalleryEncoder, images: list[np.ndarray]) -> np.ndarray:
    """Seed photos (uint8, H x W x 3, already resized) embedded as one gallery with the full model."""
    device = pick_device()
    store = PackedGalleries.from_arrays(["seeds"], [np.stack(images)])
    x, index = store.gather([0])
    encoder = encoder.to(device).eval()
    return encoder(x.to(device), index.to(device), 1, from_features=False)[0].float().cpu().numpy()


def retrieval_examples(encoder: GalleryEncoder, frame, gallery_ids: list[str], embeddings: np.ndarray,
                       image_size: int, n_examples: int, seed: int, k: int = 4, seeds_per_example: int = 3) -> list[dict]:
    """Seed sets taken from random valid galleries, each with its k nearest *other* galleries."""
    rng = np.random.default_rng(seed)
    position = {g: i for i, g in enumerate(gallery_ids)}
    images = frame.set_index("gallery_id")["images"]
    valid = [g for g in frame.loc[frame["split"] == "valid", "gallery_id"] if g in position]
    examples = []
    for source in rng.choice(valid, size=min(n_examples, len(valid)), replace=False):
        seeds = list(images[source][:seeds_per_example])
        query = embed_images(encoder, [load_image(s, image_size) for s in seeds])
        hits = nearest(query, embeddings, k, exclude=[position[source]])
        examples.append({"source": str(source), "seeds": seeds,
                         "results": [{"gallery_id": gallery_ids[i], "score": s, "images": list(images[gallery_ids[i]][:3])}
                                     for i, s in hits]})
    return examples


def retrieval_figure(examples: list[dict], thumb: int = 64):
    """One row per seed set: the seeds, then each result's first photos, with its score."""
    import matplotlib.pyplot as plt

    from gallery.images import ImageProblem

    def picture(path):
        try:
            return load_image(path, thumb)
        except ImageProblem:
            return np.full((thumb, thumb, 3), 230, np.uint8)

    n_cols = max(len(e["seeds"]) for e in examples) + sum(len(r["images"]) for r in examples[0]["results"])
    fig, axes = plt.subplots(len(examples), n_cols, figsize=(1.1 * n_cols, 1.35 * len(examples)), squeeze=False)
    for row, example in zip(axes, examples):
        cells = [(p, "seed" if j == 0 else "") for j, p in enumerate(example["seeds"])]
        for r in example["results"]:
            cells += [(p, f"{r['gallery_id']}\n{r['score']:.2f}" if j == 0 else "") for j, p in enumerate(r["images"])]
        for ax in row:
            ax.axis("off")
        for ax, (path, title) in zip(row, cells):
            ax.imshow(picture(path))
            ax.set_title(title, fontsize=6)
    fig.suptitle("Seed images (left) and the nearest galleries by embedding", fontsize=9)
    fig.tight_layout()
    return fig
