"""Gallery embeddings for export: float vectors and their packed sign bits (Pinterest-style binarization)."""
from __future__ import annotations

import numpy as np
import torch

from gallery.models import GalleryEncoder
from gallery.packed import PackedGalleries, iterate_batches
from gallery.train import autocast, pick_device


@torch.no_grad()
def embed_galleries(encoder: GalleryEncoder, store: PackedGalleries, from_features: bool,
                    batch_galleries: int = 64, device=None) -> np.ndarray:
    """(G, d) float32 embeddings of every gallery in `store`, in its order (eval mode)."""
    device = pick_device(device)
    encoder = encoder.to(device).eval()
    out = []
    for batch in iterate_batches(store, {}, np.arange(len(store)), batch_galleries):
        with autocast(device):
            out.append(encoder(batch.x.to(device), batch.index.to(device), batch.n, from_features).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, encoder.dim), np.float32)


def pack_sign_bits(embeddings: np.ndarray) -> np.ndarray:
    """(G, d) floats -> (G, ceil(d/8)) uint8: bit = value > 0, most significant bit first."""
    return np.packbits(embeddings > 0, axis=1)
