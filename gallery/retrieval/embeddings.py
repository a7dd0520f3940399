"""Gallery embeddings for export: float vectors and their binary codes (Pinterest-style binarization, see codes.py)."""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

import gallery.storage as storage
from gallery.data.inputs import open_random_access, read_bounded
from gallery.data.packed import PackedGalleries
from gallery.data.readers import batches_of, stream
from gallery.errors import UserError, example
from gallery.model.gallery_model import GalleryEncoder
from gallery.retrieval.codes import BinaryCode, code_of, sign_code
from gallery.training.device import autocast, fast_layout, pick_device


@dataclass
class GalleryEmbeddings:
    """Every gallery's embedding and, with an attention pooling, each of its photos' weight."""

    vectors: np.ndarray                     # (G, d) float32
    photo_weights: list[np.ndarray] | None  # per gallery, its photos' weights in stored order (sum 1); None: no attention


@torch.no_grad()
def embed_with_photo_weights(encoder: GalleryEncoder, source, from_features: bool, batch_galleries: int = 64,
                             device=None, precision: str = "fp32", workers: int = 0) -> GalleryEmbeddings:
    """Embeddings of every gallery of `source` (shards or PackedGalleries), in its order, streamed
    batch by batch (eval mode; full precision unless asked, so an export does not depend on the
    machine's bf16 support), with the photo weights of an attention pooling."""
    device = pick_device(device)
    encoder = fast_layout(encoder.to(device), device).eval()
    vectors, weights = [], []
    for batch in stream(source, batches_of(np.arange(len(source)), batch_galleries), workers=workers,
                        pin_memory=device.type == "cuda"):
        with autocast(device, precision):
            z, w = encoder.forward_with_weights(batch.x.to(device), batch.index.to(device), batch.n, from_features)
        vectors.append(z.float().cpu())
        if w is not None:  # a batch's rows are its galleries' photos, gallery after gallery
            counts = torch.bincount(batch.index, minlength=batch.n).tolist()
            weights += [part.numpy() for part in w.float().cpu().split(counts)]
    return GalleryEmbeddings(torch.cat(vectors).numpy() if vectors else np.zeros((0, encoder.dim), np.float32),
                             weights if encoder.has_photo_weights else None)


def embed_galleries(encoder: GalleryEncoder, source, from_features: bool, batch_galleries: int = 64, device=None,
                    precision: str = "fp32", workers: int = 0) -> np.ndarray:
    """(G, d) float32 embeddings of every gallery of `source`, in its order (see embed_with_photo_weights)."""
    return embed_with_photo_weights(encoder, source, from_features, batch_galleries, device, precision, workers).vectors


@torch.no_grad()
def embed_images(encoder: GalleryEncoder, images: list[np.ndarray], device=None) -> np.ndarray:
    """A few photos (uint8, H x W x 3, already resized) embedded together as one gallery."""
    device = pick_device(device)
    store = PackedGalleries.from_arrays(["query"], [np.stack(images)])
    x, index = store.gather([0])
    encoder = encoder.to(device).eval()
    return encoder(x.to(device), index.to(device), 1, from_features=False)[0].float().cpu().numpy()


def pack_sign_bits(embeddings: np.ndarray) -> np.ndarray:
    """(G, d) floats -> (G, ceil(d/8)) uint8: bit = value > 0, most significant bit first (the sign code)."""
    return sign_code(embeddings.shape[1]).encode(embeddings)


def embeddings_table(gallery_ids, splits, embeddings: np.ndarray, metadata: dict, code: BinaryCode | None = None,
                     photos: list[list[str]] | None = None, photo_weights: list[np.ndarray] | None = None):
    """The export of data_contracts/embeddings.schema.json as an Arrow table with schema metadata.

    `embedding_bits` are the embeddings binarized by `code` (a saved code: codes.save_code), sign bits
    when none is given; the metadata names the code, its bits and where it is saved. With an
    attention pooling, `photos` (each gallery's embedded photos) and their `photo_weights` become the
    `images` and `photo_weights` columns."""
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    n, dim = embeddings.shape
    code = sign_code(dim) if code is None else code
    if code.name != "sign" and code.location is None:
        raise ValueError(f"save the fitted {code.name} code (codes.save_code) before writing bits made with it: "
                         "the embeddings file must name where it is")
    bits = code.encode(embeddings)
    table = pa.table({
        "gallery_id": pa.array(list(gallery_ids), pa.string()),
        "split": pa.array(list(splits), pa.string()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1)), dim),
        "embedding_bits": pa.FixedSizeBinaryArray.from_buffers(pa.binary(bits.shape[1]), n, [None, pa.py_buffer(bits)]),
    })
    if photo_weights is not None:
        for gallery_id, images, weights in zip(gallery_ids, photos, photo_weights):
            if len(images) != len(weights):
                raise ValueError(f"gallery {gallery_id}: {len(weights)} photo weights for {len(images)} photos")
        table = table.append_column("images", pa.array([list(p) for p in photos], pa.list_(pa.string())))
        table = table.append_column("photo_weights", pa.array([np.asarray(w, np.float32) for w in photo_weights],
                                                              pa.list_(pa.float32())))
    meta = {f"gallery.{k}": str(v) for k, v in {**metadata, "dimension": dim, **code.metadata()}.items()}
    return table.replace_schema_metadata(meta)


def write_embeddings(location: str, table) -> None:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    storage.write_bytes(location, buffer.getvalue())


def read_embeddings_metadata(location: str) -> dict:
    """The file's `gallery.*` schema metadata (without the prefix), read from the Parquet footer only."""
    with open_random_access(location, "embeddings") as f:
        return _gallery_metadata(pq.read_schema(f))


def embeddings_code(location: str) -> BinaryCode:
    """The code that made a file's `embedding_bits`: binarize more galleries with it (the embed flow, queries)."""
    return code_of(read_embeddings_metadata(location))


def _gallery_metadata(schema) -> dict:
    return {k.decode()[len("gallery."):]: v.decode() for k, v in (schema.metadata or {}).items()
            if k.decode().startswith("gallery.")}


class NonFiniteEmbeddings(UserError):
    """An embeddings file with NaN or infinite values: cosine ranks nothing by them, so it is refused at read."""


SCAN_ROWS = 65536  # rows looked at together when naming the galleries with a non-finite value


def _finite(location: str, table):
    """`table` as read from `location`, unless its `embedding` column holds NaN or infinity: then a
    NonFiniteEmbeddings naming the file, how many galleries and the first few ids. The test is a float64
    sum per chunk of the column as read (any NaN or infinity makes it non-finite; float32 values cannot
    overflow it), so a sound file costs no copy; only a refused one is scanned row by row."""
    if "embedding" not in table.column_names or all(
            np.isfinite(chunk.flatten().to_numpy().sum(dtype=np.float64)) for chunk in table["embedding"].chunks):
        return table
    vectors = embedding_matrix(table)
    rows = np.concatenate([start + np.flatnonzero(~np.isfinite(vectors[start:start + SCAN_ROWS]).all(axis=1))
                           for start in range(0, len(vectors), SCAN_ROWS)])
    ids = (table if "gallery_id" in table.column_names else read_columns(location, ["gallery_id"]))["gallery_id"]
    raise NonFiniteEmbeddings(
        f"embeddings file {location}: {len(rows)} of {len(vectors)} galleries have NaN or infinite values in "
        f"`embedding` (e.g. {example(ids.take(rows[:5]).to_pylist())}); no search can rank by them. Export the "
        "embeddings again from a model whose training did not diverge (its loss stayed finite), or leave those "
        "galleries out of the file")


def read_columns(location: str, columns: list[str]):
    """Some columns of an embeddings file, reading only their bytes (ids and codes without the floats);
    floats that are not finite are refused (NonFiniteEmbeddings)."""
    with open_random_access(location, "embeddings") as f:
        return _finite(location, pq.read_table(f, columns=columns))


def embedding_matrix(table) -> np.ndarray:
    """(G, d) float32 of the `embedding` column."""
    column = table["embedding"].combine_chunks()
    return column.flatten().to_numpy().reshape(len(column), column.type.list_size)


def code_matrix(table) -> np.ndarray:
    """(G, bytes) uint8 packed bits of the `embedding_bits` column."""
    column = table["embedding_bits"].combine_chunks()
    width = column.type.byte_width
    data = np.frombuffer(column.buffers()[1], np.uint8)
    return data[column.offset * width:(column.offset + len(column)) * width].reshape(len(column), width)


def photo_weights_of(table) -> dict[str, tuple[list[str], np.ndarray]] | None:
    """gallery_id -> (its embedded photos, their attention weights) of an embeddings table, or None
    when the file has no photo weights (a pooling without attention)."""
    if "photo_weights" not in table.column_names:
        return None
    return {g: (images, np.asarray(weights, np.float32)) for g, images, weights in
            zip(table["gallery_id"].to_pylist(), table["images"].to_pylist(), table["photo_weights"].to_pylist())}


def read_embeddings(location: str):
    """(table, metadata dict without the 'gallery.' prefix) of an embeddings Parquet file."""
    table = _finite(location, pq.read_table(io.BytesIO(read_bounded(location, "embeddings"))))
    return table, _gallery_metadata(table.schema)
