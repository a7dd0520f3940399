"""The catalogue as the service shows it: each served gallery's attributes and photo locations, from the manifest.

Values are the manifest's own (as the user wrote them), not the training encodings: a merchandiser
reads "hotel", not class 3. Categorical values are compared as `label_key` text, so a filter
`star_rating=4` matches 4, 4.0 and "4" alike. The task spec says which columns are tasks and which
are held out; they are the ones the map can be coloured by.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from gallery.data.contracts import RESERVED_COLUMNS, load_manifest, load_task_spec
from gallery.data.ingest import resolve_image
from gallery.data.labels import label_key
from gallery.serve.problems import RequestProblem
import gallery.storage as storage

MAX_LISTED_VALUES = 50  # categorical values listed per attribute (beyond: a free-text column)


@dataclass(frozen=True)
class Attribute:
    name: str                   # the manifest column
    kind: str                   # binary | multiclass | regression | text | number
    role: str                   # task | holdout | column
    values: tuple[str, ...]     # categorical values present, in display order ('' for numbers and long lists)

    @property
    def numeric(self) -> bool:
        return self.kind in ("regression", "number")


def _display(value):
    """A manifest cell as JSON: a number, text, or None for missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return str(value)


def _ordered(keys) -> tuple[str, ...]:
    keys = sorted(set(keys))
    try:
        return tuple(sorted(keys, key=float))
    except ValueError:
        return tuple(keys)


class ServedCatalogue:
    """Attributes and photo locations of the galleries `ids` (the embeddings file's rows, in its order)."""

    def __init__(self, manifest_location: str, tasks_location: str | None, ids: list[str]):
        raw = load_manifest(manifest_location)
        raw = raw.assign(gallery_id=raw["gallery_id"].astype(str)).drop_duplicates("gallery_id")
        frame = raw.set_index("gallery_id").reindex(ids)
        base = storage.parent(manifest_location)
        self.photos = [[resolve_image(r, base) for r in refs] if isinstance(refs, list) else []
                       for refs in frame["images"]]
        roles = {}
        if tasks_location:
            spec = load_task_spec(tasks_location)
            roles = {t.column: (t.kind, "task") for t in spec.tasks} | {t.column: (t.kind, "holdout") for t in spec.holdout}
        columns = [c for c in frame.columns if c not in RESERVED_COLUMNS]
        self.values = {c: [_display(v) for v in frame[c]] for c in columns}
        self.attributes = [self._attribute(c, *roles.get(c, (None, "column"))) for c in columns]
        self.attributes.sort(key=lambda a: ("task", "holdout", "column").index(a.role))

    def _attribute(self, column: str, kind: str | None, role: str) -> Attribute:
        present = [v for v in self.values[column] if v is not None]
        if kind is None:
            kind = "number" if present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present) \
                else "text"
        if kind in ("regression", "number"):
            return Attribute(column, kind, role, ())
        keys = _ordered(label_key(v) for v in present)
        return Attribute(column, kind, role, keys if len(keys) <= MAX_LISTED_VALUES else ())

    def attribute(self, name: str) -> Attribute:
        for a in self.attributes:
            if a.name == name:
                return a
        raise RequestProblem(f"attribute {name!r} is not a column of the catalogue; "
                             f"attributes: {', '.join(a.name for a in self.attributes) or 'none'}")

    def of(self, row: int) -> dict:
        """One gallery's attributes, by column."""
        return {c: values[row] for c, values in self.values.items()}

    def colour(self, name: str, rows) -> list:
        """An attribute's values for some rows, as the map colours them: numbers, or categorical keys."""
        attribute = self.attribute(name)
        values = [self.values[name][r] for r in rows]
        return values if attribute.numeric else [None if v is None else label_key(v) for v in values]

    def matching(self, where: dict[str, str]) -> np.ndarray:
        """Boolean mask of the galleries whose attributes equal every `where` value (compared as label_key text)."""
        mask = np.ones(len(self.photos), bool)
        for name, wanted in where.items():
            self.attribute(name)
            key = label_key(wanted)
            mask &= np.array([v is not None and label_key(v) == key for v in self.values[name]])
        return mask
