"""`gallery bench train`: what the frozen-trunk cache and packed batches buy, measured side by side.

One process, one model, the same batches for every variant; ratios are printed next to the raw
figures. Memory on CPU is the bytes autograd saves for the backward pass (activations: what
padding inflates); on CUDA it is the peak allocated memory.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from gallery.config import ModelSettings
from gallery.data.labels import LabelStats
from gallery.data.packed import PackedGalleries
from gallery.data.tasks import Task
from gallery.model.backbones import WeightsUnavailable
from gallery.model.gallery_model import build_model
from gallery.model.losses import PseudoUniform, task_losses
from gallery.training.device import autocast, pick_device

BENCH_TASKS = [Task("B_bin", "b", "binary"), Task("C_cat", "c", "multiclass", classes=tuple("abcdefgh")),
               Task("R_reg", "r", "regression")]
BENCH_STATS = {"R_reg": LabelStats("regression", {"train": 1}, mean=0.0, variance=1.0)}


@dataclass(frozen=True)
class Case:
    backbone: str
    image_size: int
    batch_galleries: int
    min_images: int
    max_images: int  # galleries are padded to this in the padded variant (the paper pads to 44)
    hidden: int


CPU_CASES = [Case("efficientnet_lite0", 96, 16, 4, 12, 128), Case("vgg16", 224, 2, 5, 20, 315)]
GPU_CASES = [Case("efficientnet_lite0", 96, 64, 4, 12, 128), Case("vgg16", 224, 4, 5, 44, 315)]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@contextmanager
def _saved_activation_bytes(counter: list):
    """Count bytes of tensors autograd keeps for backward (the activation memory of a step)."""
    def pack(t):
        counter[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


def _model(case: Case, log):
    settings = ModelSettings(case.backbone, "imagenet", 1, case.image_size, "mean", case.hidden)
    try:
        model = build_model(settings, BENCH_TASKS, BENCH_STATS)
        weights = "imagenet"
    except WeightsUnavailable:
        model = build_model(ModelSettings(**{**settings.__dict__, "weights": "random"}), BENCH_TASKS, BENCH_STATS)
        weights = "random init (ImageNet weights not on this machine; speed does not depend on them)"
    log(f"\n== {case.backbone} at {case.image_size}px, {case.batch_galleries} galleries/batch of "
        f"{case.min_images}-{case.max_images} images, weights: {weights}")
    return model


def _batches(case: Case, n_batches: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = []
    for b in range(n_batches):
        lengths = rng.integers(case.min_images, case.max_images + 1, case.batch_galleries)
        arrays = [rng.integers(0, 256, (n, case.image_size, case.image_size, 3), dtype=np.uint8) for n in lengths]
        targets = {"B_bin": torch.tensor(rng.integers(0, 2, case.batch_galleries), dtype=torch.float32),
                   "C_cat": torch.tensor(rng.integers(0, 8, case.batch_galleries)),
                   "R_reg": torch.tensor(rng.normal(size=case.batch_galleries), dtype=torch.float32)}
        out.append((PackedGalleries.from_arrays([f"g{i}" for i in range(len(arrays))], arrays), targets))
    return out


def _padded_vectors(model, features: torch.Tensor, lengths: torch.Tensor, max_images: int):
    """The padded alternative: every gallery filled up to max_images with blank rows, masked mean."""
    b = len(lengths)
    padded = features.new_zeros((b * max_images,) + tuple(features.shape[1:]))
    mask = torch.arange(max_images)[None, :] < lengths[:, None]
    padded[mask.flatten().to(features.device)] = features
    vectors = model.encoder.images.top_vectors(padded).view(b, max_images, -1)
    mask = mask.to(vectors.device, vectors.dtype)[..., None]
    return (vectors * mask).sum(1) / mask.sum(1)


def _step(model, weighting, optimizer, batch, device, variant: str, case: Case, counter: list):
    store, targets = batch
    x, index = store.gather(np.arange(len(store)))
    x, index = x.to(device), index.to(device)
    with _saved_activation_bytes(counter), autocast(device, "auto" if device.type == "cuda" else "fp32"):
        if variant == "recompute":
            _, outputs = model(x, index, len(store), from_features=False)
        else:
            feats = x.float() if x.dtype == torch.float16 and device.type == "cpu" else x
            if variant == "padded":
                z = _padded_vectors(model, feats, store.lengths, case.max_images)
                outputs = {name: head(z) for name, head in model.heads.items()}
            else:
                _, outputs = model(feats, index, len(store), from_features=True)
        loss = weighting(task_losses(outputs, {k: v.to(device) for k, v in targets.items()}, model.tasks))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def _measure(model, batches, device, variant, case, steps):
    weighting = PseudoUniform(model.tasks, BENCH_STATS)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    _step(model, weighting, optimizer, batches[0], device, variant, case, [0])  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    counter, images = [0], 0
    _sync(device)
    start = time.perf_counter()
    for batch in batches[1:steps + 1]:
        _step(model, weighting, optimizer, batch, device, variant, case, counter)
        images += len(batch[0].data)
    _sync(device)
    seconds = time.perf_counter() - start
    memory = torch.cuda.max_memory_allocated() if device.type == "cuda" else counter[0] / steps
    return {"seconds_per_step": seconds / steps, "images_per_s": images / seconds,
            "galleries_per_s": steps * case.batch_galleries / seconds, "memory_bytes": memory}


def bench_case(case: Case, steps: int, device, log=print) -> dict:
    torch.manual_seed(0)
    model = _model(case, log).to(device)
    pixel_batches = _batches(case, steps + 1)
    start = time.perf_counter()
    feature_batches = [(store.map_data(lambda d: model.encoder.images.trunk_features(d.to(device)).half()), t)
                       for store, t in pixel_batches]
    _sync(device)
    cache_build = (time.perf_counter() - start) / sum(len(s.data) for s, _ in pixel_batches)
    r = {v: _measure(model, batches, device, v, case, steps) for v, batches in
         (("recompute", pixel_batches), ("cache", feature_batches), ("padded", feature_batches))}
    mem_label = "peak CUDA memory" if device.type == "cuda" else "saved activations/step"
    for name, label in (("recompute", "recompute trunk, packed"), ("cache", "feature cache, packed"),
                        ("padded", f"feature cache, padded to {case.max_images}")):
        m = r[name]
        log(f"  {label:<32} {m['seconds_per_step'] * 1000:9.1f} ms/step {m['images_per_s']:9.1f} images/s "
            f"{m['galleries_per_s']:8.2f} galleries/s   {mem_label} {m['memory_bytes'] / 2**20:9.1f} MiB")
    cache_speedup = r["recompute"]["seconds_per_step"] / r["cache"]["seconds_per_step"]
    padded_time = r["padded"]["seconds_per_step"] / r["cache"]["seconds_per_step"]
    padded_memory = r["padded"]["memory_bytes"] / max(r["cache"]["memory_bytes"], 1)
    log(f"  ratio: a training epoch from the cache is {cache_speedup:.2f}x cheaper than recomputing the trunk "
        f"(one-off cache build: {cache_build * 1000:.1f} ms/image)")
    log(f"  ratio: padded vs packed batches: {padded_time:.2f}x the time, {padded_memory:.2f}x the memory")
    return {"case": case.__dict__, "variants": r, "cache_speedup": cache_speedup,
            "padded_time_ratio": padded_time, "padded_memory_ratio": padded_memory,
            "cache_build_s_per_image": cache_build}


def bench_train(steps: int = 3, device=None, log=print) -> list[dict]:
    device = pick_device(device)
    log(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'} "
        f"({torch.get_num_threads()} threads); {steps} timed steps per variant after one warm-up step")
    results = [bench_case(case, steps, device, log) for case in (GPU_CASES if device.type == "cuda" else CPU_CASES)]
    if device.type != "cuda":
        log("\nno CUDA device: paper-preset galleries/s and images/s with autocast are measured on a GPU only")
    return results
