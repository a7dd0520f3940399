"""Gallery embeddings for export: float vectors and their packed sign bits (Pinterest-style binarization)."""
from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

import gallery.storage as storage
from gallery.data.packed import PackedGalleries
from gallery.data.readers import batches_of, stream
from gallery.model.gallery_model import GalleryEncoder
from gallery.training.device import autocast, fast_layout, pick_device


@torch.no_grad()
def embed_galleries(encoder: GalleryEncoder, source, from_features: bool, batch_galleries: int = 64, device=None,
                    precision: str = "fp32", workers: int = 0) -> np.ndarray:
    """(G, d) float32 embeddings of every gallery of `source` (shards or PackedGalleries), in its
    order, streamed batch by batch (eval mode; full precision unless asked, so an export does not
    depend on the machine's bf16 support)."""
    device = pick_device(device)
    encoder = fast_layout(encoder.to(device), device).eval()
    out = []
    for batch in stream(source, batches_of(np.arange(len(source)), batch_galleries), workers=workers,
                        pin_memory=device.type == "cuda"):
        with autocast(device, precision):
            out.append(encoder(batch.x.to(device), batch.index.to(device), batch.n, from_features).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, encoder.dim), np.float32)


@torch.no_grad()
def embed_images(encoder: GalleryEncoder, images: list[np.ndarray], device=None) -> np.ndarray:
    """A few photos (uint8, H x W x 3, already resized) embedded together as one gallery."""
    device = pick_device(device)
    store = PackedGalleries.from_arrays(["query"], [np.stack(images)])
    x, index = store.gather([0])
    encoder = encoder.to(device).eval()
    return encoder(x.to(device), index.to(device), 1, from_features=False)[0].float().cpu().numpy()


def pack_sign_bits(embeddings: np.ndarray) -> np.ndarray:
    """(G, d) floats -> (G, ceil(d/8)) uint8: bit = value > 0, most significant bit first."""
    return np.packbits(embeddings > 0, axis=1)


def embeddings_table(gallery_ids, splits, embeddings: np.ndarray, metadata: dict):
    """The export of data_contracts/embeddings.schema.json as an Arrow table with schema metadata."""
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    n, dim = embeddings.shape
    bits = pack_sign_bits(embeddings)
    table = pa.table({
        "gallery_id": pa.array(list(gallery_ids), pa.string()),
        "split": pa.array(list(splits), pa.string()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1)), dim),
        "embedding_bits": pa.array([row.tobytes() for row in bits], pa.binary(bits.shape[1])),
    })
    meta = {f"gallery.{k}": str(v) for k, v in {**metadata, "dimension": dim}.items()}
    return table.replace_schema_metadata(meta)


def write_embeddings(location: str, table) -> None:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    storage.write_bytes(location, buffer.getvalue())


def read_embeddings_metadata(location: str) -> dict:
    """The file's `gallery.*` schema metadata (without the prefix), read from the Parquet footer only."""
    with storage.open_input_file(location) as f:
        return _gallery_metadata(pq.read_schema(f))


def _gallery_metadata(schema) -> dict:
    return {k.decode()[len("gallery."):]: v.decode() for k, v in (schema.metadata or {}).items()
            if k.decode().startswith("gallery.")}


def read_embeddings(location: str):
    """(table, metadata dict without the 'gallery.' prefix) of an embeddings Parquet file."""
    table = pq.read_table(io.BytesIO(storage.read_bytes(location)))
    return table, _gallery_metadata(table.schema)
