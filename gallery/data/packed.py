"""Packed galleries: all images (or trunk features) of many galleries in one tensor, no padding.

Rows offsets[i]:offsets[i+1] of `data` belong to gallery i. The same container holds decoded
pixels (uint8) and the frozen-trunk cache (fp16/fp32), is written as one file per shard, and
yields training batches: x (N, ...), index (N,) gallery-in-batch of each row, n galleries.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

import gallery.storage as storage


@dataclass
class PackedGalleries:
    gallery_ids: list[str]
    offsets: torch.Tensor  # (G + 1,) int64
    data: torch.Tensor     # (N, ...)

    @staticmethod
    def from_arrays(gallery_ids: list[str], arrays: list) -> "PackedGalleries":
        lengths = torch.tensor([len(a) for a in arrays], dtype=torch.int64)
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
        data = torch.cat([torch.as_tensor(np.asarray(a)) for a in arrays]) if arrays else torch.zeros(0)
        return PackedGalleries(list(gallery_ids), offsets, data)

    @staticmethod
    def concat(parts: list["PackedGalleries"]) -> "PackedGalleries":
        ids = [g for p in parts for g in p.gallery_ids]
        lengths = torch.cat([p.lengths for p in parts])
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
        return PackedGalleries(ids, offsets, torch.cat([p.data for p in parts]))

    def __len__(self) -> int:
        return len(self.gallery_ids)

    @property
    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    def gather(self, rows) -> tuple[torch.Tensor, torch.Tensor]:
        """Data rows of galleries `rows` (in that order) and the gallery-in-batch index of each."""
        rows = torch.as_tensor(np.asarray(rows), dtype=torch.int64)
        starts, lengths = self.offsets[rows], self.lengths[rows]
        index = torch.repeat_interleave(torch.arange(len(rows)), lengths)
        first_in_batch = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)[:-1]])
        positions = torch.arange(int(lengths.sum())) - first_in_batch[index] + starts[index]
        return self.data[positions], index

    def map_data(self, fn) -> "PackedGalleries":
        """Same galleries, new per-row data (e.g. pixels -> trunk features)."""
        return PackedGalleries(self.gallery_ids, self.offsets, fn(self.data))

    def save(self, location: str) -> None:
        """Write to a store location (atomic: a killed step never leaves half a shard)."""
        storage.save_torch(location, {"gallery_ids": self.gallery_ids, "offsets": self.offsets, "data": self.data})

    @staticmethod
    def load(location: str) -> "PackedGalleries":
        state = storage.load_torch(location)
        return PackedGalleries(state["gallery_ids"], state["offsets"], state["data"])


@dataclass
class Batch:
    x: torch.Tensor
    index: torch.Tensor
    n: int
    targets: dict[str, torch.Tensor]
    rows: np.ndarray


def label_tensors(frame, tasks, gallery_ids: list[str]) -> dict[str, torch.Tensor]:
    """Encoded labels (gallery.data.labels) aligned with the packed galleries' order."""
    position = frame.reset_index(drop=True).set_index("gallery_id").index.get_indexer(gallery_ids)
    if (position < 0).any():
        missing = [g for g, p in zip(gallery_ids, position) if p < 0][:5]
        raise KeyError(f"galleries {missing} are not in the catalogue")
    return {t.name: torch.as_tensor(frame[t.name].to_numpy()[position]) for t in tasks}


def iterate_batches(store: PackedGalleries, targets: dict[str, torch.Tensor], rows: np.ndarray, batch_galleries: int):
    """Batches of `batch_galleries` galleries in the given row order (shuffle the rows to shuffle)."""
    for start in range(0, len(rows), batch_galleries):
        chunk = np.asarray(rows[start:start + batch_galleries])
        x, index = store.gather(chunk)
        yield Batch(x, index, len(chunk), {k: v[chunk] for k, v in targets.items()}, chunk)
