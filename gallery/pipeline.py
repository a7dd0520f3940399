"""What each step of the training flow does, as plain functions (flows/train_flow.py only wires them).

Everything large goes through the run-scoped store (gallery.storage): shards, the feature
cache, checkpoints and embeddings live under `<store root>/<run id>/`, so no step depends on
another step's local disk and the flow runs unchanged on a cluster.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from dataclasses import asdict, dataclass, replace

import numpy as np
import pandas as pd
import torch

from gallery import storage
from gallery.backbones import build_backbone
from gallery.config import Settings
from gallery.embed import embed_galleries, embeddings_table, write_embeddings
from gallery.features import trunk_features
from gallery.images import DataQuality, load_galleries
from gallery.ingest import Catalogue
from gallery.losses import build_weighting
from gallery.models import GalleryModel, build_model
from gallery.packed import PackedGalleries
from gallery.progress import Progress
from gallery.synth import generate
from gallery.train import TrainData, TrainResult, fit, pick_device

PIXELS, FEATURES = "pixels.pt", "features.pt"


def share_cores(parallel_tasks: int) -> int:
    """Give each of `parallel_tasks` sibling processes on this machine its share of the cores.

    PyTorch's OpenMP threads spin while they wait: two processes with a thread per core each
    on the same cores ran training 80x slower than with one thread each (measured on 2 cores).
    """
    threads = max(1, len(os.sched_getaffinity(0)) // max(1, parallel_tasks))
    torch.set_num_threads(threads)
    return threads


# ---------------------------------------------------------------- start: the data source

def synthetic_source(store_root: str, settings: Settings, log=print) -> tuple[str, str]:
    """The preset's synthetic catalogue, generated once per (settings, seed) and reused after."""
    synth = settings.data.synth
    key = hashlib.sha1(json.dumps(asdict(synth), sort_keys=True).encode()).hexdigest()[:12]
    location = storage.join(store_root, "catalogues", f"synth-{key}")
    manifest, tasks = storage.join(location, "manifest.parquet"), storage.join(location, "tasks.yaml")
    if storage.exists(manifest):
        log(f"reusing the synthetic catalogue at {location}")
        return manifest, tasks
    log(f"generating the synthetic catalogue ({synth.galleries} galleries, {synth.image_size}px) at {location}")
    if storage.is_uri(location):
        with tempfile.TemporaryDirectory() as tmp:
            generate(tmp, synth)
            storage.upload_dir(tmp, location)
    else:
        generate(location, synth)
    return manifest, tasks


# ---------------------------------------------------------------- preprocess

@dataclass
class Shard:
    location: str
    gallery_ids: list[str]
    n_images: int
    quality: DataQuality


def shard_rows(n_galleries: int, shards: int) -> list[np.ndarray]:
    """Round-robin rows per shard: balanced, deterministic."""
    return [np.arange(k, n_galleries, shards) for k in range(max(1, min(shards, n_galleries)))]


def preprocess_shard(catalogue: Catalogue, rows, settings: Settings, location: str, log=print) -> Shard:
    """Decode, EXIF-fix and resize one shard's galleries; write pixels or the frozen-trunk cache.

    Writes `<location>/galleries.parquet` (gallery_id, split, images kept) and `features.pt` (the
    trunk output, when the cache is on) or `pixels.pt` (uint8 images) as PackedGalleries.
    """
    frame = catalogue.frame.iloc[np.asarray(rows)]
    images = [imgs[: settings.data.max_images] for imgs in frame["images"]]
    progress = Progress(sum(map(len, images)), f"decode {location}", "images", log)
    ids, arrays, quality = load_galleries(frame["gallery_id"], images, settings.model.image_size, progress)
    pixels = PackedGalleries.from_arrays(ids, arrays) if ids else None
    if settings.train.use_cache:
        m = settings.model
        encoder = build_backbone(m.backbone, m.weights, m.trainable_blocks, m.image_size)
        if pixels is not None:
            pixels = trunk_features(encoder, pixels, settings.train.cache_dtype, device=pick_device(), log=log)
    if pixels is not None:
        pixels.save(storage.join(location, FEATURES if settings.train.use_cache else PIXELS))
    kept = frame.set_index("gallery_id").loc[ids]
    table = pd.DataFrame({"gallery_id": ids, "split": kept["split"].to_numpy(),
                          "images": [len(a) for a in arrays]})
    buffer = io.BytesIO()
    table.to_parquet(buffer, index=False)
    storage.write_bytes(storage.join(location, "galleries.parquet"), buffer.getvalue())
    log(f"shard {location}: {len(ids)} galleries, {sum(map(len, arrays))} images; {quality.summary()}")
    return Shard(location, ids, sum(map(len, arrays)), quality)


def load_packed(shards: list[Shard], use_cache: bool) -> PackedGalleries:
    name = FEATURES if use_cache else PIXELS
    return PackedGalleries.concat([PackedGalleries.load(storage.join(s.location, name)) for s in shards if s.gallery_ids])


# ---------------------------------------------------------------- train

def train_weighting(catalogue: Catalogue, shards: list[Shard], settings: Settings, weighting: str,
                    checkpoints: str, resume_from: str | None = None, log=print, on_epoch_end=None) -> TrainResult:
    """MTL training of the model with one loss weighting; best weights end in `checkpoints/best.pt`."""
    store = load_packed(shards, settings.train.use_cache)
    torch.manual_seed(settings.train.seed)
    model = build_model(settings.model, catalogue.tasks, catalogue.stats)
    data = TrainData.from_catalogue(catalogue.frame, catalogue.tasks, store, settings.train.use_cache)
    log(f"training with {weighting} weighting: {len(data.train_rows)} train / {len(data.valid_rows)} valid galleries, "
        f"{len(store.data)} images, {'from the feature cache' if settings.train.use_cache else 'from pixels'}, "
        f"device {pick_device()}")
    w = build_weighting(weighting, catalogue.tasks, catalogue.stats)
    return fit(model, w, data, settings.train, checkpoints, resume_from, log=log, on_epoch_end=on_epoch_end)


def load_trained(catalogue: Catalogue, settings: Settings, checkpoints: str) -> GalleryModel:
    """The model as trained (best epoch); no pretrained weights are needed to rebuild it."""
    model = build_model(replace(settings.model, weights="random"), catalogue.tasks, catalogue.stats)
    model.load_state_dict(storage.load_torch(storage.join(checkpoints, "best.pt"))["model"])
    return model.eval()


# ---------------------------------------------------------------- export

def export_embeddings(catalogue: Catalogue, shards: list[Shard], settings: Settings, checkpoints: str,
                      location: str, metadata: dict) -> int:
    """Embeddings of every readable gallery -> Parquet per data_contracts/embeddings.schema.json."""
    store = load_packed(shards, settings.train.use_cache)
    model = load_trained(catalogue, settings, checkpoints)
    embeddings = embed_galleries(model.encoder, store, settings.train.use_cache)
    splits = catalogue.frame.set_index("gallery_id").loc[store.gallery_ids, "split"]
    meta = {"backbone": settings.model.backbone, "pooling": settings.model.pooling, **metadata}
    write_embeddings(location, embeddings_table(store.gallery_ids, splits, embeddings, meta))
    return len(store)
