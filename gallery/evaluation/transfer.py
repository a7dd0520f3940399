"""The transfer suite (see docs/design.md, "Evaluation protocol"): does the embedding carry what the
photos show to tasks it was never taught? Several held-out tasks, three probes on every embedding arm.

Arms (gallery.evaluation.arms.EmbeddingArm): the exported MTL embeddings (the reference model's), the
other trained models' embeddings, ImageNet transfer (the backbone's pretrained features, mean-pooled), any
other pretrained backbone named in `evaluation.baselines`, and for the 2-layer head the end-to-end model. Probes: the paper's 2-layer head (gallery.evaluation.holdout,
with its rows at fractions of the first epoch), a linear probe and a k-NN probe
(gallery.evaluation.probes).

The rule: every scored gallery's embedding comes from a model that never trained on it, and the probe
that scores it never saw its label. The MTL models train on the train split only, so the scored
galleries are the valid and test ones that carry the task's label; every probe fits on the train split
only; the linear and k-NN probes choose their one hyperparameter on the other folds of the scored
galleries (out of fold). Valid galleries helped choose the MTL model's epoch through their MTL labels,
never their held-out labels; the scorecard also shows the effects on the test galleries alone
(gallery.evaluation.scorecard), so a reader can see that they do not depend on it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from gallery.config import Settings, primary_task
from gallery.data.ingest import Catalogue
from gallery.faults import reached
from gallery.data.packed import PackedGalleries
from gallery.data.tasks import Task
from gallery.evaluation.arms import END_TO_END_ARM, IMAGENET_ARM, EmbeddingArm, arm_label, reference_arm
from gallery.evaluation.holdout import HoldoutResult, evaluate_holdout, metric_name, scored_rows
from gallery.evaluation.probes import folds_of, knn_candidates, linear_candidates, out_of_fold
from gallery.training.engine import TrainData


@dataclass
class ProbeScores:
    """One probe on one arm for one task: each scored gallery's score (1/0, or the squared error)."""

    task: str
    probe: str                 # head | linear | knn (gallery.evaluation.probes.PROBES)
    arm: EmbeddingArm
    gallery_ids: list[str]
    scores: np.ndarray
    chosen: list = field(default_factory=list)   # the hyperparameter(s) each fold was scored with

    @property
    def value(self) -> float:
        """Accuracy, or MSE."""
        return float(self.scores.mean()) if len(self.scores) else float("nan")


@dataclass
class HeldOutTask:
    name: str
    kind: str
    metric: str
    train_labelled: int
    scored: int


@dataclass
class TransferResult:
    """Every held-out task x probe x arm, paired on each task's scored galleries; what each part cost."""

    tasks: list[HeldOutTask]
    arms: list[EmbeddingArm]              # in the report's order
    scores: list[ProbeScores]
    holdouts: list[HoldoutResult]         # the 2-layer head's rows per task (Table 2 is the primary task's)
    seconds: dict[str, float] = field(default_factory=dict)  # per part of the suite (render.COST_PARTS)
    notes: list[str] = field(default_factory=list)
    split: str = "valid+test"
    primary_task: str | None = None       # Table 2's and the primary comparison's (gallery.config.primary_task)

    def get(self, task: str, probe: str, arm: EmbeddingArm) -> ProbeScores | None:
        return next((s for s in self.scores if (s.task, s.probe, s.arm) == (task, probe, arm)), None)

    @property
    def reference(self) -> EmbeddingArm | None:
        """The exported model's arm."""
        return reference_arm(self.arms)


def probe_scores(task: Task, catalogue: Catalogue, arm: EmbeddingArm, store: PackedGalleries, seconds: dict) -> list[ProbeScores]:
    """The linear and k-NN probes of one arm: fitted on the train galleries, scored out of fold. Time: the
    probes' (gallery.evaluation.probes; the k-NN search is O(n·n_train·d)), memory O(N·d)."""
    data = scored_rows(TrainData.from_catalogue(catalogue.frame, [task], store, True).labelled())
    x, y = store.data.numpy().astype(np.float32), data.targets[:, 0].numpy().astype(float)
    ids = [store.gallery_ids[r] for r in data.test_rows]
    folds = folds_of(ids)
    out = []
    for probe, candidates in (("linear", linear_candidates), ("knn", knn_candidates)):
        start = time.perf_counter()
        found = candidates(task.kind, x[data.train_rows], y[data.train_rows], x[data.test_rows])
        scores, chosen = out_of_fold(task.kind, found, y[data.test_rows], folds)
        out.append(ProbeScores(task.name, probe, arm, ids, scores, chosen))
        seconds[probe] = seconds.get(probe, 0.0) + time.perf_counter() - start
    return out


def transfer_suite(catalogue: Catalogue, settings: Settings, arms: dict[EmbeddingArm, PackedGalleries], shards, pixels,
                   notes: list[str] = (), log=print, head_arms: list[EmbeddingArm] | None = None) -> TransferResult:
    """All held-out tasks x probes x arms. `arms`: vector arms (one vector per gallery, the same galleries
    in the same order); `shards`/`pixels`: the preprocessed galleries for the end-to-end arm; `head_arms`:
    the arms the 2-layer head probes too (default: all; a study keeps it to the preset's pooling).
    Time: per task, `evaluate_holdout`'s and each arm's `probe_scores` (linear in the galleries but for the
    k-NN search, O(n·n_train·d)); memory O(arms·N·d), nothing pairwise."""
    tasks, scores, holdouts, seconds = [], [], [], {}
    head = {a: s for a, s in arms.items() if head_arms is None or a in head_arms}
    timed = primary_task(settings, [t.name for t in catalogue.holdout])  # Table 2's: end-to-end timed from pixels
    for task in catalogue.holdout:
        start = time.perf_counter()
        holdout = evaluate_holdout(catalogue, task, settings, head, shards, pixels, log, time_from_pixels=task.name == timed)
        seconds["head"] = seconds.get("head", 0.0) + sum(a.train_seconds for a in holdout.arms
                                                         if a.arm != END_TO_END_ARM)
        if holdout.has(END_TO_END_ARM):
            seconds["end_to_end"] = seconds.get("end_to_end", 0.0) + holdout.of(END_TO_END_ARM).train_seconds
        seconds["head_and_end_to_end_with_scoring"] = (seconds.get("head_and_end_to_end_with_scoring", 0.0)
                                                       + time.perf_counter() - start)
        holdouts.append(holdout)
        scores += [ProbeScores(task.name, "head", result.arm, holdout.scored_ids, result.rows[-1].scores, result.chosen)
                   for result in holdout.arms]
        for arm, store in arms.items():
            scores += probe_scores(task, catalogue, arm, store, seconds)
        reached("transfer.task")
        tasks.append(HeldOutTask(task.name, task.kind, metric_name(task), holdout.train_galleries,
                                 holdout.scored_galleries))
        shown = (reference_arm(arms), IMAGENET_ARM)
        log(f"transfer {task.name}: " + "; ".join(
            f"{s.probe}/{arm_label(s.arm)} {s.value:.3f}" for s in scores if s.task == task.name and s.arm in shown))
    return TransferResult(tasks, [*arms, *([END_TO_END_ARM] if settings.evaluation.end_to_end else [])], scores, holdouts, seconds, list(notes), primary_task=timed)
