"""`gallery bench scale`: does memory stay flat when the catalogue grows?

Two synthetic catalogues 10x apart go through the pipeline's own code paths — preprocess (shards),
train (one epoch from the shards), export (embeddings of every gallery) — each phase in a fresh
process, so its peak resident memory (ru_maxrss) is its own. Printed side by side: peak RSS of
training+export and of preprocessing, training images/s, and bytes per image on disk for the
encoded images and the feature cache. The headline is training's peak RSS big/small (streaming
keeps it flat; holding the catalogue in one tensor made it grow ~10x). Also measured: the encoded
size of a 224 px image (a real photo and synthetic ones), the paper preset's resolution.
"""
from __future__ import annotations

import multiprocessing
import pickle
import resource
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np

from gallery.config import load_settings
from gallery.data.images import load_image
from gallery.data.shards import encode_image


def _phase(phase: str, settings, folder: str) -> dict:
    """One phase in this (fresh) process: its result and this process's peak RSS."""
    import torch

    torch.set_num_threads(1)
    from gallery.data.ingest import ingest
    from gallery.steps import export_embeddings, preprocess_shard, shard_rows, train_weighting
    from gallery.training.checkpoints import load_trained

    catalogue = ingest(f"{folder}/catalogue/manifest.parquet", f"{folder}/catalogue/tasks.yaml")
    shard_list = Path(folder, "shards.pkl")  # what the flow passes as an artifact
    if phase == "preprocess":
        rows = shard_rows(len(catalogue.frame), settings.data.shards)
        shards = [preprocess_shard(catalogue, r, settings, f"{folder}/shards/{k}", log=lambda _: None)
                  for k, r in enumerate(rows)]
        result = {"images": sum(s.images for s in shards), "image_bytes": sum(s.image_bytes for s in shards),
                  "feature_bytes": sum(s.feature_bytes for s in shards)}
        shard_list.write_bytes(pickle.dumps(shards))
    else:
        shards = pickle.loads(shard_list.read_bytes())
        start = time.perf_counter()
        trained = train_weighting(catalogue, shards, settings, "pseudo_uniform", f"{folder}/checkpoints",
                                  log=lambda _: None)
        train_seconds = time.perf_counter() - start
        model = load_trained(f"{folder}/checkpoints")
        start = time.perf_counter()
        exported = export_embeddings(model, catalogue.frame, shards, settings, f"{folder}/embeddings.parquet",
                                     {"run_id": "bench"})
        result = {"train_images_per_s": trained.history[0].images_per_s, "train_seconds": train_seconds,
                  "export_seconds": time.perf_counter() - start, "exported": exported}
    return {**result, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "peak_rss_workers": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}


def _run(phase: str, settings, folder: str) -> dict:
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_phase, phase, settings, folder).result()


def encoded_kb_at_224(settings, folder: str) -> dict:
    """KB per 224 px image as the shards store it: a real photo (matplotlib's sample) and synthetic ones
    rendered at 224 px."""
    import matplotlib

    from gallery.data.synth import SynthSettings, generate

    d = settings.data
    photo = load_image(f"{matplotlib.get_data_path()}/sample_data/grace_hopper.jpg", 224)
    generate(f"{folder}/at224", SynthSettings(galleries=20, seed=1, image_size=224, min_images=2, max_images=4))
    synthetic = [load_image(p, 224) for p in sorted(Path(folder).glob("at224/images/*.jpg"))]
    size = lambda pixels: len(encode_image(pixels, d.image_format, d.image_quality)) / 1024  # noqa: E731
    return {"photo": size(photo), "synthetic": float(np.mean([size(p) for p in synthetic])),
            "decoded": 224 * 224 * 3 / 1024}


def bench_scale(sizes=(1_500, 15_000), image_size: int = 64, min_images: int = 2, max_images: int = 6,
                code: str | None = None, log=print) -> list[dict]:
    """`code`: the binary code the export fits (default: the default preset's)."""
    from gallery.data.synth import SynthSettings, generate

    base = load_settings("default")
    rows = []
    with tempfile.TemporaryDirectory(prefix="gallery-bench-scale-") as tmp:
        for n in sizes:
            synth = SynthSettings(galleries=n, seed=0, image_size=image_size, min_images=min_images, max_images=max_images)
            settings = replace(base, model=replace(base.model, image_size=image_size),
                               train=replace(base.train, max_epochs=1, precision="fp32"),
                               data=replace(base.data, synth=synth, shards=2),
                               retrieval=replace(base.retrieval, code=code or base.retrieval.code))
            folder = f"{tmp}/{n}"
            start = time.perf_counter()
            generate(f"{folder}/catalogue", synth)
            log(f"{n:,} galleries: synthetic catalogue in {time.perf_counter() - start:.0f} s")
            pre = _run("preprocess", settings, folder)
            log(f"{n:,} galleries: preprocessed {pre['images']:,} images, peak RSS {pre['peak_rss'] / 2**20:,.0f} MiB")
            train = _run("train", settings, folder)
            log(f"{n:,} galleries: trained one epoch at {train['train_images_per_s']:,.0f} images/s and exported "
                f"{train['exported']:,}, peak RSS {train['peak_rss'] / 2**20:,.0f} MiB")
            rows.append({"galleries": n, "preprocess": pre, "train_export": train})
        kb224 = encoded_kb_at_224(settings, tmp)

    log(f"\n{'':<34}" + "".join(f"{r['galleries']:>16,} galleries" for r in rows) + "       ratio")
    small, big = rows[0], rows[-1]
    table = [("peak RSS, train + export (MiB)", lambda r: r["train_export"]["peak_rss"] / 2**20, "{:,.0f}"),
             ("peak RSS, preprocess (MiB)", lambda r: r["preprocess"]["peak_rss"] / 2**20, "{:,.0f}"),
             ("images", lambda r: r["preprocess"]["images"], "{:,.0f}"),
             ("train images/s (1 thread)", lambda r: r["train_export"]["train_images_per_s"], "{:,.0f}"),
             ("encoded image, bytes/image", lambda r: r["preprocess"]["image_bytes"] / r["preprocess"]["images"], "{:,.0f}"),
             ("feature cache, bytes/image", lambda r: r["preprocess"]["feature_bytes"] / r["preprocess"]["images"], "{:,.0f}")]
    for label, value, fmt in table:
        log(f"{label:<34}" + "".join(f"{fmt.format(value(r)):>26}" for r in rows)
            + f"{value(big) / max(value(small), 1e-9):>11.2f}x")
    rss_ratio = big["train_export"]["peak_rss"] / small["train_export"]["peak_rss"]
    log(f"\nheadline: {big['galleries'] // small['galleries']}x the galleries -> {rss_ratio:.2f}x the peak RSS of "
        f"training + export")
    log(f"encoded at 224 px ({settings.data.image_format}, quality {settings.data.image_quality}): a real photo "
        f"{kb224['photo']:.1f} KB, synthetic images {kb224['synthetic']:.1f} KB on average "
        f"(decoded: {kb224['decoded']:.0f} KB)")
    return rows + [{"rss_ratio": rss_ratio, "kb_at_224": kb224}]
