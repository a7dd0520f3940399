"""Checks at ingest beyond the schema: what a later step would trip over, found before any work starts.

Ingest reads both inputs through `load_inputs` (so one run names every unreadable file, not the first),
then adds `catalogue_problems`: image references gallery cannot read (an unsupported URI scheme, a
file:// URI of another host), tasks with nothing to learn (one value in train), and regression labels
too large for float32 training. Every problem is a Violation naming file, column, ids and fix.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from gallery.data.contracts import TaskSpec, load_manifest, load_task_spec
from gallery.data.inputs import location_problem
from gallery.data.labels import is_labelled
from gallery.data.tasks import Task
from gallery.errors import ContractError, Violation, example

# Training computes squared errors and variances in float32: a label whose square overflows becomes inf.
FLOAT32_SAFE = float(np.sqrt(np.finfo(np.float32).max))


def load_inputs(manifest_path: str, tasks_path) -> tuple[TaskSpec, pd.DataFrame]:
    """The task spec (an empty one without `tasks_path`) and the raw manifest; a ContractError listing
    the problems of both files when either cannot be read."""
    violations, spec, raw = [], TaskSpec("(no task spec)", [], []), None
    if tasks_path:
        try:
            spec = load_task_spec(tasks_path)
        except ContractError as e:
            violations += e.violations
    try:
        raw = load_manifest(manifest_path)
    except ContractError as e:
        violations += e.violations
    if violations:
        raise ContractError(violations)
    return spec, raw


def catalogue_problems(frame: pd.DataFrame, raw: pd.DataFrame, tasks: list[Task], manifest_path: str) -> list[Violation]:
    """Problems of the ingested catalogue (`frame`: ids, resolved images, split, encoded labels) that
    the contract's per-column checks do not see."""
    return (image_location_problems(frame, manifest_path)
            + [v for task in tasks if task.name in frame for v in task_problems(frame, raw, task, manifest_path)])


def image_location_problems(frame: pd.DataFrame, manifest_path: str) -> list[Violation]:
    """Image references no reader of gallery can open, by reason (an unsupported scheme is refused here,
    not discovered image by image while preprocessing)."""
    by_reason: dict[str, list[str]] = {}
    for gallery_id, images in zip(frame["gallery_id"], frame["images"]):
        for image in images:
            problem = location_problem(image) if (":" in image or "\x00" in image) else None
            if problem:
                by_reason.setdefault(problem, []).append(gallery_id)
    return [Violation(manifest_path, "column 'images'", f"{len(ids)} image reference(s): {reason} (galleries {example(ids)})",
                      "use local paths (relative to the manifest's folder, or absolute), file:///absolute/path, "
                      "s3://, gs:// or http(s):// URIs")
            for reason, ids in by_reason.items()]


def task_problems(frame: pd.DataFrame, raw: pd.DataFrame, task: Task, manifest_path: str) -> list[Violation]:
    """A task with a single value in the train split (nothing to learn, and no positive or no negative
    to evaluate), and regression labels too large for float32."""
    where = f"column {task.column!r} (task {task.name!r})"
    values = frame[task.name].to_numpy()
    train = values[is_labelled(values, task.kind) & (frame["split"].to_numpy() == "train")]
    out = []
    if task.kind == "regression":
        numeric = pd.to_numeric(raw[task.column], errors="coerce").astype("float64").to_numpy()
        huge = np.isfinite(numeric) & (np.abs(numeric) >= FLOAT32_SAFE)
        if huge.any():
            out.append(Violation(manifest_path, where, f"{int(huge.sum())} value(s) of magnitude {FLOAT32_SAFE:.2g} or more "
                                 f"({example(numeric[huge].tolist())} at ids {example(frame['gallery_id'][huge])}): training "
                                 "computes squared errors in float32, where they overflow to infinity",
                                 "rescale the column (e.g. thousands, or log of the value), or mark wrong values null"))
            return out  # the train values below hold those infinities
    distinct = np.unique(train)
    if len(train) and len(distinct) == 1 and task.kind != "multiclass":
        shown = {0.0: "0/false", 1.0: "1/true"}.get(float(distinct[0]), f"{distinct[0]:g}") if task.kind == "binary" \
            else f"{distinct[0]:g}"
        out.append(Violation(manifest_path, where, f"all {len(train)} labelled train product(s) have the same value "
                             f"({shown}): nothing to learn or to tell apart",
                             f"label train products with {'both values' if task.kind == 'binary' else 'different values'}, "
                             "or remove the task"))
    elif task.kind == "multiclass" and task.classes is not None and len(train) and len(distinct) == 1:
        out.append(Violation(manifest_path, where, f"all {len(train)} labelled train product(s) are of one class "
                             f"({task.classes[int(distinct[0])]!r})",
                             "label train products of at least two classes, or remove the task"))
    return out
