"""One side of `gallery compare`: a finished training run (everything it measured), or an exported model
folder with an embeddings file its model made (its embeddings and code only)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

import gallery.storage as storage
from gallery.data.tasks import Task
from gallery.errors import UserError
from gallery.model.identity import ModelIdentity
from gallery.retrieval.embeddings import embedding_matrix, read_embeddings

if TYPE_CHECKING:
    from gallery.evaluation.retrieval_suite import RetrievalResult
    from gallery.evaluation.transfer import TransferResult
    from gallery.training.engine import GalleryScores


class CompareError(UserError):
    """Two things that cannot be compared, or one that cannot be read: what and how to fix it."""


@dataclass
class Side:
    """What one side brings: its embeddings (ids, vectors, binary codes) and, for a run, what the run measured
    of its exported model: transfer scores, per-task test scores, retrieval, the catalogue's labels, costs."""

    source: str                          # the run id, or the model folder, as given
    identity: ModelIdentity | None
    run_id: str | None
    embeddings_location: str
    ids: list[str]
    splits: list[str]                    # each gallery's split in the run that trained the model
    vectors: np.ndarray                  # (n, d), rows in `ids` order
    code_bytes: int                      # bytes of one gallery's binary code
    transfer: TransferResult | None = None   # the transfer suite of the exported model's seed (runs)
    test: GalleryScores | None = None        # the exported model's scores on its test split (runs)
    task_kinds: dict[str, str] = field(default_factory=dict)      # the tests' tasks -> kind (their error)
    retrieval: RetrievalResult | None = None  # runs with metric tasks
    labels: dict[str, np.ndarray] = field(default_factory=dict)   # classification attribute -> label per id
    label_tasks: list[Task] = field(default_factory=list)
    train_seconds: float | None = None
    embed_seconds_per_gallery: float | None = None

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]


def _embeddings(location: str) -> tuple[list[str], list[str], np.ndarray, int, dict]:
    table, meta = read_embeddings(location)
    code_bytes = table.schema.field("embedding_bits").type.byte_width
    return (table["gallery_id"].to_pylist(), table["split"].to_pylist(), embedding_matrix(table), int(code_bytes),
            meta)


def run_side(run: str) -> Side:
    """A finished GalleryTrainFlow run: its exported embeddings and what its report measured."""
    from gallery.data.labels import MISSING_CLASS
    from gallery.runs import finished_run

    found = finished_run(run)
    data = found["end"].task.data
    ids, splits, vectors, code_bytes, _ = _embeddings(data.embeddings_location)
    reference = data.training_by_seed[0][data.reference]
    frame = data.catalogue.frame.set_index("gallery_id").reindex(ids)
    tasks = [t for t in [*data.catalogue.tasks, *data.catalogue.holdout]
             if t.kind in ("binary", "multiclass") and t.name in frame.columns]
    labels = {t.name: np.where(frame[t.name].to_numpy() == MISSING_CLASS, np.nan, frame[t.name].to_numpy(float))
              for t in tasks}
    return Side(str(run), data.reference, found.id, data.embeddings_location, ids, splits, vectors, code_bytes,
                data.transfer_by_seed[0], reference.test, {t.name: t.kind for t in data.catalogue.trained},
                data.retrieval_result, labels, tasks,
                sum(e.seconds for e in reference.history), data.embedding_seconds_per_gallery)


def model_side(folder: str, embeddings_location: str | None) -> Side:
    """An exported model folder with an embeddings file its model made (checked by the file's run id)."""
    from gallery.artifact.folder import check_made_by, read_config

    if not embeddings_location:
        raise CompareError(f"{folder} is a model folder: give the embeddings file its model made "
                           "(--embeddings-a / --embeddings-b), since a folder holds no embeddings")
    config = read_config(folder)
    ids, splits, vectors, code_bytes, meta = _embeddings(embeddings_location)
    check_made_by(config, folder, embeddings_location, meta)
    return Side(folder, config.identity, config.run_id, embeddings_location, ids, splits, vectors, code_bytes)


def side(source: str, embeddings_location: str | None = None) -> Side:
    """A model folder (a folder or s3:// prefix holding config.json) or a run id ('latest' too)."""
    if storage.is_uri(source) or os.path.isdir(source):
        return model_side(source, embeddings_location)
    if embeddings_location:
        raise CompareError(f"{source} is a run: it brings its own embeddings; give --embeddings-a/-b only with a "
                           "model folder")
    return run_side(source)
