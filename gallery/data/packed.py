"""Packed galleries in memory: all images (or trunk features, or vectors) of many galleries in one
tensor, no padding.

Rows offsets[i]:offsets[i+1] of `data` belong to gallery i. `gather(rows)` gives a batch in the
same form as gallery.data.readers.ShardSource: x (N, ...) and index (N,), the gallery-in-batch of
each row. Used where the data is small by nature (one vector per gallery, a query's few photos,
benchmark batches); catalogues are streamed from shards instead.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


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
