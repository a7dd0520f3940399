"""Preprocessed shards (docs/design.md §6): a catalogue's resized images as encoded bytes, fetchable gallery by gallery.

A shard is a folder in the run-scoped store holding
- `images.bin`: every kept image, resized to the preset size and encoded (JPEG by default: a few KB
  at 64 px, ~10-25 KB at 224 px where decoded pixels would take 150 KB), one gallery after another;
- `features.bin` (optional): the frozen trunk's output per image, raw, in the same order;
- `galleries.parquet`: per gallery its id, split, image count, first image, byte offset and the
  size of each of its images in images.bin; its schema metadata names the codec, image size and
  the feature dtype and shape.
A reader (gallery.data.readers) fetches one gallery's byte range, from a folder or s3://, without
the rest. galleries.parquet is published last, so a shard without it was never finished.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

import gallery.storage as storage
from gallery.data.images import DataQuality

if TYPE_CHECKING:
    import torch

IMAGES, FEATURES, GALLERIES = "images.bin", "features.bin", "galleries.parquet"
FORMATS = {"jpeg": "JPEG", "webp": "WEBP", "png": "PNG"}  # png is lossless (exact pixels, larger files)


def encode_image(pixels: np.ndarray, image_format: str = "jpeg", quality: int = 90) -> bytes:
    """(H, W, 3) uint8 -> encoded bytes."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, FORMATS[image_format], quality=quality)
    return buffer.getvalue()


def decode_stored(data: bytes) -> np.ndarray:
    """Encoded bytes written by encode_image -> (H, W, 3) uint8, exactly as every reader sees them."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def as_stored(pixels: np.ndarray, image_format: str = "jpeg", quality: int = 90) -> np.ndarray:
    """A photo as a shard stores and reads it back: what training saw, so what a query photo should be."""
    return decode_stored(encode_image(pixels, image_format, quality))


@dataclass
class Shard:
    """What a preprocessed shard is, for the steps after it (a small Metaflow artifact)."""

    location: str
    gallery_ids: list[str]
    quality: DataQuality
    images: int = 0
    image_bytes: int = 0     # images.bin
    feature_bytes: int = 0   # features.bin (0 without the cache)


class ShardWriter:
    """Writes one shard gallery by gallery, so preprocessing holds one chunk of images at a time.

    Files are written to a staging folder and published when `finish` is called: a killed step
    never leaves a shard that looks complete.
    """

    def __init__(self, location: str, image_size: int, image_format: str = "jpeg", quality: int = 90):
        if image_format not in FORMATS:
            raise ValueError(f"image format {image_format!r} is not one of {sorted(FORMATS)}")
        self.location, self.image_size, self.image_format, self.quality = location, image_size, image_format, quality
        self.staging = storage.staging_dir(location)
        self.images = open(os.path.join(self.staging, IMAGES), "wb")
        self.features = None
        self.feature_dtype, self.feature_shape = None, None
        self.rows: list[dict] = []
        self.n_images = self.n_bytes = self.n_feature_images = 0

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        """On an error nothing is published; the staging folder goes. A full disk is named (storage.full_disk)."""
        for f in (self.images, self.features):
            if f is not None and not f.closed:
                with contextlib.suppress(OSError):  # a full disk fails the close too: the folder goes all the same
                    f.close()
        shutil.rmtree(self.staging, ignore_errors=True)
        if (full := storage.full_disk(error, self.staging)) is not None:
            raise full from error

    def add(self, gallery_id: str, split: str, pixels: np.ndarray) -> np.ndarray:
        """Encode a gallery's images (n, H, W, 3); returns them decoded, as readers will see them."""
        encoded = [encode_image(p, self.image_format, self.quality) for p in pixels]
        self.images.write(b"".join(encoded))
        self.rows.append({"gallery_id": gallery_id, "split": split, "images": len(encoded),
                          "first_image": self.n_images, "byte_offset": self.n_bytes,
                          "image_sizes": [len(e) for e in encoded]})
        self.n_images += len(encoded)
        self.n_bytes += sum(map(len, encoded))
        return np.stack([decode_stored(e) for e in encoded])

    def add_features(self, features: torch.Tensor) -> None:
        """The trunk's output for the next images, in the order they were added."""
        import torch  # here: the flow's light steps read shards' records without torch

        if self.features is None:
            self.features = open(os.path.join(self.staging, FEATURES), "wb")
            self.feature_dtype, self.feature_shape = str(features.dtype).removeprefix("torch."), tuple(features.shape[1:])
        self.features.write(features.contiguous().view(torch.uint8).numpy().tobytes())  # a uint8 view: any dtype
        self.n_feature_images += len(features)

    def finish(self, quality: DataQuality) -> Shard:
        self.images.close()
        if self.features is not None:
            self.features.close()
            if self.n_feature_images != self.n_images:
                raise RuntimeError(f"shard {self.location}: features for {self.n_feature_images} of {self.n_images} images")
        meta = {"image_format": self.image_format, "image_size": self.image_size,
                "feature_dtype": self.feature_dtype, "feature_shape": self.feature_shape}
        schema = pa.schema([("gallery_id", pa.string()), ("split", pa.string()), ("images", pa.int32()),
                            ("first_image", pa.int64()), ("byte_offset", pa.int64()),
                            ("image_sizes", pa.list_(pa.int32()))], metadata={"gallery.shard": json.dumps(meta)})
        table = pa.Table.from_pylist(self.rows, schema=schema)
        pq.write_table(table, os.path.join(self.staging, GALLERIES))
        names = [IMAGES] + ([FEATURES] if self.features is not None else []) + [GALLERIES]
        for name in names:  # galleries.parquet last: it marks the shard complete
            storage.publish(os.path.join(self.staging, name), storage.join(self.location, name))
        shutil.rmtree(self.staging, ignore_errors=True)
        feature_bytes = self.n_feature_images * int(np.prod(self.feature_shape or (0,))) * _itemsize(self.feature_dtype)
        return Shard(self.location, [r["gallery_id"] for r in self.rows], quality, self.n_images, self.n_bytes,
                     feature_bytes)


def _itemsize(dtype: str | None) -> int:
    import torch

    return getattr(torch, dtype).itemsize if dtype else 0


def shard_metadata(schema: pa.Schema) -> dict:
    return json.loads(schema.metadata[b"gallery.shard"])
