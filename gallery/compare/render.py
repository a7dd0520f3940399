"""A Comparison -> compare.md (verdict first, then each table), compare.json (every number, identities as
fields), neighbour_overlap.csv (each common gallery's overlap) and two figures."""
from __future__ import annotations

import json
import math
from dataclasses import asdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

import gallery.storage as storage  # noqa: E402
from gallery.compare.comparison import Comparison, Paired, SideSummary  # noqa: E402
from gallery.evaluation.probes import PROBES  # noqa: E402
from gallery.evaluation.report import jsonable  # noqa: E402
from gallery.evaluation.statistics import effect_text  # noqa: E402



def _who(s: SideSummary) -> str:
    i = s.identity
    model = f"{i.backbone}, {i.weighting} weighting, {i.pooling} pooling, seed {i.seed}" if i else "model unknown"
    return f"`{s.source}` (run {s.run_id or '?'}; {model}; {s.galleries:,} galleries, {s.dim}-d)"


def _value(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _cells(p: Paired) -> str:
    return f"{p.n} | {_value(p.value_a)} | {_value(p.value_b)} | {effect_text(p.difference)} | {p.reading}"


def _size(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def markdown(c: Comparison) -> str:
    lines = [f"# Compare: is B a better model than A?\n\n- **A**: {_who(c.a)}\n- **B**: {_who(c.b)}\n",
             f"Compared on the **{c.common:,} galleries both embedded**; every difference is B − A, paired on the same "
             "galleries (or queries), with a 95% bootstrap interval (and McNemar's exact test for right/wrong scores). "
             f"Computed in {c.seconds:.1f} s.", *[f"\n> {n}" for n in c.notes],
             f"\n## Verdict: **{c.verdict}**\n", *[f"- {r}" for r in c.reasons], f"\nThe rule: {c.rule}\n"]
    if c.transfer:
        lines += ["## Transfer (held-out tasks, the exported models)\n",
                  "| held-out task | probe | n | A | B | B − A [95% CI] | reading | B's errors vs A's [95% CI] |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        lines += [f"| `{r.task}` ({r.metric}) | {PROBES[r.probe]} | {_cells(r.scores)} | "
                  f"{effect_text(r.error_change, change=True)} |" for r in c.transfer]
        if c.transfer_error_change is not None:
            lines.append(f"\nIn aggregate, B's transfer errors against A's (geometric mean of the error ratios over "
                         f"every task x probe): **{effect_text(c.transfer_error_change, change=True)}** "
                         "(< 0: B errs less).\n")
    if c.task_errors:
        lines += ["## Trained tasks: test errors\n", "| task | n | A error | B error | B − A [95% CI] | reading |",
                  "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| `{r.task}` | {_cells(r.errors)} |" for r in c.task_errors]
        lines.append("\nError: 1 − accuracy, or the squared error of a regression; lower is better.\n")
    if c.retrieval:
        lines += ["## Retrieval (metric tasks)\n", "| task | search | metric | queries | A | B | B − A [95% CI] | reading |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        lines += [f"| `{r.task}` | {r.search} | {r.metric} | {_cells(r.scores)} |" for r in c.retrieval]
    s = c.stability
    lines += ["\n## Neighbour stability: what users will see change\n",
              f"Each gallery's top {s.k} neighbours (exact cosine) under A and under B: on average "
              f"**{effect_text(s.mean_overlap, percent=True)}** of them stay (overlap |A ∩ B| / {s.k}); "
              f"{s.unchanged:.0%} of the galleries keep exactly the same {s.k}. Distribution: "
              + ", ".join(f"{i}/{s.k}: {n:,}" for i, n in enumerate(s.histogram)) + ".\n",
              "![neighbour overlap](neighbour_overlap.png)\n"]
    if s.most_changed:
        lines += ["The galleries whose neighbourhoods changed most:\n", "| gallery | overlap |", "| --- | --- |"]
        lines += [f"| `{g}` | {o:.0%} |" for g, o in s.most_changed]
    if c.agreement:
        lines += [f"\nHow often a gallery's top {s.k} neighbours share its label (A's catalogue labels):\n",
                  "| attribute | galleries | A | B | B − A [95% CI] | reading |", "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| `{r.attribute}` | {_cells(r.shares)} |" for r in c.agreement]
    t = c.cost
    lines += ["\n## Cost\n", "| | A | B |", "| --- | --- | --- |",
              f"| training (exported model, all epochs) | {_value(t.train_seconds[0], 1)} s | {_value(t.train_seconds[1], 1)} s |",
              "| export per gallery (from the feature cache, code and file included) | "
              + " | ".join(f"{x * 1e3:.2f} ms" if x is not None else "n/a" for x in t.export_seconds_per_gallery) + " |",
              f"| float index ({c.common:,} galleries, float32) | {_size(t.float_index_bytes[0])} | {_size(t.float_index_bytes[1])} |",
              f"| binary-code index | {_size(t.code_index_bytes[0])} | {_size(t.code_index_bytes[1])} |"]
    if c.transfer:
        lines.append("\n![transfer differences](transfer_differences.png)")
    return "\n".join(lines) + "\n"


def as_json(c: Comparison) -> dict:
    """Every number of the comparison (NaN as null); identities as fields; per-gallery overlaps go to the CSV."""
    d = asdict(c)
    d.pop("overlap"), d.pop("common_ids")
    return jsonable(d)


def overlap_figure(c: Comparison):
    s = c.stability
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar([f"{i}/{s.k}" for i in range(s.k + 1)], s.histogram, color="#4c72b0")
    ax.set_xlabel(f"overlap of a gallery's top {s.k} neighbours, A vs B")
    ax.set_ylabel("galleries")
    fig.tight_layout()
    return fig


def transfer_figure(c: Comparison):
    rows = c.transfer
    fig, ax = plt.subplots(figsize=(6.5, 0.3 * len(rows) + 1.2))
    ys = np.arange(len(rows))
    est = np.array([r.error_change.estimate for r in rows]) * 100
    low, high = (np.array([getattr(r.error_change, side) for r in rows]) * 100 for side in ("low", "high"))
    ax.errorbar(est, ys, xerr=[np.nan_to_num(est - low), np.nan_to_num(high - est)], fmt="o", markersize=3, capsize=2)
    ax.axvline(0, color="grey", linewidth=0.8)
    ax.set_yticks(ys, [f"{r.task} / {PROBES[r.probe]}" for r in rows], fontsize=7)
    ax.set_xlabel("B's errors against A's, % change [95% CI] (< 0: B errs less)")
    fig.tight_layout()
    return fig


def write_comparison(c: Comparison, out: str) -> dict[str, str]:
    """Write the comparison's files into the folder (or prefix) `out`; returns name -> location."""
    import io

    files = {"compare.md": markdown(c).encode(),
             "compare.json": json.dumps(as_json(c), indent=1, allow_nan=False).encode(),
             "neighbour_overlap.csv": pd.DataFrame({"gallery_id": c.common_ids, "overlap": c.overlap}).to_csv(
                 index=False).encode()}
    for name, fig in [("neighbour_overlap.png", overlap_figure(c))] + (
            [("transfer_differences.png", transfer_figure(c))] if c.transfer else []):
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110)
        plt.close(fig)
        files[name] = buffer.getvalue()
    locations = {}
    for name, data in files.items():
        locations[name] = storage.join(out, name)
        storage.write_bytes(locations[name], data)
    return locations
