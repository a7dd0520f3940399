"""Task-optimal models (paper §4.2): the same architecture trained on one task alone, the yardstick
of Figures 5 and 6 (compared with the MTL models in gallery.evaluation.comparisons).

`valid` selects each model's best epoch (its own early stopping); `test` scores it.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

import gallery.storage as storage
from gallery.faults import reached
from gallery.config import Settings
from gallery.data.ingest import Catalogue
from gallery.data.split import stable_sample
from gallery.data.tasks import Task
from gallery.model.gallery_model import build_model
from gallery.model.weightings import PseudoUniform
from gallery.training.engine import FitConfig, FitHooks, FitOptions, TrainData, fit, score
from gallery.training.group import ModelGroup

RESULT = "result.json"


def error(kind: str, metric: float) -> float:
    """The paper's error: 1 - accuracy for classification, MSE for regression."""
    return metric if kind == "regression" else 1.0 - metric


def baseline(kind: str, train: torch.Tensor, scored: torch.Tensor) -> float:
    """Majority class (classification) or train mean (regression) of the train labels, as a metric on
    the `scored` labels (accuracy, or MSE)."""
    train, scored = train[~torch.isnan(train)], scored[~torch.isnan(scored)]
    if len(scored) == 0 or len(train) == 0:
        return math.nan
    if kind == "regression":
        return float(torch.mean((scored - train.mean()) ** 2))
    return float((scored.long() == torch.mode(train.long()).values).float().mean())


def group_tasks(tasks: list[Task], groups: int) -> list[list[str]]:
    """Round-robin task names into at most `groups` branches (one task per branch on a cluster)."""
    groups = max(1, min(groups, len(tasks)))
    return [[t.name for t in tasks[g::groups]] for g in range(groups)]


@dataclass
class TaskOptimalResult:
    """One task's single-task model: its error on `test` at the epoch `valid` selected, its budget and
    the epochs it ran, the majority/mean baseline's test error, and each labelled test gallery's score."""

    task: str
    error: float
    valid_error: float           # at the selected epoch: what selected it
    epochs: int
    best_epoch: int
    max_epochs: int
    patience: int
    baseline_error: float
    test_ids: list[str] = field(default_factory=list)
    test_scores: list[float] = field(default_factory=list)
    train_galleries: int = 0     # trained on: every train gallery, or evaluation.task_optimal_galleries of them
    split: str = "test"
    selected_on: str = "valid"

    @property
    def test_labelled(self) -> int:
        return len(self.test_ids)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @staticmethod
    def from_json(data: bytes) -> "TaskOptimalResult":
        return TaskOptimalResult(**json.loads(data))


def train_task_optimal(catalogue: Catalogue, tasks: list[Task], source, settings: Settings, checkpoints_of,
                       recovery_of, log=print) -> dict[str, TaskOptimalResult]:
    """The model architecture trained on each task alone (all of them together in one pass over the data,
    gallery.training.group), each with the MTL model's budget (the same batches, max epochs and patience)
    and its own early stopping. A task-optimal model is a yardstick, not an output: it leaves a small
    `result.json` in `checkpoints_of(name)` as soon as it stops, which a resumed run reuses
    (`recovery_of(name)`: the origin run's folder holding one, or None).
    """
    outcomes: dict[str, TaskOptimalResult] = {}
    for task in tasks:
        recovered = recovery_of(task.name)
        if recovered is not None:
            outcome = TaskOptimalResult.from_json(storage.read_bytes(storage.join(recovered, RESULT)))
            storage.write_bytes(storage.join(checkpoints_of(task.name), RESULT), outcome.to_json())
            log(f"task-optimal {task.name}: already evaluated in {recovered}, error {outcome.error:.4f}")
            outcomes[task.name] = outcome
    todo = [t for t in tasks if t.name not in outcomes]
    if todo:
        outcomes |= _train(catalogue, todo, source, settings, checkpoints_of, log)
    return {t.name: outcomes[t.name] for t in tasks}


def _train(catalogue: Catalogue, tasks: list[Task], source, settings: Settings, checkpoints_of, log):
    data = TrainData.from_catalogue(catalogue.frame, tasks, source, settings.train.use_cache,
                                    settings.data.loader_workers)
    kept = stable_sample([source.gallery_ids[r] for r in data.train_rows], settings.evaluation.task_optimal_galleries,
                         "task_optimal")
    data = replace(data, train_rows=data.train_rows[kept])  # a cap: days of training on a 500k catalogue otherwise
    config = FitConfig.of(settings.train)
    models = []
    for task in tasks:
        torch.manual_seed(settings.train.seed)  # each model starts as it would alone
        models.append(build_model(settings.model, [task], catalogue.stats))
    group, outcomes = ModelGroup(models), {}

    def done(members: list[int], result) -> None:
        """Score the finished models on test with the weights valid selected; keep their result."""
        test = score(group, data, "test", config.batch_galleries, precision=config.precision)
        for m in members:
            task, best = tasks[m], result.best_epochs[m]
            ids, scores = test.task(task.name)
            outcome = TaskOptimalResult(
                task.name, error(task.kind, float(np.mean(scores))) if len(scores) else math.nan,
                error(task.kind, result.history[best].valid_metrics[task.name]), len(result.history), best,
                config.max_epochs, config.patience,
                error(task.kind, baseline(task.kind, data.targets[data.train_rows, m], data.targets[data.test_rows, m])),
                ids, scores.tolist(), len(data.train_rows))
            storage.write_bytes(storage.join(checkpoints_of(task.name), RESULT), outcome.to_json())
            log(f"task-optimal {task.name}: test error {outcome.error:.4f} with epoch {best + 1} of "
                f"{outcome.epochs} (selected on valid)")
            outcomes[task.name] = outcome

    fit(group, PseudoUniform(tasks, catalogue.stats), data, config,
        options=FitOptions(log=log, hooks=FitHooks(on_step=lambda _: reached("task_optimal.step"), on_members_done=done)))
    return outcomes
