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

from gallery import report, storage
from gallery.backbones import build_backbone
from gallery.config import Settings
from gallery.embed import embed_galleries, embeddings_table, read_embeddings, write_embeddings
from gallery.features import trunk_features
from gallery.errors import UserError
from gallery.holdout import evaluate_holdout, vectors_as_galleries
from gallery.images import DataQuality, load_galleries
from gallery.ingest import Catalogue, describe
from gallery.losses import build_weighting
from gallery.models import GalleryEncoder, GalleryModel, build_model
from gallery.packed import PackedGalleries
from gallery.pooling import MeanPool
from gallery.progress import Progress
from gallery.projection import agreement_attributes, projection_attributes, projection_figure, umap_2d
from gallery.report import PAPER_BALANCE_R, PAPER_PU_WINS
from gallery.retrieval import retrieval_examples, retrieval_figure
from gallery.search import attribute_agreement, neighbours, recall_at_k
from gallery.synth import generate
from gallery.task_optimal import class_balance, per_task_table, pseudo_uniform_wins, train_task_optimal
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
    if ids:
        pixels = PackedGalleries.from_arrays(ids, arrays)
        if settings.train.use_cache:
            m = settings.model
            encoder = build_backbone(m.backbone, m.weights, m.trainable_blocks, m.image_size)
            pixels = trunk_features(encoder, pixels, settings.train.cache_dtype, device=pick_device(), log=log)
        pixels.save(storage.join(location, FEATURES if settings.train.use_cache else PIXELS))
    kept = frame.set_index("gallery_id").loc[ids]
    table = pd.DataFrame({"gallery_id": ids, "split": kept["split"].to_numpy(),
                          "images": [len(a) for a in arrays]})
    buffer = io.BytesIO()
    table.to_parquet(buffer, index=False)
    storage.write_bytes(storage.join(location, "galleries.parquet"), buffer.getvalue())
    log(f"shard {location}: {len(ids)} galleries, {sum(map(len, arrays))} images; {quality.summary()}")
    return Shard(location, ids, quality)


def collect_quality(shards: list[Shard], location: str) -> DataQuality:
    """Merge the shards' data-quality problems and write them as CSV; stop if no gallery is left."""
    quality = DataQuality.merge(s.quality for s in shards)
    storage.write_bytes(location, report.quality_csv(quality).encode())
    print(quality.summary())
    if not any(s.gallery_ids for s in shards):
        raise UserError(f"no gallery has a readable image; see {location}")
    return quality


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


def load_trained(tasks, stats, settings: Settings, checkpoints: str) -> GalleryModel:
    """The model as trained (best epoch); no pretrained weights are needed to rebuild it."""
    model = build_model(replace(settings.model, weights="random"), tasks, stats)
    model.load_state_dict(storage.load_torch(storage.join(checkpoints, "best.pt"))["model"])
    return model.eval()


# ---------------------------------------------------------------- export

def export_embeddings(model: GalleryModel, frame: pd.DataFrame, shards: list[Shard], settings: Settings,
                      location: str, metadata: dict) -> int:
    """Embeddings of every readable gallery -> Parquet per data_contracts/embeddings.schema.json.

    `metadata["run_id"]` names the training run whose model made them (searches check it)."""
    store = load_packed(shards, settings.train.use_cache)
    embeddings = embed_galleries(model.encoder, store, settings.train.use_cache)
    splits = frame.set_index("gallery_id").loc[store.gallery_ids, "split"]
    meta = {"backbone": settings.model.backbone, "pooling": settings.model.pooling, **metadata}
    write_embeddings(location, embeddings_table(store.gallery_ids, splits, embeddings, meta))
    return len(store)


# ---------------------------------------------------------------- evaluate

def imagenet_embeddings(store: PackedGalleries, settings: Settings) -> np.ndarray:
    """The ImageNet-transfer arm: the pretrained backbone (no MTL training), mean-pooled per gallery."""
    m = settings.model
    encoder = GalleryEncoder(build_backbone(m.backbone, m.weights, m.trainable_blocks, m.image_size), MeanPool())
    return embed_galleries(encoder, store, settings.train.use_cache)


def holdout_evaluation(catalogue: Catalogue, shards: list[Shard], settings: Settings, embeddings_location: str,
                       imagenet_location: str, metadata: dict, log=print) -> list[dict]:
    """Table 2 for every holdout task; also writes the ImageNet-transfer embeddings for later comparisons."""
    table, _ = read_embeddings(embeddings_location)
    mtl_ids = table["gallery_id"].to_pylist()
    mtl = np.stack(table["embedding"].to_numpy(zero_copy_only=False))
    cache = load_packed(shards, settings.train.use_cache)
    ids, imagenet = cache.gallery_ids, imagenet_embeddings(cache, settings)
    splits = catalogue.frame.set_index("gallery_id").loc[ids, "split"]
    write_embeddings(imagenet_location, embeddings_table(ids, splits, imagenet, {
        "backbone": settings.model.backbone, "pooling": "mean", "weighting": "none (ImageNet weights)", **metadata}))
    stores = {"mtl": vectors_as_galleries(mtl_ids, mtl), "imagenet": vectors_as_galleries(ids, imagenet), "cache": cache}
    return [evaluate_holdout(catalogue, task, settings, stores, log) for task in catalogue.holdout]


def task_optimal_models(catalogue: Catalogue, shards: list[Shard], settings: Settings, names: list[str],
                        checkpoints_of, recovery_of, log=print) -> dict:
    """Task-optimal models for the named tasks, one after the other in this process."""
    store = load_packed(shards, settings.train.use_cache)
    tasks = {t.name: t for t in catalogue.tasks}
    return {name: train_task_optimal(catalogue, tasks[name], store, settings, checkpoints_of(name), recovery_of(name), log)
            for name in names}


# ---------------------------------------------------------------- report

def build_report(run_id: str, settings: Settings, catalogue: Catalogue, quality: DataQuality, training: dict,
                 holdout: list[dict], optimal: dict, embeddings_location: str, imagenet_location: str,
                 reference_checkpoints: str, log=print) -> report.Report:
    """Tables, figures, a short reading of the results beside the paper's, and metrics.json."""
    weightings = list(training)
    table = per_task_table(catalogue, training, optimal)
    balance = class_balance(table, weightings)
    wins = pseudo_uniform_wins(table) if {"pseudo_uniform", "kendall"} <= set(weightings) else None
    r = report.Report()
    r.text(f"# Gallery embedding report — run {run_id}\n\nPreset `{settings.name}`: {settings.model.backbone} at "
           f"{settings.model.image_size} px, {settings.model.pooling} pooling, weightings {', '.join(weightings)}. "
           "Every number below was measured in this run; the paper's figures are shown beside ours, never in our columns.")
    r.text("## Data\n```\n" + describe(catalogue) + "\n```\n\n" + report.quality_markdown(quality))
    r.text("## Training\n" + report.training_markdown(training))
    r.figure("training_curves.png", report.training_curves({w: t["history"] for w, t in training.items()}),
             "Train and validation total loss per epoch.")

    for h in holdout:
        r.text(f"## Held-out task `{h['task']}` (Table 2)\n{h['metric']} on the valid split, "
               f"{h['valid_galleries']} labelled valid galleries ({h['train_galleries']} train); "
               f"95% intervals in brackets.\n\n" + report.table2_markdown(h) + "\n\n" + report.table2_reading(h))
    r.table("table2.csv", pd.concat([report.table2_frame(h) for h in holdout]) if holdout else pd.DataFrame())

    r.text("## MTL vs task-optimal models (Figure 5)\nError is 1 - accuracy (classification) or MSE (regression) on "
           "the valid split; relative error increase = (err_MTL - err_opt) / err_opt, below 0 when MTL does better. "
           f"Task-optimal models: the same architecture on one task, at most {settings.evaluation.task_optimal_epochs} "
           "epochs with early stopping.\n\n" + report.per_task_markdown(table, weightings))
    r.table("per_task.csv", table)
    r.figure("relative_error.png", report.relative_error_figure(table, weightings), "Relative error increase per task.")
    better = {w: int((table[f"relative_error_increase_{w}"] < 0).sum()) for w in weightings}
    lines = [f"MTL ({w}) beats the task-optimal model on {n} of {len(table)} tasks." for w, n in better.items()]
    if wins:
        lines.append(f"Pseudo-uniform has a lower error than Kendall on {wins['wins']} of {wins['tasks']} tasks "
                     f"({wins['share']:.0%}); the paper: {PAPER_PU_WINS[0]} of {PAPER_PU_WINS[1]} (71%).")
    r.text("\n".join(f"- {line}" for line in lines))

    r.text("## Class balance vs MTL benefit (Figure 6)\n" + "\n".join(
        f"- {w}: Pearson r = {report.fmt(b['r'], 2)}, p = {report.fmt(b['p'], 4)} over {b['n']} binary tasks "
        f"(paper: r = {PAPER_BALANCE_R.get(w, float('nan')):.2f}, p < .001): {report.balance_reading(b)}"
        for w, b in balance.items()))
    r.table("class_balance.csv", pd.DataFrame([{"weighting": w, **b} for w, b in balance.items()]))
    r.figure("class_balance.png", report.class_balance_figure(table, balance),
             "Minority-class fraction against relative error increase, with least-squares lines.")

    emb_table, _ = read_embeddings(embeddings_location)
    ids = emb_table["gallery_id"].to_pylist()
    embeddings = np.stack(emb_table["embedding"].to_numpy(zero_copy_only=False))
    binary = binary_vs_float(catalogue, ids, embeddings, imagenet_location)
    if binary:
        r.text("## Binarized embeddings (Pinterest)\n" + report.binary_markdown(binary, embeddings.shape[1]))
    attributes = projection_attributes(catalogue)
    if attributes and len(ids) >= 5:
        rows, coords = umap_2d(embeddings, settings.train.seed, settings.evaluation.projection_points)
        frame = catalogue.frame.set_index("gallery_id").loc[[ids[i] for i in rows]]
        r.text("## 2-D projection (Figure 4)")
        r.figure("projection.png", projection_figure(coords, [(t, frame[t.name].to_numpy()) for t in attributes]),
                 "UMAP of the exported embeddings, coloured by attributes (grey: label missing).")
    model = load_trained(catalogue.tasks, catalogue.stats, settings, reference_checkpoints)
    examples = retrieval_examples(model.encoder, catalogue.frame, ids, embeddings, settings.model.image_size,
                                  settings.evaluation.retrieval_examples, settings.train.seed)
    if examples:
        r.text("## Retrieval by seed images (Figure 1)")
        r.figure("retrieval.png", retrieval_figure(examples), "Seeds from a valid gallery; its nearest other galleries.")

    r.metrics = {"run_id": run_id, "preset": settings.name, "galleries": len(catalogue.frame),
                 "exported_galleries": len(ids),
                 "data_quality": {"skipped_images": len(quality.skipped), "excluded_galleries": len(quality.excluded),
                                  "reasons": quality.reasons()},
                 "training": {w: {k: t[k] for k in ("best_epoch", "best_valid_loss", "stopped_early")} | {"epochs": len(t["history"])}
                              for w, t in training.items()},
                 "holdout": holdout, "per_task": table.to_dict("records"), "class_balance": balance,
                 "pseudo_uniform_wins": wins, "binary_vs_float": binary, "retrieval": examples}
    log(f"report: {len(r.files)} files")
    return r


def binary_vs_float(catalogue: Catalogue, ids: list[str], embeddings: np.ndarray, imagenet_location: str,
                    k: int = 10) -> dict | None:
    """Recall@k of Hamming search on sign bits against float search, and attribute agreement of the
    top-k neighbours (float MTL, binary MTL, float ImageNet transfer), valid galleries as queries."""
    frame = catalogue.frame.set_index("gallery_id").loc[ids]
    queries = np.flatnonzero(frame["split"].to_numpy() == "valid")
    if len(queries) == 0 or len(ids) <= k:
        return None
    imagenet_table, _ = read_embeddings(imagenet_location)
    imagenet = np.stack(imagenet_table["embedding"].to_numpy(zero_copy_only=False))
    assert imagenet_table["gallery_id"].to_pylist() == ids, "ImageNet and MTL embeddings list the same galleries"
    found = {"float": neighbours(embeddings, queries, k, binary=False),
             "binary": neighbours(embeddings, queries, k, binary=True),
             "imagenet_float": neighbours(imagenet, queries, k, binary=False)}
    agreement = {t.name: {kind: attribute_agreement(rows, frame[t.name].to_numpy(), queries) for kind, rows in found.items()}
                 for t in agreement_attributes(catalogue)}
    return {"k": k, "queries": len(queries), "recall_binary_vs_float": recall_at_k(embeddings, queries, k),
            "attribute_agreement": agreement}


def write_report(r: report.Report, location: str) -> None:
    """report.md, metrics.json, the CSV tables and PNG figures into a folder or store location."""
    for name, data in r.files.items():
        storage.write_bytes(storage.join(location, name), data)
    storage.write_bytes(storage.join(location, "metrics.json"), json.dumps(r.metrics, indent=2, default=float).encode())
    storage.write_bytes(storage.join(location, "report.md"), r.markdown().encode())
