"""2-D map of the gallery embeddings (paper Fig. 4): UMAP, coloured by a few attributes; made once per
embeddings file and saved beside it (the report's figure and the explorer page show the same map)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from gallery.data.ingest import Catalogue
from gallery.data.labels import MISSING_CLASS
from gallery.data.tasks import Task
from gallery.retrieval.embeddings import embedding_matrix, read_columns
from gallery.retrieval.index import normalize, one_faiss_thread
from gallery.retrieval.saved import saved_vectors


def projection_attributes(catalogue: Catalogue, limit: int = 3) -> list[Task]:
    """Classification tasks worth colouring by: the holdout first, then multiclass tasks with few classes."""
    holdout = [t for t in catalogue.holdout if t.kind == "multiclass"]
    few = sorted((t for t in catalogue.tasks if t.kind == "multiclass" and t.out_dim <= 12), key=lambda t: t.out_dim)
    return (holdout + few)[:limit]


def agreement_attributes(catalogue: Catalogue, limit: int = 2) -> list[Task]:
    """Attributes a neighbour should share: property type and region when present, else the
    multiclass MTL tasks with the fewest classes."""
    named = [t for t in catalogue.tasks if t.column in ("property_type", "world_region")]
    few = sorted((t for t in catalogue.tasks if t.kind == "multiclass"), key=lambda t: t.out_dim)
    return (named or few)[:limit]


def cache_umaps_compiled_code() -> None:
    """UMAP compiles the numba functions of its neighbour graph and layout without numba's cache, about
    8 s in every new process (each report and evaluate step): cache them too. Before their first use."""
    import umap.layouts
    import umap.umap_

    for module, name in ((umap.umap_, "smooth_knn_dist"), (umap.umap_, "compute_membership_strengths"),
                         (umap.layouts, "_nb_optimize_layout_euclidean_single_epoch")):
        function = getattr(module, name, None)  # absent in another UMAP version: it just compiles
        if hasattr(function, "enable_caching") and not function.signatures:
            function.enable_caching()


def umap_2d(embeddings: np.ndarray, seed: int, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows used, their 2-D coordinates) by UMAP over cosine neighbours; a seeded sample when there are
    more than max_points.

    The neighbour graph UMAP starts from is computed exactly (faiss, a few thousand points) and handed
    to it, instead of UMAP's approximate nearest-neighbour descent: 1.9 s against 13 s for the default's
    2,000 galleries (measured on 2 cores, UMAP's compiled code cached). Its numba functions compile on
    first use in every new process: a cache folder shared by runs (NUMBA_CACHE_DIR, set only if the user
    has not) keeps the compiled code. 200 optimisation epochs instead of UMAP's 500 for small inputs: a
    figure, not an analysis. Capped: with m = min(N, max_points), time O(N) to sample plus O(m²·d) for the
    exact neighbour graph and O(m·n_neighbors·epochs) for the layout, memory O(m·d)."""
    os.environ.setdefault("NUMBA_CACHE_DIR", str(Path.home() / ".cache" / "gallery" / "numba"))
    import umap  # heavy import (numba): only where it is used

    cache_umaps_compiled_code()

    rows = np.arange(len(embeddings))
    if len(rows) > max_points:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_points, replace=False))
    n_neighbors = max(2, min(15, len(rows) - 1))
    unit = normalize(embeddings[rows])
    with one_faiss_thread():
        index = faiss.IndexFlatIP(unit.shape[1])
        index.add(unit)
        similarity, neighbours = index.search(unit, n_neighbors)
    distance = np.sqrt(np.maximum(2.0 - 2.0 * similarity, 0.0)).astype(np.float32)  # Euclidean on unit vectors
    coords = umap.UMAP(n_components=2, n_neighbors=n_neighbors, n_epochs=200, random_state=seed,
                       precomputed_knn=(neighbours, distance, None)).fit_transform(unit)
    return rows, coords


@dataclass(frozen=True)
class GalleryMap:
    rows: np.ndarray  # (m,) rows of the embeddings file shown, ascending
    xy: np.ndarray    # (m, 2) their map coordinates


def gallery_map(embeddings_location: str, max_points: int, seed: int = 0, log=print) -> GalleryMap:
    """The UMAP map of an embeddings file's galleries (a seeded sample of `max_points` at most), saved
    beside the file (as the search indexes are, gallery.retrieval.saved) and reused until it changes.
    Time O(N·d) to read the file plus `umap_2d`'s, capped by `max_points`; memory O(N·d)."""
    def build() -> np.ndarray:
        log(f"mapping the galleries of {embeddings_location} in 2-D (UMAP, at most {max_points:,} of them)")
        floats = embedding_matrix(read_columns(embeddings_location, ["embedding"]))
        rows, coords = umap_2d(floats, seed, max_points)
        return np.column_stack([rows, coords]).astype(np.float64)

    stored = np.asarray(saved_vectors(embeddings_location, "map-umap", {"points": max_points, "seed": seed}, build, log))
    return GalleryMap(stored[:, 0].astype(np.int64), stored[:, 1:3].copy())


def projection_figure(coords: np.ndarray, colourings: list[tuple[Task, np.ndarray]]):
    """One panel per attribute; unlabelled galleries in light grey."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(colourings), figsize=(5.2 * len(colourings), 4.6), squeeze=False)
    for ax, (task, labels) in zip(axes[0], colourings):
        missing = labels == MISSING_CLASS
        ax.scatter(coords[missing, 0], coords[missing, 1], s=4, c="#dddddd", label="unlabelled")
        cmap = plt.get_cmap("viridis" if all(c.isdigit() for c in task.classes) else "tab10", len(task.classes))
        for k, name in enumerate(task.classes):
            mask = labels == k
            if mask.any():
                ax.scatter(coords[mask, 0], coords[mask, 1], s=5, color=cmap(k), label=name)
        ax.set(title=task.name, xticks=[], yticks=[])
        ax.legend(fontsize=6, markerscale=2, loc="best", ncol=2)
    fig.suptitle("UMAP of the MTL gallery embeddings")
    fig.tight_layout()
    return fig
