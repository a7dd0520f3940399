"""Should model B replace model A? Everything paired on the galleries both sides embedded (and both scored),
B − A, with 95% intervals, and one stated decision rule.

- transfer: each held-out task x probe of the exported models' arms, and the aggregate error change of
  B against A (the geometric mean of error ratios, as the scorecard aggregates MTL against a baseline);
- per-task test errors of the trained tasks (the exported models' test scores);
- retrieval: each metric task's recall@10 and MRR of the exported models (float and binary search);
- neighbour stability: the overlap of each gallery's top k (gallery.compare.neighbours), and how often a
  gallery's neighbours share its label, per classification attribute, under A and under B;
- cost: training time, export time per gallery, index size.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from gallery.compare.neighbours import K, NeighbourChange, neighbour_change
from gallery.compare.sides import CompareError, Side
from gallery.evaluation.arms import MTL
from gallery.evaluation.probes import PROBES
from gallery.evaluation.scorecard import error_change, errors_of
from gallery.evaluation.statistics import Effect, paired_difference
from gallery.model.identity import ModelIdentity

TRANSFER_MARGIN = 0.02   # B may make at most 2% more transfer errors than A and still count as "not worse"
RETRIEVAL_MARGIN = 0.02  # and lose at most 0.02 of recall@10 on any metric task
RULE = (f"B replaces A when B is **not worse** (the 95% interval of its transfer error change against A stays "
        f"below +{TRANSFER_MARGIN:.0%}, and on every metric task the interval of its recall@10 difference stays "
        f"above -{RETRIEVAL_MARGIN}) **and better** somewhere (the transfer error change's interval below 0, or a "
        "recall@10 interval above 0). Not worse but not better: no clear difference (replace for other reasons, "
        "such as cost or fresher data). Worse: keep A.")
REPLACE, NO_CLEAR_DIFFERENCE, KEEP = "replace A with B", "no clear difference", "keep A"
BETTER, WORSE, TIED = "B better", "B worse", "no clear difference"
MOST_CHANGED = 10


def read(effect: Effect, better: int) -> str:
    """B − A's reading: `better` is +1 where a higher value is better (accuracy, recall), -1 where lower is."""
    side = effect.side()
    return BETTER if side == better else WORSE if side == -better else TIED


@dataclass
class SideSummary:
    source: str
    identity: ModelIdentity | None
    run_id: str | None
    galleries: int
    dim: int


@dataclass
class Paired:
    """One quantity under A and under B on the same galleries (or queries): B − A with its interval, read."""

    n: int
    value_a: float
    value_b: float
    difference: Effect
    reading: str


def paired(a: np.ndarray, b: np.ndarray, better: int, seed: int) -> Paired:
    """`better`: +1 where a higher value is better (accuracy, recall), -1 where lower is (errors, MSE)."""
    difference = paired_difference(b, a, seed)
    return Paired(len(a), float(np.mean(a)), float(np.mean(b)), difference, read(difference, better))


@dataclass
class TransferRow:
    task: str
    kind: str
    metric: str
    probe: str
    scores: Paired       # accuracy or MSE
    error_change: Effect  # B's errors / A's − 1 (< 0: B errs less): every task on one scale


@dataclass
class TaskErrorRow:
    task: str
    errors: Paired       # 1 − accuracy, or the squared error


@dataclass
class RetrievalRow:
    task: str
    search: str
    metric: str
    scores: Paired


@dataclass
class AgreementRow:
    """How often a gallery's top-k neighbours share its label: a share per labelled gallery, under A and B."""

    attribute: str
    shares: Paired


@dataclass
class Stability:
    k: int
    mean_overlap: Effect                    # mean over the galleries, bootstrap interval
    histogram: list[int]                    # galleries with overlap 0/k, 1/k, ..., k/k
    unchanged: float                        # share of galleries with the same top k
    most_changed: list[tuple[str, float]]   # (gallery id, overlap), lowest first


@dataclass
class Cost:
    train_seconds: tuple[float | None, float | None]
    export_seconds_per_gallery: tuple[float | None, float | None]
    float_index_bytes: tuple[int, int]
    code_index_bytes: tuple[int, int]


@dataclass
class Comparison:
    a: SideSummary
    b: SideSummary
    common: int
    only_a: int
    only_b: int
    notes: list[str]
    transfer: list[TransferRow]
    transfer_error_change: Effect | None    # B's errors against A's over every task x probe (< 0: B errs less)
    task_errors: list[TaskErrorRow]
    retrieval: list[RetrievalRow]
    stability: Stability
    agreement: list[AgreementRow]
    cost: Cost
    verdict: str
    reasons: list[str]
    rule: str = RULE
    seconds: float = 0.0
    overlap: np.ndarray = field(default=None, repr=False)   # per common gallery, in `common_ids` order
    common_ids: list[str] = field(default_factory=list, repr=False)


def _pair(ids_a: list[str], scores_a: np.ndarray, ids_b: list[str], scores_b: np.ndarray):
    """The scores of the galleries both lists hold, in A's order."""
    at_b = {g: i for i, g in enumerate(ids_b)}
    keep = [(i, at_b[g]) for i, g in enumerate(ids_a) if g in at_b]
    rows_a, rows_b = (np.array([k[j] for k in keep], int) for j in (0, 1))
    return [ids_a[i] for i in rows_a], np.asarray(scores_a)[rows_a], np.asarray(scores_b)[rows_b]


def compare_transfer(a, b, seed: int = 0) -> tuple[list[TransferRow], Effect | None]:
    """Every held-out task x probe both runs scored their exported model's arm on, paired per gallery."""
    arm_a, arm_b = a.reference, b.reference
    in_a = {t.name for t in a.tasks}
    rows, pairs = [], []
    for task in b.tasks:
        if task.name not in in_a:
            continue
        for probe in PROBES:
            sa, sb = a.get(task.name, probe, arm_a), b.get(task.name, probe, arm_b)
            if sa is None or sb is None:
                continue
            ids, x, y = _pair(sa.gallery_ids, sa.scores, sb.gallery_ids, sb.scores)
            if len(ids) < 2:
                continue
            rows.append(TransferRow(task.name, task.kind, task.metric, probe,
                                    paired(x, y, -1 if task.kind == "regression" else 1, seed),
                                    error_change([(task.kind, ids, y, x)], seed, "task x probe")))
            pairs.append((task.kind, ids, y, x))
    return rows, (error_change(pairs, seed, "task x probe pairs") if pairs else None)


def compare_task_errors(a: Side, b: Side, seed: int = 0) -> list[TaskErrorRow]:
    """The trained tasks' test errors of the two exported models, on the test galleries both scored."""
    rows = []
    for task in a.test.tasks:
        if task not in b.test.tasks or task not in a.task_kinds:
            continue
        ids_a, sa = a.test.task(task)
        ids_b, sb = b.test.task(task)
        ids, x, y = _pair(ids_a, sa, ids_b, sb)
        if len(ids) < 2:
            continue
        kind = a.task_kinds[task]
        rows.append(TaskErrorRow(task, paired(errors_of(kind, x), errors_of(kind, y), -1, seed)))
    return rows


def _reference_rows(result) -> list:
    return [r for r in result.rows if r.arm.kind == MTL and r.arm.reference]


def compare_retrieval(a: Side, b: Side, seed: int = 0) -> list[RetrievalRow]:
    """Each metric task's ranking quality of the two exported models, paired on the queries both asked."""
    if a.retrieval is None or b.retrieval is None:
        return []
    out = []
    for ra in _reference_rows(a.retrieval):
        rb = next((r for r in _reference_rows(b.retrieval) if (r.task, r.search) == (ra.task, ra.search)), None)
        if rb is None:
            continue
        for metric in (f"recall@{K}", "mrr"):
            if metric not in ra.scores.metrics or metric not in rb.scores.metrics:
                continue
            ids, x, y = _pair([a.ids[q] for q in ra.scores.query_rows], ra.scores.values(metric),
                              [b.ids[q] for q in rb.scores.query_rows], rb.scores.values(metric))
            if len(ids) < 2:
                continue
            out.append(RetrievalRow(ra.task, ra.search, metric, paired(x, y, 1, seed)))
    return out


def _mean_interval(values: np.ndarray, seed: int) -> Effect:
    return paired_difference(values, np.zeros_like(values), seed)  # mean − 0, the same paired bootstrap


def stability(change: NeighbourChange, ids: list[str], seed: int = 0) -> Stability:
    k = change.k
    steps = np.rint(change.overlap * k).astype(int)
    order = np.argsort(change.overlap, kind="stable")[:MOST_CHANGED]
    mean = _mean_interval(change.overlap, seed)
    return Stability(k, Effect(mean.estimate, mean.low, mean.high, None, mean.n, "bootstrap over galleries"),
                     np.bincount(steps, minlength=k + 1).tolist(), float((steps == k).mean()),
                     [(ids[i], float(change.overlap[i])) for i in order if change.overlap[i] < 1])


def agreement(a: Side, ids: list[str], change: NeighbourChange, seed: int = 0) -> list[AgreementRow]:
    """Per classification attribute of A's catalogue: each labelled gallery's share of top-k neighbours (with a
    label) that share its label, under A's neighbours and under B's."""
    at = {g: i for i, g in enumerate(a.ids)}
    rows = []
    for task in a.label_tasks:
        labels = a.labels[task.name][[at[g] for g in ids]]

        def shares(neighbours: np.ndarray) -> np.ndarray:
            theirs = np.where(neighbours >= 0, labels[np.maximum(neighbours, 0)], np.nan)
            known = ~np.isnan(theirs)
            with np.errstate(invalid="ignore"):
                return (np.where(known, theirs == labels[:, None], False).sum(1) / known.sum(1))

        x, y = shares(change.a), shares(change.b)
        keep = ~np.isnan(labels) & ~np.isnan(x) & ~np.isnan(y)
        if keep.sum() < 2:
            continue
        rows.append(AgreementRow(task.name, paired(x[keep], y[keep], 1, seed)))
    return rows


def verdict(error_change_: Effect | None, retrieval: list[RetrievalRow]) -> tuple[str, list[str]]:
    """The decision RULE states, and the reasons that decided it."""
    recall = [r for r in retrieval if r.metric == f"recall@{K}"]
    worse, better = [], []
    if error_change_ is not None and not math.isnan(error_change_.high):
        if error_change_.high >= TRANSFER_MARGIN:
            worse.append(f"transfer errors {error_change_.estimate:+.1%} [{error_change_.low:+.1%}, "
                         f"{error_change_.high:+.1%}]: the interval reaches the +{TRANSFER_MARGIN:.0%} margin")
        elif error_change_.high < 0:
            better.append(f"transfer errors {error_change_.estimate:+.1%} [{error_change_.low:+.1%}, "
                          f"{error_change_.high:+.1%}]: fewer")
    for r in recall:
        d = r.scores.difference
        what = f"{r.task} {r.search} recall@{K} {d.estimate:+.3f} [{d.low:+.3f}, {d.high:+.3f}]"
        if d.low <= -RETRIEVAL_MARGIN:
            worse.append(f"{what}: the interval reaches the -{RETRIEVAL_MARGIN} margin")
        elif d.low > 0:
            better.append(f"{what}: higher")
    if error_change_ is None and not recall:
        return NO_CLEAR_DIFFERENCE, ["nothing both sides measured decides it (no transfer or retrieval scores: "
                                     "model folders carry none; compare runs)"]
    if worse:
        return KEEP, worse
    if better:
        return REPLACE, better
    return NO_CLEAR_DIFFERENCE, ["B is not worse beyond the margins, and not clearly better anywhere"]


def compare(a: Side, b: Side, k: int = K, seed: int = 0) -> Comparison:
    """B against A on the galleries both embedded (an error when there are none)."""
    started = time.perf_counter()
    in_b = set(b.ids)
    ids = [g for g in a.ids if g in in_b]
    if len(ids) < 2:
        raise CompareError(f"{a.embeddings_location} and {b.embeddings_location} share {len(ids)} galleries: a "
                           "comparison needs the same galleries embedded by both models (two runs of one catalogue)")
    notes = []
    if len(ids) < max(len(a.ids), len(b.ids)):
        notes.append(f"The two sides embedded different galleries: compared on the {len(ids):,} both hold "
                     f"({len(a.ids) - len(ids):,} only in A, {len(b.ids) - len(ids):,} only in B).")
    at_a, at_b = {g: i for i, g in enumerate(a.ids)}, {g: i for i, g in enumerate(b.ids)}
    moved = sum(a.splits[at_a[g]] != b.splits[at_b[g]] for g in ids)
    if moved:  # scores pair on the galleries scored in both runs: those neither model trained on
        notes.append(f"{moved:,} common galleries are in different splits in A and B: transfer and test scores "
                     "pair only on the galleries that are scored (not trained on) in both.")
    change = neighbour_change(a.vectors[[at_a[g] for g in ids]], b.vectors[[at_b[g] for g in ids]], k)
    transfer, change_of_errors = (compare_transfer(a.transfer, b.transfer, seed) if a.transfer and b.transfer
                                  else ([], None))
    if not transfer:
        notes.append("No transfer scores to pair: " + ("a side is a model folder (its run's report holds them)"
                                                       if not (a.transfer and b.transfer) else
                                                       "the runs share no held-out task scored on common galleries"))
    task_errors = compare_task_errors(a, b, seed) if a.test is not None and b.test is not None else []
    retrieval = compare_retrieval(a, b, seed)
    n = len(ids)
    cost = Cost((a.train_seconds, b.train_seconds), (a.embed_seconds_per_gallery, b.embed_seconds_per_gallery),
                (n * a.dim * 4, n * b.dim * 4), (n * a.code_bytes, n * b.code_bytes))
    decision, reasons = verdict(change_of_errors, retrieval)
    return Comparison(SideSummary(a.source, a.identity, a.run_id, len(a.ids), a.dim),
                      SideSummary(b.source, b.identity, b.run_id, len(b.ids), b.dim), n, len(a.ids) - n,
                      len(b.ids) - n, notes, transfer, change_of_errors, task_errors, retrieval,
                      stability(change, ids, seed), agreement(a, ids, change, seed), cost, decision, reasons,
                      seconds=time.perf_counter() - started, overlap=change.overlap, common_ids=ids)
