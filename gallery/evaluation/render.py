"""Human-readable pieces of a run: markdown tables, figures, and the Report that holds them for the card and report.md."""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from gallery.data.images import DataQuality  # noqa: E402
from gallery.evaluation.comparisons import PAPER_BALANCE_R, PAPER_PU_WINS, PAPER_TIME_PER_INSTANCE, paper_row  # noqa: E402
from gallery.evaluation.holdout import ARMS  # noqa: E402
from gallery.evaluation.statistics import CONSISTENT, NOISE, OPPOSITE, effect_text  # noqa: E402


def training_curves(histories: dict[str, list]):
    """Train and validation total loss per epoch, one panel per weighting."""
    fig, axes = plt.subplots(1, len(histories), figsize=(5 * len(histories), 3.5), squeeze=False)
    for ax, (weighting, history) in zip(axes[0], histories.items()):
        epochs = [h["epoch"] + 1 for h in history]
        ax.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train")
        ax.plot(epochs, [h["valid_loss"] for h in history], marker="o", label="valid")
        ax.set(title=weighting, xlabel="epoch", ylabel="total loss")
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


def training_markdown(results: dict) -> str:
    lines = ["| weighting | epochs | best epoch | best valid total loss | stopped early | galleries/s (last epoch) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for weighting, r in results.items():
        last = r["history"][-1]
        lines.append(f"| {weighting} | {len(r['history'])} | {r['best_epoch'] + 1} | {r['best_valid_loss']:.4f} | "
                     f"{'yes' if r['stopped_early'] else 'no'} | {last['galleries_per_s']:,.1f} |")
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


def table2_frame(holdout: dict) -> pd.DataFrame:
    """Long format: one row per (row label, arm), plus the baseline."""
    rows = []
    for arm, result in holdout["arms"].items():
        for r in result["rows"]:
            rows.append({"holdout_task": holdout["task"], "row": r["label"], "arm": arm, "metric": holdout["metric"],
                         "value": r["value"], "ci_low": r["ci_low"], "ci_high": r["ci_high"],
                         "galleries_seen": r["galleries_seen"]})
    rows.append({"holdout_task": holdout["task"], "row": "baseline", "arm": "majority" if holdout["metric"] == "accuracy"
                 else "mean", "metric": holdout["metric"], "value": holdout["baseline"], "ci_low": None,
                 "ci_high": None, "galleries_seen": holdout["train_galleries"]})
    return pd.DataFrame(rows)


def table2_markdown(holdout: dict) -> str:
    """The arms' metric per row with 95% intervals; the paper's column only beside rows that mean what
    its rows mean (a fraction of the first epoch, or 4 epochs) and only for the star-rating accuracy."""
    arms = list(holdout["arms"])
    paper = holdout["task"] == "star_rating" and holdout["metric"] == "accuracy"
    head = "| data seen | " + " | ".join(ARMS[a] for a in arms) + (" | paper (MTL / ImageNet / end-to-end) |" if paper else " |")
    lines = [head, "|" + " --- |" * (len(arms) + 1 + paper)]
    for i, first in enumerate(holdout["arms"][arms[0]]["rows"]):
        cells = [f"{first['label']} ({first['galleries_seen']} galleries)"]
        for arm in arms:
            r = holdout["arms"][arm]["rows"][i]
            ci = f" [{fmt(r['ci_low'], 2)}, {fmt(r['ci_high'], 2)}]" if r["ci_low"] is not None else ""
            cells.append(f"{fmt(r['value'])}{ci}")
        if paper:
            figures = paper_row(first)
            cells.append(" / ".join(f"{v:.3f}" for v in figures) if figures else "(no row of the paper means this)")
        lines.append("| " + " | ".join(cells) + " |")
    end = " | |" if paper else " |"
    base = "majority class" if holdout["metric"] == "accuracy" else "train mean"
    lines.append(f"| {base} baseline | " + " | ".join(fmt(holdout["baseline"]) for _ in arms) + end)
    lines.append("| training time per instance, training steps as the arm runs them | " + " | ".join(
        _ms(holdout["arms"][a]["seconds_per_instance"]) for a in arms)
        + (f" | {PAPER_TIME_PER_INSTANCE['mtl']} / - / {PAPER_TIME_PER_INSTANCE['end_to_end']} |" if paper else " |"))
    lines.append("| training time per instance from pixels, every layer of the model | - | - | "
                 + _ms(holdout["arms"]["end_to_end"].get("seconds_per_instance_from_pixels")) + end)
    lines.append("| total training time | " + " | ".join(f"{holdout['arms'][a]['train_seconds']:.1f} s" for a in arms)
                 + (" | 4 h (CPU) / - / 40 h (GPU) |" if paper else " |"))
    return "\n".join(lines)


def _ms(seconds) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.2f} ms"


def paired_markdown(holdout: dict, rows: list[dict]) -> str:
    """MTL minus each other arm, row by row, on the same valid galleries: the difference, its paired
    bootstrap interval, McNemar's p (right/wrong answers) and the reading against the paper."""
    lines = ["| data seen | MTL - ImageNet transfer | reading | MTL - end-to-end | reading |", "|" + " --- |" * 5]
    for r in rows:
        a, b = r["mtl_vs_imagenet"], r["mtl_vs_end_to_end"]
        lines.append(f"| {r['row']} | {effect_text(a)} | {a['reading']} | {effect_text(b)} | {b['reading']} |")
    better = "higher" if holdout["metric"] == "accuracy" else "lower"
    method = rows[-1]["mtl_vs_imagenet"]["method"] if rows else ""
    return "\n".join(lines) + (f"\n\nDifferences in {holdout['metric']} with 95% intervals ({method}); "
                               f"the paper's direction: MTL {better}.")


def table2_reading(holdout: dict, rows: list[dict]) -> str:
    final = rows[-1]
    text = (f"After all epochs, MTL - ImageNet transfer = {effect_text(final['mtl_vs_imagenet'])}: "
            f"{final['mtl_vs_imagenet']['reading']}; MTL - end-to-end = {effect_text(final['mtl_vs_end_to_end'])}: "
            f"{final['mtl_vs_end_to_end']['reading']}.")
    if holdout["task"] == "star_rating" and holdout["metric"] == "accuracy":
        text += (" The paper (star rating, 250k properties, 4 epochs): MTL 0.631, ImageNet 0.542, end-to-end 0.598; "
                 f"here {holdout['valid_galleries']} labelled valid galleries decide it.")
    return text


def per_task_markdown(table: pd.DataFrame, weightings) -> str:
    cols = ["task", "kind", "valid labelled", "baseline error", "task-optimal error (epochs)"]
    cols += [f"{w} error" for w in weightings] + [f"{w} relative error increase [95% CI]" for w in weightings]
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for _, r in table.iterrows():
        cells = [r["task"], r["kind"], str(r["valid_labelled"]), fmt(r["error_baseline"]),
                 f"{fmt(r['error_task_optimal'])} ({fmt(r['task_optimal_epochs'], 0)})"]
        cells += [fmt(r[f"error_{w}"]) for w in weightings]
        cells += [effect_text({"estimate": r[f"relative_error_increase_{w}"], "low": r[f"relative_error_increase_{w}_low"],
                               "high": r[f"relative_error_increase_{w}_high"]}, 2) for w in weightings]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure5_markdown(vs_optimal: dict, wins: dict | None, vs_baseline: dict) -> str:
    lines = []
    for w, o in vs_optimal.items():
        s = o["share_worse"]
        lines.append(f"MTL ({w}) has the higher error on {effect_text(s, percent=True)} of the {s['n']} tasks where the "
                     f"errors differ (sign test; "
                     f"the paper: worse on most tasks): {s['reading']}. Intervals: clearly worse on {o['clearly_worse']}, "
                     f"clearly better on {o['clearly_better']}, not distinguishable on {o['not_distinguishable']}.")
        lines += [f"`{t}` under {w}: relative error increase {effect_text(e, 2)} (the paper: better under MTL): {e['reading']}."
                  for t, e in o["paper_named_tasks"].items()]
    if wins:
        lines.append(f"Pseudo-uniform has the lower error on {wins['wins']} tasks, Kendall on {wins['losses']} ({wins['ties']} "
                     f"ties); share {effect_text(wins, percent=True)} (sign test; the paper: {PAPER_PU_WINS[0]} of {PAPER_PU_WINS[1]}, "
                     f"71%): {wins['reading']}.")
    for w, b in vs_baseline.items():
        lines.append(f"MTL ({w}) against the majority/mean baseline: clearly better on {b['clearly_better']} of "
                     f"{b['tasks']} tasks, clearly worse on {b['clearly_worse']} (the paper: better on every task): "
                     f"{b['reading']}.")
    return "\n".join(f"- {line}" for line in lines)


def figure6_markdown(balance: dict) -> str:
    return "\n".join(
        f"- {w}: Pearson r = {effect_text(b['pearson'], 2)}; Spearman rho = {effect_text(b['spearman'], 2)}; over "
        f"{b['pearson']['n']} binary tasks (the paper: r = {PAPER_BALANCE_R.get(w, math.nan):.2f}, p < .001): {b['reading']}."
        for w, b in balance.items())


def findings_markdown(found: list[dict]) -> str:
    """The paper's findings sorted by what this run's tests say about them."""
    out = []
    for verdict, title in ((CONSISTENT, "Reproduced here"), (NOISE, "Not resolved by this run (the interval includes no effect)"),
                           (OPPOSITE, "Opposite here")):
        rows = [f for f in found if f["reading"] == verdict]
        out.append(f"**{title}** ({len(rows)})" + ("" if rows else ": none"))
        out += [f"- {f['finding']}: here {f['here']}; paper {f['paper']}" for f in rows]
        out.append("")
    return "\n".join(out).strip()


def seeds_markdown(numbers: dict[str, dict]) -> str:
    """Mean and spread across seeds of each headline number."""
    lines = ["| number | mean | sd | min | max |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {name} | {fmt(s['mean'])} | {fmt(s['sd'])} | {fmt(s['min'])} | {fmt(s['max'])} |"
              for name, s in numbers.items()]
    return "\n".join(lines)


SEARCHES = {"hamming": "Hamming only", "two_stage": "two-stage"}


def binary_markdown(b: dict) -> str:
    """The run's code against float search, the recall/size curve over codes, and attribute agreement."""
    k, ratio = b["k"], b["float_bytes"] // b["code_bytes"]
    attributes = list(b["attribute_agreement"])
    lines = [f"Queries: the {b['queries']} valid galleries; neighbours: their top {k} among all galleries, by exact "
             f"search. Codes are fitted on the train split; the run's code, `{b['code']}`, binarized the export "
             f"(`embedding_bits`). Two-stage search takes the top {b['rerank']} galleries by Hamming distance and "
             "orders them by exact cosine on the float vectors.", "",
             f"- recall@{k} of the run's code against float search: **{b['recall_binary_vs_float']:.3f}** two-stage, "
             f"{b['recall_hamming_vs_float']:.3f} by Hamming distance alone (candidate index: {b['code_bytes']} bytes "
             f"per gallery instead of {b['float_bytes']}, {ratio}x smaller)", "",
             f"| code | bytes per gallery | smaller than float32 | recall@{k} Hamming | recall@{k} two-stage | "
             + " | ".join(f"{a} agreement (Hamming / two-stage)" for a in attributes) + " |",
             "|" + " --- |" * (5 + len(attributes))]
    for row in b["curve"]:
        if "skipped" in row:
            lines.append(f"| {row['code']} | not fitted here: {row['skipped']} |" + " |" * (3 + len(attributes)))
            continue
        agreement = [" / ".join(fmt(row["attribute_agreement"][a][kind]) for kind in SEARCHES) for a in attributes]
        lines.append(f"| {row['code']} ({row['bits']} bits) | {row['bytes_per_gallery']} | "
                     f"{b['float_bytes'] / row['bytes_per_gallery']:.0f}x | {fmt(row['recall_hamming'])} | "
                     f"{fmt(row['recall_two_stage'])} | " + " | ".join(agreement) + " |")
    lines.append(f"| float32 (reference) | {b['float_bytes']} | 1x | 1.000 | 1.000 | "
                 + " | ".join(fmt(b["attribute_agreement"][a]["float"]) for a in attributes) + " |")
    kinds = {"float": "MTL, float (cosine)", "binary": f"MTL, `{b['code']}` two-stage", "imagenet_float": "ImageNet transfer, float"}
    lines += ["", f"Share of the top {k} neighbours with the query's attribute:", "",
              "| attribute | " + " | ".join(kinds.values()) + " |", "|" + " --- |" * (len(kinds) + 1)]
    for name, values in b["attribute_agreement"].items():
        lines.append(f"| {name} | " + " | ".join(fmt(values[kind]) for kind in kinds) + " |")
    change = np.nanmean([v["binary"] - v["float"] for v in b["attribute_agreement"].values()] or [np.nan])
    lines += ["", f"Pinterest reports binarized embeddings without loss of precision and recall. Here two-stage search "
              f"with {b['code_bytes']}-byte codes returns {b['recall_binary_vs_float']:.1%} of the float top {k} "
              f"(Hamming distance alone: {b['recall_hamming_vs_float']:.1%}), and the neighbours' attribute agreement "
              f"changes by {change:+.3f} on average: their quality {'holds' if abs(change) < 0.03 else 'changes'}."]
    return "\n".join(lines)


def code_curve_figure(b: dict):
    """Recall@k against float search and mean attribute agreement, against bytes per gallery, for pure
    Hamming and two-stage search; ITQ codes joined by lines, the per-dimension codes as single points."""
    rows = [r for r in b["curve"] if "skipped" not in r]
    fig, (recall, agreement) = plt.subplots(1, 2, figsize=(10, 3.8))
    for (kind, label), colour in zip(SEARCHES.items(), ("tab:blue", "tab:orange")):
        for ax, value in ((recall, lambda r: r[f"recall_{kind}"]),
                          (agreement, lambda r: np.nanmean([v[kind] for v in r["attribute_agreement"].values()]))):
            itq = sorted((r for r in rows if r["code"].startswith("itq")), key=lambda r: r["bytes_per_gallery"])
            ax.plot([r["bytes_per_gallery"] for r in itq], [value(r) for r in itq], "-o", color=colour, label=label)
            for r in rows:
                ax.plot(r["bytes_per_gallery"], value(r), "o" if r["code"].startswith("itq") else "s", color=colour)
                ax.annotate(r["code"], (r["bytes_per_gallery"], value(r)), fontsize=7, xytext=(3, 3), textcoords="offset points")
    float_agreement = np.nanmean([v["float"] for v in b["attribute_agreement"].values()])
    recall.axhline(1.0, color="grey", linestyle=":", label="float32 (reference)")
    agreement.axhline(float_agreement, color="grey", linestyle=":", label="float32")
    recall.set(ylabel=f"recall@{b['k']} against float search", title="Neighbours kept")
    agreement.set(ylabel=f"top-{b['k']} attribute agreement (mean)", title="Neighbour quality")
    for ax in (recall, agreement):
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"bytes per gallery (float32: {b['float_bytes']})")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def code_curve_frame(b: dict) -> pd.DataFrame:
    """The curve as a table: one row per code and search."""
    return pd.DataFrame([{"code": r["code"], "bits": r["bits"], "bytes_per_gallery": r["bytes_per_gallery"],
                          "search": kind, "recall_at_k": r[f"recall_{kind}"],
                          **{f"agreement_{a}": v[kind] for a, v in r["attribute_agreement"].items()}}
                         for r in b["curve"] if "skipped" not in r for kind in SEARCHES])


def relative_error_figure(table: pd.DataFrame, weightings):
    """Figure 5: relative error increase per task and weighting, with its 95% interval."""
    fig, ax = plt.subplots(figsize=(max(6, 0.32 * len(table)), 4))
    x = np.arange(len(table))
    width = 0.8 / len(weightings)
    for k, w in enumerate(weightings):
        column = f"relative_error_increase_{w}"
        estimate = table[column].to_numpy(float)
        low, high = table[f"{column}_low"].to_numpy(float), table[f"{column}_high"].to_numpy(float)
        ax.bar(x + k * width, estimate, width, label=w)
        ax.errorbar(x + k * width, estimate, yerr=[np.clip(estimate - low, 0, None), np.clip(high - estimate, 0, None)],
                    fmt="none", ecolor="black", elinewidth=0.6, capsize=1.5)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(x + width * (len(weightings) - 1) / 2, [t.split("_")[0] for t in table["task"]], rotation=90, fontsize=7)
    ax.set(ylabel="relative error increase vs task-optimal", title="MTL vs task-optimal models (below 0: MTL better; 95% CI)")
    ax.legend()
    fig.tight_layout()
    return fig


def class_balance_figure(table: pd.DataFrame, balance: dict):
    fig, ax = plt.subplots(figsize=(5.5, 4))
    binary = table[table["kind"] == "binary"]
    for w, fit in balance.items():
        r = fit["pearson"]
        points = ax.scatter(binary["minority_fraction"], binary[f"relative_error_increase_{w}"], s=18,
                            label=f"{w} (r={fmt(r['estimate'], 2)} [{fmt(r['low'], 2)}, {fmt(r['high'], 2)}])")
        if not np.isnan(fit["slope"]):
            xs = np.linspace(binary["minority_fraction"].min(), binary["minority_fraction"].max(), 10)
            ax.plot(xs, fit["intercept"] + fit["slope"] * xs, color=points.get_facecolor()[0])
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set(xlabel="class balance (minority-class fraction)", ylabel="relative error increase",
           title="Class balance vs MTL benefit (binary tasks)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
