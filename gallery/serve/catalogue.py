"""The catalogue as the service shows it: each served gallery's attributes and photo locations, from the manifest.

Values are the manifest's own (as the user wrote them), not the training encodings: a merchandiser
reads "hotel", not class 3. Categorical values are compared as `label_key` text, so a filter
`star_rating=4` matches 4, 4.0 and "4" alike. The task spec says which columns are tasks and which
are held out; they come first in the lists of attributes. The manifest stays one pandas frame aligned
with the embeddings file's rows; Python values are made per request, so a large catalogue costs its
frame and no more.
"""
from __future__ import annotations

import math
import threading

import numpy as np
import pandas as pd
from pandas.api.types import is_bool_dtype, is_numeric_dtype

import gallery.storage as storage
from gallery.data.contracts import RESERVED_COLUMNS, load_manifest, load_task_spec
from gallery.data.ingest import resolve_image
from gallery.data.labels import label_key
from gallery.data.pairs import read_pairs
from gallery.serve.problems import RequestProblem

MAX_LISTED_VALUES = 50  # categorical values listed per attribute (more: a free-text column, not colourable)
ROLES = ("task", "holdout", "column")


class Attribute:
    def __init__(self, name: str, kind: str, role: str, values: tuple[str, ...]):
        self.name = name      # the manifest column
        self.kind = kind      # binary | multiclass | regression (tasks), number | text (other columns)
        self.role = role      # task | holdout | column
        self.values = values  # categorical values present, in display order (() for numbers and long lists)

    @property
    def numeric(self) -> bool:
        return self.kind in ("regression", "number")


def display(value):
    """A manifest cell as JSON: a number, a boolean, text, or None for missing."""
    if value is None or value is pd.NA or (isinstance(value, float) and not math.isfinite(value)):
        return None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return str(value)


def _ordered(keys) -> tuple[str, ...]:
    """Numeric order when every value is a number (star ratings), else alphabetical."""
    keys = sorted(set(keys))
    try:
        return tuple(sorted(keys, key=float))
    except ValueError:
        return tuple(keys)


class Relevance:
    """What the catalogue says belongs together: per metric task, an identity task's group of each gallery
    and a pairs task's partners (the engagement file read as at ingest, bad pairs dropped), by row."""

    def __init__(self, groups: dict[str, np.ndarray], partners: dict[str, dict[int, set[int]]]):
        self.groups, self.partners = groups, partners

    @staticmethod
    def of(metric_tasks, frame: pd.DataFrame) -> "Relevance":
        groups, partners = {}, {}
        ids = pd.Series(frame.index.astype(str))
        for task in metric_tasks:
            if task.kind == "identity" and task.column in frame.columns:
                groups[task.name] = frame[task.column].astype("string").to_numpy(dtype=object, na_value=None)
            elif task.kind == "pairs":
                pairs, _ = read_pairs(task, ids)
                linked: dict[int, set[int]] = {}
                for a, b in zip(pairs.a.tolist(), pairs.b.tolist()):
                    linked.setdefault(a, set()).add(b)
                    linked.setdefault(b, set()).add(a)
                partners[task.name] = linked
        return Relevance(groups, partners)

    def __bool__(self) -> bool:
        return bool(self.groups or self.partners)

    def between(self, row: int, other: int) -> tuple[str, ...]:
        """The metric tasks by which gallery `other` is relevant to gallery `row` (same group, engaged)."""
        same = tuple(name for name, g in self.groups.items() if g[row] is not None and g[row] == g[other])
        return same + tuple(name for name, linked in self.partners.items() if other in linked.get(row, ()))


class ServedCatalogue:
    """Attributes and photo locations of the galleries `ids` (the embeddings file's rows, in its order)."""

    def __init__(self, manifest_location: str, tasks_location: str | None, ids: list[str]):
        raw = load_manifest(manifest_location)
        raw = raw.assign(gallery_id=raw["gallery_id"].astype(str)).drop_duplicates("gallery_id")
        self.frame = raw.set_index("gallery_id").reindex(ids)
        self.base = storage.parent(manifest_location)
        roles, metric = {}, []
        if tasks_location:
            spec = load_task_spec(tasks_location)
            roles = {t.column: (t.kind, "task") for t in spec.tasks} | {t.column: (t.kind, "holdout") for t in spec.holdout}
            metric = spec.metric
        self.relevance = Relevance.of(metric, self.frame)
        columns = [c for c in self.frame.columns if c not in RESERVED_COLUMNS]
        self.attributes = sorted((self._attribute(c, *roles.get(c, (None, "column"))) for c in columns),
                                 key=lambda a: ROLES.index(a.role))
        self._keys: dict[str, np.ndarray] = {}
        self._keys_lock = threading.Lock()

    def _attribute(self, column: str, kind: str | None, role: str) -> Attribute:
        values = self.frame[column]
        if kind is None:
            kind = "number" if is_numeric_dtype(values) and not is_bool_dtype(values) else "text"
        if kind in ("regression", "number"):
            return Attribute(column, kind, role, ())
        present = values.dropna().unique()
        keys = _ordered(label_key(v) for v in present) if len(present) <= MAX_LISTED_VALUES else ()
        return Attribute(column, kind, role, keys)

    def attribute(self, name: str) -> Attribute:
        for a in self.attributes:
            if a.name == name:
                return a
        raise RequestProblem(f"attribute {name!r} is not a column of the catalogue; "
                             f"attributes: {', '.join(a.name for a in self.attributes) or 'none'}")

    def photos(self, row: int) -> list[str]:
        """A gallery's photo locations, as the manifest resolves them (relative to its folder)."""
        refs = self.frame["images"].iloc[row]
        return [resolve_image(r, self.base) for r in refs] if isinstance(refs, list) else []

    def of(self, row: int) -> dict:
        """One gallery's attributes, by column, in the manifest's order."""
        values = self.frame.iloc[row]
        return {c: display(values[c]) for c in self.frame.columns if c not in RESERVED_COLUMNS}

    def colour(self, name: str, rows) -> list:
        """An attribute's values for some rows, as the map colours them: numbers, or categorical keys."""
        attribute = self.attribute(name)
        values = [display(v) for v in self.frame[name].iloc[list(rows)]]
        return values if attribute.numeric else [None if v is None else label_key(v) for v in values]

    def keys(self, name: str) -> np.ndarray:
        """Every gallery's value of an attribute as label_key text ('' when missing), made once per attribute."""
        self.attribute(name)
        with self._keys_lock:
            if name not in self._keys:
                values = (display(v) for v in self.frame[name])
                self._keys[name] = np.array(["" if v is None else label_key(v) for v in values], dtype=object)
            return self._keys[name]

    def matching(self, where: dict[str, str | list[str]]) -> np.ndarray:
        """Boolean mask of the galleries whose attributes equal every `where` entry (compared as label_key
        text): an attribute given several values matches any of them (as SQL's IN), different attributes all."""
        mask = np.ones(len(self.frame), bool)
        for name, wanted in where.items():
            values = filter_values(wanted)
            if not values or "" in values:
                raise RequestProblem(f"filter on {name!r} has no value: write {name}=VALUE")
            mask &= np.isin(self.keys(name), [label_key(v) for v in values])
        return mask


def filter_values(wanted: str | list[str]) -> list[str]:
    """A filter's values: one, or a list of which any may match."""
    return [wanted] if isinstance(wanted, str) else list(wanted)
