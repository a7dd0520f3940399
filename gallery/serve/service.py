"""The loaded service: a run's embeddings, float and code indexes, model and catalogue, in memory once.

Every answer the HTTP app gives is computed here, as plain functions of plain inputs (no HTTP), so the
bench and the tests call it directly. Search by a gallery, by a vector, or by seed photos embedded as
one gallery by the run's model (the same model and the same steps as `gallery search --images`);
"float" search ranks by exact (or HNSW) cosine, "code" search is two-stage: Hamming candidates on the
binary codes re-ranked by exact cosine (gallery.retrieval.search.FileIndex). Filters keep the galleries
whose manifest attributes equal the given values (every attribute filtered on, any of the values given for
one); the index is asked for more candidates until k pass (among the nearest FILTER_DEPTH: every gallery
of a catalogue up to that size).
"""
from __future__ import annotations

import io
import threading
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

from gallery.config import RetrievalSettings
from gallery.data.images import ImageProblem, load_image
from gallery.data.shards import as_stored
from gallery.model.gallery_model import GalleryEncoder
from gallery.retrieval.codes import code_of
from gallery.retrieval.embeddings import embed_images, read_columns, read_embeddings_metadata
from gallery.retrieval.search import FileIndex, model_run_id, seed_model
from gallery.runs import RunNotFound, TrainedRun, trained_run
from gallery.evaluation.projection import GalleryMap, gallery_map
from gallery.serve.catalogue import ServedCatalogue, filter_values
from gallery.serve.problems import NotFound, RequestProblem, Unavailable

SEARCHES = ("float", "code")
FILTER_FETCH = 64      # candidates asked for first when a filter may drop some (then 4x more, ...
FILTER_DEPTH = 20_000  # ... up to this many: a filter few galleries pass may find fewer than k in a larger catalogue


@dataclass(frozen=True)
class Embedder:
    """The run's image encoder, the photo size it was trained at and how its shards stored photos (format,
    quality): what turns seed photos into a query, prepared as training saw its photos."""

    encoder: GalleryEncoder
    image_size: int
    run_id: str
    stored: tuple[str, int] = ("jpeg", 90)


@dataclass(frozen=True)
class Hit:
    gallery_id: str
    score: float
    relevant: tuple[str, ...] = ()   # the metric tasks by which the catalogue says it belongs with the query


@dataclass(frozen=True)
class Ranking:
    search: str      # float | code
    score: str       # what the scores are: cosine, or hamming bits (code search without re-ranking)
    hits: list[Hit]


class Service:
    def __init__(self, embeddings_location: str, embedder: Embedder | None = None,
                 catalogue_files: tuple[str, str | None] | None = None, settings: RetrievalSettings = RetrievalSettings(),
                 searches=SEARCHES, map_points: int = 3000, log=print):
        """Load everything a request needs. `catalogue_files`: (manifest, task spec) for attributes and
        photos; `searches`: which indexes to hold (a large catalogue may keep the codes only)."""
        unknown = set(searches) - set(SEARCHES)
        if unknown or not searches:
            raise RequestProblem(f"searches {sorted(unknown) or '(none)'}: choose from {', '.join(SEARCHES)}")
        self.location, self.embedder, self.map_points, self.log = embeddings_location, embedder, map_points, log
        self.metadata = read_embeddings_metadata(embeddings_location)
        columns = read_columns(embeddings_location, ["gallery_id", "split"])
        self.ids, self.splits = columns["gallery_id"].to_pylist(), columns["split"].to_pylist()
        self.rows = {gallery_id: row for row, gallery_id in enumerate(self.ids)}
        self.dimension, self.code = int(self.metadata["dimension"]), code_of(self.metadata)
        self.rerank = settings.rerank
        self.indexes = {s: FileIndex(embeddings_location, s == "code", settings, log) for s in SEARCHES if s in searches}
        self.catalogue = None if catalogue_files is None else ServedCatalogue(*catalogue_files, self.ids)
        self._map: GalleryMap | None = None
        self._map_lock = threading.Lock()

    @property
    def run_id(self) -> str | None:
        return self.metadata.get("run_id")

    def describe(self) -> dict:
        return {"run_id": self.run_id, "galleries": len(self.ids), "dimension": self.dimension,
                "code": self.code.name, "code_bits": self.code.bits, "searches": list(self.indexes),
                "rerank": self.rerank, "seed_photos": self.embedder is not None,
                "image_size": None if self.embedder is None else self.embedder.image_size,
                "catalogue": self.catalogue is not None}

    # ------------------------------------------------------------------ search

    def row(self, gallery_id: str) -> int:
        if gallery_id not in self.rows:
            raise NotFound(f"gallery {gallery_id!r} is not among the {len(self.ids):,} galleries of run {self.run_id}")
        return self.rows[gallery_id]

    def neighbours(self, gallery_id: str, k: int, searches=SEARCHES, where: dict | None = None) -> list[Ranking]:
        """The k nearest other galleries to one of the file's galleries, by each search asked for; each hit
        names the metric tasks by which the catalogue says it belongs with the gallery (same group, engaged)."""
        row = self.row(gallery_id)
        found = [self._ranking(s, k, lambda index, n: index.search_row(row, n), where, exclude=row)
                 for s in self._searches(searches)]
        if self.catalogue is None or not self.catalogue.relevance:
            return found
        relevance = self.catalogue.relevance
        return [replace(r, hits=[replace(h, relevant=relevance.between(row, self.rows[h.gallery_id])) for h in r.hits])
                for r in found]

    def search_vector(self, vector, k: int, searches=SEARCHES, where: dict | None = None) -> list[Ranking]:
        """The k nearest galleries to an embedding made elsewhere (by this run's model: see embed)."""
        query = self.query_vector(vector)
        return [self._ranking(s, k, lambda index, n: index.search_vector(query, n), where) for s in self._searches(searches)]

    def query_vector(self, vector) -> np.ndarray:
        try:
            query = np.asarray(vector, np.float32).reshape(-1)
        except (TypeError, ValueError):
            raise RequestProblem("vector: give a list of numbers") from None
        if len(query) != self.dimension:
            raise RequestProblem(f"vector has {len(query)} values, but run {self.run_id}'s embeddings have "
                                 f"{self.dimension}: embed with this run's model (POST /api/embed)")
        if not np.isfinite(query).all() or not np.abs(query).sum():
            raise RequestProblem("vector must be finite and not all zeros")
        return query

    def _searches(self, searches) -> list[str]:
        searches = list(searches)
        for s in searches:
            if s not in self.indexes:
                held = ", ".join(self.indexes)
                raise (Unavailable if s in SEARCHES else RequestProblem)(
                    f"search {s!r}: this server answers {held} search (start it with --search to hold others)")
        return searches

    def _ranking(self, search: str, k: int, find, where: dict | None, exclude: int | None = None) -> Ranking:
        index, n = self.indexes[search], len(self.ids)
        allowed = None if not where else self._matching(where)
        wanted = min(k, n - (exclude is not None))
        fetch = wanted + (exclude is not None) if allowed is None else max(FILTER_FETCH, 4 * wanted)
        limit = n if allowed is None else min(n, FILTER_DEPTH)
        while True:
            fetch = min(fetch, limit)
            hits = find(index, fetch)
            rows = [(r, s) for r, s in zip(hits.rows[0], hits.scores[0])
                    if r >= 0 and r != exclude and (allowed is None or allowed[r])]
            if len(rows) >= wanted or fetch >= limit:
                break
            fetch *= 4
        score = "hamming bits" if search == "code" and not index.index.rerank_depth else "cosine"
        return Ranking(search, score, [Hit(self.ids[r], float(s)) for r, s in rows[:wanted]])

    def _matching(self, where: dict) -> np.ndarray:
        if self.catalogue is None:
            raise Unavailable("filters need the catalogue's attributes: this server was started without a manifest")
        mask = self.catalogue.matching(where)
        if not mask.any():
            wanted = (f"{k}={' or '.join(map(repr, filter_values(v)))}" for k, v in where.items())
            raise NotFound(f"no gallery has {', '.join(wanted)}")
        return mask

    # ------------------------------------------------------------------ seed photos

    def model(self) -> Embedder:
        if self.embedder is None:
            raise Unavailable("this server has no model to embed photos with: start it with --run RUN, or --model FOLDER "
                              "(the training run that made the embeddings)")
        return self.embedder

    def embed(self, photos: list[np.ndarray]) -> np.ndarray:
        """Photos (already decoded at `model().image_size`) embedded together as one gallery, after the round
        trip through the shards' storage format that training's photos took."""
        model = self.model()
        if not photos:
            raise RequestProblem("no photos: upload at least one (field 'photos') or name one (field 'paths')")
        return embed_images(model.encoder, [as_stored(p, *model.stored) for p in photos])

    def binary_code(self, vector: np.ndarray) -> bytes:
        """An embedding's packed bits, by the code that made the file's bits."""
        return self.code.encode(vector[None])[0].tobytes()

    # ------------------------------------------------------------------ what the explorer shows

    def gallery(self, gallery_id: str) -> dict:
        row = self.row(gallery_id)
        shown = {"gallery_id": gallery_id, "split": self.splits[row], "photos": 0, "attributes": {}}
        if self.catalogue is not None:
            shown |= {"photos": len(self.catalogue.photos(row)), "attributes": self.catalogue.of(row)}
        return shown

    def photo(self, gallery_id: str, index: int, size: int) -> bytes:
        """One of a gallery's photos as a size x size JPEG thumbnail, read through the image loader."""
        row = self.row(gallery_id)
        if self.catalogue is None:
            raise Unavailable("this server was started without the catalogue's manifest: it has no photos to show")
        photos = self.catalogue.photos(row)
        if not 0 <= index < len(photos):
            raise NotFound(f"gallery {gallery_id!r} has {len(photos)} photo(s): index {index} is out of range")
        try:
            pixels = load_image(photos[index], size)
        except ImageProblem as e:
            raise NotFound(f"photo {index} of gallery {gallery_id!r} cannot be read: {e}") from None
        return jpeg(pixels)

    def map(self) -> GalleryMap:
        """The 2-D map, made (or read from beside the embeddings) on first use."""
        with self._map_lock:
            if self._map is None:
                self._map = gallery_map(self.location, self.map_points, log=self.log)
            return self._map


def jpeg(pixels: np.ndarray, quality: int = 85) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def service_from_run(run: TrainedRun, embeddings_location: str | None = None, searches=SEARCHES, with_model: bool = True,
                     log=print) -> Service:
    """The service of a finished training run: its embeddings (or another file its model made), its model
    (checked to have made the file's space, as `gallery search --images` checks) and its catalogue."""
    location = embeddings_location or run.embeddings_location
    embedder = None
    if with_model:
        model = seed_model(location, run)
        data = run.settings.data
        embedder = Embedder(model.encoder, run.settings.model.image_size, run.run_id, (data.image_format, data.image_quality))
    catalogue = (run.manifest_location, run.tasks_location) if run.manifest_location else None
    return Service(location, embedder, catalogue, run.settings.retrieval, searches, run.settings.evaluation.projection_points,
                   log)


def open_service(run: str | None = None, embeddings_location: str | None = None, manifest: str | None = None,
                 tasks: str | None = None, searches=SEARCHES, with_model: bool = True, log=print) -> Service:
    """The service `gallery serve` starts: a run's (default: the latest), or an embeddings file's with the
    run named in its metadata; a file whose run is not in this datastore is served without a model (no
    seed photos). `manifest` and `tasks` replace the run's catalogue."""
    if embeddings_location is None or run is not None:
        found = trained_run(run or "latest")
    else:
        try:
            found = trained_run(model_run_id(embeddings_location))
        except RunNotFound as e:
            log(f"serving {embeddings_location} without a model, so without seed-photo search: {e}")
            found = None
    if found is not None:
        if manifest:
            found = replace(found, manifest_location=manifest, tasks_location=tasks or "")
        return service_from_run(found, embeddings_location, searches, with_model, log)
    return Service(embeddings_location, None, (manifest, tasks) if manifest else None, RetrievalSettings(), searches, log=log)


def service_from_model(folder: str, embeddings_location: str, manifest: str | None = None, tasks: str | None = None,
                       searches=SEARCHES, log=print) -> Service:
    """The service of an exported model folder (gallery.artifact) and an embeddings file its model made: no
    Metaflow run store needed. Seed photos are embedded by the folder's model, so the file must be its space."""
    from gallery.artifact.folder import check_made_by
    from gallery.artifact.loaded import load_model

    model = load_model(folder)
    check_made_by(model.config, folder, embeddings_location, read_embeddings_metadata(embeddings_location))
    p = model.config.preprocessing
    embedder = Embedder(model.model.encoder, p.image_size, model.config.run_id or folder, (p.stored_as, p.stored_quality))
    return Service(embeddings_location, embedder, (manifest, tasks) if manifest else None, RetrievalSettings(), searches,
                   log=log)
