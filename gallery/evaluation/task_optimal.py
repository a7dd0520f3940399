"""Per-task comparison with task-optimal models (paper §4.2, Figures 5 and 6).

A task-optimal model is the same architecture trained on one task alone. Per task and MTL
weighting: error (1 - accuracy, or MSE for regression), the relative error increase
(err_MTL - err_opt) / err_opt (negative: MTL does better), and the majority/mean baseline.
For binary tasks, the class balance (minority fraction) against that relative error increase,
with Pearson's r and p.
"""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import torch
from scipy import stats as scistats

import gallery.storage as storage
from gallery.config import Settings
from gallery.data.ingest import Catalogue
from gallery.data.packed import PackedGalleries
from gallery.data.tasks import Task
from gallery.evaluation.holdout import baseline, labelled_rows
from gallery.model.gallery_model import build_model
from gallery.model.losses import build_weighting
from gallery.training.loop import TrainData, fit


def error(kind: str, metric: float) -> float:
    """The paper's error: 1 - accuracy for classification, MSE for regression."""
    return metric if kind == "regression" else 1.0 - metric


def group_tasks(tasks: list[Task], groups: int) -> list[list[str]]:
    """Round-robin task names into at most `groups` branches (one task per branch on a cluster)."""
    groups = max(1, min(groups, len(tasks)))
    return [[t.name for t in tasks[g::groups]] for g in range(groups)]


RESULT = "result.json"
RESUME_MARKERS = (RESULT, "last.pt")  # a finished task's result, or an interrupted fit's checkpoint


def train_task_optimal(catalogue: Catalogue, task: Task, store: PackedGalleries, settings: Settings,
                       checkpoints: str, resume_from: str | None = None, log=print) -> dict:
    """The §5 architecture trained on `task` alone (from the feature cache); its best valid error.

    A task-optimal model is a yardstick, not an output: once it is evaluated its checkpoints
    (tens of MB per task) give way to a small `result.json`, which a resumed run reuses.
    """
    if resume_from is not None and storage.exists(storage.join(resume_from, RESULT)):
        outcome = json.loads(storage.read_bytes(storage.join(resume_from, RESULT)))
        storage.write_bytes(storage.join(checkpoints, RESULT), json.dumps(outcome).encode())
        log(f"task-optimal {task.name}: already evaluated in {resume_from}, error {outcome['error']:.4f}")
        return outcome
    data = labelled_rows(TrainData.from_catalogue(catalogue.frame, [task], store, settings.train.use_cache), task)
    if len(data.valid_rows) == 0:
        log(f"task-optimal {task.name}: no labelled valid gallery, not evaluated")
        return {"error": np.nan, "epochs": 0, "best_epoch": -1, "baseline_error": np.nan, "valid_labelled": 0}
    torch.manual_seed(settings.train.seed)
    model = build_model(settings.model, [task], catalogue.stats)
    train = replace(settings.train, max_epochs=settings.evaluation.task_optimal_epochs,
                    patience=settings.evaluation.task_optimal_patience)
    result = fit(model, build_weighting("pseudo_uniform", [task], catalogue.stats), data, train, checkpoints,
                 resume_from, log=lambda line: None)
    best = result.history[result.best_epoch]
    outcome = {"error": error(task.kind, best.valid_metrics[task.name]), "epochs": len(result.history),
               "best_epoch": result.best_epoch, "baseline_error": error(task.kind, baseline(task, data)),
               "valid_labelled": len(data.valid_rows)}
    log(f"task-optimal {task.name}: error {outcome['error']:.4f} (best of {outcome['epochs']} epochs)")
    storage.write_bytes(storage.join(checkpoints, RESULT), json.dumps(outcome).encode())
    for name in ("last.pt", "best.pt"):
        storage.delete(storage.join(checkpoints, name))
    return outcome


def per_task_table(catalogue: Catalogue, training: dict, optimal: dict) -> pd.DataFrame:
    """One row per MTL task: errors of each weighting, the task-optimal model and the baseline."""
    rows = []
    for task in catalogue.tasks:
        opt = optimal[task.name]
        row = {"task": task.name, "kind": task.kind, "minority_fraction": catalogue.stats[task.name].minority_fraction,
               "valid_labelled": opt["valid_labelled"], "error_task_optimal": opt["error"],
               "error_baseline": opt["baseline_error"]}
        for weighting, result in training.items():
            best = result["history"][result["best_epoch"]]
            err = error(task.kind, best["valid_metrics"][task.name])
            row[f"error_{weighting}"] = err
            row[f"relative_error_increase_{weighting}"] = (err - opt["error"]) / opt["error"] if opt["error"] > 0 else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def class_balance(table: pd.DataFrame, weightings) -> dict:
    """Pearson r, p and the least-squares line of minority fraction vs relative error increase (binary tasks)."""
    out = {}
    binary = table[table["kind"] == "binary"]
    for weighting in weightings:
        pairs = binary[["minority_fraction", f"relative_error_increase_{weighting}"]].dropna()
        if len(pairs) < 3 or pairs.iloc[:, 0].nunique() < 2 or pairs.iloc[:, 1].nunique() < 2:
            out[weighting] = {"n": len(pairs), "r": np.nan, "p": np.nan, "slope": np.nan, "intercept": np.nan}
            continue
        fit = scistats.linregress(pairs.iloc[:, 0], pairs.iloc[:, 1])
        out[weighting] = {"n": len(pairs), "r": float(fit.rvalue), "p": float(fit.pvalue),
                          "slope": float(fit.slope), "intercept": float(fit.intercept)}
    return out


def pseudo_uniform_wins(table: pd.DataFrame) -> dict:
    """Tasks where pseudo-uniform has a lower error than Kendall (the paper: 22 of 31)."""
    wins = int((table["error_pseudo_uniform"] < table["error_kendall"]).sum())
    return {"wins": wins, "tasks": len(table), "share": wins / max(len(table), 1)}
