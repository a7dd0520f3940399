"""Engagement pairs of a `pairs` task (co-views, co-bookings): read, checked, and told apart for training
and evaluation.

A pair naming a gallery the manifest lacks, a gallery paired with itself, a repeated pair (either order)
and a weight that is not a positive number are dropped, counted and listed in the run's data_quality.csv;
a file missing a column, or left with no pair, stops ingest with a ContractError. Training uses only the
pairs whose ends are both train galleries (valid-valid pairs give the validation loss); every pair,
those that cross splits included, is relevance ground truth for the retrieval evaluation.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from gallery.data.contracts import MANIFEST_FORMATS, decode_table
from gallery.data.inputs import InputProblem, MissingInput, read_bounded
from gallery.data.tasks import Task
from gallery.errors import ContractError, Violation, example

PAIR_COLUMNS = ("gallery_a", "gallery_b")
WEIGHT = "weight"


@dataclass(frozen=True)
class SkippedPair:
    """A pair left out of a pairs task, and why (a row of data_quality.csv)."""

    task: str
    row: int          # in the file, from 1
    gallery_a: str
    gallery_b: str
    reason: str


@dataclass
class Pairs:
    """A pairs task's engagement as rows of the catalogue's frame, each unordered pair once."""

    a: np.ndarray        # (P,) int64
    b: np.ndarray        # (P,) int64
    weight: np.ndarray   # (P,) float64, > 0

    def __len__(self) -> int:
        return len(self.a)

    def select(self, keep: np.ndarray) -> "Pairs":
        return Pairs(self.a[keep], self.b[keep], self.weight[keep])

    def within(self, split: np.ndarray, name: str) -> "Pairs":
        """The pairs whose both ends are in split `name` (`split`: each frame row's split)."""
        return self.select((split[self.a] == name) & (split[self.b] == name))

    def crossing(self, split: np.ndarray) -> int:
        """How many pairs join galleries of two splits (evaluation only: never trained on)."""
        return int((split[self.a] != split[self.b]).sum())


def read_pairs(task: Task, gallery_ids: pd.Series) -> tuple[Pairs, list[SkippedPair]]:
    """The pairs of `task.file` as rows of the catalogue (`gallery_ids`, in frame order) and what was
    dropped; a ContractError when the file cannot be read, lacks a column, or keeps no pair."""
    path = task.file
    frame = _read_table(task)
    where = f"task {task.name!r} (pairs file)"
    missing = [c for c in PAIR_COLUMNS if c not in frame.columns]
    if missing:
        raise ContractError([Violation(path, where, f"missing column(s) {example(missing)} (columns: "
                                       f"{example(frame.columns, 8)})",
                                       "give one row per pair with columns gallery_a, gallery_b and an optional "
                                       "positive weight")])
    ids_a, ids_b = (frame[c].astype("string").fillna("").to_numpy(dtype=object) for c in PAIR_COLUMNS)
    weight = (pd.to_numeric(frame[WEIGHT], errors="coerce").to_numpy(float) if WEIGHT in frame.columns
              else np.ones(len(frame)))
    position = pd.Index(gallery_ids.astype(str))
    a, b = position.get_indexer(ids_a), position.get_indexer(ids_b)
    reasons = np.full(len(frame), "", dtype=object)
    reasons[(a < 0) | (b < 0)] = "names a gallery the manifest does not list"
    reasons[(ids_a == "") | (ids_b == "")] = "an empty gallery id"
    reasons[(reasons == "") & (a == b)] = "a gallery paired with itself"
    reasons[(reasons == "") & ~(np.isfinite(weight) & (weight > 0))] = "weight is not a positive number"
    usable = np.flatnonzero(reasons == "")
    low, high = np.minimum(a[usable], b[usable]), np.maximum(a[usable], b[usable])
    reasons[usable[pd.DataFrame({"low": low, "high": high}).duplicated().to_numpy()]] = \
        "repeats an earlier pair (in either order)"
    skipped = [SkippedPair(task.name, int(i) + 1, ids_a[i], ids_b[i], reasons[i]) for i in np.flatnonzero(reasons != "")]
    keep = reasons == ""
    if not keep.any():
        raise ContractError([Violation(path, where, f"no usable pair among its {len(frame)} row(s)"
                                       + (f": {skipped[0].reason} (row {skipped[0].row}: {skipped[0].gallery_a!r}, "
                                          f"{skipped[0].gallery_b!r}), ..." if skipped else ""),
                                       "pair galleries listed in the manifest (gallery_id), each pair once")])
    return Pairs(a[keep].astype(np.int64), b[keep].astype(np.int64), weight[keep]), skipped


def _read_table(task: Task) -> pd.DataFrame:
    path = task.file
    fmt = MANIFEST_FORMATS.get(Path(path).suffix.lower())
    where = f"task {task.name!r} (pairs file)"
    if fmt is None:
        raise ContractError([Violation(path, where, f"unsupported format {Path(path).suffix or '(no suffix)'!r}",
                                       "write the pairs as .parquet, .csv or .jsonl")])
    try:
        data = read_bounded(path, "manifest")
    except InputProblem as e:
        raise ContractError([Violation(path, where, "the file does not exist" if isinstance(e, MissingInput)
                                       else e.reason, f"fix `file:` of task {task.name!r} (relative paths are from "
                                       "the task spec's folder)" if isinstance(e, MissingInput) else e.fix)]) from None
    return decode_table(path, fmt, data, PAIR_COLUMNS)


def pair_notes(task: Task, pairs: Pairs, skipped: list[SkippedPair], split: np.ndarray) -> list[str]:
    """What `gallery validate` and the ingest step say of a pairs task beyond its counts."""
    notes = []
    if skipped:
        by_reason: dict[str, int] = {}
        for s in skipped:
            by_reason[s.reason] = by_reason.get(s.reason, 0) + 1
        notes.append(f"task {task.name!r}: {len(skipped)} pair(s) dropped (" + ", ".join(
            f"{n} {r}" for r, n in by_reason.items()) + "); data_quality.csv lists them")
    crossing = pairs.crossing(split)
    if crossing:
        notes.append(f"task {task.name!r}: {crossing} pair(s) join galleries of two splits: kept as relevance for "
                     "the retrieval evaluation, never trained on")
    return notes
