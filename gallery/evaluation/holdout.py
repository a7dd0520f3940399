"""The paper's 2-layer head on a held-out task (paper §4.1, Table 2), for every arm of the transfer suite.

Each arm puts the same 2-layer head on top and trains it on the train galleries carrying the held-out
label: the frozen embeddings of an arm (the exported MTL embeddings, those of the other weightings,
ImageNet transfer: the mean-pooled vectors of the pretrained backbone, other pretrained backbones),
standardised on the train galleries, or end-to-end: the model architecture trained on the held-out
task alone. Every arm trains through the one engine (gallery.training.engine) for a fixed budget, as
the paper's rows are defined: after 20/40/60/80/100% of one epoch of the labelled train galleries and
after all epochs. Each row scores every labelled gallery no model trained on (valid and test:
gallery.evaluation.transfer says why that is fair), so arms are compared pair by pair on the same
galleries (gallery.evaluation.statistics).

Every arm gets the same tuning budget: it trains once per learning rate x weight decay of one grid
(`evaluation.head_lrs`, `evaluation.head_weight_decays`), and each scored gallery is scored by the
value that did best after all epochs on the *other* folds of the scored galleries (the linear probe's
out-of-fold rule, gallery.evaluation.probes), in every row. So no arm is judged by a head that has not
settled at the one learning rate that suits another arm, and no gallery is scored by a value chosen on
it. Time per instance: the training steps only, averaged over the grid. When the end-to-end arm
trains from the feature cache, a few of its steps are also timed from pixels, through every layer an
end-to-end model runs, and both figures are reported.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import nn

from gallery.config import Settings
from gallery.data.ingest import Catalogue
from gallery.data.packed import PackedGalleries
from gallery.data.readers import batches_of
from gallery.data.tasks import Task
from gallery.evaluation.arms import END_TO_END_ARM, EmbeddingArm, arm_label
from gallery.evaluation.probes import chosen_out_of_fold, folds_of, scaler
from gallery.evaluation.task_optimal import baseline
from gallery.model.gallery_model import GalleryModel, build_model
from gallery.model.weightings import PseudoUniform
from gallery.training.engine import FitConfig, FitHooks, FitOptions, TrainData, fit, score

SCORED_SPLITS = ("valid", "test")  # the galleries no embedding model trained on
PIXEL_TIMING_STEPS = 5
SCORING_GALLERIES = 256  # galleries per scoring batch: eval mode, so the rows' scores do not depend on it


class VectorInput(nn.Module):
    """Galleries that are already one vector each: the 'encoder' of the embedding arms."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, x, index, n, from_features=False):
        return x.float()


def vectors_as_galleries(gallery_ids, vectors) -> PackedGalleries:
    """One row per gallery, so the embedding arms run through the same batching as the others."""
    data = torch.as_tensor(np.asarray(vectors, dtype=np.float32))
    return PackedGalleries(list(gallery_ids), torch.arange(len(data) + 1, dtype=torch.int64), data)


def metric_name(task: Task) -> str:
    return "MSE" if task.kind == "regression" else "accuracy"


@dataclass
class Row:
    """One row of Table 2 for one arm: the test metric after `fraction` of the first epoch or after
    `epochs` epochs, with each labelled test gallery's score (1/0, or the squared error)."""

    label: str
    fraction: float | None        # of one epoch; None for the row after all epochs
    epochs: int | None            # all epochs; None for the fractions of the first
    galleries_seen: int
    value: float
    ci_low: float | None          # 95% Clopper-Pearson interval of an accuracy
    ci_high: float | None
    scores: np.ndarray


@dataclass(frozen=True)
class HeadSetting:
    """One point of the tuning grid: the learning rate and weight decay a head (or end-to-end model) trains with."""

    lr: float
    weight_decay: float


@dataclass
class ArmResult:
    arm: EmbeddingArm
    rows: list[Row]
    train_seconds: float          # every grid point's training, summed: what tuning cost
    seconds_per_instance: float   # one training's, averaged over the grid
    instances: int
    seconds_per_instance_from_pixels: float | None = None  # end-to-end from the cache: timed from pixels too
    chosen: list[HeadSetting] = field(default_factory=list)  # per fold of the scored galleries


@dataclass
class HoldoutResult:
    """The 2-layer head on one held-out task: every arm's rows on the same labelled scored galleries
    (Table 2 is the primary task's view: gallery.config.primary_task)."""

    task: str
    kind: str
    metric: str
    train_galleries: int
    scored_galleries: int
    scored_ids: list[str]
    arms: list[ArmResult]         # each arm's, in the suite's order (end-to-end last)
    baseline: float               # majority class (accuracy) or train mean (MSE), on the scored galleries
    grid: list[HeadSetting] = field(default_factory=list)
    split: str = "+".join(SCORED_SPLITS)
    selected_on: str = ("the learning rate and weight decay, per arm, on the other folds of the scored galleries "
                        "(after all epochs); every row is a fixed budget")

    def of(self, arm: EmbeddingArm) -> ArmResult:
        return next(a for a in self.arms if a.arm == arm)

    def has(self, arm: EmbeddingArm) -> bool:
        return any(a.arm == arm for a in self.arms)


def _row(label: str, seen: int, scores: np.ndarray, kind: str, fraction=None, epochs=None) -> Row:
    value = float(scores.mean()) if len(scores) else math.nan
    if kind == "regression" or math.isnan(value):
        return Row(label, fraction, epochs, seen, value, None, None, scores)
    from scipy.stats import binomtest  # here: scipy.stats takes a second to import, in every flow step otherwise

    ci = binomtest(int(scores.sum()), len(scores)).proportion_ci(0.95)
    return Row(label, fraction, epochs, seen, value, ci.low, ci.high, scores)


@dataclass
class GridRun:
    """One grid point trained: the meaning of each Table 2 row, each scored gallery's score after all
    epochs, and `score_at(i)`, the scores at row i, computed on demand from the trained parameters kept at
    that row: only a point some fold chooses is ever scored before the end (a quarter of the end-to-end
    arm's cost went into scoring rows no fold used)."""

    marks: list[tuple[str, int, float | None, int | None]]   # label, galleries seen, fraction, epochs
    final: np.ndarray
    score_at: Callable[[int], np.ndarray]
    seconds: float
    galleries: int


def trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of what training changes: the trainable parameters and every buffer (not the frozen trunk)."""
    changing = {n for n, p in model.named_parameters() if p.requires_grad} | {n for n, _ in model.named_buffers()}
    return {n: t.detach().clone() for n, t in model.state_dict().items() if n in changing}


def progressive_training(model: GalleryModel, data: TrainData, config: FitConfig, fractions, stats,
                         log=print) -> GridRun:
    """Train `model` on its one task for `config.max_epochs`, keeping its trained parameters at fractions
    of the first epoch, and scoring the test galleries at the end."""
    n = len(data.train_rows)
    marks = [(f, math.ceil(f * n)) for f in fractions]
    kept, timed = [], {"seconds": 0.0, "galleries": 0}

    def scores() -> np.ndarray:
        return score(model, data, "test", max(config.batch_galleries, SCORING_GALLERIES),
                     precision=config.precision).scores[:, 0]

    def on_step(info):
        timed["seconds"] += info.seconds
        timed["galleries"] += info.galleries
        while info.epoch == 0 and marks and info.galleries_seen >= marks[0][1]:
            fraction, _ = marks.pop(0)
            kept.append(((f"{fraction:.0%} of one epoch", info.galleries_seen, fraction, None), trained_state(model)))

    fit(model, PseudoUniform(model.tasks, stats), data, config,
        options=FitOptions(log=log, hooks=FitHooks(on_step=on_step), time_steps=True, select=False))
    final = scores()
    kept.append(((f"{config.max_epochs} epochs", timed["galleries"], None, config.max_epochs), None))

    def score_at(i: int) -> np.ndarray:
        if kept[i][1] is None:
            return final
        model.load_state_dict(kept[i][1], strict=False)
        return scores()

    return GridRun([mark for mark, _ in kept], final, score_at, timed["seconds"], timed["galleries"])


def seconds_per_instance_from_pixels(model: GalleryModel, data: TrainData, config: FitConfig, stats) -> float:
    """A few training steps of the end-to-end model from pixels (frozen trunk, top, head: every layer it
    runs), after one untimed warm-up step: seconds per gallery."""
    rows = np.concatenate(batches_of(data.train_rows, config.batch_galleries)[:PIXEL_TIMING_STEPS + 1])
    few = TrainData(data.source, data.targets, rows, rows[:0], rows[:0], False, data.workers)
    timed = []
    on_step = lambda info: timed.append((info.seconds, info.galleries)) if info.step else None  # noqa: E731
    fit(model, PseudoUniform(model.tasks, stats), few, replace(config, max_epochs=1),
        options=FitOptions(log=lambda _: None, hooks=FitHooks(on_step=on_step), time_steps=True, select=False))
    return sum(s for s, _ in timed) / max(sum(g for _, g in timed), 1)


def scored_rows(data: TrainData) -> TrainData:
    """Train on the train split; score (as `test`) every gallery of the scored splits, in row order."""
    scored = np.sort(np.concatenate([data.valid_rows, data.test_rows]))
    return TrainData(data.source, data.targets, data.train_rows, data.valid_rows[:0], scored, data.from_features,
                     data.workers)


def standardised(store: PackedGalleries, rows: np.ndarray) -> PackedGalleries:
    """An arm's vectors standardised on `rows` (the train galleries; the linear probe's scaler), so one
    grid of learning rates suits every arm whatever the scale of its features. Time and memory O(N·d)."""
    data = store.data.float().numpy()
    mean, scale = scaler(data[rows])
    return PackedGalleries(store.gallery_ids, store.offsets, torch.from_numpy((data - mean) / scale))


def tuned_rows(kind: str, runs: list[GridRun], folds: np.ndarray) -> tuple[list[Row], list[int]]:
    """Every row of Table 2 with each scored gallery scored by the grid point chosen on the other folds
    after all epochs, and the index chosen per fold. Only chosen points' earlier rows are scored.
    Time O(rows·(chosen points' scoring + n)), memory O(grid·n) over the n scored galleries."""
    best = chosen_out_of_fold(kind, np.stack([run.final for run in runs]), folds)
    picked, rows = np.arange(len(folds)), []
    for i, (label, seen, fraction, epochs) in enumerate(runs[0].marks):
        at = {c: runs[c].score_at(i) for c in sorted(set(best.tolist()))}
        scores = np.array([at[c][g] for g, c in zip(picked, best)]) if len(picked) else np.zeros(0)
        rows.append(_row(label, seen, scores, kind, fraction, epochs))
    return rows, [int(best[folds == f][0]) for f in np.unique(folds)]


def evaluate_holdout(catalogue: Catalogue, task: Task, settings: Settings, arms: dict[EmbeddingArm, PackedGalleries],
                     shards, pixels, log=print, time_from_pixels: bool = True) -> HoldoutResult:
    """The 2-layer head on every vector arm (`arms`: one vector per gallery, the same galleries in the
    same order) and end-to-end from `shards` (the preprocessed galleries as the preset trains: features
    or pixels; `pixels`: the same as pixels, for the timing from pixels, which costs about one more
    end-to-end training: `time_from_pixels` False skips it), each tuned on the grid. evaluation.end_to_end
    off leaves the end-to-end arm out (its training cost more than every other arm's together: docs/sizing.md).
    Time O(arms·grid·epochs·n_train) training steps (linear in the train galleries) plus O(arms·grid·rows·n)
    scoring, memory O(N·d) for an arm's vectors and O(grid·n) scores: nothing pairwise."""
    ev, stats, seed = settings.evaluation, catalogue.stats, settings.train.seed
    config = FitConfig.of(settings.train, batch_galleries=ev.batch_galleries, max_epochs=ev.holdout_epochs,
                          patience=None)
    grid = [HeadSetting(lr, wd) for lr in ev.head_lrs for wd in ev.head_weight_decays]
    results, ids, data = [], None, None
    for arm, store in [*arms.items(), *([(END_TO_END_ARM, shards)] if ev.end_to_end else [])]:
        end_to_end = arm == END_TO_END_ARM
        from_features = settings.train.use_cache if end_to_end else True
        workers = settings.data.loader_workers if end_to_end else 0
        data = scored_rows(TrainData.from_catalogue(catalogue.frame, [task], store, from_features, workers).labelled())
        if not end_to_end:
            data = replace(data, source=standardised(store, data.train_rows))
        scored = [store.gallery_ids[r] for r in data.test_rows]
        if ids is not None and scored != ids:
            raise ValueError(f"held-out arms disagree on the scored galleries ({arm_label(arm)}); they must be paired")
        ids = scored

        def model():
            torch.manual_seed(seed)
            if end_to_end:
                return build_model(settings.model, [task], stats)
            return GalleryModel(VectorInput(store.data.shape[1]), [task], settings.model.hidden, stats)

        runs = [progressive_training(model(), data, replace(config, lr=g.lr, weight_decay=g.weight_decay),
                                     ev.holdout_fractions, stats, log=lambda _: None) for g in grid]
        rows, best = tuned_rows(task.kind, runs, folds_of(scored))
        result = ArmResult(arm, rows, sum(r.seconds for r in runs),
                           float(np.mean([r.seconds / max(r.galleries, 1) for r in runs])), runs[0].galleries,
                           chosen=[grid[b] for b in best])
        if end_to_end:  # trained from pixels, or from the cache and (Table 2's task) timed from pixels too
            result.seconds_per_instance_from_pixels = None if from_features else result.seconds_per_instance
            if from_features and time_from_pixels:
                chosen = grid[max(set(best), key=best.count)]
                result.seconds_per_instance_from_pixels = seconds_per_instance_from_pixels(
                    model(), replace(data, source=pixels, from_features=False),
                    replace(config, lr=chosen.lr, weight_decay=chosen.weight_decay), stats)
        results.append(result)
        log(f"held-out {task.name} / {arm_label(arm)}, 2-layer head: {metric_name(task)} {result.rows[-1].value:.4f} "
            f"after {ev.holdout_epochs} epochs (tuned on {len(grid)} settings: {chosen_text(result.chosen)}), "
            f"{result.seconds_per_instance * 1000:.2f} ms per instance")
    return HoldoutResult(task.name, task.kind, metric_name(task), len(data.train_rows), len(data.test_rows), ids,
                         results, baseline(task.kind, data.targets[data.train_rows, 0], data.targets[data.test_rows, 0]),
                         grid)


def chosen_text(chosen: list[HeadSetting]) -> str:
    """The grid points an arm's folds chose, most chosen first: `lr 0.001, wd 0 (4 of 5 folds); ...`."""
    counts = {c: chosen.count(c) for c in dict.fromkeys(chosen)}
    return "; ".join(f"lr {c.lr:g}, wd {c.weight_decay:g} ({n} of {len(chosen)} folds)"
                     for c, n in sorted(counts.items(), key=lambda kv: -kv[1]))
