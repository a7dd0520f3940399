"""Every comparison the report makes beside the paper (Table 2, Figures 5 and 6), as an effect with
its interval, its test and the reading that follows from them (gallery.evaluation.statistics).

All comparisons are paired on the same galleries: each MTL model and its task-optimal model (and the
majority/mean baseline) on the `test` galleries labelled for the task (no model was selected on
them); Table 2's arms on the held-out task's scored galleries (valid and test: no model trained on
them, nothing selected on them; gallery.evaluation.transfer). The paper's figures and claims
are quoted from its text (Table 2, §4.2, Figure 5 and 6 captions) and shown only beside rows that
mean the same.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from gallery.data.ingest import Catalogue
from gallery.data.labels import LabelStats
from gallery.data.tasks import Task
from gallery.evaluation.arms import END_TO_END, IMAGENET, EmbeddingArm, paper_arms, reference_arm
from gallery.evaluation.holdout import HoldoutResult, Row
from gallery.evaluation.scorecard import Scorecard, scorecard
from gallery.evaluation.statistics import (CONSISTENT, NOISE, OPPOSITE, Effect, correlations, paired_difference,
                                           relative_increase, sign_test)
from gallery.evaluation.task_optimal import TaskOptimalResult
from gallery.evaluation.transfer import TransferResult
from gallery.model.identity import ModelIdentity
from gallery.training.engine import TrainResult

# Table 2 of the paper (star rating accuracy on 250k properties), by row meaning: a fraction of one
# epoch, or a number of epochs. Columns: MTL embeddings, ImageNet transfer, end-to-end model.
PAPER_TABLE2 = {("fraction", 0.2): (0.574, 0.515, 0.543), ("fraction", 0.4): (0.597, 0.523, 0.558),
                ("fraction", 0.6): (0.616, 0.546, 0.575), ("fraction", 0.8): (0.622, 0.532, 0.586),
                ("fraction", 1.0): (0.623, 0.534, 0.583), ("epochs", 4): (0.631, 0.542, 0.598)}
PAPER_TIME_PER_INSTANCE = {"mtl": "14 ms (CPU)", "end_to_end": "136 ms (GPU)"}
PAPER_PU_WINS = (22, 31)                                    # §4.2: pseudo-uniform better on 22 of 31 tasks
PAPER_BALANCE_R = {"pseudo_uniform": 0.78, "kendall": 0.80}  # Figure 6: Pearson's r, p < .001 both
PAPER_MTL_BETTER = {"B1", "B3", "B11"}                      # Figure 5: better than task-optimal, both weightings
PAPER_WEIGHTINGS = ("pseudo_uniform", "kendall")             # the two the paper trained


PAPER_COLUMNS = {IMAGENET: 1, END_TO_END: 2}  # the paper's Table 2 columns after MTL's, by arm kind


def paper_row(row: Row):
    """The paper's Table 2 figures for a row of ours that means the same, else None."""
    key = ("fraction", round(row.fraction, 2)) if row.fraction is not None else ("epochs", row.epochs)
    return PAPER_TABLE2.get(key)


def beside_the_paper(holdout: HoldoutResult, primary_task: str | None) -> bool:
    """Whether the paper's Table 2 figures (star rating accuracy) are shown beside this holdout's rows: the
    primary held-out task (gallery.config.primary_task), measured by accuracy."""
    return holdout.task == primary_task and holdout.metric == "accuracy"


def errors_of(kind: str, scores: np.ndarray) -> np.ndarray:
    """Per-gallery errors from per-gallery scores (1/0 right, or the squared error)."""
    return scores if kind == "regression" else 1.0 - scores


# ---------------------------------------------------------------- Table 2

@dataclass
class Versus:
    """The reference MTL arm minus another arm, on the same galleries."""

    arm: EmbeddingArm
    effect: Effect


@dataclass
class Table2Comparison:
    """One row of Table 2: MTL minus each other arm, with its reading, and the paper's figures where
    its row means the same."""

    row: str
    fraction: float | None
    paper: tuple[float, float, float] | None
    versus: list[Versus]   # each other arm of Table 2 (ImageNet transfer, end-to-end), in its column order

    def against(self, arm: EmbeddingArm) -> Effect | None:
        """MTL minus `arm`; None where the run has no such arm (evaluation.end_to_end off)."""
        return next((v.effect for v in self.versus if v.arm == arm), None)


def table2_comparisons(holdout: HoldoutResult, primary_task: str | None, seed: int = 0) -> list[Table2Comparison]:
    """Per row: MTL - ImageNet and MTL - end-to-end on the same test galleries, with the reading
    against the paper's claim that MTL embeddings transfer best (higher accuracy, lower MSE); the paper's
    figures beside the primary task's rows (`beside_the_paper`). Time O(rows·arms·RESAMPLES·n) (paired
    bootstraps over the n scored galleries), memory O(n + statistics.BATCH_CELLS)."""
    better = 1 if holdout.metric == "accuracy" else -1
    arms = [a.arm for a in holdout.arms]
    mtl = holdout.of(reference_arm(arms))
    others = [a for a in paper_arms(arms) if a != mtl.arm]
    out = []
    for i, row in enumerate(mtl.rows):
        paper = paper_row(row) if beside_the_paper(holdout, primary_task) else None
        versus = [Versus(other, paired_difference(row.scores, holdout.of(other).rows[i].scores, seed).read(better))
                  for other in others]
        out.append(Table2Comparison(row.label, row.fraction, paper, versus))
    return out


# ---------------------------------------------------------------- Figure 5

def _scores_by_id(ids, scores) -> dict:
    return {g: s for g, s in zip(ids, scores) if not math.isnan(s)}


def baseline_scores(task: Task, stats: LabelStats, labels: np.ndarray) -> np.ndarray:
    """The majority class (train split) or the train mean, scored gallery by gallery like a model."""
    if task.kind == "regression":
        return (labels - stats.mean) ** 2
    return (labels == int(np.argmax(stats.class_counts))).astype(float)


@dataclass
class ModelOnTask:
    """One trained model on one MTL task (test): its error, against its task-optimal model and the baseline."""

    model: ModelIdentity
    error: float                    # 1 - accuracy, or MSE
    relative_error_increase: Effect  # (err_MTL - err_opt) / err_opt, paired bootstrap (< 0: MTL better)
    baseline_minus: Effect          # the majority/mean baseline's error - the model's (> 0: MTL better)


@dataclass
class TaskRow:
    """One MTL task of Figure 5: its task-optimal model, its baseline, and every trained model."""

    task: str
    kind: str
    minority_fraction: float
    test_labelled: int
    error_task_optimal: float
    error_baseline: float
    task_optimal_epochs: float
    models: list[ModelOnTask]

    def of(self, model: ModelIdentity) -> ModelOnTask:
        return next(m for m in self.models if m.model == model)


def per_task(catalogue: Catalogue, training: dict[ModelIdentity, TrainResult], optimal: dict[str, TaskOptimalResult],
             seed: int = 0) -> list[TaskRow]:
    """One row per MTL task: test errors of each trained model, its task-optimal model and the baseline, and
    each model's relative error increase over the task-optimal model with its paired interval. Without
    task-optimal models (`optimal` empty: evaluation.task_optimal off) a row has the models and the baseline.
    Time O(tasks·models·RESAMPLES·n) (paired bootstraps over the n test galleries; the pairing is by id,
    dictionaries), memory O(n + statistics.BATCH_CELLS)."""
    labels = catalogue.frame.set_index("gallery_id")
    rows = []
    for task in catalogue.tasks:
        opt = optimal.get(task.name)
        optimal_scores = None if opt is None else _scores_by_id(opt.test_ids, opt.test_scores)
        models = []
        for model, result in training.items():
            mtl_scores = _scores_by_id(*result.test.task(task.name))
            common = [g for g in mtl_scores if optimal_scores is None or g in optimal_scores]
            mtl = np.array([mtl_scores[g] for g in common])
            increase = (NO_OPTIMAL if optimal_scores is None else relative_increase(
                errors_of(task.kind, mtl), errors_of(task.kind, np.array([optimal_scores[g] for g in common])), seed))
            base = baseline_scores(task, catalogue.stats[task.name], labels.loc[common, task.name].to_numpy(float))
            versus = paired_difference(errors_of(task.kind, base), errors_of(task.kind, mtl), seed)
            models.append(ModelOnTask(model, float(errors_of(task.kind, mtl).mean()) if len(mtl) else math.nan,
                                      increase, versus))
        if opt is None:  # the baseline on the models' labelled test galleries (the last model's: all have the same)
            rows.append(TaskRow(task.name, task.kind, catalogue.stats[task.name].minority_fraction, len(common),
                                math.nan, float(errors_of(task.kind, base).mean()) if len(base) else math.nan,
                                math.nan, models))
        else:
            rows.append(TaskRow(task.name, task.kind, catalogue.stats[task.name].minority_fraction, opt.test_labelled,
                                opt.error, opt.baseline_error, opt.epochs, models))
    return rows


NO_OPTIMAL = Effect(math.nan, math.nan, math.nan, None, 0, "no task-optimal model (evaluation.task_optimal is off)")


@dataclass
class VersusOptimal:
    """How the tasks split between MTL and the task-optimal models, by their intervals."""

    model: ModelIdentity
    clearly_worse: int
    clearly_better: int
    not_distinguishable: int
    tasks: int
    share_worse: Effect                  # share of decided tasks where MTL's error is higher (sign test)
    paper_named_tasks: dict[str, Effect]  # B1, B3, B11: the paper finds them better under MTL


def paper_code(task: str) -> str:
    """The paper's code of a task of its Table 1 (`B1` of `B1_breakfast`): the spec's names begin with it."""
    return task.split("_")[0]


def mtl_vs_optimal(rows: list[TaskRow], model: ModelIdentity) -> VersusOptimal:
    """How the tasks split: MTL clearly worse (interval above 0), clearly better, or not distinguishable;
    the share of tasks where MTL's error is higher, with a sign test (the paper: worse on most tasks),
    and the paper's named tasks (B1, B3, B11 better under MTL)."""
    effects = [(r.task, r.of(model).relative_error_increase) for r in rows]
    decided = [e for _, e in effects if not math.isnan(e.estimate)]
    worse = sign_test(sum(e.estimate > 0 for e in decided), sum(e.estimate < 0 for e in decided))
    named = {name: e.read(-1) for name, e in effects if paper_code(name) in PAPER_MTL_BETTER}
    return VersusOptimal(model, sum(e.side() == 1 for e in decided), sum(e.side() == -1 for e in decided),
                         sum(e.side() == 0 for e in decided), len(decided), worse.read(+1, null=0.5), named)


@dataclass
class WeightingWins:
    """Pseudo-uniform against Kendall: tasks where each has the lower error."""

    model: ModelIdentity     # the pseudo-uniform model
    against: ModelIdentity   # the Kendall model
    wins: int
    losses: int
    ties: int
    tasks: int
    share: Effect   # share of decided tasks pseudo-uniform wins (sign test)


def weighting_wins(rows: list[TaskRow], pseudo_uniform: ModelIdentity, kendall: ModelIdentity) -> WeightingWins:
    """Pseudo-uniform against Kendall: tasks with the lower error, a sign test over the decided ones."""
    pu, other = np.array([r.of(pseudo_uniform).error for r in rows]), np.array([r.of(kendall).error for r in rows])
    wins, losses = int((pu < other).sum()), int((pu > other).sum())
    return WeightingWins(pseudo_uniform, kendall, wins, losses, len(rows) - wins - losses, len(rows),
                         sign_test(wins, losses).read(+1, null=0.5))


def paper_pair(models: list[ModelIdentity]) -> tuple[ModelIdentity, ModelIdentity] | None:
    """The paper's two weightings among `models` (of one pooling), pseudo-uniform first, when both are there."""
    found = {m.weighting: m for m in models}
    return (found[PAPER_WEIGHTINGS[0]], found[PAPER_WEIGHTINGS[1]]) if set(PAPER_WEIGHTINGS) <= set(found) else None


@dataclass
class VersusBaseline:
    model: ModelIdentity
    tasks: int
    clearly_better: int
    clearly_worse: int
    reading: str


def mtl_vs_baseline(rows: list[TaskRow], model: ModelIdentity) -> VersusBaseline:
    """MTL against the majority/mean baseline per task (the paper: better on every single task)."""
    decided = [e for e in (r.of(model).baseline_minus for r in rows) if not math.isnan(e.estimate)]
    better, against = sum(e.side() == 1 for e in decided), sum(e.side() == -1 for e in decided)
    verdict = CONSISTENT if decided and better == len(decided) else OPPOSITE if against else NOISE
    return VersusBaseline(model, len(decided), better, against, verdict)


# ---------------------------------------------------------------- Figure 6

@dataclass
class ClassBalance:
    """Figure 6 for one model: minority-class fraction against relative error increase."""

    model: ModelIdentity
    n: int
    pearson: Effect     # with the reading against the paper's r > 0
    spearman: Effect
    slope: float
    intercept: float
    reading: str


def balance_points(rows: list[TaskRow], model: ModelIdentity) -> tuple[np.ndarray, np.ndarray]:
    """Binary tasks with both numbers: minority-class fractions and the model's relative error increases."""
    pairs = [(r.minority_fraction, r.of(model).relative_error_increase.estimate) for r in rows if r.kind == "binary"]
    pairs = [(x, y) for x, y in pairs if not (math.isnan(x) or math.isnan(y))]
    return np.array([x for x, _ in pairs], float), np.array([y for _, y in pairs], float)


def class_balance(rows: list[TaskRow], models, seed: int = 0) -> dict[ModelIdentity, ClassBalance]:
    """Binary tasks: minority-class fraction against relative error increase: Pearson and Spearman
    with intervals, the least-squares line for the figure, and the reading against the paper's r > 0.
    Time O(models·RESAMPLES·tasks·log tasks): its points are tasks, not galleries."""
    out = {}
    for model in models:
        x, y = balance_points(rows, model)
        found = correlations(x, y, seed)
        slope, intercept = np.polyfit(x, y, 1) if len(x) >= 2 and np.ptp(x) > 0 else (math.nan, math.nan)
        pearson = found["pearson"].read(+1)
        out[model] = ClassBalance(model, len(x), pearson, found["spearman"], float(slope), float(intercept),
                                  pearson.reading)
    return out


# ---------------------------------------------------------------- what the run reproduces

# The paper's claims a run tests, by identifier (the report's prose for each is gallery.evaluation.render's).
TRANSFER_BEATS = "transfer_beats_baseline"                 # Table 2 generalised: every held-out task and probe
TABLE2_BEATS = "table2_beats_baseline"                     # one held-out task, one row of Table 2
WORSE_THAN_OPTIMAL = "worse_than_task_optimal_on_most_tasks"
NAMED_TASK_BETTER = "named_task_better_than_task_optimal"  # B1, B3, B11
PU_BEATS_KENDALL = "pseudo_uniform_beats_kendall"
BEATS_MAJORITY = "beats_majority_baseline_on_every_task"
HELPS_IMBALANCED = "helps_most_where_imbalanced"


@dataclass
class Finding:
    """One of the paper's claims tested by this run: what was measured (an effect with its interval, or a
    count read by a test), the reading, and the paper's figure where it gives one. Who it is about are
    fields: the model, the held-out task, the baseline arm, the Table 2 row."""

    claim: str                     # one of the identifiers above
    reading: str
    effect: Effect                 # the measured effect and its 95% interval
    paper: tuple[float, ...] | None = None   # the paper's figure(s): Table 2 (MTL, other arm), a share, an r
    model: ModelIdentity | None = None       # the trained model a claim about one weighting is about
    task: str | None = None
    baseline: EmbeddingArm | None = None     # the other arm
    row: str | None = None         # Table 2's row label
    pairs: int | None = None       # task x probe pairs an aggregate covers
    probes: tuple[str, ...] = ()   # the probes an effect rests on (gallery.evaluation.probes.PROBES)
    metric: str | None = None      # Table 2's: accuracy or MSE
    clearly_for: int | None = None       # tasks decided the claim's way (its count tests), and the other way
    clearly_against: int | None = None


def findings(card: Scorecard | None, holdouts: list[tuple[HoldoutResult, list[Table2Comparison]]],
             optimal: dict[ModelIdentity, VersusOptimal], wins: WeightingWins | None,
             baseline: dict[ModelIdentity, VersusBaseline], balance: dict[ModelIdentity, ClassBalance]) -> list[Finding]:
    """Each of the paper's claims with this run's effect and the reading of its test: the list the report
    sorts into reproduced, not resolved and contradicted. `card`: the transfer scorecard (its aggregates
    over every held-out task and probe, of the reference MTL arm); `optimal`, `baseline`, `balance`: per
    model; only the paper's two weightings have findings (its claims are about them), any other trained
    weighting is compared in the report's tables, not here."""
    optimal, baseline, balance = ({m: v for m, v in d.items() if m.weighting in PAPER_WEIGHTINGS}
                                  for d in (optimal, baseline, balance))
    mtl = [a for a in (card.aggregates if card else []) if a.arm is not None and a.arm.reference and a.probe == "all"]
    out = [Finding(TRANSFER_BEATS, a.effect.reading, a.effect, baseline=a.baseline, pairs=a.entries,
                   probes=tuple(dict.fromkeys(e.probe for e in card.entries if (e.arm, e.baseline) == (a.arm, a.baseline))))
           for a in mtl]
    for holdout, rows in holdouts:
        one_epoch = [r for r in rows[:-1] if r.fraction == 1.0]
        for row in one_epoch[-1:] + rows[-1:]:   # after one epoch of the labelled data, and after all epochs
            for versus in row.versus:
                e = versus.effect
                paper = (row.paper[0], row.paper[PAPER_COLUMNS[versus.arm.kind]]) if row.paper else None
                out.append(Finding(TABLE2_BEATS, e.reading, e, paper,
                                   task=holdout.task, baseline=versus.arm, row=row.row, probes=("head",),
                                   metric=holdout.metric))
    for m, o in optimal.items():
        out.append(Finding(WORSE_THAN_OPTIMAL, o.share_worse.reading, o.share_worse, model=m,
                           clearly_for=o.clearly_worse, clearly_against=o.clearly_better))
        out += [Finding(NAMED_TASK_BETTER, e.reading, e, model=m, task=task) for task, e in o.paper_named_tasks.items()]
    if wins:
        out.append(Finding(PU_BEATS_KENDALL, wins.share.reading, wins.share, (PAPER_PU_WINS[0] / PAPER_PU_WINS[1],),
                           clearly_for=wins.wins, clearly_against=wins.losses))
    for m, b in baseline.items():
        share = Effect(b.clearly_better / b.tasks if b.tasks else math.nan, math.nan, math.nan, None, b.tasks,
                       "tasks whose interval excludes no effect on MTL's side")
        out.append(Finding(BEATS_MAJORITY, b.reading, share, model=m, clearly_for=b.clearly_better,
                           clearly_against=b.clearly_worse))
    out += [Finding(HELPS_IMBALANCED, b.reading, b.pearson, (PAPER_BALANCE_R[m.weighting],), model=m)
            for m, b in balance.items()]
    return out


@dataclass
class HeadlineNumber:
    """One seed's number that the report follows across seeds: which measure, of what (fields), its value."""

    measure: str                   # transfer_score | transfer_error_change | median_relative_error_increase |
    value: float                   # class_balance_pearson | tasks_pseudo_uniform_beats_kendall
    task: str | None = None
    probe: str | None = None
    arm: EmbeddingArm | None = None
    baseline: EmbeddingArm | None = None
    model: ModelIdentity | None = None

    @property
    def identity(self) -> tuple:
        """What the number is of, its seed left out: the same number of every seed's repetition."""
        unseeded = lambda x: None if x is None else x.with_seed(0)  # noqa: E731
        return (self.measure, self.task, self.probe, unseeded(self.arm), unseeded(self.baseline), unseeded(self.model))


def headline_numbers(catalogue: Catalogue, training: dict[ModelIdentity, TrainResult], transfer: TransferResult,
                     optimal: dict[str, TaskOptimalResult], pooling: str, seed: int = 0) -> list[HeadlineNumber]:
    """One seed's headline numbers, for their spread across seeds (gallery.evaluation.statistics.spread);
    `pooling`: the preset's (pseudo-uniform against Kendall compares its two models)."""
    paper = paper_arms(transfer.arms)
    numbers = [HeadlineNumber("transfer_score", s.value, task=s.task, probe=s.probe, arm=s.arm)
               for s in transfer.scores if s.arm in paper]
    test_ids = set(catalogue.frame.loc[catalogue.frame["split"] == "test", "gallery_id"])
    numbers += [HeadlineNumber("transfer_error_change", a.effect.estimate, arm=a.arm, baseline=a.baseline, probe=a.probe)
                for a in scorecard(transfer, test_ids, seed).aggregates if a.arm is not None and a.arm.reference]
    rows = per_task(catalogue, training, optimal)
    for m in training if optimal else ():  # against the task-optimal models, where the run trained them
        increases = [e for e in (r.of(m).relative_error_increase.estimate for r in rows) if not math.isnan(e)]
        numbers.append(HeadlineNumber("median_relative_error_increase",
                                      float(np.median(increases)) if increases else math.nan, model=m))
        x, y = balance_points(rows, m)
        numbers.append(HeadlineNumber("class_balance_pearson", float(np.corrcoef(x, y)[0, 1]) if len(x) > 2 else math.nan,
                                      model=m))
    pair = paper_pair([m for m in training if m.pooling == pooling])
    if pair:
        numbers.append(HeadlineNumber("tasks_pseudo_uniform_beats_kendall",
                                      float(sum(r.of(pair[0]).error < r.of(pair[1]).error for r in rows))))
    return numbers
