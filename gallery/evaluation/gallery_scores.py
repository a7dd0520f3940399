"""Per-gallery scores beside metrics.json, as Parquet: one long table per evaluation, one row per scored
gallery of each thing scored (a transfer probe on an arm, a 2-layer head's row, a task-optimal model).

metrics.json keeps the summaries and names these files, so its size does not grow with the catalogue (the
per-gallery scores were ~90% of it at 2,000 galleries, and would be ~900 MB at 520k); the paired
statistics can be recomputed from the tables. Models and arms are columns of their fields, never names.
"""
from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gallery.evaluation.arms import arm_columns
from gallery.evaluation.holdout import HoldoutResult
from gallery.evaluation.task_optimal import TaskOptimalResult
from gallery.evaluation.transfer import ProbeScores

TRANSFER = "transfer_scores.parquet"          # task, probe, arm's fields, gallery_id, score
HOLDOUT = "holdout_scores.parquet"            # task, arm's fields, row (data seen), gallery_id, score
TASK_OPTIMAL = "task_optimal_scores.parquet"  # task, gallery_id, score (test)
SCORE = "1/0 for a right/wrong class, or the squared error"


def _long(parts: list[tuple[dict, list[str], np.ndarray]]) -> pa.Table:
    """One table from (constant columns, gallery ids, scores) parts: the constants repeated per gallery."""
    sizes = [len(ids) for _, ids, _ in parts]
    names = list(parts[0][0]) if parts else []
    columns = {n: pa.array(np.repeat(np.array([c[n] for c, _, _ in parts], dtype=object), sizes).tolist())
               for n in names}
    columns["gallery_id"] = pa.array([g for _, ids, _ in parts for g in ids], pa.string())
    columns["score"] = pa.array(np.concatenate([np.asarray(s, float) for _, _, s in parts]) if parts else [], pa.float64())
    return pa.table(columns).replace_schema_metadata({"score": SCORE})  # what a score is, for a reader of the file


def transfer_table(scores: list[ProbeScores]) -> pa.Table:
    return _long([({"task": s.task, "probe": s.probe, **arm_columns(s.arm)}, s.gallery_ids, s.scores) for s in scores])


def holdout_table(holdouts: list[HoldoutResult]) -> pa.Table:
    return _long([({"task": h.task, **arm_columns(a.arm), "row": row.label}, h.scored_ids, row.scores)
                  for h in holdouts for a in h.arms for row in a.rows])


def task_optimal_table(optimal: dict[str, TaskOptimalResult]) -> pa.Table:
    return _long([({"task": name}, o.test_ids, o.test_scores) for name, o in optimal.items()])


def parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def score_files(transfer: list[ProbeScores], holdouts: list[HoldoutResult],
                optimal: dict[str, TaskOptimalResult]) -> dict[str, bytes]:
    """The three files by name (task-optimal only where the run trained them)."""
    files = {TRANSFER: transfer_table(transfer), HOLDOUT: holdout_table(holdouts)}
    if optimal:
        files[TASK_OPTIMAL] = task_optimal_table(optimal)
    return {name: parquet_bytes(table) for name, table in files.items()}
