"""Training and evaluation repeated with several seeds (`evaluation.seeds`), combined.

Seed k changes the model initialisation and the batch order (train.seed + k). Each test
gallery's score is averaged over the seeds — a right/wrong answer becomes the share of seeds that
got it right — so the paired statistics of a multi-seed run compare models with their training
noise averaged out; the report adds the spread of each headline number across the seeds.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import replace

import numpy as np

from gallery.evaluation.arms import arm_label
from gallery.evaluation.holdout import HoldoutResult
from gallery.evaluation.task_optimal import TaskOptimalResult
from gallery.evaluation.transfer import TransferResult
from gallery.model.identity import ModelIdentity
from gallery.training.engine import TrainResult


def seeds_of(settings) -> list[int]:
    if settings.evaluation.seeds < 1:
        raise ValueError(f"settings evaluation.seeds: {settings.evaluation.seeds}; give 1 or more")
    return [settings.train.seed + k for k in range(settings.evaluation.seeds)]


def with_seed(settings, seed: int):
    """The settings with train.seed = seed: what one repetition trains with."""
    return replace(settings, train=replace(settings.train, seed=seed))


def task_optimal_folder(task: str, seed: int, settings) -> str:
    """A task-optimal model's folder name, made from its task and seed (never read back): the task's name for
    the run's first seed, `<task>-seed<k>` for the repetitions."""
    return task if seed == settings.train.seed else f"{task}-seed{seed}"


def _but_seed(a, b) -> bool:
    """Whether two arms or model identities are the same but for their seed: one configuration's repetitions."""
    return a.with_seed(0) == b.with_seed(0)


def mean_holdout(per_seed: list[HoldoutResult]) -> HoldoutResult:
    """One holdout result whose rows hold, per test gallery, the mean score over the seeds. Time and memory
    O(seeds·arms·rows·n)."""
    if len(per_seed) == 1:
        return per_seed[0]
    if any(h.scored_ids != per_seed[0].scored_ids for h in per_seed):
        raise ValueError("seeds evaluated different galleries; their scores cannot be paired")
    arms = []
    for first in per_seed[0].arms:
        runs = [next(a for a in h.arms if _but_seed(a.arm, first.arm)) for h in per_seed]
        rows = []
        for i, row in enumerate(first.rows):
            scores = np.mean([r.rows[i].scores for r in runs], axis=0)
            # an interval of one seed's accuracy no longer applies
            rows.append(replace(row, scores=scores, value=float(np.mean(scores)) if len(scores) else math.nan,
                                ci_low=None, ci_high=None))
        pixels = [r.seconds_per_instance_from_pixels for r in runs if r.seconds_per_instance_from_pixels is not None]
        arms.append(replace(first, rows=rows, train_seconds=float(np.mean([r.train_seconds for r in runs])),
                            seconds_per_instance=float(np.mean([r.seconds_per_instance for r in runs])),
                            seconds_per_instance_from_pixels=float(np.mean(pixels)) if pixels else None,
                            chosen=[c for r in runs for c in r.chosen]))
    return replace(per_seed[0], arms=arms)


def mean_training(per_seed: list[dict[ModelIdentity, TrainResult]]) -> dict[ModelIdentity, TrainResult]:
    """Per trained model (named by its first seed's identity), the first seed's history with each test
    gallery's task scores averaged over the seeds' repetitions of it. Time and memory O(seeds·models·n·tasks)."""
    out = {}
    for model, first in per_seed[0].items():
        tests = [next(r for m, r in seed.items() if _but_seed(m, model)).test for seed in per_seed]
        if any(t.gallery_ids != first.test.gallery_ids for t in tests):
            raise ValueError("seeds evaluated different test galleries; their scores cannot be paired")
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a gallery without a task's label: NaN stays NaN
            scores = np.nanmean([t.scores for t in tests], 0)
        out[model] = replace(first, test=replace(first.test, scores=scores))
    return out


def mean_optimal(per_seed: list[dict[str, TaskOptimalResult]]) -> dict[str, TaskOptimalResult]:
    """Per task, the task-optimal models' per-gallery test scores averaged over seeds, and their mean error.
    Time and memory O(seeds·tasks·n)."""
    out = {}
    for name, first in per_seed[0].items():
        runs = [seed[name] for seed in per_seed]
        if any(r.test_ids != first.test_ids for r in runs):
            raise ValueError(f"seeds evaluated task {name} on different test galleries")
        scores = np.mean([r.test_scores for r in runs], axis=0).tolist() if first.test_scores else []
        out[name] = replace(first, test_scores=scores, error=float(np.mean([r.error for r in runs])),
                            epochs=float(np.mean([r.epochs for r in runs])))
    return out


def mean_transfer(per_seed: list[TransferResult]) -> TransferResult:
    """The transfer suite with each scored gallery's score averaged over the seeds, per task, probe and arm.
    Time O(entries·seeds·(entries + n)) (each entry's seed twins found by a scan), memory O(seeds·entries·n)."""
    first = per_seed[0]
    if len(per_seed) == 1:
        return first
    scores = []
    for entry in first.scores:
        runs = [next((s for s in seed.scores if (s.task, s.probe) == (entry.task, entry.probe)
                      and _but_seed(s.arm, entry.arm)), None) for seed in per_seed]
        if any(r is None or r.gallery_ids != entry.gallery_ids for r in runs):
            raise ValueError(f"seeds scored {entry.task}/{entry.probe}/{arm_label(entry.arm)} on different galleries")
        scores.append(replace(entry, scores=np.mean([r.scores for r in runs], axis=0),
                              chosen=[c for r in runs for c in r.chosen]))
    holdouts = [mean_holdout([seed.holdouts[i] for seed in per_seed]) for i in range(len(first.holdouts))]
    seconds = {k: float(np.mean([seed.seconds.get(k, 0.0) for seed in per_seed])) for k in first.seconds}
    return replace(first, scores=scores, holdouts=holdouts, seconds=seconds)
