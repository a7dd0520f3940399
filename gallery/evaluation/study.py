"""A study: every trained configuration (a *cell*: a loss weighting with a pooling) ranked against the
paper's (pseudo-uniform weighting, mean pooling), with paired intervals (see docs/design.md, "Study").

A run trains one cell per weighting in `train.weightings` and pooling in `model.pooling` plus
`train.poolings`. Each cell is compared with the paper's cell on the same galleries:
- per-task error: the geometric mean over the MTL tasks of this cell's test error over the paper's
  cell's, minus 1 (< 0: this cell errs less; gallery.evaluation.scorecard.error_change), paired
  bootstrap over the test galleries;
- held-out transfer: the same over the held-out tasks and the linear and k-NN probes (the transfer
  suite's scored galleries: valid and test, no model trained on them);
- training time per epoch relative to the paper's cell (as measured, side by side on one machine).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from gallery.data.ingest import Catalogue
from gallery.evaluation.arms import mtl_arm
from gallery.evaluation.scorecard import error_change
from gallery.evaluation.statistics import Effect
from gallery.evaluation.transfer import TransferResult
from gallery.model.identity import ModelIdentity
from gallery.training.engine import TrainResult

PAPER = ("pseudo_uniform", "mean")
STUDY_PROBES = ("linear", "knn")
BETTER, WORSE, UNDECIDED = "better than the paper's", "worse than the paper's", "not distinguishable"


@dataclass
class CellRanking:
    model: ModelIdentity      # the cell: its weighting and pooling (the run's first seed)
    per_task: Effect          # error change over the MTL tasks vs the paper's cell (test; < 0: fewer errors)
    transfer: Effect          # error change over held-out tasks x probes vs the paper's cell
    seconds_per_epoch: float
    time_ratio: float         # seconds per epoch / the paper's cell's
    epochs: int

    @property
    def reading(self) -> str:
        side = self.transfer.side()
        return BETTER if side < 0 else WORSE if side > 0 else UNDECIDED


def _seconds_per_epoch(result: TrainResult) -> float:
    return float(np.mean([h.seconds for h in result.history])) if result.history else math.nan


def rank_cells(catalogue: Catalogue, training: dict[ModelIdentity, TrainResult], transfer: TransferResult,
               reference: ModelIdentity, seed: int = 0) -> list[CellRanking]:
    """Every trained cell (`training`: each weighting-and-pooling model) but the paper's against the paper's,
    best held-out transfer first. `reference`: the exported model (the transfer suite's reference arm).
    Empty when the paper's cell was not trained. Time O(cells·RESAMPLES·n) over the n test (and scored)
    galleries (`error_change`, streamed), memory O(n + scorecard.WEIGHT_CELLS)."""
    paper = next((m for m in training if (m.weighting, m.pooling) == PAPER), None)
    if paper is None:
        return []
    paper_arm, base_seconds = mtl_arm(paper, reference), _seconds_per_epoch(training[paper])
    out = []
    for model, result in training.items():
        if model == paper:
            continue
        per_task = [(t.kind, *_paired(result, training[paper], t.name)) for t in catalogue.tasks]
        arm = mtl_arm(model, reference)
        held_out = [(t.kind, a.gallery_ids, a.scores, b.scores) for t in transfer.tasks for p in STUDY_PROBES
                    if (a := transfer.get(t.name, p, arm)) is not None and (b := transfer.get(t.name, p, paper_arm)) is not None]
        seconds = _seconds_per_epoch(result)
        out.append(CellRanking(model,
                               error_change(per_task, seed, "MTL tasks"),
                               error_change(held_out, seed, "held-out task x probe pairs"),
                               seconds, seconds / base_seconds, len(result.history)))
    return sorted(out, key=lambda r: r.transfer.estimate if not math.isnan(r.transfer.estimate) else math.inf)


def _paired(a: TrainResult, b: TrainResult, task: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    ids_a, scores_a = a.test.task(task)
    ids_b, scores_b = b.test.task(task)
    if ids_a != ids_b:
        raise ValueError(f"{task}: two trained models were scored on different test galleries")
    return ids_a, scores_a, scores_b
