"""Task-optimal models (paper §4.2): the same architecture trained on one task alone, the yardstick
of Figures 5 and 6 (compared with the MTL models in gallery.evaluation.comparisons).
"""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import torch

import gallery.storage as storage
from gallery.config import Settings
from gallery.data.ingest import Catalogue
from gallery.data.tasks import Task
from gallery.evaluation.holdout import baseline
from gallery.model.gallery_model import build_model
from gallery.model.losses import build_weighting
from gallery.training.loop import TrainData
from gallery.training.single_task import fit_single_task_models


def error(kind: str, metric: float) -> float:
    """The paper's error: 1 - accuracy for classification, MSE for regression."""
    return metric if kind == "regression" else 1.0 - metric


def group_tasks(tasks: list[Task], groups: int) -> list[list[str]]:
    """Round-robin task names into at most `groups` branches (one task per branch on a cluster)."""
    groups = max(1, min(groups, len(tasks)))
    return [[t.name for t in tasks[g::groups]] for g in range(groups)]


RESULT = "result.json"


def train_task_optimal(catalogue: Catalogue, tasks: list[Task], source, settings: Settings, checkpoints_of,
                       recovery_of, log=print) -> dict[str, dict]:
    """The §5 architecture trained on each task alone; each task's best valid error.

    All of them train together (gallery.training.single_task): every batch is read once for all,
    and every model gets the MTL model's budget (the same batches, max epochs and patience), each
    with its own early stopping. A task-optimal model is a yardstick, not an output: it leaves a
    small `result.json` in `checkpoints_of(name)` as soon as it stops, which a resumed run reuses
    (`recovery_of(name)`: the origin run's folder holding one, or None).
    """
    outcomes = {}
    for task in tasks:
        recovered = recovery_of(task.name)
        if recovered is not None:
            outcome = json.loads(storage.read_bytes(storage.join(recovered, RESULT)))
            storage.write_bytes(storage.join(checkpoints_of(task.name), RESULT), json.dumps(outcome).encode())
            log(f"task-optimal {task.name}: already evaluated in {recovered}, error {outcome['error']:.4f}")
            outcomes[task.name] = outcome
    todo = [t for t in tasks if t.name not in outcomes]
    if not todo:
        return outcomes
    data = TrainData.from_catalogue(catalogue.frame, todo, source, settings.train.use_cache,
                                    settings.data.loader_workers)
    targets = data.targets  # column k: task todo[k]
    labelled = ~torch.isnan(targets).numpy()
    for k, task in enumerate(todo):
        if not labelled[data.valid_rows, k].any():
            log(f"task-optimal {task.name}: no labelled valid gallery, not evaluated")
            outcomes[task.name] = {"error": np.nan, "epochs": 0, "best_epoch": -1, "baseline_error": np.nan,
                                   "valid_labelled": 0}
    trained = [k for k, t in enumerate(todo) if t.name not in outcomes]
    models, weightings = [], []
    for k in trained:
        torch.manual_seed(settings.train.seed)
        models.append(build_model(settings.model, [todo[k]], catalogue.stats))
        weightings.append(build_weighting("pseudo_uniform", [todo[k]], catalogue.stats))

    valid_ids = [source.gallery_ids[r] for r in data.valid_rows]

    def done(m: int, result) -> None:
        k, task = trained[m], todo[trained[m]]
        scored = ~np.isnan(result.best_scores)
        outcome = {"error": error(task.kind, result.best_metric), "epochs": len(result.valid_losses),
                   "best_epoch": result.best_epoch, "max_epochs": settings.train.max_epochs,
                   "patience": settings.train.patience,
                   "baseline_error": error(task.kind, baseline(task.kind, targets[data.train_rows, k],
                                                               targets[data.valid_rows, k])),
                   "valid_labelled": int(labelled[data.valid_rows, k].sum()),
                   "valid_ids": [g for g, s in zip(valid_ids, scored) if s],   # each labelled valid gallery's
                   "valid_scores": result.best_scores[scored].tolist()}      # score (gallery_scores), for pairing
        storage.write_bytes(storage.join(checkpoints_of(task.name), RESULT), json.dumps(outcome).encode())
        log(f"task-optimal {task.name}: error {outcome['error']:.4f} (best of {outcome['epochs']} epochs)")
        outcomes[task.name] = outcome

    fit_single_task_models(models, weightings, replace(data, targets=targets[:, trained]), settings.train, log=log,
                           on_model_done=done)  # column m of the targets: model m's task
    return {t.name: outcomes[t.name] for t in tasks}
