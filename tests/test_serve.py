"""`gallery serve`'s API through FastAPI's test client: every endpoint, every bad request, the limits.

The served run is the `served_run` fixture (40 galleries, a lite0 model with random weights, no flow).
Expected rankings are computed independently with numpy from the embeddings file; seed-photo search is
compared with `gallery search --images`'s own function. Nothing here needs the 2-D map (UMAP): the
map and the page are in test_explorer.py.
"""
import io
import os
import socket
from functools import partial
from pathlib import Path

import anyio
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import EVIL_ID
from PIL import Image

from gallery.retrieval.search import search_embeddings
from gallery.serve.app import WorkerPool, create_app
from gallery.serve.limits import Limits, resolved_roots
from gallery.serve.problems import Busy
from gallery.serve.service import Service, service_from_run

TestClient = pytest.importorskip("fastapi.testclient").TestClient
KB = 1024


@pytest.fixture(scope="module")
def service(served_run):
    return service_from_run(served_run, log=lambda line: None)


@pytest.fixture(scope="module")
def photos_root(served_run) -> Path:
    return Path(served_run.manifest_location).parent / "images"


@pytest.fixture(scope="module")
def client(service, photos_root):
    limits = Limits(max_body_bytes=2 << 20, max_photos=5, max_photo_bytes=256 * KB, allowed_roots=resolved_roots([photos_root]))
    with TestClient(create_app(service, limits)) as c:
        yield c


@pytest.fixture(scope="module")
def stored(served_run):
    """The embeddings file as numpy: ids, unit vectors, packed codes."""
    table = pq.read_table(served_run.embeddings_location)
    vectors = np.stack(table["embedding"].to_numpy(zero_copy_only=False)).astype(np.float64)
    codes = np.frombuffer(b"".join(table["embedding_bits"].to_pylist()), np.uint8).reshape(len(vectors), -1)
    return table["gallery_id"].to_pylist(), vectors / np.linalg.norm(vectors, axis=1, keepdims=True), codes


@pytest.fixture(scope="module")
def manifest(served_run) -> pd.DataFrame:
    return pd.read_parquet(served_run.manifest_location).set_index("gallery_id")


def photo_files(manifest, served_run, gallery_id) -> list[Path]:
    return [Path(served_run.manifest_location).parent / p for p in manifest.loc[gallery_id, "images"]]


def uploads(paths):
    return [("photos", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]


def hits(response, search):
    assert response.status_code == 200, response.text
    (ranking,) = [r for r in response.json()["results"] if r["search"] == search]
    return [(h["gallery_id"], h["score"]) for h in ranking["hits"]]


def numpy_top(stored, query, k, exclude=None, allowed=None):
    ids, unit, _ = stored
    similarity = unit @ (query / np.linalg.norm(query))
    order = [r for r in np.argsort(-similarity, kind="stable") if r != exclude and (allowed is None or allowed[r])]
    return [ids[r] for r in order[:k]], similarity[order[:k]]


# ---------------------------------------------------------------- search


def test_health_says_what_is_served_and_its_limits(client):
    body = client.get("/health").json()
    assert body["status"] == "ok" and body["run_id"] == "fixture" and body["galleries"] == 40
    assert body["dimension"] == 1280 and body["code"] == "itq16" and body["seed_photos"] and body["image_size"] == 32
    assert body["limits"]["max_photos"] == 5 and body["limits"]["paths_readable"]


def test_neighbours_by_id_are_the_exact_cosine_ranking(client, stored):
    ids, unit, _ = stored
    for row in (1, 17, 33):
        found = hits(client.get("/api/neighbours", params={"id": ids[row], "k": 7, "search": "float"}), "float")
        expected, scores = numpy_top(stored, unit[row], 7, exclude=row)
        assert [g for g, _ in found] == expected
        np.testing.assert_allclose([s for _, s in found], scores, atol=1e-5)


def test_code_search_reranks_hamming_candidates_by_cosine(client, stored, served_run):
    ids, unit, codes = stored
    depth = served_run.settings.retrieval.rerank
    for row in (2, 20):
        found = hits(client.get("/api/neighbours", params={"id": ids[row], "k": 5, "search": "code"}), "code")
        hamming = np.unpackbits(codes[row] ^ codes, axis=1).sum(axis=1)
        bound = np.sort(hamming)[depth]  # the depth-th nearest other code (hamming[row] is 0: itself)
        for gallery_id, score in found:
            r = ids.index(gallery_id)
            assert r != row and hamming[r] <= bound
            assert score == pytest.approx(unit[r] @ unit[row], abs=1e-5)
        assert [s for _, s in found] == sorted((s for _, s in found), reverse=True)


def test_both_searches_answer_side_by_side(client, stored):
    body = client.get("/api/neighbours", params={"id": stored[0][5], "k": 4}).json()
    assert body["gallery_id"] == stored[0][5] and body["k"] == 4
    assert [(r["search"], r["score"], len(r["hits"])) for r in body["results"]] == [("float", "cosine", 4), ("code", "cosine", 4)]
    assert [h["rank"] for h in body["results"][0]["hits"]] == [1, 2, 3, 4]


def test_filters_keep_only_matching_galleries(client, stored, manifest):
    ids, unit, _ = stored
    property_type = manifest.loc[ids[4], "property_type"]
    allowed = np.array([manifest.loc[g, "property_type"] == property_type for g in ids])
    found = hits(client.get("/api/neighbours", params={"id": ids[4], "k": 3, "search": "float",
                                                        "where": f"property_type={property_type}"}), "float")
    expected, _ = numpy_top(stored, unit[4], 3, exclude=4, allowed=allowed)
    assert [g for g, _ in found] == expected and all(manifest.loc[g, "property_type"] == property_type for g, _ in found)
    region, rental = manifest.loc[ids[4], ["world_region", "is_vacation_rental"]]
    both = np.array([manifest.loc[g, "world_region"] == region and manifest.loc[g, "is_vacation_rental"] == rental for g in ids])
    two = {"where": [f"world_region={region}", f"is_vacation_rental={str(rental).lower()}"], "id": ids[4], "k": 5}
    found = hits(client.get("/api/neighbours", params=two | {"search": "float"}), "float")
    assert [g for g, _ in found] == numpy_top(stored, unit[4], 5, exclude=4, allowed=both)[0]
    assert len(found) == both.sum() - 1 < 5  # fewer match than k: every match, and no other


def test_repeated_filters_on_one_attribute_keep_any_of_its_values(client, stored, manifest):
    """Filters on one attribute are OR-ed (as SQL's IN), different attributes AND-ed; by id and by vector alike."""
    ids, unit, _ = stored
    types = manifest.loc[ids, "property_type"]
    first, second = types.iloc[4], next(t for t in types if t != types.iloc[4])
    region = manifest.loc[ids[4], "world_region"]
    either = types.isin([first, second]).to_numpy()
    in_region = either & (manifest.loc[ids, "world_region"] == region).to_numpy()
    for where, allowed in (([f"property_type={first}", f"property_type={second}"], either),
                           ([f"property_type={first}", f"world_region={region}", f"property_type={second}"], in_region)):
        found = hits(client.get("/api/neighbours", params={"id": ids[4], "k": 6, "search": "float", "where": where}), "float")
        assert [g for g, _ in found] == numpy_top(stored, unit[4], 6, exclude=4, allowed=allowed)[0]
    by_vector = client.post("/api/search/vector", json={"vector": unit[4].tolist(), "k": 6, "search": "float",
                                                        "where": {"property_type": [first, second]}})
    assert [g for g, _ in hits(by_vector, "float")] == numpy_top(stored, unit[4], 6, allowed=either)[0]
    response = client.get("/api/neighbours", params={"id": ids[4], "where": ["property_type=castle", "property_type=igloo"]})
    assert response.status_code == 404 and "property_type='castle' or 'igloo'" in response.json()["detail"]


def test_neighbours_say_which_are_relevant_by_the_catalogues_metric_tasks(client, stored, manifest, served_run):
    """A hit in the query's identity group (same property_id) or engaged with it (co_views.parquet) is
    marked with those tasks' names, as the catalogue's own files say; every other hit is marked by none."""
    ids = stored[0]
    pairs = pd.read_parquet(Path(served_run.manifest_location).parent / "co_views.parquet")
    linked = {(a, b) for a, b in zip(pairs["gallery_a"], pairs["gallery_b"])}
    marked = 0
    for row in range(len(ids)):
        body = client.get("/api/neighbours", params={"id": ids[row], "k": len(ids) - 1, "search": "float"}).json()
        for hit in body["results"][0]["hits"]:
            other = hit["gallery_id"]
            expected = [name for name, holds in (
                ("same_property", manifest.loc[ids[row], "property_id"] == manifest.loc[other, "property_id"]),
                ("co_viewed", (ids[row], other) in linked or (other, ids[row]) in linked)) if holds]
            assert hit["relevant"] == expected, (ids[row], other)
            marked += bool(expected)
    assert marked > 0


def test_k_larger_than_the_catalogue_returns_every_other_gallery(client, stored):
    found = hits(client.get("/api/neighbours", params={"id": stored[0][0], "k": 200, "search": "float"}), "float")
    assert len(found) == 39 and stored[0][0] not in {g for g, _ in found}


def test_search_by_vector_finds_the_gallery_first(client, stored):
    ids, unit, _ = stored
    body = client.post("/api/search/vector", json={"vector": unit[9].tolist(), "k": 3, "search": "both"})
    for search in ("float", "code"):
        found = hits(body, search)
        assert found[0][0] == ids[9] and found[0][1] == pytest.approx(1.0, abs=1e-5)
        for g, score in found:  # every score is the exact cosine, best first
            assert score == pytest.approx(float(unit[ids.index(g)] @ unit[9]), abs=1e-5)
        assert [s for _, s in found] == sorted((s for _, s in found), reverse=True)
    # float search is exact; code search re-ranks its Hamming candidates, so it finds the same or lower
    assert [g for g, _ in hits(body, "float")[1:]] == numpy_top(stored, unit[9], 2, exclude=9)[0]


# ---------------------------------------------------------------- seed photos, embedding


def test_uploaded_seed_photos_rank_as_gallery_search_images_does(client, served_run, manifest, stored):
    gallery_id = stored[0][12]
    paths = photo_files(manifest, served_run, gallery_id)
    response = client.post("/api/search/photos", files=uploads(paths), data={"k": "5", "search": "float"})
    assert response.json()["photos"] == len(paths)
    cli = search_embeddings(served_run.embeddings_location, k=5, images=[str(p) for p in paths], model_run=served_run,
                            log=lambda line: None)
    found = hits(response, "float")
    assert [g for g, _ in found] == [g for g, _ in cli] and found[0][0] == gallery_id
    np.testing.assert_allclose([s for _, s in found], [s for _, s in cli], atol=1e-5)
    binary = search_embeddings(served_run.embeddings_location, k=5, binary=True, images=[str(p) for p in paths],
                               model_run=served_run, settings=served_run.settings.retrieval, log=lambda line: None)
    code = client.post("/api/search/photos", files=uploads(paths), data={"k": "5", "search": "code"})
    assert [g for g, _ in hits(code, "code")] == [g for g, _ in binary]


def test_seed_paths_under_an_allowed_root_equal_uploads(client, served_run, manifest, photos_root, stored):
    paths = photo_files(manifest, served_run, stored[0][30])
    by_path = client.post("/api/search/photos", data={"paths": [p.name for p in paths], "k": "4"})
    absolute = client.post("/api/search/photos", data={"paths": [str(p) for p in paths], "k": "4"})
    uploaded = client.post("/api/search/photos", files=uploads(paths), data={"k": "4"})
    assert hits(by_path, "float") == hits(uploaded, "float") == hits(absolute, "float")
    assert hits(by_path, "code") == hits(uploaded, "code")


def test_a_relative_seed_path_is_looked_up_under_every_allowed_root(service, served_run, manifest, photos_root, stored,
                                                                  tmp_path):
    roots = resolved_roots([tmp_path, photos_root])  # the photos are under the second root only
    paths = photo_files(manifest, served_run, stored[0][30])
    with TestClient(create_app(service, Limits(allowed_roots=roots))) as two_roots:
        by_path = two_roots.post("/api/search/photos", data={"paths": [p.name for p in paths], "k": "4"})
        assert hits(by_path, "float") == hits(two_roots.post("/api/search/photos", files=uploads(paths),
                                                             data={"k": "4"}), "float")
        missing = two_roots.post("/api/search/photos", data={"paths": ["missing.jpg"]})
        assert missing.status_code == 404 and "'missing.jpg'" in missing.json()["detail"]


def test_embed_gives_the_exported_embedding_and_code(client, served_run, manifest, stored):
    ids, _, codes = stored
    table = pq.read_table(served_run.embeddings_location)
    row = 21
    body = client.post("/api/embed", files=uploads(photo_files(manifest, served_run, ids[row]))).json()
    exported = np.asarray(table["embedding"][row].as_py(), np.float32)
    assert body["dimension"] == 1280 and body["photos"] == len(manifest.loc[ids[row], "images"])
    np.testing.assert_allclose(body["embedding"], exported, rtol=1e-4, atol=1e-5)
    assert body["code"] == "itq16" and body["code_bits"] == 16 and bytes.fromhex(body["bits_hex"]) == codes[row].tobytes()


# ---------------------------------------------------------------- what the explorer shows


def test_a_gallery_shows_its_manifest_attributes(client, manifest, stored):
    body = client.get("/api/gallery", params={"id": stored[0][6]}).json()
    row = manifest.loc[stored[0][6]]
    assert body["photos"] == len(row["images"]) and body["split"] == row["split"]
    assert set(body["attributes"]) == set(row.index) - {"images", "split"}
    for column, value in body["attributes"].items():
        assert value is None if pd.isna(row[column]) else value == pytest.approx(row[column]), column
    assert isinstance(body["attributes"]["property_type"], str) and isinstance(body["attributes"]["sea_view"], bool)


def test_photos_are_thumbnails_of_the_manifest_images(client, served_run, manifest, stored):
    gallery_id = stored[0][3]
    response = client.get("/api/photo", params={"id": gallery_id, "index": 1, "size": 48})
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    thumbnail = np.asarray(Image.open(io.BytesIO(response.content)), np.float64)
    source = Image.open(photo_files(manifest, served_run, gallery_id)[1]).convert("RGB").resize((48, 48), Image.BILINEAR)
    assert thumbnail.shape == (48, 48, 3) and np.abs(thumbnail - np.asarray(source, np.float64)).mean() < 6  # JPEG noise


def test_attributes_list_tasks_and_holdout(client):
    body = client.get("/api/attributes").json()
    by_name = {a["name"]: a for a in body}
    assert by_name["property_type"]["role"] == "task" and by_name["property_type"]["kind"] == "multiclass"
    assert by_name["star_rating"]["role"] == "holdout"
    assert by_name["review_score"]["kind"] == "regression" and by_name["review_score"]["values"] == []
    assert [a["role"] for a in body] == sorted((a["role"] for a in body), key=["task", "holdout", "column"].index)


def test_openapi_describes_every_endpoint(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert set(paths) == {"/health", "/api/attributes", "/api/map", "/api/gallery", "/api/photo", "/api/neighbours",
                          "/api/search/vector", "/api/search/photos", "/api/embed"}
    assert "multipart/form-data" in paths["/api/search/photos"]["post"]["requestBody"]["content"]
    assert client.get("/docs").status_code == 404  # its page would load scripts from a CDN


# ---------------------------------------------------------------- bad requests


@pytest.mark.parametrize("params, status, words", [
    ({"id": "no-such-gallery"}, 404, ["'no-such-gallery'", "40 galleries"]),
    ({"id": EVIL_ID, "where": "nonexistent=1"}, 400, ["'nonexistent'", "property_type"]),
    ({"id": EVIL_ID, "where": "property_type"}, 400, ["attribute=value"]),
    ({"id": EVIL_ID, "where": "property_type=castle_in_the_air"}, 404, ["castle_in_the_air"]),
    ({"id": EVIL_ID, "where": "property_type="}, 400, ["no value"]),
    ({"id": EVIL_ID, "k": 0}, 422, ["k"]),
    ({"id": EVIL_ID, "k": 100000}, 422, ["k"]),
    ({"id": EVIL_ID, "search": "fuzzy"}, 422, ["search"]),
    ({}, 422, ["id"]),
])
def test_bad_neighbour_requests_say_what_is_wrong(client, params, status, words):
    response = client.get("/api/neighbours", params=params)
    assert response.status_code == status
    assert all(w in str(response.json()["detail"]) for w in words), response.json()


@pytest.mark.parametrize("body, words", [
    ('{"vector": [0.5, 0.5, 0.5]}', ["3 values", "1280"]),
    ('{"vector": [%s]}' % ", ".join(["0"] * 1280), ["zeros"]),
    ('{"vector": [NaN%s]}' % (", 1" * 1279), ["finite"]),
    ('{"vector": [0.5], "where": {"property_type": "villa"}}', ["1 values"]),
])
def test_vectors_of_the_wrong_dimension_or_value_are_refused(client, body, words):
    response = client.post("/api/search/vector", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400 and all(w in response.json()["detail"] for w in words), response.text


def test_a_malformed_vector_request_is_422_naming_the_field(client):
    response = client.post("/api/search/vector", json={"vector": "north", "k": 3})
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "vector"]


def test_photo_requests_out_of_range(client, stored):
    assert client.get("/api/photo", params={"id": stored[0][3], "index": 99}).status_code == 404
    assert "out of range" in client.get("/api/photo", params={"id": stored[0][3], "index": 99}).json()["detail"]
    assert client.get("/api/photo", params={"id": stored[0][3], "size": 4096}).status_code == 422
    assert client.get("/api/gallery", params={"id": "nope"}).status_code == 404


def test_a_non_image_upload_is_415_naming_the_file(client, served_run, manifest, stored):
    real = uploads(photo_files(manifest, served_run, stored[0][1]))[:1]
    for endpoint in ("/api/search/photos", "/api/embed"):
        response = client.post(endpoint, files=real + [("photos", ("notes.txt", b"just some text", "image/jpeg"))])
        assert response.status_code == 415 and "'notes.txt'" in response.json()["detail"]
    empty = client.post("/api/embed", files=[("photos", ("empty.jpg", b"", "image/jpeg"))])
    assert empty.status_code == 415 and "zero-byte" in empty.json()["detail"]


def test_no_photos_is_a_bad_request(client):
    response = client.post("/api/search/photos", data={"k": "3"})
    assert response.status_code == 400 and "no photos" in response.json()["detail"]


def test_too_many_or_too_large_photos_are_413(client, served_run, manifest, stored):
    one = uploads(photo_files(manifest, served_run, stored[0][1]))[:1]
    response = client.post("/api/search/photos", files=one * 6)
    assert response.status_code == 413 and "at most 5" in response.json()["detail"]
    big = [("photos", ("huge.jpg", b"\xff" * (300 * KB), "image/jpeg"))]
    response = client.post("/api/embed", files=big)
    assert response.status_code == 413 and "'huge.jpg'" in response.json()["detail"]


def test_photos_declaring_more_pixels_than_a_request_may_hold_are_413_before_decoding(service, monkeypatch):
    """The probe's upload, shrunk: one-bit PNGs of 7990 x 7990 px, a few KB each, 63.8 million pixels declared."""
    image = io.BytesIO()
    Image.new("1", (7990, 7990)).save(image, "PNG")
    decoded = []
    monkeypatch.setattr("gallery.serve.limits.decode", lambda *args: decoded.append(args))
    with TestClient(create_app(service, Limits())) as default_client:
        response = default_client.post("/api/search/photos",
                                        files=[("photos", (f"blank{i}.png", image.getvalue(), "image/png")) for i in range(2)])
    detail = response.json()["detail"]
    assert response.status_code == 413 and not decoded
    assert "2 photos hold 127,680,200 pixels" in detail and "limit of 100,000,000 per request" in detail
    assert "--max-megapixels" in detail


def test_decoding_past_the_time_limit_is_413_naming_it(service, served_run, manifest, stored):
    with TestClient(create_app(service, Limits(max_decode_seconds=1e-9))) as hurried:
        response = hurried.post("/api/embed", files=uploads(photo_files(manifest, served_run, stored[0][1]))[:1])
    assert response.status_code == 413 and "max_decode_seconds" in response.json()["detail"]


def test_a_200_mb_body_is_refused_before_it_is_read(service):
    with TestClient(create_app(service, Limits())) as default_client:
        response = default_client.post("/api/search/photos", content=b"\0" * (200 << 20),
                                       headers={"content-type": "multipart/form-data; boundary=x"})
    assert response.status_code == 413 and "209,715,200 bytes" in response.json()["detail"]
    assert "67,108,864" in response.json()["detail"]


def test_a_streamed_body_is_cut_at_the_limit(client):
    sent = []

    def chunks():  # no Content-Length: the body is counted as it arrives
        for _ in range(8):
            sent.append(1)
            yield b"\0" * (512 * KB)

    response = client.post("/api/search/photos", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"})
    assert response.status_code == 413 and "limit of 2,097,152 bytes" in response.json()["detail"]


def test_paths_outside_the_allowed_roots_are_refused(client, photos_root, tmp_path):
    outside = tmp_path / "secret.jpg"
    outside.write_bytes((photos_root / os.listdir(photos_root)[0]).read_bytes())
    (photos_root / "link-out.jpg").symlink_to(outside)
    try:
        for path in ("../../../../../../etc/passwd", "/etc/passwd", str(outside), "link-out.jpg", "file:///etc/passwd",
                     "s3://bucket/a.jpg", "../manifest.parquet"):
            response = client.post("/api/search/photos", data={"paths": [path]})
            assert response.status_code == 403, (path, response.text)
            assert "not under an allowed root" in response.json()["detail"]
    finally:
        (photos_root / "link-out.jpg").unlink()


def test_paths_that_are_not_regular_files_are_refused_without_reading(client, photos_root):
    fifo = photos_root / "pipe.jpg"
    os.mkfifo(fifo)  # reading it would block: it must not be opened
    try:
        response = client.post("/api/search/photos", data={"paths": ["pipe.jpg"]})
        assert response.status_code == 400 and "not a regular file" in response.json()["detail"]
    finally:
        fifo.unlink()
    assert client.post("/api/search/photos", data={"paths": ["missing.jpg"]}).status_code == 404
    assert client.post("/api/search/photos", data={"paths": ["."]}).status_code == 400


def test_named_photos_are_read_through_the_input_layer(service, tmp_path):
    """Its errors are the HTTP answers that say the same, naming the photo as the request did (not the server's path)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        nobody = f"http://127.0.0.1:{s.getsockname()[1]}/"  # nothing listens there
    (tmp_path / "big.jpg").write_bytes(b"\xff" * (300 * KB))
    with TestClient(create_app(service, Limits(max_photo_bytes=256 * KB,
                                               allowed_roots=resolved_roots([tmp_path, nobody])))) as c:
        big = c.post("/api/embed", data={"paths": ["big.jpg"]})
        detail = big.json()["detail"]
        assert big.status_code == 413 and "'big.jpg': too large" in detail and "262,144 bytes per photo" in detail
        assert str(tmp_path) not in detail
        unreachable = c.post("/api/embed", data={"paths": [nobody + "a.jpg"]})
        assert unreachable.status_code == 502 and "unreachable (could not connect)" in unreachable.json()["detail"]


def test_a_server_without_roots_reads_no_paths(service):
    with TestClient(create_app(service, Limits())) as plain:
        response = plain.post("/api/search/photos", data={"paths": ["a.jpg"]})
    assert response.status_code == 403 and "--allow-root" in response.json()["detail"]


def test_a_server_without_model_or_catalogue_says_so(served_run):
    bare = Service(served_run.embeddings_location, log=lambda line: None)
    with TestClient(create_app(bare, Limits())) as c:
        assert c.get("/health").json()["seed_photos"] is False
        response = c.post("/api/search/photos", files=[("photos", ("a.jpg", b"x", "image/jpeg"))])
        assert response.status_code == 409 and "--run" in response.json()["detail"]
        assert c.get("/api/photo", params={"id": EVIL_ID}).status_code == 409
        assert c.get("/api/neighbours", params={"id": EVIL_ID, "where": "a=b"}).status_code == 409
        assert c.get("/api/attributes").json() == []
    codes_only = Service(served_run.embeddings_location, searches=("code",), log=lambda line: None)
    with TestClient(create_app(codes_only, Limits())) as c:
        response = c.get("/api/neighbours", params={"id": EVIL_ID, "search": "float"})
        assert response.status_code == 409 and "answers code search" in response.json()["detail"]
        assert len(hits(c.get("/api/neighbours", params={"id": EVIL_ID, "search": "code", "k": 3}), "code")) == 3


def test_an_internal_error_is_a_500_and_the_server_goes_on(service, monkeypatch):
    with TestClient(create_app(service, Limits()), raise_server_exceptions=False) as c:
        monkeypatch.setattr(service, "photo", lambda *a: 1 / 0)
        response = c.get("/api/photo", params={"id": EVIL_ID})
        assert response.status_code == 500 and "ZeroDivisionError" in response.json()["detail"]
        assert c.get("/health").status_code == 200


def test_the_worker_pool_is_bounded():
    async def main():
        pool, started, release = WorkerPool(workers=1, queue=1), anyio.Event(), anyio.Event()
        answers = []

        def blocking(token):
            anyio.from_thread.run_sync(started.set)
            anyio.from_thread.run(release.wait)
            return token

        async def call(token):
            answers.append(await pool.run(blocking, token))

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(call, "first")
            await started.wait()
            tasks.start_soon(call, "queued")
            await anyio.sleep(0.05)
            with pytest.raises(Busy):  # one running, one waiting: the third is turned away
                await pool.run(blocking, "third")
            release.set()
        return answers

    assert sorted(anyio.run(main)) == ["first", "queued"]


def test_photo_jobs_leave_a_worker_to_searches():
    async def main():
        pool, started, release = WorkerPool(workers=2, queue=4), anyio.Event(), anyio.Event()
        running = []

        def photo_job(token):
            running.append(token)
            anyio.from_thread.run_sync(started.set)
            anyio.from_thread.run(release.wait)

        async with anyio.create_task_group() as tasks:
            for token in ("photos 1", "photos 2"):
                tasks.start_soon(partial(pool.run, photo_job, token, photos=True))
            await started.wait()
            await anyio.sleep(0.05)
            assert running == ["photos 1"]  # the second photo job waits for the first ...
            assert await pool.run(lambda: "search") == "search"  # ... while a search has the other worker
            release.set()
        return running

    assert anyio.run(main) == ["photos 1", "photos 2"]
