"""What a learning target is: a manifest column, its kind and, for multiclass tasks, its classes.

Attribute tasks (binary, multiclass, regression) get a head each. Metric tasks (identity, pairs) have no
head: they train the normalised gallery embedding itself (Pinterest's metric learning, gallery.model.metric).

Its own module so that the contract checks (contracts) and the label encoding (labels) can both
name it without importing each other.
"""
from __future__ import annotations

from dataclasses import dataclass

ATTRIBUTE_KINDS = ("binary", "multiclass", "regression")
METRIC_KINDS = ("identity", "pairs")  # identity: a group id column; pairs: an engagement file of gallery pairs


@dataclass(frozen=True)
class Task:
    """One learning target: a manifest column and how to read it."""

    name: str
    column: str | None
    kind: str
    classes: tuple[str, ...] | None = None  # multiclass: class keys (see labels.label_key), in output order
    num_classes: int | None = None          # multiclass: declared cardinality; identity: the trained groups
    positive: object = None
    description: str = ""
    file: str | None = None                 # pairs: the engagement file, resolved (gallery.data.pairs)

    @property
    def is_metric(self) -> bool:
        """A metric-learning task: it trains the embedding directly, has no head and no per-gallery score."""
        return self.kind in METRIC_KINDS

    @property
    def out_dim(self) -> int:
        """Width of the head's output layer (none for a metric task)."""
        if self.is_metric:
            return 0
        if self.kind != "multiclass":
            return 1
        if self.classes is not None:
            return len(self.classes)
        if self.num_classes is None:
            raise ValueError(f"task {self.name!r}: classes are unknown until the data is read "
                             "(declare `classes` or `num_classes` in the task spec)")
        return self.num_classes
