"""Search an embeddings file: the nearest galleries to one of its galleries or to seed images.

Float search ranks by cosine similarity; code search (`binary`) finds candidates by Hamming distance
on the file's binary codes and re-ranks the top `RetrievalSettings.rerank` by exact cosine. Up to
`approximate_above` galleries the indexes are exact and built in memory; above it, HNSW (float) or
IVF (codes) indexes and the float16 vectors that re-ranking reads are saved beside the file and
reused until the file changes (gallery.retrieval.saved).

Seed images are embedded together as one gallery by the model of a training run (the caller
resolves the run: gallery.runs.trained_run) and binarized with the code the file names; a model
whose space differs from the file's is refused.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gallery.config import RetrievalSettings
from gallery.data.images import ImageProblem, load_image, read_image_bytes
from gallery.data.shards import as_stored
from gallery.data.inputs import InputProblem, open_random_access
from gallery.errors import UserError, excerpt
from gallery.retrieval.codes import code_of
from gallery.retrieval.embeddings import (
    code_matrix,
    embed_images,
    embedding_matrix,
    read_columns,
    read_embeddings_metadata,
)
from gallery.retrieval.index import BLOCK_ROWS, CodeIndex, FloatIndex, Hits, normalize
from gallery.retrieval.saved import saved_index, saved_vectors


class SearchError(UserError):
    """A search that cannot run as asked; the message names the input and the fix."""


def model_run_id(embeddings_location: str) -> str:
    """The training run whose model made an embeddings file ('latest' when the file does not say)."""
    check_embeddings_file(embeddings_location)
    return read_embeddings_metadata(embeddings_location).get("run_id", "latest")


@dataclass(frozen=True)
class EmbeddingsFile:
    galleries: int
    dimension: int


def check_embeddings_file(location: str, binary: bool = False) -> EmbeddingsFile:
    """An embeddings file's size, after checking (footer and schema only) that it is one a search can use;
    a SearchError naming the file and the fix otherwise."""
    fix = "give an embeddings Parquet file written by the train or embed flow (data_contracts/embeddings.schema.json)"
    try:
        with open_random_access(location, "embeddings") as f:
            meta = pq.read_metadata(f)
    except InputProblem as e:
        raise SearchError(f"embeddings file {e}") from None
    except (pa.ArrowException, OSError) as e:
        raise SearchError(f"embeddings file {location} is not a readable Parquet file, or is cut short "
                          f"({excerpt(str(e), 160, quote=False)}): {fix}") from None
    schema = meta.schema.to_arrow_schema()
    wanted = {"gallery_id": pa.types.is_string, "embedding": _fixed_floats}
    wanted |= {"embedding_bits": pa.types.is_fixed_size_binary} if binary else {}
    missing = [c for c in wanted if c not in schema.names]
    wrong = [f"{c} ({schema.field(c).type})" for c, ok in wanted.items() if c in schema.names and not ok(schema.field(c).type)]
    if missing or wrong:
        raise SearchError(f"embeddings file {location}: " + "; ".join(
            ([f"missing column(s) {', '.join(missing)}"] if missing else [])
            + ([f"column(s) of the wrong type: {', '.join(wrong)} (embedding: fixed-size list of float32, every "
                "gallery the same dimension; embedding_bits: fixed-size binary; gallery_id: string)"] if wrong else []))
            + f": {fix}")
    if binary and b"gallery.dimension" not in (schema.metadata or {}):
        raise SearchError(f"embeddings file {location} names no binary code (no gallery.* metadata): search it "
                          "without --binary, or export it with the train or embed flow")
    if meta.num_rows == 0:
        raise SearchError(f"embeddings file {location} holds no galleries: {fix}")
    return EmbeddingsFile(meta.num_rows, schema.field("embedding").type.list_size)


def _fixed_floats(kind: pa.DataType) -> bool:
    return pa.types.is_fixed_size_list(kind) and pa.types.is_float32(kind.value_type)


def check_seeds(images) -> None:
    """Check that every seed photo can be read (bounded, gallery.data.inputs) before anything slower
    runs; a SearchError listing each unreadable one."""
    problems = []
    for image in images:
        try:
            read_image_bytes(image)
        except ImageProblem as e:
            problems.append(f"seed image {excerpt(image, 200, quote=False)}: {e}")
    if problems:
        raise SearchError("; ".join(problems) + "; pass readable JPEG/PNG/WEBP/GIF files")


class FileIndex:
    """The index of one embeddings file, for float or code search, exact or approximate by its size."""

    def __init__(self, location: str, binary: bool, settings: RetrievalSettings = RetrievalSettings(), log=print):
        self.location, self.binary = location, binary
        self.metadata = read_embeddings_metadata(location)
        approximate = check_embeddings_file(location, binary).galleries > settings.approximate_above
        if binary:
            self.code = code_of(self.metadata)
            self.codes = code_matrix(read_columns(location, ["embedding_bits"]))
            index, vectors = None, None
            if approximate:
                index = saved_index(location, "codes-ivf", {"code": self.code.name, "lists": settings.ivf_lists},
                                    lambda: CodeIndex(self.codes, settings).index, binary=True, log=log)
            if settings.rerank:
                vectors = (saved_vectors(location, "rerank-float16", {}, self._unit_float16, log)
                           if approximate else normalize(self._floats()))
            self.index = CodeIndex(self.codes, settings, index=index, vectors=vectors)
        elif approximate:
            params = {"links": settings.hnsw_links, "build_breadth": settings.hnsw_build_breadth}
            self.index = FloatIndex(settings=settings, index=saved_index(
                location, "float-hnsw", params, lambda: FloatIndex(self._floats(), settings).index, binary=False, log=log))
        else:
            self.index = FloatIndex(self._floats(), settings)

    def _floats(self) -> np.ndarray:
        return embedding_matrix(read_columns(self.location, ["embedding"]))

    def _unit_float16(self) -> np.ndarray:
        """The vectors two-stage search re-ranks with on a large catalogue: half the bytes of float32."""
        floats = self._floats()
        return np.concatenate([normalize(floats[s:s + BLOCK_ROWS]).astype(np.float16) for s in range(0, len(floats), BLOCK_ROWS)])

    def encode_query(self, vector: np.ndarray) -> np.ndarray:
        """A query embedding's bits, by the code that made the file's bits."""
        return self.code.encode(vector[None])

    def search_vector(self, vector: np.ndarray, k: int) -> Hits:
        """Nearest galleries to an embedding (e.g. of seed images)."""
        if self.binary:
            return self.index.search(self.encode_query(vector), k, vector[None])
        return self.index.search(vector[None], k)

    def search_row(self, row: int, k: int) -> Hits:
        """Nearest galleries to the file's gallery at `row`, queried with its stored vector (and bits)."""
        if self.binary:
            query = None if self.index.vectors is None else np.asarray(self.index.vectors[row], np.float32)[None]
            return self.index.search(self.codes[row], k, query)
        return self.index.search(self.index.vector(row), k)


def search_embeddings(embeddings_location: str, k: int = 10, binary: bool = False, images=None,
                      gallery_id: str | None = None, model_run=None, settings: RetrievalSettings = RetrievalSettings(),
                      log=print) -> list[tuple[str, float]]:
    """Top-k galleries of an embeddings file for one of its galleries, or for seed images embedded
    by `model_run`'s model (a gallery.runs.TrainedRun; normally the run that made the file, whose id
    is in the file's metadata: `read_embeddings_metadata(location)["run_id"]`). Scores are cosine
    similarities, or Hamming distances in bits for code search with `settings.rerank` 0."""
    if (images is None) == (gallery_id is None):
        raise SearchError("give seed images (--images) or an existing gallery (--gallery-id), not both")
    if k < 1:
        raise SearchError(f"-k {k}: ask for at least 1 gallery")
    dimension = check_embeddings_file(embeddings_location, binary).dimension
    ids = read_columns(embeddings_location, ["gallery_id"])["gallery_id"].to_pylist()
    if gallery_id is not None and gallery_id not in ids:
        raise SearchError(f"gallery {excerpt(gallery_id)} is not in {embeddings_location} ({len(ids)} galleries)")
    query = None if images is None else _embed_seeds(embeddings_location, dimension, images, model_run)
    index = FileIndex(embeddings_location, binary, settings, log)
    k = min(k, len(ids))
    hits = index.search_row(ids.index(gallery_id), k) if query is None else index.search_vector(query, k)
    return [(ids[r], float(s)) for r, s in zip(hits.rows[0], hits.scores[0]) if r >= 0]


def _embed_seeds(embeddings_location: str, dimension: int, images, model_run) -> np.ndarray:
    """Seed images embedded as one gallery by the run's model, after checking it made the file's space."""
    if model_run is None:
        raise ValueError("seed images need the training run whose model embeds them (model_run)")
    model = seed_model(embeddings_location, model_run)
    pictures, data = [], model_run.settings.data
    for image in images:
        try:  # prepared as training saw its photos: resized, then stored and read back as its shards did
            pictures.append(as_stored(load_image(image, model_run.settings.model.image_size), data.image_format,
                                      data.image_quality))
        except ImageProblem as e:
            name = excerpt(image, 200, quote=False) if isinstance(image, str) else f"({len(image)} bytes)"
            raise SearchError(f"seed image {name}: {e}; pass readable JPEG/PNG/WEBP/GIF files") from None
    return embed_images(model.encoder, pictures)


def seed_model(embeddings_location: str, model_run):
    """The run's model (a gallery.runs.TrainedRun's), refused unless it made the file's space: seeds it
    embeds are then comparable with the file's galleries (also what `gallery serve` embeds photos with)."""
    meta = read_embeddings_metadata(embeddings_location)
    model = model_run.model()
    if int(meta["dimension"]) != model.encoder.dim:
        raise SearchError(f"{embeddings_location} holds {meta.get('dimension')}-d embeddings "
                          f"({meta.get('backbone')}), but run {model_run.run_id}'s model makes {model.encoder.dim}-d "
                          f"ones ({model_run.settings.model.backbone}): search with the run that made the file "
                          f"(--run {meta.get('run_id')}) or embed the catalogue with flows/embed_flow.py")
    if meta.get("run_id") not in (None, model_run.run_id):
        raise SearchError(f"{embeddings_location} was made by run {meta['run_id']}, the seeds would be embedded by "
                          f"run {model_run.run_id}: two models, two spaces. Pass --run {meta['run_id']}, or embed "
                          f"the catalogue with run {model_run.run_id} (flows/embed_flow.py --train-run {model_run.run_id})")
    return model
