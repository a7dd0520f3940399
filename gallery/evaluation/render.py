"""The run report laid out (see docs/design.md, "Evaluation protocol"): markdown tables, figures, CSVs and
metrics.json from a computed gallery.evaluation.report.ReportData, in reading order, held by a Report
for report.md and the run's card."""
from __future__ import annotations

import json
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

import gallery.storage as storage  # noqa: E402
from gallery.data.images import DataQuality  # noqa: E402
import gallery.evaluation.comparisons as comparisons  # noqa: E402
from gallery.evaluation.arms import (END_TO_END_ARM, IMAGENET_ARM, MTL, arm_columns, arm_label,  # noqa: E402
                                     paper_arms)
from gallery.evaluation.comparisons import (PAPER_BALANCE_R, PAPER_PU_WINS, PAPER_TIME_PER_INSTANCE,  # noqa: E402
                                            ClassBalance, Finding, HeadlineNumber, Table2Comparison, TaskRow,
                                            VersusBaseline, VersusOptimal, WeightingWins, beside_the_paper, paper_code,
                                            paper_row)
from gallery.evaluation.gallery_scores import score_files  # noqa: E402
from gallery.faults import reached  # noqa: E402
from gallery.evaluation.holdout import HoldoutResult, chosen_text  # noqa: E402
from gallery.evaluation.neighbours import SEARCHES, BinaryVsFloat  # noqa: E402
from gallery.evaluation.probes import PROBES  # noqa: E402
from gallery.evaluation.projection import projection_figure  # noqa: E402
from gallery.evaluation.report import ReportData, SeedSpread, metrics  # noqa: E402
from gallery.evaluation.retrieval_examples import retrieval_figure  # noqa: E402
from gallery.evaluation.retrieval_suite import (BINARY, FLOAT, LOSES_NOTHING, NON_INFERIORITY,  # noqa: E402
                                               RetrievalResult)
from gallery.evaluation.scorecard import Scorecard  # noqa: E402
from gallery.evaluation.study import BETTER, STUDY_PROBES, CellRanking  # noqa: E402
from gallery.evaluation.transfer import TransferResult  # noqa: E402
from gallery.evaluation.statistics import CONSISTENT, NOISE, OPPOSITE, Effect, effect_text  # noqa: E402
from gallery.model.identity import ModelIdentity  # noqa: E402
from gallery.training.engine import TrainResult  # noqa: E402


def training_curves(training: dict[ModelIdentity, TrainResult]):
    """Per model, train and validation loss per epoch, each task's loss relative to its first epoch
    and averaged over tasks: unweighted, so the weightings' curves compare (valid: what early stopping watches)."""
    columns = min(len(training), 4)
    rows = -(-len(training) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.5 * rows), squeeze=False)
    for ax in axes.flat[len(training):]:
        ax.set_visible(False)
    for ax, (model, result) in zip(axes.flat, training.items()):
        epochs = [h.epoch + 1 for h in result.history]
        first = np.array(list(result.history[0].train_task_losses.values()), float)
        train = [np.nanmean(np.array(list(h.train_task_losses.values()), float) / first) for h in result.history]
        ax.plot(epochs, train, marker="o", label="train")
        ax.plot(epochs, [h.valid_criterion[0] for h in result.history], marker="o", label="valid")
        ax.axvline(result.best_epoch + 1, color="grey", linestyle=":", label="selected (valid)")
        ax.set(title=model.label(), xlabel="epoch", ylabel="mean task loss / first epoch's")
        ax.legend()
    fig.tight_layout()
    return fig


def quality_markdown(quality: DataQuality, limit: int = 20) -> str:
    lines = [f"**Data quality:** {quality.summary()}"]
    if quality.skipped:
        lines += ["", "| gallery | image | reason |", "| --- | --- | --- |"]
        lines += [f"| {s.gallery_id} | {s.image} | {s.reason} |" for s in quality.skipped[:limit]]
        if len(quality.skipped) > limit:
            lines.append(f"| ... | {len(quality.skipped) - limit} more | |")
    if quality.excluded:
        lines += ["", f"Excluded galleries (no readable image): {', '.join(quality.excluded[:limit])}"
                  + (f" ... and {len(quality.excluded) - limit} more" if len(quality.excluded) > limit else "")]
    return "\n".join(lines)


def training_markdown(training: dict[ModelIdentity, TrainResult]) -> str:
    lines = ["| weighting | epochs | selected epoch (valid) | valid relative loss there | stopped early | "
             "galleries/s (last epoch) |", "| --- | --- | --- | --- | --- | --- |"]
    for model, r in training.items():
        lines.append(f"| {model.label()} | {len(r.history)} | {r.best_epoch + 1} | {r.best_criterion:.4f} | "
                     f"{'yes' if r.stopped_early[0] else 'no'} | {r.history[-1].galleries_per_s:,.1f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- the run report (docs/design.md §7)

class Report:
    """Ordered blocks (markdown text or a PNG by name) rendered to report.md and to the card."""

    def __init__(self):
        self.blocks: list[tuple[str, str]] = []
        self.files: dict[str, bytes] = {}
        self.metrics: dict = {}

    def text(self, markdown: str) -> None:
        self.blocks.append(("md", markdown))

    def figure(self, name: str, fig, caption: str) -> None:
        import io

        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110)
        plt.close(fig)
        self.files[name] = buffer.getvalue()
        self.blocks.append(("png", name))
        self.blocks.append(("md", f"*{caption}*"))

    def table(self, name: str, frame: pd.DataFrame) -> None:
        self.files[name] = frame.to_csv(index=False).encode()

    def markdown(self) -> str:
        return "\n\n".join(f"![{c}]({c})" if kind == "png" else c for kind, c in self.blocks) + "\n"


def fmt(x, digits=3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.{digits}f}"


def table2_frame(holdout: HoldoutResult) -> pd.DataFrame:
    """Long format: one row per (row label, arm), plus the baseline."""
    rows = [{"holdout_task": holdout.task, "row": r.label, **arm_columns(result.arm), "metric": holdout.metric,
             "split": holdout.split, "value": r.value, "ci_low": r.ci_low, "ci_high": r.ci_high,
             "galleries_seen": r.galleries_seen}
            for result in holdout.arms for r in result.rows]
    rows.append({"holdout_task": holdout.task, "row": "baseline", "arm": "majority" if holdout.metric == "accuracy"
                 else "mean", "metric": holdout.metric, "split": holdout.split, "value": holdout.baseline, "ci_low": None,
                 "ci_high": None, "galleries_seen": holdout.train_galleries})
    return pd.DataFrame(rows)


def table2_markdown(holdout: HoldoutResult, primary_task: str | None) -> str:
    """The arms' metric per row with 95% intervals; the paper's column only beside rows that mean what
    its rows mean (a fraction of the first epoch, or 4 epochs) and only for the primary task's accuracy
    (gallery.evaluation.comparisons.beside_the_paper)."""
    arms = paper_arms([a.arm for a in holdout.arms])  # the paper's three
    paper = beside_the_paper(holdout, primary_task)
    head = "| data seen | " + " | ".join(arm_label(a) for a in arms) + (" | paper (MTL / ImageNet / end-to-end) |" if paper else " |")
    lines = [head, "|" + " --- |" * (len(arms) + 1 + paper)]
    for i, first in enumerate(holdout.of(arms[0]).rows):
        cells = [f"{first.label} ({first.galleries_seen} galleries)"]
        for arm in arms:
            r = holdout.of(arm).rows[i]
            ci = f" [{fmt(r.ci_low, 2)}, {fmt(r.ci_high, 2)}]" if r.ci_low is not None else ""
            cells.append(f"{fmt(r.value)}{ci}")
        if paper:
            figures = paper_row(first)
            cells.append(" / ".join(f"{v:.3f}" for v in figures) if figures else "(no row of the paper means this)")
        lines.append("| " + " | ".join(cells) + " |")
    end = " | |" if paper else " |"
    base = "majority class" if holdout.metric == "accuracy" else "train mean"
    lines.append(f"| {base} baseline | " + " | ".join(fmt(holdout.baseline) for _ in arms) + end)
    lines.append("| training time per instance, training steps as the arm runs them | " + " | ".join(
        _ms(holdout.of(a).seconds_per_instance) for a in arms)
        + (f" | {PAPER_TIME_PER_INSTANCE['mtl']} / - / {PAPER_TIME_PER_INSTANCE['end_to_end']} |" if paper else " |"))
    if holdout.has(END_TO_END_ARM):
        lines.append("| training time per instance from pixels, every layer of the model | - | - | "
                     + _ms(holdout.of(END_TO_END_ARM).seconds_per_instance_from_pixels) + end)
    lines.append(f"| total training time, all {len(holdout.grid)} grid points | "
                 + " | ".join(f"{holdout.of(a).train_seconds:.1f} s" for a in arms)
                 + (" | 4 h (CPU) / - / 40 h (GPU) |" if paper else " |"))
    lines.append("| learning rate, weight decay chosen (folds) | " + " | ".join(chosen_text(holdout.of(a).chosen)
                                                                          for a in arms) + end)
    return "\n".join(lines)


def tuning_markdown(holdouts: list[HoldoutResult]) -> str:
    """The grid every arm's 2-layer head (and the end-to-end model, where it ran) was tuned on, the rule, and what each
    arm chose on each held-out task."""
    if not holdouts or not holdouts[0].grid:
        return ""
    grid = holdouts[0].grid
    lrs, decays = (sorted({getattr(g, k) for g in grid}) for k in ("lr", "weight_decay"))
    arms = [a.arm for a in holdouts[0].arms]
    lines = [f"Every arm's 2-layer head{', and the end-to-end model,' if END_TO_END_ARM in arms else ''} trained once per learning rate "
             f"({', '.join(f'{v:g}' for v in lrs)}) x weight decay ({', '.join(f'{v:g}' for v in decays)}), "
             "inputs standardised on the train galleries; each fold of the scored galleries is scored, in every "
             "row, with the point that did best after all epochs on the other folds. Chosen (folds):", "",
             "| held-out task | " + " | ".join(arm_label(a) for a in arms) + " |", "|" + " --- |" * (1 + len(arms))]
    lines += [f"| `{h.task}` | " + " | ".join(chosen_text(h.of(a).chosen) if h.has(a) else "-" for a in arms) + " |"
              for h in holdouts]
    return "\n".join(lines)


def _ms(seconds) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.2f} ms"


def paired_markdown(holdout: HoldoutResult, rows: list[Table2Comparison]) -> str:
    """MTL minus each other arm, row by row, on the same test galleries: the difference, its paired
    bootstrap interval, McNemar's p (right/wrong answers) and the reading against the paper."""
    columns = {IMAGENET_ARM: "MTL - ImageNet transfer", END_TO_END_ARM: "MTL - end-to-end"}
    others = [a for a in columns if rows and rows[0].against(a) is not None]  # end-to-end: where the run has it
    lines = ["| data seen | " + " | ".join(f"{columns[a]} | reading" for a in others) + " |",
             "|" + " --- |" * (1 + 2 * len(others))]
    for r in rows:
        lines.append(f"| {r.row} | " + " | ".join(f"{effect_text(e)} | {e.reading}"
                                                  for e in (r.against(a) for a in others)) + " |")
    better = "higher" if holdout.metric == "accuracy" else "lower"
    method = rows[-1].against(IMAGENET_ARM).method if rows else ""
    return "\n".join(lines) + (f"\n\nDifferences in {holdout.metric} with 95% intervals ({method}); "
                               f"the paper's direction: MTL {better}.")


def table2_reading(holdout: HoldoutResult, rows: list[Table2Comparison], primary_task: str | None) -> str:
    imagenet, end_to_end = rows[-1].against(IMAGENET_ARM), rows[-1].against(END_TO_END_ARM)
    text = (f"After all epochs, MTL - ImageNet transfer = {effect_text(imagenet)}: {imagenet.reading}; "
            + (f"MTL - end-to-end = {effect_text(end_to_end)}: {end_to_end.reading}." if end_to_end is not None
               else "no end-to-end arm (evaluation.end_to_end is off)."))
    if beside_the_paper(holdout, primary_task):
        text += (" The paper (star rating, 250k properties, 4 epochs): MTL 0.631, ImageNet 0.542, end-to-end 0.598; "
                 f"here {holdout.scored_galleries} labelled galleries no model trained on decide it.")
    return text


def _interval(effect: Effect) -> Effect:
    """An interval as the per-task table shows it: the estimate and its bounds."""
    return Effect(effect.estimate, effect.low, effect.high)


def per_task_markdown(table: list[TaskRow], models: list[ModelIdentity], optimal: bool = True) -> str:
    """Each MTL task's test errors; with `optimal`, its task-optimal model's and each model's increase over it."""
    cols = ["task", "kind", "test labelled", "baseline error"] + (["task-optimal error (epochs)"] if optimal else [])
    cols += [f"{m.label()} error" for m in models]
    cols += [f"{m.label()} relative error increase [95% CI]" for m in models] if optimal else []
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for r in table:
        cells = [r.task, r.kind, str(r.test_labelled), fmt(r.error_baseline)]
        cells += [f"{fmt(r.error_task_optimal)} ({fmt(r.task_optimal_epochs, 0)})"] if optimal else []
        cells += [fmt(r.of(m).error) for m in models]
        cells += [effect_text(_interval(r.of(m).relative_error_increase), 2) for m in models] if optimal else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_task_frame(table: list[TaskRow]) -> pd.DataFrame:
    """per_task.csv: one row per MTL task; each model's columns named by its label (made from its fields)."""
    rows = []
    for r in table:
        row = {"task": r.task, "kind": r.kind, "minority_fraction": r.minority_fraction, "test_labelled": r.test_labelled,
               "error_task_optimal": r.error_task_optimal, "error_baseline": r.error_baseline,
               "task_optimal_epochs": r.task_optimal_epochs}
        for m in r.models:
            name = m.model.label()
            row[f"error_{name}"] = m.error
            for column, e in ((f"relative_error_increase_{name}", m.relative_error_increase),
                              (f"baseline_minus_{name}", m.baseline_minus)):
                row[column], row[f"{column}_low"], row[f"{column}_high"] = e.estimate, e.low, e.high
        rows.append(row)
    return pd.DataFrame(rows)


def figure5_markdown(vs_optimal: dict[ModelIdentity, VersusOptimal], wins: WeightingWins | None,
                     vs_baseline: dict[ModelIdentity, VersusBaseline]) -> str:
    lines = []
    for m, o in vs_optimal.items():
        w, s = m.label(), o.share_worse
        lines.append(f"MTL ({w}) has the higher error on {effect_text(s, percent=True)} of the {s.n} tasks where the "
                     f"errors differ (sign test; the paper: worse on most tasks): {s.reading}. Intervals: clearly worse "
                     f"on {o.clearly_worse}, clearly better on {o.clearly_better}, not distinguishable on "
                     f"{o.not_distinguishable}.")
        lines += [f"`{t}` under {w}: relative error increase {effect_text(e, 2)} (the paper: better under MTL): {e.reading}."
                  for t, e in o.paper_named_tasks.items()]
    if wins:
        lines.append(f"Pseudo-uniform has the lower error on {wins.wins} tasks, Kendall on {wins.losses} ({wins.ties} "
                     f"ties); share {effect_text(wins.share, percent=True)} (sign test; the paper: {PAPER_PU_WINS[0]} of "
                     f"{PAPER_PU_WINS[1]}, 71%): {wins.share.reading}.")
    for m, b in vs_baseline.items():
        lines.append(f"MTL ({m.label()}) against the majority/mean baseline: clearly better on {b.clearly_better} of "
                     f"{b.tasks} tasks, clearly worse on {b.clearly_worse} (the paper: better on every task): {b.reading}.")
    return "\n".join(f"- {line}" for line in lines)


def figure6_markdown(balance: dict[ModelIdentity, ClassBalance]) -> str:
    def paper(m: ModelIdentity) -> str:
        return (f"the paper: r = {PAPER_BALANCE_R[m.weighting]:.2f}, p < .001" if m.weighting in PAPER_BALANCE_R
                else "not in the paper")

    return "\n".join(
        f"- {m.label()}: Pearson r = {effect_text(b.pearson, 2)}; Spearman rho = {effect_text(b.spearman, 2)}; over "
        f"{b.n} binary tasks ({paper(m)}): {b.reading}."
        for m, b in balance.items())


def finding_sentence(f: Finding) -> tuple[str, str, str]:
    """A finding in words: the claim, what this run measured, and what the paper says."""
    arm = "" if f.baseline is None else "an end-to-end model" if f.baseline == END_TO_END_ARM else arm_label(f.baseline)
    model = f.model.label() if f.model else ""
    if f.claim == comparisons.TRANSFER_BEATS:
        return (f"Across the held-out tasks, MTL embeddings transfer better than {arm_label(f.baseline)}",
                f"errors change by {effect_text(f.effect, change=True)} over {f.pairs} task x probe pairs "
                f"(geometric mean of the error ratios; {', '.join(PROBES[p] for p in f.probes)})",
                "MTL embeddings beat ImageNet features and an end-to-end model (Table 2, one task)")
    if f.claim == comparisons.TABLE2_BEATS:
        paper = (f"{f.paper[0]:.3f} vs {f.paper[1]:.3f} star-rating accuracy at this row (Table 2)" if f.paper
                 else "MTL embeddings best at every row of Table 2")
        return (f"On a new task (`{f.task}`), MTL embeddings beat {arm} ({f.row})",
                f"test {f.metric} difference {effect_text(f.effect)} ({', '.join(PROBES[p] for p in f.probes)})", paper)
    if f.claim == comparisons.WORSE_THAN_OPTIMAL:
        e = f.effect
        return (f"MTL ({model}) is worse than task-optimal models on most tasks",
                f"worse on {e.estimate:.0%} [{e.low:.0%}, {e.high:.0%}] of {e.n} tasks; clearly worse on "
                f"{f.clearly_for}, clearly better on {f.clearly_against}",
                "\"most tasks understandably show inferior predictive performance\" (§4.2)")
    if f.claim == comparisons.NAMED_TASK_BETTER:
        return (f"`{f.task}` does better under MTL ({model}) than its task-optimal model",
                f"relative error increase {effect_text(f.effect, 2)}",
                "\"tasks B1, B3 and B11 perform better than the optimal models\" (§4.2)")
    if f.claim == comparisons.PU_BEATS_KENDALL:
        return ("Pseudo-uniform weighting beats Kendall's on most tasks",
                f"{f.clearly_for} of {f.clearly_for + f.clearly_against} decided tasks ({effect_text(f.effect, percent=True)}; sign test)",
                f"{PAPER_PU_WINS[0]} out of {PAPER_PU_WINS[1]} tasks ({f.paper[0]:.0%}) (§4.2)")
    if f.claim == comparisons.BEATS_MAJORITY:
        return (f"MTL ({model}) beats the majority/mean baseline on every task",
                f"clearly better on {f.clearly_for} of {f.effect.n} tasks, clearly worse on {f.clearly_against}",
                "\"significantly outperform basic benchmarks ... across every single task\" (§4.2)")
    if f.claim == comparisons.HELPS_IMBALANCED:
        return (f"MTL ({model}) helps most where classes are most imbalanced",
                f"r = {effect_text(f.effect, 2)} over {f.effect.n} binary tasks",
                f"Pearson's r = {f.paper[0]:.2f} (p < .001) (Figure 6)")
    raise ValueError(f"no words for the finding {f.claim!r}")


def findings_markdown(found: list[Finding]) -> str:
    """The paper's findings sorted by what this run's tests say about them."""
    out = []
    for verdict, title in ((CONSISTENT, "Reproduced here"), (NOISE, "Not resolved by this run (the interval includes no effect)"),
                           (OPPOSITE, "Opposite here")):
        rows = [f for f in found if f.reading == verdict]
        out.append(f"**{title}** ({len(rows)})" + ("" if rows else ": none"))
        for f in rows:
            claim, here, paper = finding_sentence(f)
            out.append(f"- {claim}: here {here}; paper {paper}")
        out.append("")
    return "\n".join(out).strip()


MEASURES = {"transfer_score": "held-out score", "transfer_error_change": "change of errors (aggregate)",
            "median_relative_error_increase": "median relative error increase vs task-optimal",
            "class_balance_pearson": "Pearson r, class balance vs relative error increase",
            "tasks_pseudo_uniform_beats_kendall": "tasks where pseudo-uniform beats Kendall"}


def headline_label(n: HeadlineNumber) -> str:
    """A headline number's name as a reader reads it."""
    parts = [MEASURES[n.measure]]
    if n.task:
        parts.append(f"`{n.task}`")
    if n.probe:
        parts.append("all probes" if n.probe == "all" else PROBES[n.probe])
    if n.arm:
        parts.append(arm_label(n.arm) + (f" vs {arm_label(n.baseline)}" if n.baseline else ""))
    if n.model:
        parts.append(n.model.label())
    return ", ".join(parts)


def seeds_markdown(numbers: list[SeedSpread]) -> str:
    """Mean and spread across seeds of each headline number."""
    lines = ["| number | mean | sd | min | max |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {headline_label(n.number)} | {fmt(n.spread.mean)} | {fmt(n.spread.sd)} | {fmt(n.spread.min)} | "
              f"{fmt(n.spread.max)} |" for n in numbers]
    return "\n".join(lines)


SEARCH_LABELS = {"hamming": "Hamming only", "two_stage": "two-stage"}


def binary_markdown(b: BinaryVsFloat) -> str:
    """The run's code against float search, the recall/size curve over codes, and attribute agreement."""
    k, ratio = b.k, b.float_bytes // b.code_bytes
    attributes = list(b.agreement)
    lines = [f"Queries: the {b.queries} test galleries; neighbours: their top {k} among all galleries, by exact "
             f"search. Codes are fitted on the train split; the run's code, `{b.code}`, binarized the export "
             f"(`embedding_bits`). Two-stage search takes the top {b.rerank} galleries by Hamming distance and "
             "orders them by exact cosine on the float vectors.", "",
             f"- recall@{k} of the run's code against float search: **{b.recall_two_stage:.3f}** two-stage, "
             f"{b.recall_hamming:.3f} by Hamming distance alone (candidate index: {b.code_bytes} bytes "
             f"per gallery instead of {b.float_bytes}, {ratio}x smaller)", "",
             f"| code | bytes per gallery | smaller than float32 | recall@{k} Hamming | recall@{k} two-stage | "
             + " | ".join(f"{a} agreement (Hamming / two-stage)" for a in attributes) + " |",
             "|" + " --- |" * (5 + len(attributes))]
    for row in b.curve:
        if row.skipped:
            lines.append(f"| {row.code} | not fitted here: {row.skipped} |" + " |" * (3 + len(attributes)))
            continue
        agreement = [" / ".join(fmt(row.agreement[a][kind]) for kind in SEARCHES) for a in attributes]
        lines.append(f"| {row.code} ({row.bits} bits) | {row.bytes_per_gallery} | "
                     f"{b.float_bytes / row.bytes_per_gallery:.0f}x | {fmt(row.recall['hamming'])} | "
                     f"{fmt(row.recall['two_stage'])} | " + " | ".join(agreement) + " |")
    lines.append(f"| float32 (reference) | {b.float_bytes} | 1x | 1.000 | 1.000 | "
                 + " | ".join(fmt(b.agreement[a]["float"]) for a in attributes) + " |")
    kinds = {"float": "MTL, float (cosine)", "binary": f"MTL, `{b.code}` two-stage", "imagenet_float": "ImageNet transfer, float"}
    lines += ["", f"Share of the top {k} neighbours with the query's attribute:", "",
              "| attribute | " + " | ".join(kinds.values()) + " |", "|" + " --- |" * (len(kinds) + 1)]
    for name, values in b.agreement.items():
        lines.append(f"| {name} | " + " | ".join(fmt(values[kind]) for kind in kinds) + " |")
    change = np.nanmean([v["binary"] - v["float"] for v in b.agreement.values()] or [np.nan])
    lines += ["", f"Pinterest reports binarized embeddings without loss of precision and recall. Here two-stage search "
              f"with {b.code_bytes}-byte codes returns {b.recall_two_stage:.1%} of the float top {k} "
              f"(Hamming distance alone: {b.recall_hamming:.1%}), and the neighbours' attribute agreement "
              f"changes by {change:+.3f} on average: their quality {'holds' if abs(change) < 0.03 else 'changes'}."]
    return "\n".join(lines)


def code_curve_figure(b: BinaryVsFloat):
    """Recall@k against float search and mean attribute agreement, against bytes per gallery, for pure
    Hamming and two-stage search; ITQ codes joined by lines, the per-dimension codes as single points."""
    rows = [r for r in b.curve if not r.skipped]
    fig, (recall, agreement) = plt.subplots(1, 2, figsize=(10, 3.8))
    for (kind, label), colour in zip(SEARCH_LABELS.items(), ("tab:blue", "tab:orange")):
        for ax, value in ((recall, lambda r: r.recall[kind]),
                          (agreement, lambda r: np.nanmean([v[kind] for v in r.agreement.values()]))):
            itq = sorted((r for r in rows if r.code.startswith("itq")), key=lambda r: r.bytes_per_gallery)
            ax.plot([r.bytes_per_gallery for r in itq], [value(r) for r in itq], "-o", color=colour, label=label)
            for r in rows:
                ax.plot(r.bytes_per_gallery, value(r), "o" if r.code.startswith("itq") else "s", color=colour)
                ax.annotate(r.code, (r.bytes_per_gallery, value(r)), fontsize=7, xytext=(3, 3), textcoords="offset points")
    float_agreement = np.nanmean([v["float"] for v in b.agreement.values()])
    recall.axhline(1.0, color="grey", linestyle=":", label="float32 (reference)")
    agreement.axhline(float_agreement, color="grey", linestyle=":", label="float32")
    recall.set(ylabel=f"recall@{b.k} against float search", title="Neighbours kept")
    agreement.set(ylabel=f"top-{b.k} attribute agreement (mean)", title="Neighbour quality")
    for ax in (recall, agreement):
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"bytes per gallery (float32: {b.float_bytes})")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def code_curve_frame(b: BinaryVsFloat) -> pd.DataFrame:
    """The curve as a table: one row per code and search."""
    return pd.DataFrame([{"code": r.code, "bits": r.bits, "bytes_per_gallery": r.bytes_per_gallery,
                          "search": kind, "recall_at_k": r.recall[kind],
                          **{f"agreement_{a}": v[kind] for a, v in r.agreement.items()}}
                         for r in b.curve if not r.skipped for kind in SEARCHES])


def relative_error_figure(table: list[TaskRow], models: list[ModelIdentity]):
    """Figure 5: relative error increase per task and model, with its 95% interval."""
    fig, ax = plt.subplots(figsize=(max(6, 0.32 * len(table)), 4))
    x = np.arange(len(table))
    width = 0.8 / len(models)
    for k, m in enumerate(models):
        effects = [r.of(m).relative_error_increase for r in table]
        estimate = np.array([e.estimate for e in effects], float)
        low, high = np.array([e.low for e in effects], float), np.array([e.high for e in effects], float)
        ax.bar(x + k * width, estimate, width, label=m.label())
        ax.errorbar(x + k * width, estimate, yerr=[np.clip(estimate - low, 0, None), np.clip(high - estimate, 0, None)],
                    fmt="none", ecolor="black", elinewidth=0.6, capsize=1.5)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(x + width * (len(models) - 1) / 2, [paper_code(r.task) for r in table], rotation=90, fontsize=7)
    ax.set(ylabel="relative error increase vs task-optimal", title="MTL vs task-optimal models (below 0: MTL better; 95% CI)")
    ax.legend()
    fig.tight_layout()
    return fig


def class_balance_figure(table: list[TaskRow], balance: dict[ModelIdentity, ClassBalance]):
    fig, ax = plt.subplots(figsize=(5.5, 4))
    binary = [r for r in table if r.kind == "binary"]
    minority = np.array([r.minority_fraction for r in binary], float)
    for m, fit in balance.items():
        r = fit.pearson
        points = ax.scatter(minority, [row.of(m).relative_error_increase.estimate for row in binary], s=18,
                            label=f"{m.label()} (r={fmt(r.estimate, 2)} [{fmt(r.low, 2)}, {fmt(r.high, 2)}])")
        if not np.isnan(fit.slope):
            xs = np.linspace(np.nanmin(minority), np.nanmax(minority), 10)
            ax.plot(xs, fit.intercept + fit.slope * xs, color=points.get_facecolor()[0])
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set(xlabel="class balance (minority-class fraction)", ylabel="relative error increase (test)",
           title="Class balance vs MTL benefit (binary tasks)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- the transfer scorecard

COST_PARTS = {"head": "2-layer heads (training, every grid point)", "end_to_end": "end-to-end (training, every grid point)",
              "head_and_end_to_end_with_scoring": "heads and end-to-end with their scoring", "linear": "linear probes",
              "knn": "k-NN probes", "arm_embeddings": "embeddings of every arm"}


def scorecard_markdown(card: Scorecard, transfer: TransferResult) -> str:
    """Per held-out task and probe: each arm's metric, then MTL minus ImageNet (and the other baselines)
    with interval and reading; the aggregates over tasks; what each part cost."""
    baselines = [a for a in transfer.arms if a.kind != MTL]
    mtl = transfer.reference
    head = ("| held-out task | probe | n | " + " | ".join(arm_label(a) for a in transfer.arms)
            + " | " + " | ".join(f"MTL - {arm_label(b)}: difference [95% CI], reading" for b in baselines) + " |")
    lines = [head, "|" + " --- |" * (3 + len(transfer.arms) + len(baselines))]
    for task in transfer.tasks:
        for probe in PROBES:
            here = {a: transfer.get(task.name, probe, a) for a in transfer.arms}
            if here.get(mtl) is None:
                continue
            cells = [f"`{task.name}` ({task.metric})", PROBES[probe], str(len(here[mtl].scores))]
            cells += [fmt(s.value) if s is not None else "-" for s in here.values()]
            for b in baselines:
                e = next((e for e in card.entries if (e.task, e.probe, e.arm, e.baseline) == (task.name, probe, mtl, b)), None)
                cells.append(f"{effect_text(e.difference)}: {e.difference.reading}" if e else "-")
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| MTL arm | against | probes | task x probe pairs | change of errors (geometric mean) [95% CI] | reading |",
              "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {arm_label(a.arm)} | {arm_label(a.baseline)} | {'all' if a.probe == 'all' else PROBES[a.probe]} | "
              f"{a.entries} | {effect_text(a.effect, change=True)} | {a.effect.reading} |" for a in card.aggregates]
    text = "\n".join(lines) + ("\n\nThe aggregate is the geometric mean of the error ratios MTL / baseline over the task x "
                               "probe pairs, as a change (-10%: a tenth fewer errors): unlike a mean of relative "
                               "reductions, it cannot be dominated by a task the baseline almost never gets wrong.")
    if card.primary:
        p = card.primary
        half = (p.difference.high - p.difference.low) / 2
        text += (f"\n\n**Primary comparison** (`{p.task}`, {PROBES[p.probe]}): MTL - ImageNet = "
                 f"{effect_text(p.difference)} {p.metric}, a 95% interval of half-width {half:.3f} over {p.n} galleries: "
                 f"{p.difference.reading}. On the test galleries alone: {effect_text(p.difference_on_test)}.")
    cost = ", ".join(f"{COST_PARTS.get(part, part)} {seconds:.1f} s" for part, seconds in transfer.seconds.items())
    text += f"\n\nCost of the suite: {cost}."
    return text + "".join(f"\n\n{note}" for note in transfer.notes)


CLAIMS = {"unified_beats_specialised": "unified beats the specialised model",
          "unified_beats_attributes_only": "unified beats attributes only",
          "unified_beats_imagenet": "unified beats ImageNet features",
          "unified_beats_pretrained": "unified beats a pretrained backbone",
          "unified_beats_another_mtl_model": "unified beats another MTL model",
          LOSES_NOTHING: "binarised loses nothing"}


def retrieval_markdown(result: RetrievalResult) -> str:
    """Per metric task, every arm's recall@k and MRR by float and binary search; then Pinterest's claims
    with their paired intervals and readings."""
    lines = []
    metrics = list(result.rows[0].means) if result.rows else []
    for task in result.tasks:
        lines += [f"**`{task}`** ({result.queries[task]} queries)", "",
                  "| arm | " + " | ".join(f"{m} float" for m in metrics) + " | "
                  + " | ".join(f"{m} binary" for m in metrics) + " |",
                  "|" + " --- |" * (1 + 2 * len(metrics))]
        for arm in result.arms:
            cells = [fmt(result.row(arm, task, search).means[m]) for search in (FLOAT, BINARY) for m in metrics]
            lines.append(f"| {arm_label(arm)} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["| claim (Pinterest) | task | metric | difference [95% CI] | reading |", "| --- | --- | --- | --- | --- |"]
    def terms(c) -> str:
        return (f"{arm_label(c.arm)}: binary - float" if c.claim == LOSES_NOTHING
                else f"{arm_label(c.arm)} - {arm_label(c.baseline)}")

    lines += [f"| {CLAIMS[c.claim]} ({terms(c)}) | `{c.task}` | {c.metric} | {effect_text(c.effect)} | {c.effect.reading} |"
              for c in result.claims]
    return "\n".join(lines)


def retrieval_headline(result: RetrievalResult) -> str:
    """The scorecard's summary line for retrieval: unified against specialised, and binarised, at recall@10."""
    parts = [f"`{c.task}` {CLAIMS[c.claim]} {effect_text(c.effect)} ({c.effect.reading})"
             for c in result.claims if c.metric == "recall@10"
             and c.claim in ("unified_beats_specialised", LOSES_NOTHING)]
    return "**Retrieval** (recall@10, paired over the same queries): " + "; ".join(parts) + "." if parts else ""


def retrieval_frames(result: RetrievalResult) -> tuple[pd.DataFrame, pd.DataFrame]:
    """retrieval.csv (arm x task x search x metric means) and retrieval_claims.csv."""
    means = pd.DataFrame([{**arm_columns(r.arm), "task": r.task, "search": r.search, "queries": result.queries[r.task],
                           "metric": m, "mean": v} for r in result.rows for m, v in r.means.items()])
    claims = pd.DataFrame([{"claim": c.claim, "task": c.task, "metric": c.metric, **arm_columns(c.arm),
                            **arm_columns(c.baseline, "baseline"),
                            "search": c.search, **vars(c.effect)} for c in result.claims])
    return means, claims


def scorecard_figure(card: Scorecard):
    """The change of the MTL embeddings' errors against each baseline, per held-out task and probe,
    with 95% intervals, and the aggregates (diamonds), on a log-ratio axis."""
    entries = [e for e in card.entries if e.arm.reference]
    baselines = list(dict.fromkeys(e.baseline for e in entries))
    rows = list(dict.fromkeys((e.task, e.probe) for e in entries))
    fig, ax = plt.subplots(figsize=(7.5, 0.3 * (len(rows) + len(baselines)) + 1.5))
    for k, baseline in enumerate(baselines):
        offset = (k - (len(baselines) - 1) / 2) * 0.8 / max(len(baselines), 1)
        mine = {(e.task, e.probe): e.error_change for e in entries if e.baseline == baseline}
        ys = [i + offset for i, key in enumerate(rows) if key in mine]
        effects = [mine[key] for key in rows if key in mine]
        estimate = np.array([e.estimate for e in effects])
        low = np.clip(estimate - np.array([e.low for e in effects]), 0, None)
        high = np.clip(np.array([e.high for e in effects]) - estimate, 0, None)
        ax.errorbar(estimate, ys, xerr=[low, high], fmt="o", markersize=3, capsize=2, label=arm_label(baseline))
        overall = next((a for a in card.aggregates if a.arm is not None and a.arm.reference and a.baseline == baseline
                        and a.probe == "all"), None)
        if overall is not None:
            y = len(rows) + 0.5 + offset
            ax.errorbar([overall.effect.estimate], [y], xerr=[[max(overall.effect.estimate - overall.effect.low, 0)],
                                                            [max(overall.effect.high - overall.effect.estimate, 0)]],
                        fmt="D", markersize=6, capsize=3, color=ax.lines[-1].get_color())
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xscale("function", functions=(np.log1p, np.expm1))   # a ratio's log: x2 and /2 equally far from 0
    ax.xaxis.set_major_formatter(lambda x, _: f"{x:+.0%}")
    ax.set_yticks(list(range(len(rows))) + [len(rows) + 0.5],
                  [f"{t} / {PROBES[p].split(' (')[0]}" for t, p in rows] + ["aggregate (geometric mean)"], fontsize=7)
    ax.invert_yaxis()
    ax.set(xlabel="change of the MTL embeddings' errors (< 0: MTL better)",
           title="Transfer scorecard: MTL against each baseline (95% intervals)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def transfer_frame(card: Scorecard) -> pd.DataFrame:
    """transfer.csv: one row per scorecard entry and per aggregate."""
    rows = [{"row": "entry", "task": e.task, "kind": e.kind, "metric": e.metric, "probe": e.probe, **arm_columns(e.arm),
             **arm_columns(e.baseline, "baseline"), "n": e.n, "value": e.value, "baseline_value": e.baseline_value,
             **{f"{name}_{k}": getattr(effect, k) for name, effect in (("difference", e.difference),
                                                                     ("error_change", e.error_change),
                                                                     ("difference_on_test", e.difference_on_test))
                for k in ("estimate", "low", "high", "p", "reading")}} for e in card.entries]
    rows += [{"row": "aggregate", "probe": a.probe, **arm_columns(a.arm), **arm_columns(a.baseline, "baseline"),
              "n": a.effect.n,
              **{f"error_change_{k}": getattr(a.effect, k) for k in ("estimate", "low", "high", "reading")}}
             for a in card.aggregates]
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- the study

def study_markdown(cells: list[CellRanking]) -> str:
    """Every trained configuration against the paper's (pseudo-uniform, mean pooling), best held-out
    transfer first: changes of errors with paired intervals (< 0: fewer errors than the paper's)."""
    lines = ["| weighting | pooling | epochs | change of errors, MTL tasks (test) | held-out transfer: "
             "change of errors (linear and k-NN probes) | reading of the transfer | time per epoch vs the paper's |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {c.model.weighting} | {c.model.pooling} | {c.epochs} | {effect_text(c.per_task, change=True)} | "
              f"{effect_text(c.transfer, change=True)} | "
              f"{c.reading} | {c.time_ratio:.2f}x |" for c in cells]
    better = [c.model.label() for c in cells if c.reading == BETTER]
    return "\n".join(lines) + ("\n\n" + (f"Better than the paper's configuration on held-out transfer here: "
                                          f"{', '.join(better)}." if better else
                                          "Nothing beats the paper's configuration on held-out transfer here."))


# ---------------------------------------------------------------- the whole report

def optimal_cap_text(data: ReportData) -> str:
    """Where evaluation.task_optimal_galleries bit: on how many of the train galleries the yardsticks trained."""
    if not data.optimal_capped_at:
        return ""
    return (f"; **capped**: the task-optimal models trained on {data.optimal_capped_at:,} of the {data.splits['train']:,} train "
            "galleries (evaluation.task_optimal_galleries, a stable sample) while the MTL models trained on all of "
            "them, which favours MTL in this comparison")


def optimal_sections(r: Report, data: ReportData) -> None:
    """Figures 5 and 6: every MTL model against the task-optimal models, task by task."""
    s = data.settings
    epochs = [o.epochs for o in data.optimal.values() if o.epochs]
    ran = ", ".join(f"{m.label()} {len(t.history)}" for m, t in data.training.items())
    r.text("## MTL vs task-optimal models (Figure 5)\nError is 1 - accuracy (classification) or MSE (regression) on "
           "the test split, each model at the epoch its validation loss selected; relative error increase = "
           "(err_MTL - err_opt) / err_opt, below 0 when MTL does better, with a paired bootstrap interval over the "
           f"task's labelled test galleries. Budgets: the MTL models at most {s.train.max_epochs} epochs with patience "
           f"{s.train.patience} (they ran {ran}); each task-optimal model the same budget, on the MTL model's "
           f"batches, with its own early stopping (they ran {np.mean(epochs) if epochs else math.nan:.1f} epochs on "
           f"average, {min(epochs, default=0):.0f} to {max(epochs, default=0):.0f})" + optimal_cap_text(data) + ".\n\n"
           + per_task_markdown(data.per_task, data.models))
    r.table("per_task.csv", per_task_frame(data.per_task))
    r.figure("relative_error.png", relative_error_figure(data.per_task, data.models),
             "Relative error increase per task on test, with 95% intervals.")
    r.text(figure5_markdown(data.vs_optimal, data.wins, data.vs_baseline))

    r.text("## Class balance vs MTL benefit (Figure 6)\nBinary tasks: minority-class fraction against relative error "
           "increase. The paper finds a positive r: MTL helps most where classes are most imbalanced.\n\n"
           + figure6_markdown(data.balance))
    r.table("class_balance.csv", pd.DataFrame([
        {"weighting": m.weighting, "pooling": m.pooling, "n": b.n, "slope": b.slope, "intercept": b.intercept, "reading": b.reading,
         **{f"{kind}_{k}": getattr(getattr(b, kind), k) for kind in ("pearson", "spearman")
            for k in ("estimate", "low", "high", "p")}} for m, b in data.balance.items()]))
    r.figure("class_balance.png", class_balance_figure(data.per_task, data.balance),
             "Minority-class fraction against relative error increase, with least-squares lines.")


def lay_out(data: ReportData) -> Report:
    """The report in reading order: what the run reproduces, data, training, Table 2, Figures 5 and 6, the
    seeds' spread, binary codes, the projection and retrieval examples; metrics.json holds every number."""
    s, seeds = data.settings, len(data.seeds)
    r = Report()
    r.text(f"# Gallery embedding report — run {data.run_id}\n\nPreset `{s.name}`: {s.model.backbone} at "
           f"{s.model.image_size} px, {s.model.pooling} pooling, weightings {', '.join(m.label() for m in data.models)}, "
           f"{seeds} seed{'s' if seeds > 1 else ''} ({', '.join(map(str, data.seeds))}). Every number below was "
           "measured in this run; the paper's figures are shown beside ours, never in our columns. "
           f"**`train` fits ({data.splits['train']} galleries), `valid` selects each model's best epoch "
           f"({data.splits['valid']}), `test` reports ({data.splits['test']})**: every comparison is paired on the same "
           "test galleries, which no model was selected on, and read from its 95% interval: \"consistent with the "
           "paper\" only when the interval excludes no effect on the paper's side."
           + (" Scores are averaged over the seeds, gallery by gallery, before the comparisons." if seeds > 1 else "")
           + ("\n\nNot measured in this run (settings, docs/sizing.md):\n" + "\n".join(f"- {x}" for x in data.skipped)
              if data.skipped else ""))
    r.text("## Transfer scorecard\nDoes the embedding carry what the photos show to tasks it was never taught? Every "
           f"held-out task ({', '.join(f'`{t.name}`' for t in data.transfer.tasks)}) x probe (the paper's 2-layer "
           "head, a linear probe, a k-NN probe) x embedding arm, scored on the labelled galleries no model trained on "
           "(valid and test); every probe is fitted on the train split, the linear and k-NN probes choose their "
           "hyperparameter on the other folds of the scored galleries, so no probe saw the label it is scored on. "
           "Accuracy (higher is better) or MSE (lower is better).\n\n" + scorecard_markdown(data.scorecard, data.transfer)
           + "\n\n" + tuning_markdown(data.holdouts))
    if data.relevance:
        r.text(retrieval_headline(data.relevance))
    r.figure("transfer_scorecard.png", scorecard_figure(data.scorecard),
             "Change of the MTL embeddings' errors against each baseline, per held-out task and probe (log-ratio axis).")
    r.table("transfer.csv", transfer_frame(data.scorecard))
    if data.relevance:
        rel = data.relevance
        r.text("## Retrieval\nDoes the embedding find the galleries the catalogue says belong together (an identity "
               "task's other listings of the same item, a pairs task's engaged partners)? Each valid and test gallery "
               "with something relevant is a query (no model trained on it, nor on its pairs); it ranks every other "
               "gallery of the catalogue by cosine (float) and by the binary code as search does (the "
               f"{rel.rerank} nearest by Hamming distance re-ranked by cosine; `{rel.code}`, fitted on each arm's "
               "train galleries). Recall@k: the share of the query's relevant galleries in its top k; MRR: the mean "
               "reciprocal rank of the first relevant one. Arms: the MTL embeddings, *unified* (the exported model, "
               "attribute and metric tasks), the same training on the attribute tasks only, each metric task alone "
               "(through the same engine), ImageNet features. Pinterest's "
               "claims, paired on the same queries (bootstrap over queries): *unified beats specialised*, read "
               f"like the scorecard; *binarised loses nothing*, consistent when the interval stays above "
               f"-{NON_INFERIORITY}.\n\n" + retrieval_markdown(rel)
               + f"\n\nCost of the retrieval evaluation: {rel.seconds:.1f} s.")
        means, claims = retrieval_frames(rel)
        r.table("retrieval.csv", means)
        r.table("retrieval_claims.csv", claims)
    r.text("## What this run reproduces\n" + findings_markdown(data.findings))
    r.text("## Data\n```\n" + data.catalogue_text + "\n```\n\n" + quality_markdown(data.quality))
    r.text("## Training\nEarly stopping and the selected epoch come from the validation loss of each task "
           "relative to its first epoch, averaged over tasks (unweighted: learned loss weights do not move it).\n\n"
           + training_markdown(data.training))
    r.figure("training_curves.png", training_curves({m: data.training[m] for m in data.models}),
             "Train and validation loss per epoch, each task's relative to its first epoch, averaged over tasks.")

    for h, rows in data.table2:
        r.text(f"## Held-out task `{h.task}`: the paper's view (Table 2)\nThe 2-layer head of the scorecard on its "
               f"three arms, row by row: {h.metric} on the {h.scored_galleries} labelled galleries no model trained on "
               f"({h.train_galleries} train); every row is a fixed training budget, at the learning rate and "
               "weight decay each arm chose out of fold (the scorecard's tuning)"
               + ("; 95% Clopper-Pearson intervals in brackets" if seeds == 1 and h.metric == "accuracy" else "")
               + ".\n\n" + table2_markdown(h, data.primary_task) + "\n\n" + paired_markdown(h, rows) + "\n\n"
               + table2_reading(h, rows, data.primary_task))
    r.table("table2.csv", pd.concat([table2_frame(h) for h in data.holdouts]) if data.holdouts else pd.DataFrame())
    r.table("table2_comparisons.csv", pd.DataFrame([
        {"holdout_task": h.task, "row": row.row, "comparison": f"mtl_vs_{v.arm.kind}", "split": h.split,
         **{k: value for k, value in vars(v.effect).items()}}
        for h, rows in data.table2 for row in rows for v in row.versus]))

    if data.optimal:
        optimal_sections(r, data)
    else:
        r.text("## MTL tasks on test\nError is 1 - accuracy (classification) or MSE (regression) on the test split, "
               "each model at the epoch its validation loss selected, against the majority/mean baseline. No "
               "task-optimal models (evaluation.task_optimal is off): Figures 5 and 6 are not measured.\n\n"
               + per_task_markdown(data.per_task, data.models, optimal=False) + "\n\n"
               + figure5_markdown({}, data.wins, data.vs_baseline))
        r.table("per_task.csv", per_task_frame(data.per_task))
    if data.study:
        r.text("## Study: weightings and poolings against the paper's configuration\nEvery trained model against "
               "pseudo-uniform weighting with mean pooling, on the same galleries: the change of errors (geometric mean "
               "of the error ratios) over "
               f"the MTL tasks (test) and over the held-out tasks x the {' and '.join(STUDY_PROBES)} probes (valid and "
               "test), with paired bootstrap intervals; training time per epoch as measured side by side.\n\n"
               + study_markdown(data.study))
        r.table("study.csv", pd.DataFrame([
            {"weighting": c.model.weighting, "pooling": c.model.pooling, "epochs": c.epochs, "seconds_per_epoch": c.seconds_per_epoch,
             "time_ratio": c.time_ratio, "reading": c.reading,
             **{f"{name}_{k}": getattr(e, k) for name, e in (("per_task", c.per_task), ("transfer", c.transfer))
                for k in ("estimate", "low", "high")}} for c in data.study]))
    if data.spread:
        r.text(f"## Across the {seeds} seeds\nEach seed trained and evaluated on its own; the spread of its headline "
               "numbers:\n\n" + seeds_markdown(data.spread))
    if data.binary:
        r.text("## Binarized embeddings (Pinterest)\n" + binary_markdown(data.binary))
        r.figure("binary_codes.png", code_curve_figure(data.binary),
                 "Recall@10 against float search and top-10 attribute agreement, by bytes per gallery.")
        r.table("binary_codes.csv", code_curve_frame(data.binary))
    if data.projection:
        r.text("## 2-D projection (Figure 4)")
        r.figure("projection.png", projection_figure(data.projection.coords, data.projection.colourings),
                 "UMAP of the exported embeddings, coloured by attributes (grey: label missing).")
    if data.retrieval:
        r.text("## Retrieval by seed images (Figure 1)")
        weighted = any(hit.top_photo_weight is not None for e in data.retrieval for hit in e.results)
        r.figure("retrieval.png", retrieval_figure(data.retrieval), "Seeds from a test gallery; its nearest other galleries"
                 + (", each shown by its photos with the largest attention weights, heaviest first." if weighted else "."))
    r.metrics = metrics(data)
    r.files.update(score_files(data.transfer.scores, data.holdouts, data.optimal))  # named by metrics.json
    return r


def write_report(r: Report, location: str) -> None:
    """report.md, metrics.json, the CSV tables, PNG figures and per-gallery Parquet scores into a folder or
    store location."""
    for name, data in r.files.items():
        storage.write_bytes(storage.join(location, name), data)
        reached("report.write")
    storage.write_bytes(storage.join(location, "metrics.json"), json.dumps(r.metrics, indent=2).encode())
    storage.write_bytes(storage.join(location, "report.md"), r.markdown().encode())
