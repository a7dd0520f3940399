"""The explorer's compare view: the served run's embeddings (A) beside another embedding of the same
galleries (B: another run's, or any embeddings file), so a user sees what changes when B replaces A.

Both sides are read over the galleries both files hold, in A's order (gallery.compare.neighbours
needs one shared order). Each side keeps its own 2-D map (the map saved beside its file, as the
single explorer shows it); the page shows the shared galleries that are on both maps. A's catalogue
gives the attributes and photos of both: the galleries are the same, only the embeddings differ.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

import gallery.storage as storage
from gallery.compare.neighbours import K, neighbour_change
from gallery.errors import UserError
from gallery.evaluation.projection import gallery_map
from gallery.retrieval.embeddings import embedding_matrix, read_columns, read_embeddings_metadata
from gallery.retrieval.search import check_embeddings_file
from gallery.runs import RunNotFound, trained_run
from gallery.serve.problems import NotFound
from gallery.serve.service import Service


class ComparisonProblem(UserError):
    """A `--compare` that names no embeddings, or embeddings without two galleries in common with the served ones."""


def comparison_location(other: str) -> str:
    """`--compare`'s argument as an embeddings file: a path (or URI) as given, else a run id's embeddings."""
    if storage.is_uri(other) or "/" in other or "\\" in other or other.endswith(".parquet") or storage.exists(other):
        return other
    try:
        return trained_run(other).embeddings_location
    except RunNotFound as e:
        raise ComparisonProblem(f"--compare {other}: no such embeddings file, and {e}") from None


@dataclass(frozen=True)
class SharedMaps:
    """The shared galleries on both maps: their positions in the shared order and their coordinates on each map."""

    shown: np.ndarray  # (m,) positions in CompareView.ids
    a_xy: np.ndarray   # (m, 2) on A's map
    b_xy: np.ndarray   # (m, 2) on B's map


class CompareView:
    """What the compare view shows: the served embeddings (A) and another file (B) over their shared galleries,
    each gallery's top k under both, and both maps."""

    def __init__(self, service: Service, b_location: str, k: int = K, log=print):
        """Read B over the galleries both hold and compute every shared gallery's top k under each (exact
        cosine: O(n² d) time, done once here)."""
        self.a, self.b_location, self.log = service, b_location, log
        check_embeddings_file(b_location)
        b_table = read_columns(b_location, ["gallery_id", "embedding"])
        b_rows = {gallery_id: row for row, gallery_id in enumerate(b_table["gallery_id"].to_pylist())}
        self.b_galleries, self.b_run_id = b_table.num_rows, read_embeddings_metadata(b_location).get("run_id")
        self.ids = [g for g in service.ids if g in b_rows]
        if len(self.ids) < 2:
            common = "only 1 gallery_id in common (neighbours need 2)" if self.ids else "no gallery_id in common"
            raise ComparisonProblem(
                f"{service.location} ({len(service.ids):,} galleries) and {b_location} ({self.b_galleries:,}) have "
                f"{common}: compare two embeddings of the same catalogue (e.g. another run's embeddings, or the "
                "embed flow's output for this run's manifest)")
        self.position = {gallery_id: i for i, gallery_id in enumerate(self.ids)}
        self.a_rows = np.array([service.rows[g] for g in self.ids])
        self.b_rows = np.array([b_rows[g] for g in self.ids])
        a_vectors = embedding_matrix(read_columns(service.location, ["embedding"]))[self.a_rows]
        log(f"comparing the top {k} neighbours of the {len(self.ids):,} galleries of {service.location} and {b_location}")
        self.change = neighbour_change(a_vectors, embedding_matrix(b_table)[self.b_rows], k)
        self._maps: SharedMaps | None = None
        self._maps_lock = threading.Lock()

    def describe(self) -> dict:
        """Both sides as the page names them, and how many galleries they share."""
        return {"a": {"run_id": self.a.run_id, "location": self.a.location, "galleries": len(self.a.ids)},
                "b": {"run_id": self.b_run_id, "location": self.b_location, "galleries": self.b_galleries},
                "shared": len(self.ids), "k": self.change.k}

    def neighbours(self, gallery_id: str) -> dict:
        """A shared gallery's top k under A and under B, and the share of A's that B keeps."""
        if gallery_id not in self.position:
            raise NotFound(f"gallery {gallery_id!r} is not among the {len(self.ids):,} galleries that both "
                           f"{self.a.location} and {self.b_location} hold")
        i = self.position[gallery_id]
        a, b = ([self.ids[r] for r in rows if r >= 0] for rows in (self.change.a[i], self.change.b[i]))
        return {"gallery_id": gallery_id, "k": self.change.k, "overlap": float(self.change.overlap[i]), "a": a, "b": b}

    def maps(self) -> SharedMaps:
        """Where the shared galleries lie on A's map and on B's (each made, or read from beside its file, once)."""
        with self._maps_lock:
            if self._maps is None:
                a_map, b_map = self.a.map(), gallery_map(self.b_location, self.a.map_points, log=self.log)
                a_at, b_at = _places(a_map.rows, len(self.a.ids)), _places(b_map.rows, self.b_galleries)
                a_place, b_place = a_at[self.a_rows], b_at[self.b_rows]
                shown = np.flatnonzero((a_place >= 0) & (b_place >= 0))
                self._maps = SharedMaps(shown, a_map.xy[a_place[shown]], b_map.xy[b_place[shown]])
            return self._maps


def _places(rows: np.ndarray, n: int) -> np.ndarray:
    """Each file row's place among a map's rows, -1 when the map leaves it out (a sampled map)."""
    at = np.full(n, -1)
    at[rows] = np.arange(len(rows))
    return at
