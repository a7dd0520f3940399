"""The explorer's 2-D map of the galleries: UMAP of the float embeddings (as the report's Figure 4), made once.

UMAP takes seconds to minutes, so the coordinates are saved beside the embeddings file (as the search
indexes are, gallery.retrieval.saved) and reused until the file changes; a catalogue larger than
`max_points` is shown as a seeded sample of that many galleries.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gallery.evaluation.projection import umap_2d
from gallery.retrieval.embeddings import embedding_matrix, read_columns
from gallery.retrieval.saved import saved_vectors


@dataclass(frozen=True)
class GalleryMap:
    rows: np.ndarray  # (m,) rows of the embeddings file shown, ascending
    xy: np.ndarray    # (m, 2) their map coordinates


def gallery_map(embeddings_location: str, max_points: int, seed: int = 0, log=print) -> GalleryMap:
    def build() -> np.ndarray:
        log(f"mapping the galleries of {embeddings_location} in 2-D (UMAP, at most {max_points:,} of them)")
        floats = embedding_matrix(read_columns(embeddings_location, ["embedding"]))
        rows, coords = umap_2d(floats, seed, max_points)
        return np.column_stack([rows, coords]).astype(np.float64)

    stored = np.asarray(saved_vectors(embeddings_location, "map-umap", {"points": max_points, "seed": seed}, build, log))
    return GalleryMap(stored[:, 0].astype(np.int64), stored[:, 1:3].copy())
