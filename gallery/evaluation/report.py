"""The run report (docs/design.md §7): every table, figure and reading, assembled in reading order.

`build_report` gathers what the evaluation steps measured into a render.Report (markdown blocks
and PNG figures, written to report.md, the run's card and metrics.json); the pieces are drawn in
gallery.evaluation.render.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd

import gallery.storage as storage
from gallery.config import Settings
from gallery.data.images import DataQuality
from gallery.data.ingest import Catalogue, describe
from gallery.evaluation import render
from gallery.evaluation.neighbours import binary_vs_float
from gallery.evaluation.projection import projection_attributes, projection_figure, umap_2d
from gallery.evaluation.comparisons import (class_balance, findings, headline_numbers, mtl_vs_baseline, mtl_vs_optimal,
                                            per_task, table2_comparisons, weighting_wins)
from gallery.evaluation.retrieval_examples import retrieval_examples, retrieval_figure
from gallery.evaluation.seeds import mean_holdout, mean_optimal, mean_training, seeds_of
from gallery.evaluation.statistics import spread as seed_spread
from gallery.retrieval.embeddings import embeddings_code, read_embeddings
from gallery.training.checkpoints import load_trained


def build_report(run_id: str, settings: Settings, catalogue: Catalogue, quality: DataQuality, training_by_seed: list[dict],
                 holdout_by_seed: list[list[dict]], optimal_by_seed: list[dict], embeddings_location: str,
                 imagenet_location: str, reference_checkpoints: str, log=print) -> render.Report:
    """Tables, figures, every comparison with the paper as an effect, its interval and the reading its
    test allows (gallery.evaluation.comparisons), and metrics.json. With several seeds each valid
    gallery's score is averaged over them before the paired statistics, and the spread is shown."""
    seed, seeds = settings.train.seed, len(training_by_seed)
    training, optimal = mean_training(training_by_seed), mean_optimal(optimal_by_seed)
    holdout = [mean_holdout([per_seed[i] for per_seed in holdout_by_seed]) for i in range(len(holdout_by_seed[0]))]
    weightings = list(training)
    table = per_task(catalogue, training, optimal, seed)
    table2 = [table2_comparisons(h, seed) for h in holdout]
    vs_optimal = {w: mtl_vs_optimal(table, w) for w in weightings}
    vs_baseline = {w: mtl_vs_baseline(table, w) for w in weightings}
    wins = weighting_wins(table) if {"pseudo_uniform", "kendall"} <= set(weightings) else None
    balance = class_balance(table, weightings, seed)
    found = findings(list(zip(holdout, table2)), vs_optimal, wins, vs_baseline, balance)

    r = render.Report()
    r.text(f"# Gallery embedding report — run {run_id}\n\nPreset `{settings.name}`: {settings.model.backbone} at "
           f"{settings.model.image_size} px, {settings.model.pooling} pooling, weightings {', '.join(weightings)}, "
           f"{seeds} seed{'s' if seeds > 1 else ''} ({', '.join(map(str, seeds_of(settings)))}). Every number below was "
           "measured in this run; the paper's figures are shown beside ours, never in our columns. Every comparison "
           "is paired on the same valid galleries and read from its 95% interval: \"consistent with the paper\" only "
           "when the interval excludes no effect on the paper's side."
           + (" Scores are averaged over the seeds, gallery by gallery, before the comparisons." if seeds > 1 else ""))
    r.text("## What this run reproduces\n" + render.findings_markdown(found))
    r.text("## Data\n```\n" + describe(catalogue) + "\n```\n\n" + render.quality_markdown(quality))
    r.text("## Training\n" + render.training_markdown(training))
    r.figure("training_curves.png", render.training_curves({w: t["history"] for w, t in training.items()}),
             "Train and validation total loss per epoch.")

    for h, rows in zip(holdout, table2):
        r.text(f"## Held-out task `{h['task']}` (Table 2)\n{h['metric']} on the valid split, "
               f"{h['valid_galleries']} labelled valid galleries ({h['train_galleries']} train)"
               + ("; 95% Clopper-Pearson intervals in brackets" if seeds == 1 and h["metric"] == "accuracy" else "")
               + ".\n\n" + render.table2_markdown(h) + "\n\n" + render.paired_markdown(h, rows)
               + "\n\n" + render.table2_reading(h, rows))
    r.table("table2.csv", pd.concat([render.table2_frame(h) for h in holdout]) if holdout else pd.DataFrame())
    r.table("table2_comparisons.csv", pd.DataFrame([
        {"holdout_task": h["task"], "row": row["row"], "comparison": name, **effect}
        for h, rows in zip(holdout, table2) for row in rows for name, effect in row.items() if name.startswith("mtl_vs_")]))

    epochs = [o["epochs"] for o in optimal.values() if o["epochs"]]
    ran = ", ".join(f"{w} {len(t['history'])}" for w, t in training.items())
    r.text("## MTL vs task-optimal models (Figure 5)\nError is 1 - accuracy (classification) or MSE (regression) on "
           "the valid split; relative error increase = (err_MTL - err_opt) / err_opt, below 0 when MTL does better, "
           "with a paired bootstrap interval over the task's labelled valid galleries. Budgets: the MTL models at most "
           f"{settings.train.max_epochs} epochs with patience {settings.train.patience} (they ran "
           f"{ran}); each task-optimal model the same "
           f"budget, on the MTL model's batches, with its own early stopping (they ran {np.mean(epochs):.1f} epochs on "
           f"average, {min(epochs, default=0):.0f} to {max(epochs, default=0):.0f}).\n\n"
           + render.per_task_markdown(table, weightings))
    r.table("per_task.csv", table)
    r.figure("relative_error.png", render.relative_error_figure(table, weightings),
             "Relative error increase per task, with 95% intervals.")
    r.text(render.figure5_markdown(vs_optimal, wins, vs_baseline))

    r.text("## Class balance vs MTL benefit (Figure 6)\nBinary tasks: minority-class fraction against relative error "
           "increase. The paper finds a positive r: MTL helps most where classes are most imbalanced.\n\n"
           + render.figure6_markdown(balance))
    r.table("class_balance.csv", pd.DataFrame([
        {"weighting": w, "n": b["pearson"]["n"], "slope": b["slope"], "intercept": b["intercept"], "reading": b["reading"],
         **{f"{kind}_{k}": b[kind][k] for kind in ("pearson", "spearman") for k in ("estimate", "low", "high", "p")}}
        for w, b in balance.items()]))
    r.figure("class_balance.png", render.class_balance_figure(table, balance),
             "Minority-class fraction against relative error increase, with least-squares lines.")
    spread = {}
    if seeds > 1:
        per_seed = [headline_numbers(catalogue, t, h, o) for t, h, o in zip(training_by_seed, holdout_by_seed, optimal_by_seed)]
        spread = {name: seed_spread([n[name] for n in per_seed]) for name in per_seed[0]}
        r.text(f"## Across the {seeds} seeds\nEach seed trained and evaluated on its own; the spread of its headline "
               "numbers:\n\n" + render.seeds_markdown(spread))

    emb_table, _ = read_embeddings(embeddings_location)
    ids = emb_table["gallery_id"].to_pylist()
    embeddings = np.stack(emb_table["embedding"].to_numpy(zero_copy_only=False))
    binary = binary_vs_float(catalogue, ids, embeddings, imagenet_location, embeddings_code(embeddings_location),
                             settings.retrieval)
    if binary:
        r.text("## Binarized embeddings (Pinterest)\n" + render.binary_markdown(binary))
        r.figure("binary_codes.png", render.code_curve_figure(binary),
                 "Recall@10 against float search and top-10 attribute agreement, by bytes per gallery.")
        r.table("binary_codes.csv", render.code_curve_frame(binary))
    attributes = projection_attributes(catalogue)
    if attributes and len(ids) >= 5:
        rows, coords = umap_2d(embeddings, settings.train.seed, settings.evaluation.projection_points)
        frame = catalogue.frame.set_index("gallery_id").loc[[ids[i] for i in rows]]
        r.text("## 2-D projection (Figure 4)")
        r.figure("projection.png", projection_figure(coords, [(t, frame[t.name].to_numpy()) for t in attributes]),
                 "UMAP of the exported embeddings, coloured by attributes (grey: label missing).")
    model = load_trained(catalogue.tasks, catalogue.stats, settings, reference_checkpoints)
    examples = retrieval_examples(model.encoder, catalogue.frame, ids, embeddings, settings.model.image_size,
                                  settings.evaluation.retrieval_examples, settings.train.seed)
    if examples:
        r.text("## Retrieval by seed images (Figure 1)")
        r.figure("retrieval.png", retrieval_figure(examples), "Seeds from a valid gallery; its nearest other galleries.")

    r.metrics = {"run_id": run_id, "preset": settings.name, "galleries": len(catalogue.frame),
                 "exported_galleries": len(ids),
                 "data_quality": {"skipped_images": len(quality.skipped), "excluded_galleries": len(quality.excluded),
                                  "reasons": quality.reasons()},
                 "training": {w: {k: t[k] for k in ("best_epoch", "best_valid_loss", "stopped_early")} | {"epochs": len(t["history"])}
                              for w, t in training.items()},
                 "holdout": holdout, "per_task": table.to_dict("records"), "class_balance": balance,
                 "pseudo_uniform_wins": wins, "comparisons": {
                     "table2": {h["task"]: rows for h, rows in zip(holdout, table2)}, "mtl_vs_task_optimal": vs_optimal,
                     "mtl_vs_baseline": vs_baseline, "findings": found, "seeds": spread},
                 "binary_vs_float": binary, "retrieval": examples}
    log(f"report: {len(r.files)} files")
    return r


def write_report(r: render.Report, location: str) -> None:
    """report.md, metrics.json, the CSV tables and PNG figures into a folder or store location."""
    for name, data in r.files.items():
        storage.write_bytes(storage.join(location, name), data)
    storage.write_bytes(storage.join(location, "metrics.json"), json.dumps(r.metrics, indent=2, default=float).encode())
    storage.write_bytes(storage.join(location, "report.md"), r.markdown().encode())
