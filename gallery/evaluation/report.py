"""The run report (DESIGN §7): every table, figure and reading, assembled in reading order.

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
from gallery.evaluation.render import PAPER_BALANCE_R, PAPER_PU_WINS
from gallery.evaluation.retrieval_examples import retrieval_examples, retrieval_figure
from gallery.evaluation.task_optimal import class_balance, per_task_table, pseudo_uniform_wins
from gallery.retrieval.embeddings import embeddings_code, read_embeddings
from gallery.training.checkpoints import load_trained


def build_report(run_id: str, settings: Settings, catalogue: Catalogue, quality: DataQuality, training: dict,
                 holdout: list[dict], optimal: dict, embeddings_location: str, imagenet_location: str,
                 reference_checkpoints: str, log=print) -> render.Report:
    """Tables, figures, a short reading of the results beside the paper's, and metrics.json."""
    weightings = list(training)
    table = per_task_table(catalogue, training, optimal)
    balance = class_balance(table, weightings)
    wins = pseudo_uniform_wins(table) if {"pseudo_uniform", "kendall"} <= set(weightings) else None
    r = render.Report()
    r.text(f"# Gallery embedding report — run {run_id}\n\nPreset `{settings.name}`: {settings.model.backbone} at "
           f"{settings.model.image_size} px, {settings.model.pooling} pooling, weightings {', '.join(weightings)}. "
           "Every number below was measured in this run; the paper's figures are shown beside ours, never in our columns.")
    r.text("## Data\n```\n" + describe(catalogue) + "\n```\n\n" + render.quality_markdown(quality))
    r.text("## Training\n" + render.training_markdown(training))
    r.figure("training_curves.png", render.training_curves({w: t["history"] for w, t in training.items()}),
             "Train and validation total loss per epoch.")

    for h in holdout:
        r.text(f"## Held-out task `{h['task']}` (Table 2)\n{h['metric']} on the valid split, "
               f"{h['valid_galleries']} labelled valid galleries ({h['train_galleries']} train); "
               f"95% intervals in brackets.\n\n" + render.table2_markdown(h) + "\n\n" + render.table2_reading(h))
    r.table("table2.csv", pd.concat([render.table2_frame(h) for h in holdout]) if holdout else pd.DataFrame())

    r.text("## MTL vs task-optimal models (Figure 5)\nError is 1 - accuracy (classification) or MSE (regression) on "
           "the valid split; relative error increase = (err_MTL - err_opt) / err_opt, below 0 when MTL does better. "
           f"Task-optimal models: the same architecture on one task, trained on the MTL model's batches with the "
           f"same budget (at most {settings.train.max_epochs} epochs, patience {settings.train.patience}), each with "
           "its own early stopping.\n\n" + render.per_task_markdown(table, weightings))
    r.table("per_task.csv", table)
    r.figure("relative_error.png", render.relative_error_figure(table, weightings), "Relative error increase per task.")
    better = {w: int((table[f"relative_error_increase_{w}"] < 0).sum()) for w in weightings}
    lines = [f"MTL ({w}) beats the task-optimal model on {n} of {len(table)} tasks." for w, n in better.items()]
    if wins:
        lines.append(f"Pseudo-uniform has a lower error than Kendall on {wins['wins']} of {wins['tasks']} tasks "
                     f"({wins['share']:.0%}); the paper: {PAPER_PU_WINS[0]} of {PAPER_PU_WINS[1]} (71%).")
    r.text("\n".join(f"- {line}" for line in lines))

    r.text("## Class balance vs MTL benefit (Figure 6)\n" + "\n".join(
        f"- {w}: Pearson r = {render.fmt(b['r'], 2)}, p = {render.fmt(b['p'], 4)} over {b['n']} binary tasks "
        f"(paper: r = {PAPER_BALANCE_R.get(w, float('nan')):.2f}, p < .001): {render.balance_reading(b)}"
        for w, b in balance.items()))
    r.table("class_balance.csv", pd.DataFrame([{"weighting": w, **b} for w, b in balance.items()]))
    r.figure("class_balance.png", render.class_balance_figure(table, balance),
             "Minority-class fraction against relative error increase, with least-squares lines.")

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
                 "pseudo_uniform_wins": wins, "binary_vs_float": binary, "retrieval": examples}
    log(f"report: {len(r.files)} files")
    return r


def write_report(r: render.Report, location: str) -> None:
    """report.md, metrics.json, the CSV tables and PNG figures into a folder or store location."""
    for name, data in r.files.items():
        storage.write_bytes(storage.join(location, name), data)
    storage.write_bytes(storage.join(location, "metrics.json"), json.dumps(r.metrics, indent=2, default=float).encode())
    storage.write_bytes(storage.join(location, "report.md"), r.markdown().encode())
