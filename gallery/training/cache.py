"""The frozen-trunk feature cache (DESIGN §6).

The trunk is frozen and in eval mode, so its output for an image never changes: compute it once
at preprocessing, and every later model (MTL training with each weighting, the end-to-end
baseline, the task-optimal models) runs only the trainable top from the cache.
"""
from __future__ import annotations

import torch

from gallery.data.packed import PackedGalleries
from gallery.model.backbones import ImageEncoder
from gallery.progress import Progress

CACHE_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


@torch.no_grad()
def trunk_features(encoder: ImageEncoder, pixels: PackedGalleries, dtype: str = "float16",
                   batch_images: int = 256, device: str | torch.device = "cpu", log=print) -> PackedGalleries:
    """Trunk output for every image of `pixels`, same galleries and offsets, stored as `dtype`."""
    encoder = encoder.to(device).eval()
    n = len(pixels.data)
    progress = Progress(n, "trunk features", "images", log)
    chunks = []
    for start in range(0, n, batch_images):
        x = pixels.data[start:start + batch_images].to(device)
        chunks.append(encoder.trunk_features(x).to("cpu", CACHE_DTYPES[dtype]))
        progress.update(len(x))
    return pixels.map_data(lambda _: torch.cat(chunks) if chunks else torch.zeros(0))
