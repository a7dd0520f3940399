"""`gallery bench train`: our training step against the machine's own matrix throughput (the roofline,
gallery.bench.roofline) and against a plain PyTorch step of the same layers, and what the feature cache
and packed batches buy, measured side by side on one device, per preset and precision.

One process, the same packed batches for every variant, warmed up over exactly the batch shapes
it then times (every new image count is a new shape). Variants:
- reference: a plain PyTorch step, written the obvious way: frozen trunk under no_grad, trainable
  top, mean pool over each gallery, ONE head, Adam;
- engine, from pixels: this project's step (GalleryModel with the paper's 31 Table 1 heads, masked
  losses, pseudo-uniform weighting, `train_step`) on the same pixels;
- engine, from the cache: the same from the frozen trunk's cached output;
- engine, padded: the cache variant with galleries padded to a fixed image count (what packing saves).
Both steps use the same layout (channels_last) and precision: fp32, and bf16 where the device runs it
natively (CUDA; CPUs with AVX512-BF16 or AMX). Memory on CPU is the bytes autograd saves for backward
(what padding inflates); on CUDA the peak.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gallery.config import ModelSettings, load_settings
from gallery.data.contracts import CONTRACTS_DIR, load_task_spec
from gallery.data.labels import LabelStats
from gallery.data.packed import PackedGalleries
from gallery.data.readers import Batch
from gallery.model.backbones import WeightsUnavailable
from gallery.model.gallery_model import build_model
from gallery.model.weightings import PseudoUniform
from gallery.bench.roofline import Roofline, counted_flops, dominant_gemm, gemm_flops_per_second
from gallery.training.device import autocast, cpu_has_native_bf16, fast_layout, pick_device
from gallery.training.engine import FitConfig, Objective, make_optimizer, train_step


def paper_tasks():
    """The paper's 31 Table 1 tasks with their cardinalities (1,981 cities...), and neutral statistics."""
    tasks = load_task_spec(CONTRACTS_DIR / "examples" / "paper_tasks.yaml").tasks
    return tasks, {t.name: LabelStats("regression", {"train": 1}, mean=0.0, variance=1.0)
                   for t in tasks if t.kind == "regression"}


@dataclass(frozen=True)
class Case:
    backbone: str
    image_size: int
    batch_galleries: int
    min_images: int
    max_images: int  # galleries are padded to this in the padded variant (the paper pads to 44)
    hidden: int
    trainable_blocks: int = 1
    use_cache: bool = True   # how the preset trains: from the feature cache, or from pixels
    preset: str = ""


def preset_case(name: str) -> Case:
    """A preset's step as it trains: its model, batch and the gallery sizes of its catalogue."""
    settings = load_settings(name)
    m, d = settings.model, settings.data.synth
    return Case(m.backbone, m.image_size, settings.train.batch_galleries, d.min_images, d.max_images, m.hidden,
                m.trainable_blocks, settings.train.use_cache, name)


def cpu_cases() -> list[Case]:
    """The default preset as it trains (lite0's head convolution from the cache) and the paper's (VGG16
    block 5 from pixels, 4 galleries a batch; 112 px on a CPU to keep it short)."""
    return [preset_case("default"), Case("vgg16", 112, 4, 5, 20, 315, 1, False, "paper")]


def gpu_cases() -> list[Case]:
    """The default preset as it trains, and the paper's step at 224 px with its 5-44 photos a gallery: at the
    paper's 4 galleries a batch, and at 10."""
    return [preset_case("default"), Case("vgg16", 224, 10, 5, 44, 315, 1, False, "paper, 10 galleries a batch"),
            Case("vgg16", 224, 4, 5, 44, 315, 1, False, "paper")]


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


def _model(case: Case, log, tasks=None, stats=None):
    tasks, stats = (tasks, stats) if tasks is not None else paper_tasks()
    settings = ModelSettings(case.backbone, "imagenet", case.trainable_blocks, case.image_size, "mean", case.hidden)
    try:
        model = build_model(settings, tasks, stats)
        weights = "imagenet"
    except WeightsUnavailable:
        model = build_model(replace(settings, weights="random"), tasks, stats)
        weights = "random init (ImageNet weights not on this machine; speed does not depend on them)"
    log(f"\n== {case.preset}: {case.backbone} at {case.image_size} px, {case.trainable_blocks} block(s) trained, "
        f"{case.batch_galleries} galleries/batch of "
        f"{case.min_images}-{case.max_images} images, {len(tasks)} task heads, weights: {weights}")
    return model


def _batches(case: Case, n_batches: int, tasks, seed: int = 0) -> list[tuple[PackedGalleries, torch.Tensor]]:
    """Random images in galleries of random sizes, and labels for every task (a tenth missing)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_batches):
        lengths = rng.integers(case.min_images, case.max_images + 1, case.batch_galleries)
        arrays = [rng.integers(0, 256, (n, case.image_size, case.image_size, 3), dtype=np.uint8) for n in lengths]
        targets = np.stack([rng.integers(0, t.out_dim if t.kind == "multiclass" else 2, case.batch_galleries)
                            for t in tasks], 1).astype(np.float32)
        targets[rng.random(targets.shape) < 0.1] = np.nan
        out.append((PackedGalleries.from_arrays([f"g{i}" for i in range(len(arrays))], arrays), torch.from_numpy(targets)))
    return out


class Reference(nn.Module):
    """The plain PyTorch step's model: the same trunk and top, mean pool per gallery, one head."""

    def __init__(self, trunk: nn.Module, top: nn.Module, mean, std, dim: int, hidden: int, classes: int):
        super().__init__()
        self.trunk, self.top = trunk, top
        self.register_buffer("mean", mean.clone())
        self.register_buffer("std", std.clone())
        self.head = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, images, index, n):
        with torch.no_grad():
            features = self.trunk((images.permute(0, 3, 1, 2).float() - self.mean) / self.std)
        vectors = self.top(features).mean(dim=(2, 3))
        z = vectors.new_zeros(n, vectors.shape[1]).index_add(0, index, vectors)
        counts = vectors.new_zeros(n).index_add(0, index, torch.ones_like(index, dtype=vectors.dtype))
        return self.head(z / counts[:, None])


def _reference(model, case: Case, device) -> tuple[nn.Module, torch.optim.Optimizer]:
    images = model.encoder.images
    reference = Reference(images.trunk, images.top, images.mean, images.std, images.dim, case.hidden, 10).to(device)
    reference.trunk.eval()
    reference = fast_layout(reference, device)
    return reference, make_optimizer([p for p in reference.parameters() if p.requires_grad], FitConfig(lr=1e-4), device)


def _padded_vectors(model, features: torch.Tensor, lengths: torch.Tensor, max_images: int):
    """The padded alternative: every gallery filled up to max_images with blank rows, masked mean."""
    b = len(lengths)
    padded = features.new_zeros((b * max_images,) + tuple(features.shape[1:]))
    mask = torch.arange(max_images)[None, :] < lengths[:, None]
    padded[mask.flatten().to(features.device)] = features
    vectors = model.encoder.images.top_vectors(padded).view(b, max_images, -1)
    mask = mask.to(vectors.device, vectors.dtype)[..., None]
    return (vectors * mask).sum(1) / mask.sum(1)


def _packed(batches, device) -> list[tuple[Batch, torch.Tensor]]:
    """Batches as the training loop receives them from its DataLoader: gathered, in pinned memory on
    CUDA (so both steps copy them asynchronously), with each gallery's image count."""
    out = []
    for store, targets in batches:
        x, index = store.gather(np.arange(len(store)))
        batch = Batch(x, index, len(store), targets, np.arange(len(store)))
        out.append((batch.pin_memory() if device.type == "cuda" else batch, store.lengths))
    return out


def _step(variant: str, state: dict, batch, device, case: Case, counter: list, precision: str) -> None:
    packed, lengths = batch
    with _saved_activation_bytes(counter):
        if variant == "reference":
            x, index = packed.x.to(device, non_blocking=True), packed.index.to(device, non_blocking=True)
            labels = (torch.nan_to_num(packed.targets[:, 0]).long() % 10).to(device, non_blocking=True)
            with autocast(device, precision):
                loss = F.cross_entropy(state["reference"](x, index, packed.n).float(), labels)
            state["ref_optimizer"].zero_grad(set_to_none=True)
            loss.backward()
            state["ref_optimizer"].step()
        elif variant == "padded":
            model, objective = state["model"], state["cache"]
            with autocast(device, precision):
                z = _padded_vectors(model, packed.x.to(device, non_blocking=True), lengths, case.max_images)
                sums = model.losses(model.heads(z), packed.targets.to(device, non_blocking=True))
            loss = objective.weighting.loss(sums.means(), sums.count > 0)
            state["optimizer"].zero_grad(set_to_none=True)
            loss.backward()
            state["optimizer"].step()
        else:
            train_step(state[variant], state[variant].weighting, state["optimizer"], packed, device)


def _measure(variant: str, state: dict, batches, device, case: Case, precision: str) -> dict:
    state["model"].train()
    for batch in batches:  # warm-up over exactly the shapes timed below
        _step(variant, state, batch, device, case, [0], precision)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    counter, images = [0], 0
    _sync(device)
    start = time.perf_counter()
    for batch in batches:
        _step(variant, state, batch, device, case, counter, precision)
        images += len(batch[0].x)
    _sync(device)
    seconds = time.perf_counter() - start
    memory = torch.cuda.max_memory_allocated() if device.type == "cuda" else counter[0] / len(batches)
    return {"seconds_per_step": seconds / len(batches), "images_per_s": images / seconds,
            "galleries_per_s": len(batches) * case.batch_galleries / seconds, "memory_bytes": memory}


LABELS = {"reference": "reference (plain PyTorch, 1 head)", "recompute": "engine, from pixels",
          "cache": "engine, from the feature cache"}


def roofline(variant: str, state: dict, batches, device, case: Case, precision: str, seconds_per_step: float) -> Roofline:
    """The preset's step (`variant`) against a matrix multiply of its dominant shape, same dtype."""
    flops = sum(counted_flops(lambda b=b: _step(variant, state, b, device, case, [0], precision)) for b in batches)
    packed, _ = batches[0]
    model = state["model"]

    def forward():
        with autocast(device, precision):
            model(packed.x.to(device), packed.index.to(device), packed.n, variant == "cache")

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    gemm = dominant_gemm(model, forward)
    return Roofline(flops // len(batches), seconds_per_step, gemm, gemm_flops_per_second(gemm, device, dtype))


def bench_case(case: Case, steps: int, device, precision: str = "fp32", log=print, tasks=None, stats=None) -> dict:
    torch.manual_seed(0)
    tasks, stats = (tasks, stats) if tasks is not None else paper_tasks()
    model = fast_layout(_model(case, log, tasks, stats).to(device), device)
    weighting = PseudoUniform(tasks, stats).to(device)
    state = {"model": model, "recompute": Objective(model, weighting, False, precision),
             "cache": Objective(model, weighting, True, precision),
             "optimizer": make_optimizer([p for p in model.parameters() if p.requires_grad], FitConfig(lr=1e-4), device)}
    state["reference"], state["ref_optimizer"] = _reference(model, case, device)
    pixels = _batches(case, steps, tasks)
    start = time.perf_counter()
    with torch.no_grad():
        features = [(store.map_data(lambda d: model.encoder.images.trunk_features(d.to(device)).half().cpu()), t)
                    for store, t in pixels]
    _sync(device)
    cache_build = (time.perf_counter() - start) / sum(len(s.data) for s, _ in pixels)
    pixel_batches, feature_batches = _packed(pixels, device), _packed(features, device)
    batches = {"reference": pixel_batches, "recompute": pixel_batches, "cache": feature_batches,
               "padded": feature_batches}
    r = {v: _measure(v, state, b, device, case, precision) for v, b in batches.items()}
    log(f"  precision {precision}")
    mem_label = "peak CUDA memory" if device.type == "cuda" else "saved activations/step"
    for name, label in (*LABELS.items(), ("padded", f"engine, cache, padded to {case.max_images}")):
        m = r[name]
        log(f"  {label:<36} {m['seconds_per_step'] * 1000:9.1f} ms/step {m['images_per_s']:10,.1f} images/s "
            f"{m['galleries_per_s']:8.2f} galleries/s   {mem_label} {m['memory_bytes'] / 2**20:9.1f} MiB")
    preset_step = "cache" if case.use_cache else "recompute"
    limit = roofline(preset_step, state, batches[preset_step], device, case, precision,
                     r[preset_step]["seconds_per_step"])
    engine_ratio = r["recompute"]["images_per_s"] / r["reference"]["images_per_s"]
    cache_speedup = r["recompute"]["seconds_per_step"] / r["cache"]["seconds_per_step"]
    padded_time = r["padded"]["seconds_per_step"] / r["cache"]["seconds_per_step"]
    padded_memory = r["padded"]["memory_bytes"] / max(r["cache"]["memory_bytes"], 1)
    log(f"  roofline: the preset's step ({LABELS[preset_step]}): {limit.line()}")
    log(f"  ratio: engine / reference from pixels: {engine_ratio:.2f}x the images/s "
        f"({len(tasks)} heads and masked losses against one head)")
    log(f"  ratio: a training epoch from the cache is {cache_speedup:.2f}x cheaper than recomputing the trunk "
        f"(one-off cache build: {cache_build * 1000:.1f} ms/image)")
    log(f"  ratio: padded vs packed batches: {padded_time:.2f}x the time, {padded_memory:.2f}x the memory")
    return {"case": case.__dict__, "precision": precision, "variants": r, "roofline": limit,
            "engine_vs_reference": engine_ratio, "cache_speedup": cache_speedup, "padded_time_ratio": padded_time,
            "padded_memory_ratio": padded_memory, "cache_build_s_per_image": cache_build}


def precisions(device) -> list[str]:
    """fp32 everywhere; bf16 too where the device runs it natively."""
    return ["fp32", "bf16"] if device.type == "cuda" or cpu_has_native_bf16() else ["fp32"]


def bench_train(steps: int = 4, device=None, log=print) -> list[dict]:
    device = pick_device(device)
    log(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'} "
        f"({torch.get_num_threads()} threads); precisions {', '.join(precisions(device))}; {steps} timed steps "
        "per variant, after a warm-up pass over the same batches")
    results = [bench_case(case, steps, device, precision, log) for case in (gpu_cases() if device.type == "cuda" else cpu_cases())
               for precision in precisions(device)]
    log("\n| preset | precision | step / matrix-multiply roofline | engine / plain reference (images/s) |")
    log("| --- | --- | --- | --- |")
    for r in results:
        log(f"| {r['case']['preset']} ({r['case']['backbone']}, {r['case']['image_size']} px) | {r['precision']} | "
            f"{r['roofline'].fraction:.0%} | {r['engine_vs_reference']:.2f}x |")
    return results
