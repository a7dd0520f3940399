"""Streaming over preprocessed shards (docs/design.md §6): any gallery's images or features, fetched on demand.

Every consumer (training, export, holdout, task-optimal models, the embed flow) reads through
here. The per-gallery index (ids, splits, offsets) is held for the whole catalogue: it is small by
nature. Pixels and features are held only for the batches in flight: one byte-range read per
gallery (pyarrow's random-access files, local or s3:// through the same code), decoded in the
DataLoader's worker processes, so memory is bounded by batch size x prefetch depth, never by the
catalogue.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset

import gallery.storage as storage
from gallery.data.shards import FEATURES, GALLERIES, IMAGES, decode_stored, shard_metadata


@dataclass
class ShardIndex:
    """Where every gallery of a set of shards lives (rows in shard order)."""

    locations: list[str]
    gallery_ids: list[str]
    split: np.ndarray         # (G,) object
    shard: np.ndarray         # (G,) which location
    first_image: np.ndarray   # (G,) image position inside its shard
    byte_offset: np.ndarray   # (G,) in images.bin
    image_sizes: list         # (G,) arrays of encoded sizes
    lengths: np.ndarray       # (G,) images per gallery
    image_size: int
    feature_dtype: str | None
    feature_shape: tuple | None

    @staticmethod
    def read(locations: list[str]) -> "ShardIndex":
        tables, metas = [], []
        for location in locations:
            with storage.open_input_file(storage.join(location, GALLERIES)) as f:
                table = pq.read_table(f)
            tables.append(table)
            metas.append(shard_metadata(table.schema))
        column = lambda name: [v for t in tables for v in t[name].to_pylist()]  # noqa: E731
        shard = np.concatenate([np.full(t.num_rows, k, np.int32) for k, t in enumerate(tables)]) if tables else np.zeros(0, np.int32)
        meta = metas[0] if metas else {"image_size": 0, "feature_dtype": None, "feature_shape": None}
        return ShardIndex(list(locations), column("gallery_id"), np.array(column("split"), dtype=object), shard,
                          np.array(column("first_image"), np.int64), np.array(column("byte_offset"), np.int64),
                          [np.array(s, np.int64) for s in column("image_sizes")], np.array(column("images"), np.int64),
                          meta["image_size"], meta["feature_dtype"],
                          tuple(meta["feature_shape"]) if meta["feature_shape"] else None)

    def __len__(self) -> int:
        return len(self.gallery_ids)


class ShardSource:
    """Galleries of a ShardIndex as pixels (decoded from images.bin) or trunk features (features.bin).

    `gather(rows)` has the shape of PackedGalleries.gather, so training and embedding take either.
    Files are opened lazily in each process (DataLoader workers open their own).
    """

    def __init__(self, index: ShardIndex, features: bool):
        if features and index.feature_dtype is None:
            raise ValueError("these shards hold no feature cache; read pixels, or preprocess with train.use_cache")
        self.index, self.features = index, features
        self.gallery_ids = index.gallery_ids
        self.lengths = torch.as_tensor(index.lengths)
        if features:
            self.dtype = getattr(torch, index.feature_dtype)
            self.row_bytes = int(np.prod(index.feature_shape)) * self.dtype.itemsize
        self._files: dict[int, object] = {}
        self._pid = None

    def __len__(self) -> int:
        return len(self.index)

    def __getstate__(self):
        return {**self.__dict__, "_files": {}, "_pid": None}

    def _file(self, shard: int):
        if self._pid != os.getpid():  # a forked worker must not share its parent's handles
            self._files, self._pid = {}, os.getpid()
        if shard not in self._files:
            name = FEATURES if self.features else IMAGES
            self._files[shard] = storage.open_input_file(storage.join(self.index.locations[shard], name))
        return self._files[shard]

    def gallery(self, row: int) -> torch.Tensor:
        """One gallery's images (n, H, W, 3) uint8 or features (n, C, h, w)."""
        i, n = self.index, int(self.index.lengths[row])
        f = self._file(int(i.shard[row]))
        if self.features:
            data = f.read_at(n * self.row_bytes, int(i.first_image[row]) * self.row_bytes)
            return torch.frombuffer(bytearray(data), dtype=self.dtype).view(n, *i.feature_shape)
        sizes = i.image_sizes[row]
        data = f.read_at(int(sizes.sum()), int(i.byte_offset[row]))
        ends = np.cumsum(sizes)
        return torch.from_numpy(np.stack([decode_stored(data[e - s:e]) for s, e in zip(sizes, ends)]))

    def gather(self, rows) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of galleries `rows` concatenated (in that order) and the gallery-in-batch index of each."""
        rows = np.asarray(rows)
        parts = [self.gallery(int(r)) for r in rows]
        lengths = torch.as_tensor([len(p) for p in parts], dtype=torch.int64)
        return torch.cat(parts), torch.repeat_interleave(torch.arange(len(rows)), lengths)


@dataclass
class Batch:
    """A packed batch: all rows of `n` galleries (x), the gallery-in-batch of each row (index), the
    galleries' labels (targets: (n, tasks) float, NaN = missing) and their rows in the source."""

    x: torch.Tensor
    index: torch.Tensor
    n: int
    targets: torch.Tensor | None
    rows: np.ndarray

    def pin_memory(self) -> "Batch":
        return Batch(self.x.pin_memory(), self.index.pin_memory(), self.n,
                     None if self.targets is None else self.targets.pin_memory(), self.rows)


@dataclass(frozen=True)
class PairedLabels:
    """Which batch galleries were drawn as ends of engagement pairs (per batch), and which target columns
    are pairs tasks: drawn galleries carry only those labels, the others every label but those, so the
    attribute tasks see exactly the usual sample and the pair loss its sampled pairs."""

    drawn: list[np.ndarray]     # per batch: (n,) bool
    columns: torch.Tensor       # (tasks,) bool

    def mask(self, k: int, targets: torch.Tensor) -> torch.Tensor:
        drawn = torch.as_tensor(self.drawn[k])[:, None]
        keep = torch.where(drawn, self.columns[None, :], ~self.columns[None, :])
        return torch.where(keep, targets, torch.nan)


class Batches(Dataset):
    """Item k is the k-th batch of galleries, packed; a DataLoader worker builds whole batches."""

    def __init__(self, source, batches: list[np.ndarray], targets: torch.Tensor | None = None,
                 paired: PairedLabels | None = None):
        self.source, self.batches, self.targets, self.paired = source, batches, targets, paired

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int) -> Batch:
        rows = self.batches[k]
        x, index = self.source.gather(rows)
        targets = None if self.targets is None else self.targets[torch.as_tensor(rows, dtype=torch.int64)]
        if targets is not None and self.paired is not None:
            targets = self.paired.mask(k, targets)
        return Batch(x, index, len(rows), targets, rows)


def batches_of(order, batch_galleries: int, rank: int = 0, world: int = 1) -> list[np.ndarray]:
    """Global batches of `batch_galleries` galleries in the given order; each of `world` data-parallel
    ranks takes every world-th gallery of each batch. A last batch too small to give every rank a
    gallery is topped up from the start of the order (every rank must take every step)."""
    return [np.ascontiguousarray(b[rank::world]) for b in global_batches(order, batch_galleries, world)]


def global_batches(order, batch_galleries: int, world: int = 1) -> list[np.ndarray]:
    """The whole batches that `world` ranks share (see `batches_of`)."""
    order = np.ascontiguousarray(order, dtype=np.int64)
    batches = [order[s:s + batch_galleries] for s in range(0, len(order), batch_galleries)]
    if world > 1 and batches and len(batches[-1]) < world:
        batches[-1] = np.concatenate([batches[-1], order[:world - len(batches[-1])]])
    return batches


@dataclass(frozen=True)
class PairRows:
    """One pairs task's engagement pairs within one split, as source rows, with their weights."""

    a: np.ndarray
    b: np.ndarray
    weight: np.ndarray


def with_pairs(order, batch_galleries: int, pairs: list[PairRows], per_batch: int, seed: list[int],
               rank: int = 0, world: int = 1) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """`batches_of` the order, each global batch followed by `per_batch` pairs of every pairs task (both
    ends, a then b), drawn with probability proportional to their weight from a generator seeded by
    `seed`; per batch, this rank's rows and which of them were drawn as pair ends. Pair-aware sampling
    beside the usual sample: a batch holds both ends of each drawn pair, so the pair loss has positives."""
    order = np.ascontiguousarray(order, dtype=np.int64)
    rng = np.random.default_rng(seed)
    rows, drawn = [], []
    for base in global_batches(order, batch_galleries, world):
        ends = [np.ravel(np.column_stack([p.a[i], p.b[i]]))
                for p in pairs if len(p.a)
                for i in [rng.choice(len(p.a), min(per_batch, len(p.a)), replace=False, p=p.weight / p.weight.sum())]]
        batch = np.concatenate([base, *ends])
        is_drawn = np.arange(len(batch)) >= len(base)
        rows.append(np.ascontiguousarray(batch[rank::world]))
        drawn.append(is_drawn[rank::world])
    return rows, drawn


def stream(source, batches: list[np.ndarray], targets: torch.Tensor | None = None, workers: int = 0,
           pin_memory: bool = False, paired: PairedLabels | None = None):
    """Batches in order, built by `workers` processes (0: in this process), `prefetch` ahead each."""
    return DataLoader(Batches(source, batches, targets, paired), batch_size=None, shuffle=False, num_workers=workers,
                      pin_memory=pin_memory, prefetch_factor=2 if workers else None, persistent_workers=False)
