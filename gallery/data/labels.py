"""Turn label columns into training targets, and summarise them on the train split.

Encoded forms (one array per task, aligned with the manifest rows):
- binary: float32 in {0, 1}, NaN = missing
- multiclass: int64 class index, -1 = missing
- regression: float32, NaN = missing (NaN and inf in the input count as missing)
- identity: float32 class index of the gallery's group (groups with two or more train galleries); valid and
  test galleries of other groups of two or more get numbers past the classes; NaN otherwise
The train-split statistics feed the pseudo-uniform loss (regression variances) and the reports
(class balance).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np
import pandas as pd

from gallery.data.tasks import Task
from gallery.errors import example

MISSING_CLASS = -1
_BOOL_WORDS = {"1": 1, "0": 0, "true": 1, "false": 0, "yes": 1, "no": 0, "y": 1, "n": 0, "t": 1, "f": 0}


def label_key(value) -> str:
    """Canonical text of a label so that 3, 3.0 and '3' (Parquet ints with nulls become floats) match."""
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer():
        return str(int(value))
    return str(value)


def _sort_classes(keys) -> list[str]:
    """Numeric order when every class is a number (star ratings, buckets), else alphabetical."""
    keys = list(keys)
    try:
        return sorted(keys, key=float)
    except ValueError:
        return sorted(keys)


@dataclass
class Encoded:
    values: np.ndarray
    task: Task                       # with multiclass classes resolved
    problems: list[tuple[str, str]]    # (problem, fix): contract violations in this column
    notes: list[str]                   # non-fatal observations for the data-quality report


def _ids_where(ids: pd.Series, mask) -> list:
    return list(ids[np.asarray(mask)])


def encode_labels(column: pd.Series, task: Task, is_train: np.ndarray, ids: pd.Series) -> Encoded:
    """Encode one label column for `task`; contract problems are returned, not raised."""
    missing = column.isna().to_numpy()
    keys = pd.Series([None if m else label_key(v) for v, m in zip(column, missing)], index=column.index, dtype=object)
    problems: list[tuple[str, str]] = []
    notes: list[str] = []

    if task.kind == "binary":
        present = sorted(set(keys[~missing]))
        if len(present) > 2:
            problems.append((f"binary column has {len(present)} distinct values {example(present)}",
                             "a binary column holds two values (0/1, true/false, yes/no) and null for missing; "
                             "declare the task `kind: multiclass` if it has more"))
            values = np.full(len(column), np.nan, np.float32)
        elif task.positive is not None:
            values = np.where(missing, np.nan, (keys == label_key(task.positive)).to_numpy()).astype(np.float32)
        else:
            unknown = [k for k in present if k.lower() not in _BOOL_WORDS]
            if unknown:
                problems.append((f"binary values {example(present)} are not 0/1, true/false or yes/no",
                                 f"declare `positive: <the value that means 1>` for task {task.name!r}"))
            values = np.array([np.nan if m else _BOOL_WORDS.get(k.lower(), np.nan) for k, m in zip(keys, missing)],
                               dtype=np.float32)

    elif task.kind == "multiclass":
        if task.classes is not None:
            classes = list(task.classes)
            outside = ~missing & ~keys.isin(classes).to_numpy()
            if outside.any():
                problems.append((f"{int(outside.sum())} label(s) outside the declared classes: values "
                                 f"{example(sorted(set(keys[outside])))} at ids {example(_ids_where(ids, outside))}",
                                 f"add these values to `classes` of task {task.name!r}, or correct the labels"))
        else:
            classes = _sort_classes(set(keys[~missing & is_train]))
            if task.num_classes is not None and len(classes) > task.num_classes:
                problems.append((f"the train split holds {len(classes)} classes but `num_classes` is {task.num_classes}",
                                 f"raise `num_classes` of task {task.name!r}, or list its `classes`"))
            if 0 < len(classes) < 2:
                problems.append((f"only one class ({classes[0]!r}) in the train split",
                                 "a multiclass task needs at least two classes in train; drop the task or add labels"))
            unseen = ~missing & ~is_train & ~keys.isin(classes).to_numpy()
            if unseen.any():
                notes.append(f"task {task.name!r}: {int(unseen.sum())} valid/test label(s) of classes unseen in train "
                             f"({example(sorted(set(keys[unseen])))}) treated as missing")
        index = {c: i for i, c in enumerate(classes)}
        values = np.array([index.get(k, MISSING_CLASS) if k is not None else MISSING_CLASS for k in keys], np.int64)
        task = replace(task, classes=tuple(classes))

    elif task.kind == "regression":
        numeric = pd.to_numeric(column, errors="coerce").astype("float64").to_numpy()
        unparsable = ~missing & np.isnan(numeric)
        if unparsable.any():
            problems.append((f"{int(unparsable.sum())} non-numeric value(s) {example(sorted(set(keys[unparsable])))} "
                             f"at ids {example(_ids_where(ids, unparsable))}",
                             "a regression column holds numbers, with null (or NaN) for missing"))
        values = np.where(np.isfinite(numeric), numeric, np.nan).astype(np.float32)
    elif task.kind == "identity":
        values, task = _encode_groups(keys, task, is_train, problems, notes)
    else:  # the task schema admits no other kind (a pairs task has no column: gallery.data.pairs)
        raise ValueError(f"unknown task kind {task.kind!r}")

    if not problems and not is_labelled(values, task.kind)[is_train].any():
        problems.append(("no labels in the train split",
                         f"label some train products for task {task.name!r}, or remove the task"))
    return Encoded(values, task, problems, notes)


def _encode_groups(keys: pd.Series, task: Task, is_train: np.ndarray, problems: list, notes: list):
    """An identity column: each group with two or more train galleries is a class (its index); a train
    gallery of another group trains nothing (NaN) but stays in the catalogue as a distractor. A valid or
    test gallery gets its group's class, or for a group the classifier never saw a number of its own past
    the classes, where the group has another gallery in its split (what validation needs: its partner in
    the batch, gallery.model.metric), NaN otherwise."""
    present = keys.notna().to_numpy()
    if present.any() and keys[present].nunique() < 2:
        problems.append((f"every labelled product is in one group ({keys[present].iloc[0]!r})",
                         "an identity column tells items apart: give each group of interchangeable products its "
                         "own id, or remove the task"))
        return np.full(len(keys), np.nan, np.float32), task
    train_sizes = keys[present & is_train].value_counts()
    classes = sorted(train_sizes.index[train_sizes >= 2])
    if present.any() and not classes:
        problems.append(("no group has two train products: nothing to learn",
                         f"give task {task.name!r} groups with several train products (re-listings of one item)"))
    index = {c: i for i, c in enumerate(classes)}
    values = np.array([index.get(k, np.nan) if k is not None else np.nan for k in keys], np.float32)
    held = present & ~is_train
    held_sizes = keys[held].value_counts()
    unseen = sorted(k for k, n in held_sizes.items() if n >= 2 and k not in index)
    numbers = index | {k: len(classes) + i for i, k in enumerate(unseen)}
    values[held] = [numbers.get(k, np.nan) for k in keys[held]]
    groups = keys[present].value_counts()
    notes.append(f"task {task.name!r}: {len(groups)} groups, {int((groups >= 2).sum())} with two or more products; "
                 f"{len(classes)} train as classes, {int((groups == 1).sum())} single products stay as distractors")
    return values, replace(task, num_classes=len(classes))


def is_labelled(values: np.ndarray, kind: str) -> np.ndarray:
    return values != MISSING_CLASS if kind == "multiclass" else ~np.isnan(values)


@dataclass
class LabelStats:
    """Train-split summary of one task (JSON-friendly via `as_dict`)."""

    kind: str
    labelled: dict[str, int]
    class_counts: list[int] | None = None
    minority_fraction: float | None = None
    mean: float | None = None
    variance: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def label_statistics(values: np.ndarray, task: Task, split: np.ndarray) -> LabelStats:
    """Counts per split; on train: class counts and minority fraction, or mean and variance (an identity
    task: the counts only)."""
    labelled = is_labelled(values, task.kind)
    counts = {s: int((labelled & (split == s)).sum()) for s in np.unique(split)}
    train = values[labelled & (split == "train")]
    stats = LabelStats(task.kind, counts)
    if task.kind == "binary":
        positives = int(train.sum())
        stats.class_counts = [len(train) - positives, positives]
        stats.minority_fraction = min(stats.class_counts) / max(len(train), 1)
    elif task.kind == "multiclass":
        stats.class_counts = np.bincount(train, minlength=task.out_dim).tolist()
        stats.minority_fraction = min(stats.class_counts) / max(len(train), 1)
    elif task.kind == "regression":
        stats.mean = float(train.mean()) if len(train) else None
        stats.variance = float(train.var(ddof=1)) if len(train) > 1 else None
    return stats


def label_matrix(frame: pd.DataFrame, tasks: list[Task], gallery_ids) -> np.ndarray:
    """(galleries, tasks) float32 targets in `gallery_ids` order, NaN = missing: every task's labels
    in one array, so a batch's targets reach the device in one copy (class indices are exact in float32)."""
    position = frame.reset_index(drop=True).set_index("gallery_id").index.get_indexer(list(gallery_ids))
    if (position < 0).any():
        missing = [g for g, p in zip(gallery_ids, position) if p < 0][:5]
        raise KeyError(f"galleries {missing} are not in the catalogue")
    out = np.empty((len(position), len(tasks)), np.float32)
    for k, task in enumerate(tasks):
        values = frame[task.name].to_numpy()[position]
        out[:, k] = np.where(is_labelled(values, task.kind), values, np.nan)
    return out
