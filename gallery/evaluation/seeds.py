"""Training and evaluation repeated with several seeds (`evaluation.seeds`), combined.

Seed k changes the model initialisation and the batch order (train.seed + k). Each valid
gallery's score is averaged over the seeds — a right/wrong answer becomes the share of seeds that
got it right — so the paired statistics of a multi-seed run compare models with their training
noise averaged out; the report adds the spread of each headline number across the seeds.
"""
from __future__ import annotations

import copy
import math
from dataclasses import replace

import numpy as np


def seeds_of(settings) -> list[int]:
    if settings.evaluation.seeds < 1:
        raise ValueError(f"settings evaluation.seeds: {settings.evaluation.seeds}; give 1 or more")
    return [settings.train.seed + k for k in range(settings.evaluation.seeds)]


def with_seed(settings, seed: int):
    """The settings with train.seed = seed: what one repetition trains with."""
    return replace(settings, train=replace(settings.train, seed=seed))


def seeded(name: str, seed: int, settings) -> str:
    """A model's folder name: `name` for the preset's own seed (what the embed flow and `gallery search`
    load), `name-seed<k>` for the repetitions."""
    return name if seed == settings.train.seed else f"{name}-seed{seed}"


def mean_holdout(per_seed: list[dict]) -> dict:
    """One holdout result whose rows hold, per valid gallery, the mean score over the seeds."""
    if len(per_seed) == 1:
        return per_seed[0]
    out = copy.deepcopy(per_seed[0])
    for other in per_seed[1:]:
        if other["valid_ids"] != out["valid_ids"]:
            raise ValueError("seeds evaluated different valid galleries; their scores cannot be paired")
    for arm, result in out["arms"].items():
        for i, row in enumerate(result["rows"]):
            rows = [seed["arms"][arm]["rows"][i] for seed in per_seed]
            row["scores"] = np.mean([r["scores"] for r in rows], axis=0).tolist()
            row["value"] = float(np.mean(row["scores"])) if row["scores"] else math.nan
            row["ci_low"] = row["ci_high"] = None  # an interval of one seed's accuracy no longer applies
        for key in ("train_seconds", "seconds_per_instance", "seconds_per_instance_from_pixels"):
            values = [seed["arms"][arm][key] for seed in per_seed if seed["arms"][arm][key] is not None]
            result[key] = float(np.mean(values)) if values else None
    return out


def mean_training(per_seed: list[dict]) -> dict:
    """Per weighting, the first seed's history with each valid gallery's task scores averaged over seeds."""
    out = copy.deepcopy(per_seed[0])
    for weighting, result in out.items():
        ids = result["valid"]["gallery_ids"]
        if any(seed[weighting]["valid"]["gallery_ids"] != ids for seed in per_seed):
            raise ValueError("seeds evaluated different valid galleries; their scores cannot be paired")
        with np.errstate(invalid="ignore"):
            result["valid"]["scores"] = np.nanmean([np.asarray(s[weighting]["valid"]["scores"]) for s in per_seed], 0)
    return out


def mean_optimal(per_seed: list[dict]) -> dict:
    """Per task, the task-optimal models' per-gallery scores averaged over seeds, and their mean error."""
    out = copy.deepcopy(per_seed[0])
    for name, outcome in out.items():
        runs = [seed[name] for seed in per_seed]
        if any(r.get("valid_ids", []) != outcome.get("valid_ids", []) for r in runs):
            raise ValueError(f"seeds evaluated task {name} on different valid galleries")
        if outcome.get("valid_scores"):
            outcome["valid_scores"] = np.mean([r["valid_scores"] for r in runs], axis=0).tolist()
        outcome["error"] = float(np.mean([r["error"] for r in runs]))
        outcome["epochs"] = float(np.mean([r["epochs"] for r in runs]))
    return out
