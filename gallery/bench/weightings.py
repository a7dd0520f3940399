"""`gallery bench weightings`: the training step's time under each loss weighting, relative to
pseudo-uniform's, on the default preset's model (EfficientNet-Lite0 at 64 px, its trainable top, the
paper's 31 task heads) and batches (its galleries per step, of 4-10 images, from the frozen trunk's
feature cache, as the default run trains).

One process, the same batches for every weighting, each with its own copy of the model and optimiser;
the weightings take turns step by step (so a busy machine slows them alike), and each one's step time
is its median over all its timed steps. A step is the engine's `train_step`, hooks included (FAMO's extra
forward, IMTL-G's task gradients), so the ratio is the ratio of training time per epoch.
"""
from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass, replace

import torch

from gallery.bench.train import Case, _batches, _packed, _sync, paper_tasks, preset_case
from gallery.config import load_settings
from gallery.model.backbones import WeightsUnavailable
from gallery.model.gallery_model import build_model
from gallery.model.weightings import WEIGHTINGS, build_weighting
from gallery.training.device import fast_layout, pick_device
from gallery.training.engine import FitConfig, Objective, make_optimizer, train_step


@dataclass(frozen=True)
class WeightingTime:
    weighting: str
    seconds_per_step: float   # median over the timed steps
    relative: float           # to pseudo-uniform's


def bench_weightings(names=None, steps: int = 8, rounds: int = 5, device=None, log=print, case: Case | None = None,
                     tasks=None, stats=None, precision: str = "auto") -> list[WeightingTime]:
    """Each weighting's step time against pseudo-uniform's, at `precision` (auto: bf16 where native)."""
    device = pick_device(device)
    names = list(names or WEIGHTINGS)
    if "pseudo_uniform" not in names:
        names.insert(0, "pseudo_uniform")
    case = case or preset_case("default")
    model_settings = replace(load_settings("default").model, backbone=case.backbone, image_size=case.image_size,
                             hidden=case.hidden, trainable_blocks=case.trainable_blocks)
    tasks, stats = (tasks, stats) if tasks is not None else paper_tasks()
    torch.manual_seed(0)
    try:
        base = build_model(model_settings, tasks, stats)
    except WeightsUnavailable:  # speed does not depend on the weights' values
        base = build_model(replace(model_settings, weights="random"), tasks, stats)
    base = fast_layout(base.to(device), device)
    with torch.no_grad():
        features = [(store.map_data(lambda d: base.encoder.images.trunk_features(d.to(device)).half().cpu()), t)
                    for store, t in _batches(case, steps, tasks)]
    batches = [packed for packed, _ in _packed(features, device)]
    log(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'} "
        f"({torch.get_num_threads()} threads), precision {precision}; {case.backbone} at {case.image_size} px, trainable "
        f"blocks {model_settings.trainable_blocks}, {len(tasks)} task heads, {case.batch_galleries} galleries/batch of "
        f"{case.min_images}-{case.max_images} images from the feature cache; {steps} steps x {rounds} rounds")
    runs = {}
    for name in names:
        model = copy.deepcopy(base).train()
        objective = Objective(model, build_weighting(name, tasks, stats).to(device), True, precision)
        optimizer = make_optimizer([p for p in objective.parameters() if p.requires_grad], FitConfig(lr=1e-4), device)
        runs[name] = (objective, optimizer)
    times = {name: [] for name in names}
    for round_ in range(rounds + 1):  # round 0 warms up every batch shape
        for batch in batches:
            for name, (objective, optimizer) in runs.items():
                _sync(device)
                start = time.perf_counter()
                train_step(objective, objective.weighting, optimizer, batch, device)
                _sync(device)
                if round_:
                    times[name].append(time.perf_counter() - start)
    reference = statistics.median(times["pseudo_uniform"])
    out = [WeightingTime(name, statistics.median(t), statistics.median(t) / reference) for name, t in times.items()]
    log("  weighting        ms/step   time / pseudo-uniform's")
    for r in out:
        log(f"  {r.weighting:<15} {r.seconds_per_step * 1000:8.1f}   {r.relative:5.2f}x")
    return out
