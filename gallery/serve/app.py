"""The HTTP app of `gallery serve` (FastAPI; uvicorn runs it): the service's answers as JSON, the explorer page at /.

Work that costs CPU (searches, decoding and embedding photos, thumbnails, the map) runs on a bounded
pool of worker threads: at most `Limits.workers` at once and `Limits.queue` waiting, beyond that 503.
Seed-photo work takes at most all workers but one, so searches by id are answered while uploads decode,
and decodes only within the server-wide budget of pixels decoded at once (gallery.serve.limits.DecodeBudget).
Every problem with a request is a 4xx whose `detail` names what is wrong (gallery.serve.problems);
anything else is a 500 that is logged, and the process goes on.
"""
from __future__ import annotations

import logging
from contextlib import nullcontext
from functools import partial
from typing import Literal

import anyio
import numpy as np
from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field

from gallery.errors import UserError
from gallery.serve.compare import CompareView
from gallery.serve.connections import server_options
from gallery.serve.explorer import PLOTLY_ROUTE, SERVED_POLICY, explorer_data, plotly_js, served_page
from gallery.serve.limits import BodySizeLimit, DecodeBudget, Limits, decode_photos, read_photos, readable_location
from gallery.serve.problems import Busy, RequestProblem, TooLarge
from gallery.serve.service import SEARCHES, Ranking, Service

MAX_K = 200
log = logging.getLogger("gallery.serve")
Search = Literal["both", "float", "code"]


class HitOut(BaseModel):
    rank: int
    gallery_id: str
    score: float
    relevant: list[str] = Field(default_factory=list, description="the metric tasks (identity, pairs) by which the "
                                "catalogue says this gallery belongs with the query gallery")


class RankingOut(BaseModel):
    search: str = Field(description="float: exact (or HNSW) cosine; code: Hamming candidates re-ranked by exact cosine")
    score: str = Field(description="what the scores are: cosine, or hamming bits")
    hits: list[HitOut]


class SearchOut(BaseModel):
    k: int
    results: list[RankingOut]


class GalleryNeighbours(SearchOut):
    gallery_id: str


class PhotoSearch(SearchOut):
    photos: int


class VectorQuery(BaseModel):
    vector: list[float] = Field(description="an embedding made by this run's model (POST /api/embed)")
    k: int = Field(10, ge=1, le=MAX_K)
    search: Search = "both"
    where: dict[str, str | list[str]] = Field(default_factory=dict, description="attribute: the value (or any of the "
                                              "values) every result must have")


class Embedded(BaseModel):
    run_id: str | None
    photos: int
    dimension: int
    embedding: list[float]
    code: str
    code_bits: int
    bits_hex: str = Field(description="the embedding's binary code, packed most significant bit first, as hex")


class WorkerPool:
    """At most `workers` jobs at once on threads, at most `queue` more waiting; past that, Busy (503). Photo
    jobs (decoding, embedding: up to seconds each) take at most `workers - 1` of the workers, so a few clients
    uploading cannot make every search wait for them."""

    def __init__(self, workers: int, queue: int):
        self.limiter, self.capacity, self.pending = anyio.CapacityLimiter(workers), workers + queue, 0
        self.photo_limiter = anyio.CapacityLimiter(max(1, workers - 1))

    async def run(self, fn, *args, photos: bool = False):
        if self.pending >= self.capacity:
            raise Busy(f"all {self.capacity} places are taken: retry in a moment")
        self.pending += 1
        try:
            async with self.photo_limiter if photos else nullcontext():
                return await anyio.to_thread.run_sync(fn, *args, limiter=self.limiter)
        finally:
            self.pending -= 1


def _searches(search: str) -> list[str]:
    return list(SEARCHES) if search == "both" else [search]


def _where(pairs: list[str]) -> dict[str, list[str]]:
    """`attribute=value` filters as each attribute's values (repeated ones: any of them); a clear 400 for one without '='."""
    out: dict[str, list[str]] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise RequestProblem(f"filter {pair!r}: write attribute=value, e.g. where=property_type=hotel")
        out.setdefault(name, []).append(value)
    return out


def _rankings(rankings: list[Ranking]) -> list[dict]:
    return [{"search": r.search, "score": r.score,
             "hits": [{"rank": i, "gallery_id": h.gallery_id, "score": h.score, "relevant": list(h.relevant)}
                      for i, h in enumerate(r.hits, 1)]}
            for r in rankings]


def create_app(service: Service, limits: Limits = Limits(), comparison: CompareView | None = None) -> FastAPI:
    """The app serving `service` within `limits` (its OpenAPI description at /openapi.json); with a comparison,
    the explorer is the compare view of the service's embeddings and another's."""
    app = FastAPI(title="gallery", version="1", docs_url=None, redoc_url=None,  # their pages load scripts from a CDN
                  description="Search a training run's gallery embeddings: by gallery, by seed photos, by vector; "
                              "embed new galleries; browse photos and attributes; the explorer page at /.")
    app.add_middleware(BodySizeLimit, max_bytes=limits.max_body_bytes)
    pool = WorkerPool(limits.workers, limits.queue)
    app.state.decode_budget = budget = DecodeBudget(limits.decode_budget, limits.decode_wait_seconds)  # tests watch its queue
    cached: dict[str, str] = {}

    @app.exception_handler(RequestProblem)
    async def request_problem(request: Request, problem: RequestProblem):
        headers = {"Retry-After": str(problem.retry_after_s)} if isinstance(problem, Busy) else None
        return JSONResponse({"detail": str(problem)}, problem.status, headers=headers)

    @app.exception_handler(UserError)
    async def user_error(request: Request, problem: UserError):
        return JSONResponse({"detail": str(problem)}, 400)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception):
        log.exception("error answering %s %s", request.method, request.url.path)
        return JSONResponse({"detail": f"internal error ({error.__class__.__name__}); the server logged it"}, 500)

    async def seed_photos(photos: list[UploadFile], paths: list[str]) -> list[np.ndarray]:
        """Uploaded and named photos, read and checked against the limits, decoded at the model's size once
        the decode budget holds their pixels."""
        size = service.model().image_size
        if len(photos) + len(paths) > limits.max_photos:
            raise TooLarge(f"{len(photos) + len(paths)} photos: at most {limits.max_photos} per request")
        named = [(f"photo path {p!r}", readable_location(p, limits)) for p in paths]
        uploaded = [(f"uploaded photo {u.filename!r}", await u.read(limits.max_photo_bytes + 1)) for u in photos]
        read = await pool.run(read_photos, uploaded + named, limits, photos=True)
        async with budget.hold(read.pixels):
            return await pool.run(decode_photos, read, size, limits, photos=True)

    @app.get("/health", summary="the service is up: what it serves and its limits")
    async def health() -> dict:
        return {"status": "ok"} | service.describe() | {"limits": limits.describe()}

    @app.get("/api/attributes", summary="the catalogue's attributes: tasks, held-out attributes, other columns")
    async def attributes() -> list[dict]:
        if service.catalogue is None:
            return []
        return [{"name": a.name, "kind": a.kind, "role": a.role, "values": list(a.values)} for a in service.catalogue.attributes]

    @app.get("/api/map", summary="the galleries' 2-D map (UMAP of the embeddings) with their attribute values")
    async def gallery_map() -> dict:
        return await pool.run(partial(explorer_data, service, comparison=comparison))

    @app.get("/api/gallery", summary="a gallery's split, number of photos and attributes")
    async def gallery(id: str = Query(description="gallery id")) -> dict:
        return service.gallery(id)

    @app.get("/api/photo", summary="one photo of a gallery as a square JPEG thumbnail",
             responses={200: {"content": {"image/jpeg": {}}}})
    async def photo(id: str = Query(description="gallery id"), index: int = Query(0, ge=0),
                    size: int = Query(192, ge=16, le=512, description="pixels per side")) -> Response:
        data = await pool.run(service.photo, id, index, size)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.get("/api/neighbours", summary="the k nearest other galleries to a gallery", response_model=GalleryNeighbours)
    async def neighbours(id: str = Query(description="gallery id"), k: int = Query(10, ge=1, le=MAX_K),
                         search: Search = "both",
                         where: list[str] = Query([], description="attribute=value filters, all must hold")):
        found = await pool.run(service.neighbours, id, k, _searches(search), _where(where))
        return {"gallery_id": id, "k": k, "results": _rankings(found)}

    if comparison is not None:  # the compare view's: a server started with --compare
        @app.get("/api/compare", summary="a gallery's top k under both compared embeddings, and their overlap")
        async def compare(id: str = Query(description="gallery id")) -> dict:
            return comparison.neighbours(id)

    @app.post("/api/search/vector", summary="the k nearest galleries to an embedding", response_model=SearchOut)
    async def search_vector(query: VectorQuery):
        found = await pool.run(service.search_vector, query.vector, query.k, _searches(query.search), query.where)
        return {"k": query.k, "results": _rankings(found)}

    @app.post("/api/search/photos", response_model=PhotoSearch,
              summary="the k nearest galleries to seed photos, embedded together as one gallery by the run's model")
    async def search_photos(photos: list[UploadFile] = File([], description="seed photos (JPEG, PNG, WEBP, GIF)"),
                            paths: list[str] = Form([], description="seed photos on the server, under an allowed root"),
                            k: int = Form(10, ge=1, le=MAX_K), search: Search = Form("both"),
                            where: list[str] = Form([], description="attribute=value filters")):
        pictures = await seed_photos(photos, paths)
        searches, filters = _searches(search), _where(where)

        def embed_and_search():
            return service.search_vector(service.embed(pictures), k, searches, filters)

        return {"k": k, "photos": len(pictures), "results": _rankings(await pool.run(embed_and_search, photos=True))}

    @app.post("/api/embed", response_model=Embedded,
              summary="a new gallery's embedding and binary code (photos embedded together by the run's model)")
    async def embed(photos: list[UploadFile] = File([], description="the gallery's photos"),
                    paths: list[str] = Form([], description="photos on the server, under an allowed root")):
        pictures = await seed_photos(photos, paths)
        vector = await pool.run(service.embed, pictures, photos=True)
        return {"run_id": service.run_id, "photos": len(pictures), "dimension": len(vector),
                "embedding": vector.tolist(), "code": service.code.name, "code_bits": service.code.bits,
                "bits_hex": service.binary_code(vector).hex()}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def explorer() -> HTMLResponse:
        if "page" not in cached:
            cached["page"] = await pool.run(partial(served_page, service, comparison=comparison))
        return HTMLResponse(cached["page"], headers={"Content-Security-Policy": SERVED_POLICY})

    @app.get(f"/{PLOTLY_ROUTE}", include_in_schema=False)
    async def plotly() -> Response:
        if "plotly" not in cached:
            cached["plotly"] = plotly_js()
        return Response(cached["plotly"], media_type="text/javascript", headers={"Cache-Control": "max-age=86400"})

    return app


def one_thread_per_request() -> None:
    """Each request computes on one thread (faiss and torch): the worker pool spreads requests over the
    cores. Two threads per request would oversubscribe the cores under load, and OpenMP threads spin while
    they wait: on 2 shared cores, embedding 10 photos took 0.3-4 s with two torch threads and 0.1 s with one."""
    import faiss
    import torch

    faiss.omp_set_num_threads(1)
    torch.set_num_threads(1)


def run_server(service: Service, limits: Limits, host: str = "127.0.0.1", port: int = 8000,
               comparison: CompareView | None = None) -> None:
    """Serve until interrupted, by uvicorn with the connection deadlines and limits of gallery.serve.connections."""
    import uvicorn

    one_thread_per_request()
    uvicorn.run(create_app(service, limits, comparison), host=host, port=port, log_level="info", **server_options(limits))
