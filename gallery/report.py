"""Human-readable pieces of a run: markdown tables and figures for the card and the report."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from gallery.images import DataQuality  # noqa: E402


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


def quality_csv(quality: DataQuality) -> str:
    """Every skipped image and excluded gallery, one row each."""
    rows = [(s.gallery_id, s.image, s.reason) for s in quality.skipped]
    rows += [(g, "", "gallery excluded: no readable image") for g in quality.excluded]
    return pd.DataFrame(rows, columns=["gallery_id", "image", "reason"]).to_csv(index=False)


def training_markdown(results: dict) -> str:
    lines = ["| weighting | epochs | best epoch | best valid total loss | stopped early | galleries/s (last epoch) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for weighting, r in results.items():
        last = r["history"][-1]
        lines.append(f"| {weighting} | {len(r['history'])} | {r['best_epoch'] + 1} | {r['best_valid_loss']:.4f} | "
                     f"{'yes' if r['stopped_early'] else 'no'} | {last['galleries_per_s']:,.1f} |")
    return "\n".join(lines)
