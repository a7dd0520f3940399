"""What a learning target is: a manifest column, its kind and, for multiclass tasks, its classes.

Its own module so that the contract checks (contracts) and the label encoding (labels) can both
name it without importing each other.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    """One learning target: a manifest column and how to read it."""

    name: str
    column: str
    kind: str
    classes: tuple[str, ...] | None = None  # multiclass: class keys (see labels.label_key), in output order
    num_classes: int | None = None
    positive: object = None
    description: str = ""

    @property
    def out_dim(self) -> int:
        """Width of the head's output layer."""
        if self.kind != "multiclass":
            return 1
        if self.classes is not None:
            return len(self.classes)
        if self.num_classes is None:
            raise ValueError(f"task {self.name!r}: classes are unknown until the data is read "
                             "(declare `classes` or `num_classes` in the task spec)")
        return self.num_classes
