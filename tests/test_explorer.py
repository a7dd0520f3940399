"""The explorer page in a real browser (Debian's headless chromium, driven by Playwright), served by uvicorn
on 127.0.0.1 and exported as one offline HTML file; the map endpoint, the CLI, a real socket's 200 MB body.

Marked `flow`: the map runs UMAP (numba) once per session, and the smoke-run test runs a whole flow.
Screenshots are kept in test-artifacts/ (explorer.png, from the smoke run, is the README's picture).
"""
import base64
import csv
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import EVIL_ID, REPO, free_port

from gallery.retrieval.embeddings import embedding_matrix, embeddings_table, read_columns, write_embeddings
from gallery.serve.app import create_app
from gallery.serve.compare import CompareView
from gallery.serve.explorer import OVERLAP, export_explorer
from gallery.serve.limits import Limits
from gallery.serve.service import Service, service_from_run

pytestmark = pytest.mark.flow
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = REPO / "test-artifacts"


@pytest.fixture(scope="module")
def service(served_run):
    return service_from_run(served_run, log=lambda line: None)


@contextmanager
def live(app):
    """The app served by uvicorn on 127.0.0.1 in a thread: its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def url(service):
    with live(create_app(service, Limits(max_photos=10))) as base:
        yield base


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        message = "the browser tests drive Debian's chromium: apt-get install chromium (.ci/run does)"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)  # never a downloaded browser
        yield browser
        browser.close()


class Visit:
    """A page in a fresh browser context, recording script errors and every request it makes."""

    def __init__(self, browser, address: str, allowed_prefix: str):
        self.context = browser.new_context(viewport={"width": 1400, "height": 900})
        self.errors, self.requests, self.refused = [], [], []

        def guard(route):
            request_url = route.request.url
            self.requests.append(request_url)
            if request_url.startswith(allowed_prefix) or request_url.startswith(("data:", "blob:")):
                route.continue_()
            else:
                self.refused.append(request_url)
                route.abort()

        self.context.route("**/*", guard)
        self.page = self.context.new_page()
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.on("dialog", lambda dialog: (self.errors.append(f"dialog: {dialog.message}"), dialog.dismiss()))
        self.page.goto(address)
        self.page.wait_for_selector("#map[data-ready=true]", timeout=60_000)

    def points(self, on: str = "map") -> int:
        return self.page.locator(f"#{on} .scatterlayer path.point").count()

    def ringed(self, on: str, ring: str) -> list[str]:
        """The galleries map `on` draws ring `ring` around (selected: the clicked one; hovered: the one under the
        pointer on the other map)."""
        return self.page.evaluate("([on, ring]) => (document.getElementById(on).data.find((t) => t.name === ring) "
                                  "|| {customdata: []}).customdata", [on, ring])

    def hover_an_isolated_point(self, on: str = "map") -> tuple[str, float, float]:
        """Hover the point of map `on` farthest from any other: the id its hover box shows, and where it is."""
        centres = np.array(self.page.eval_on_selector_all(
            f"#{on} .scatterlayer path.point",
            "els => els.map(e => { const b = e.getBoundingClientRect(); return [b.x + b.width / 2, b.y + b.height / 2]; })"))
        gaps = np.linalg.norm(centres[:, None] - centres[None], axis=2) + np.eye(len(centres)) * 1e9
        x, y = centres[int(gaps.min(axis=1).argmax())]
        self.page.mouse.move(x, y)
        self.page.wait_for_selector("#hover:not([hidden])", timeout=5_000)
        return self.page.locator("#hover-id").text_content(), x, y

    def click_an_isolated_point(self, on: str = "map") -> str:
        """Click the point of map `on` farthest from any other; returns the id its hover box showed."""
        hovered, x, y = self.hover_an_isolated_point(on)
        self.page.mouse.click(x, y)
        return hovered

    def box_select(self, on: str, holding: str) -> list[str]:
        """Box-select (the mode bar's box) on map `on` the galleries left or right of the widest gap between
        the middle half of its points, the side holding gallery `holding`; the ids the box holds, in the
        page's order, from the page's data and the map's axes (not from plotly's selection)."""
        self.page.click(f"#{on} .modebar-btn[data-val='select']")
        ids, x, y, xrange, yrange, area = self.page.evaluate(
            """(on) => { const data = JSON.parse(document.getElementById('explorer-data').textContent);
                 const xy = on === 'map' ? data.map : data.compare.map_b, layout = document.getElementById(on).layout;
                 const r = document.querySelector(`#${on} .nsewdrag`).getBoundingClientRect();
                 return [data.map.ids, xy.x, xy.y, layout.xaxis.range, layout.yaxis.range, [r.left, r.top, r.right, r.bottom]]; }""",
            on)
        left, top, right, bottom = area
        px = left + (np.array(x) - xrange[0]) / (xrange[1] - xrange[0]) * (right - left)
        order = np.sort(px)
        middle = order[len(order) // 4: 3 * len(order) // 4 + 1]
        widest = int(np.diff(middle).argmax())
        cut = (middle[widest] + middle[widest + 1]) / 2
        assert middle[widest + 1] - middle[widest] > 4, "no gap between the points to cut the map at"
        first = px[ids.index(holding)] < cut
        x0, x1 = (left + 2, cut) if first else (cut, right - 2)
        self.page.mouse.move(x0, top + 2)
        self.page.mouse.down()
        self.page.mouse.move(x1, bottom - 2, steps=8)
        self.page.mouse.up()
        return [g for g, p in zip(ids, px) if (p < cut) == first]

    def chosen(self) -> list[str]:
        """The ids the page lists as selected, once it lists some."""
        self.page.wait_for_selector("#chosen-ids li", timeout=5_000)
        return self.page.eval_on_selector_all("#chosen-ids li", "els => els.map(e => e.textContent)")

    def exported_csv(self) -> list[list[str]]:
        """The rows of the CSV the export button downloads (header first), read as RFC 4180 CSV."""
        with self.page.expect_download(timeout=5_000) as download:
            self.page.click("#chosen-csv")
        text = Path(download.value.path()).read_bytes().decode()
        assert text.startswith("gallery_id\r\n")
        return list(csv.reader(io.StringIO(text, newline="")))

    def drop(self, files: list[Path]) -> None:
        """Drop photos on the drop zone as a person would drag them from their desktop."""
        transfer = self.page.evaluate_handle(
            """(files) => { const t = new DataTransfer();
                 for (const f of files) {
                   const bytes = Uint8Array.from(atob(f.data), (c) => c.charCodeAt(0));
                   t.items.add(new File([bytes], f.name, {type: "image/jpeg"}));
                 }
                 return t; }""",
            [{"name": f.name, "data": base64.b64encode(f.read_bytes()).decode()} for f in files])
        self.page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})

    def relevant(self, within: str) -> dict[str, dict[str, list[str]]]:
        """Per search, the listed galleries marked relevant and the metric tasks each mark names."""
        return self.page.eval_on_selector_all(
            f"{within} .ranking",
            "els => Object.fromEntries(els.map(e => [e.dataset.search, Object.fromEntries([...e.querySelectorAll('li.relevant')]"
            ".map(li => [li.dataset.galleryId, [...li.querySelectorAll('.relevant-mark')].map(m => m.textContent)]))]))")

    def rankings(self, within: str) -> dict[str, list[str]]:
        return self.page.eval_on_selector_all(
            f"{within} .ranking",
            "els => Object.fromEntries(els.map(e => [e.dataset.search, [...e.querySelectorAll('li')].map(li => li.dataset.galleryId)]))")

    def shot(self, name: str, full_page: bool = False) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        self.page.screenshot(path=str(ARTIFACTS / name), full_page=full_page)
        return ARTIFACTS / name

    def close(self):
        self.context.close()


@pytest.fixture(scope="module")
def other_embeddings(served_run, tmp_path_factory) -> str:
    """B of the compare view: the fixture run's embeddings plus noise, without its last 2 galleries (so the
    page must say it compares fewer than A holds), written by the project's own writer."""
    table = read_columns(served_run.embeddings_location, ["gallery_id", "split", "embedding"])
    vectors = embedding_matrix(table)
    noisy = vectors + np.random.default_rng(0).normal(0, 1, vectors.shape).astype(np.float32) * vectors.std(axis=0)
    location = str(tmp_path_factory.mktemp("compare") / "other.parquet")
    write_embeddings(location, embeddings_table(table["gallery_id"].to_pylist()[:-2], table["split"].to_pylist()[:-2],
                                                noisy[:-2], {"run_id": "other"}))
    return location


def top_k(vectors: np.ndarray, k: int) -> np.ndarray:
    """Each row's k most cosine-similar other rows, by numpy (what the compare view must agree with)."""
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    similarity = unit.astype(np.float64) @ unit.T.astype(np.float64)
    np.fill_diagonal(similarity, -np.inf)
    return np.argsort(-similarity, axis=1, kind="stable")[:, :k]


@pytest.fixture(scope="module")
def comparison(service, other_embeddings) -> CompareView:
    return CompareView(service, other_embeddings, log=lambda line: None)


@pytest.fixture(scope="module")
def expected_change(served_run, other_embeddings) -> dict:
    """Per shared gallery (A's order): its top 10 under A and under B and their overlap, computed by numpy alone."""
    a = read_columns(served_run.embeddings_location, ["gallery_id", "embedding"])
    b = read_columns(other_embeddings, ["gallery_id", "embedding"])
    b_ids = b["gallery_id"].to_pylist()
    shared = [g for g in a["gallery_id"].to_pylist() if g in b_ids]
    a_rows = [a["gallery_id"].to_pylist().index(g) for g in shared]
    top_a = top_k(embedding_matrix(a)[a_rows], 10)
    top_b = top_k(embedding_matrix(b)[[b_ids.index(g) for g in shared]], 10)
    return {g: ([shared[r] for r in ra], [shared[r] for r in rb], len(set(ra) & set(rb)) / 10)
            for g, ra, rb in zip(shared, top_a.tolist(), top_b.tolist())}


def photos_of(run, gallery_id) -> list[Path]:
    manifest = pd.read_parquet(run.manifest_location).set_index("gallery_id")
    return [Path(run.manifest_location).parent / p for p in manifest.loc[gallery_id, "images"]]


# ---------------------------------------------------------------- the map and the page, without a browser


def test_the_map_has_one_point_per_gallery_and_is_reused(service, served_run):
    from fastapi.testclient import TestClient

    with TestClient(create_app(service, Limits())) as client:
        body = client.get("/api/map").json()
    assert sorted(body["map"]["ids"]) == sorted(service.ids) and body["galleries"] == 40
    assert np.isfinite(body["map"]["x"]).all() and np.isfinite(body["map"]["y"]).all()
    assert body["colours"]["property_type"] == [service.gallery(g)["attributes"]["property_type"] for g in body["map"]["ids"]]
    assert body["colours"]["review_score"] == [service.gallery(g)["attributes"]["review_score"] for g in body["map"]["ids"]]
    assert body["colour_by"] == "star_rating"  # the held-out attribute, as the report's map
    lines = []
    again = Service(served_run.embeddings_location, catalogue_files=(served_run.manifest_location, None), log=lines.append)
    np.testing.assert_array_equal(again.map().xy, service.map().xy)
    assert not any("UMAP" in line for line in lines)  # read from beside the embeddings, not made again


def test_the_page_holds_ids_as_escaped_json(service):
    from fastapi.testclient import TestClient

    with TestClient(create_app(service, Limits())) as client:
        response = client.get("/")
        assert client.get("/assets/plotly.min.js").headers["content-type"].startswith("text/javascript")
    html = response.text
    assert "default-src 'self'" in response.headers["content-security-policy"]
    assert EVIL_ID not in html and html.count("<script") == 3  # plotly, the data, the page's own code
    data = json.loads(re.search(r'<script id="explorer-data" type="application/json">(.*?)</script>', html, re.S)[1])
    assert EVIL_ID in data["map"]["ids"]


# ---------------------------------------------------------------- in the browser


def test_browser_map_click_and_seed_photos(browser, url, service, served_run):
    visit = Visit(browser, url, url)
    try:
        assert visit.points() == len(service.ids) == 40
        hovered = visit.click_an_isolated_point()
        visit.page.wait_for_selector("#detail .ranking li", timeout=15_000)
        assert visit.page.locator("#gallery-id").text_content() == hovered
        photos = visit.page.locator("#detail .photos img")
        expected_photos = len(photos_of(served_run, hovered))
        assert photos.count() == expected_photos
        visit.page.wait_for_function("[...document.querySelectorAll('#detail .photos img')].every(i => i.complete && i.naturalWidth > 0)")
        visit.page.click("#attributes summary")
        attributes = dict(visit.page.eval_on_selector_all("#attributes tr", "rows => rows.map(r => [...r.cells].map(c => c.textContent))"))
        assert attributes == {name: "—" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
                              for name, value in service.gallery(hovered)["attributes"].items()}
        shown = visit.rankings("#detail")
        expected = {r.search: [h.gallery_id for h in r.hits] for r in service.neighbours(hovered, 10)}
        assert shown == expected and len(shown["float"]) == 10
        differing = visit.page.locator("#detail li.differs").count()
        assert differing == sum(len(set(a) - set(b)) for a, b in ((shown["float"], shown["code"]), (shown["code"], shown["float"])))
        assert visit.relevant("#detail") == {r.search: {h.gallery_id: list(h.relevant) for h in r.hits if h.relevant}
                                             for r in service.neighbours(hovered, 10)}

        seed = service.ids[17]
        visit.drop(photos_of(served_run, seed))
        visit.page.wait_for_selector("#seed-results .ranking li", timeout=30_000)
        found = visit.rankings("#seed-results")
        assert found["float"][0] == seed and found["code"][0] == seed and len(found["float"]) == 10
        assert visit.page.locator("#seed-photos img").count() == len(photos_of(served_run, seed))
        visit.shot("explorer-fixture.png")
        assert visit.errors == [] and visit.refused == []  # no script error, no request off this server
    finally:
        visit.close()


def test_browser_compare_view(browser, service, comparison, expected_change):
    """The compare view, served: both maps of the 38 shared galleries, linked by hover, click and box selection;
    overlap colouring; a clicked gallery's top 10 under A and under B as numpy finds them, the changes marked;
    the box's ids exported as CSV; a numeric colour bar clear of the legend."""
    shared = list(expected_change)
    with live(create_app(service, Limits(), comparison)) as base:
        visit = Visit(browser, base, base)
        page = visit.page
        try:
            assert visit.points("map") == visit.points("map-b") == len(shared) == 38
            assert "A holds 40 galleries and B 38" in page.locator("#shared-note").text_content()
            assert page.locator("#colour-by").input_value() == OVERLAP
            for ids, colours in page.evaluate("() => ['map', 'map-b'].map((on) => document.getElementById(on).data[0])"
                                              ".map((t) => [t.customdata, t.marker.color])"):
                assert sorted(ids) == sorted(shared) and colours == pytest.approx([expected_change[g][2] for g in ids])
            assert page.locator("#map .colorbar").count() == page.locator("#map-b .colorbar").count() == 1

            hovered, x, y = visit.hover_an_isolated_point("map")
            page.wait_for_function("(id) => (document.getElementById('map-b').data.find((t) => t.name === 'hovered') "
                                   "|| {customdata: []}).customdata[0] === id", arg=hovered)
            ring, data = page.evaluate("() => [document.getElementById('map-b').data.find((t) => t.name === 'hovered'), "
                                       "JSON.parse(document.getElementById('explorer-data').textContent)]")
            at = data["map"]["ids"].index(hovered)  # B's ring sits on B's own place for the gallery
            assert (ring["x"], ring["y"]) == ([data["compare"]["map_b"]["x"][at]], [data["compare"]["map_b"]["y"][at]])
            assert visit.ringed("map", "hovered") == []

            page.mouse.click(x, y)
            page.wait_for_selector("#detail .ranking li", timeout=15_000)
            a, b, overlap = expected_change[hovered]
            assert 0 < overlap < 1  # something changed, something stayed
            assert page.locator("#gallery-id").text_content() == hovered
            assert visit.rankings("#detail") == {"a": a, "b": b}
            marks = page.eval_on_selector_all("#detail .ranking", "els => Object.fromEntries(els.map((e) => "
                                              "[e.dataset.search, [...e.querySelectorAll('.change-mark')].map((m) => m.textContent)]))")
            assert marks == {"a": ["in both" if g in b else "only in A" for g in a],
                             "b": ["in both" if g in a else "only in B" for g in b]}
            assert page.locator("#detail li.differs").count() == 2 * round(10 * (1 - overlap))
            assert f"neighbour overlap {overlap:.2f}" in page.locator("#detail .summary").text_content()
            assert visit.ringed("map-b", "selected") == visit.ringed("map", "selected") == [hovered]

            page.select_option("#colour-by", "review_score")  # an attribute, numeric, with missing values: a legend
            page.wait_for_function("() => ['map', 'map-b'].every((on) => document.querySelector(`#${on} .legend`))")
            for bar, legend in page.evaluate("() => ['map', 'map-b'].map((on) => ['.colorbar', '.legend'].map((part) => {"
                                             "const r = document.querySelector(`#${on} ${part}`).getBoundingClientRect();"
                                             "return [r.left, r.top, r.right, r.bottom]; }))"):
                assert bar[1] >= legend[3] or legend[1] >= bar[3] or bar[0] >= legend[2] or legend[0] >= bar[2]
            page.mouse.move(5, 5)
            visit.shot("explorer-compare.png")

            boxed = visit.box_select("map-b", holding=hovered)
            assert visit.chosen() == boxed and 0 < len(boxed) < 38
            page.wait_for_function("(n) => document.getElementById('map').data.flatMap((t) => t.selectedpoints || []).length === n",
                                   arg=len(boxed))
            lit = page.evaluate("() => document.getElementById('map').data.flatMap((t) => (t.selectedpoints || [])"
                                ".map((i) => t.customdata[i]))")
            assert sorted(lit) == sorted(boxed)  # A's map lights B's selection, and dims the rest
            assert page.eval_on_selector_all("#map .scatterlayer path.point", "els => els.filter((e) => "
                                             "getComputedStyle(e).opacity < 0.5).length") == 38 - len(boxed)
            assert visit.exported_csv() == [["gallery_id"]] + [[g] for g in boxed]
            assert visit.errors == [] and visit.refused == []
        finally:
            visit.close()


def test_cli_exports_the_compare_view(served_run, other_embeddings, expected_change, tmp_path):
    """`gallery explorer --compare FILE`: every shown gallery's two top-10 lists and overlap, as numpy finds them."""
    from gallery.cli import main

    out = tmp_path / "compare.html"
    assert main(["explorer", "--embeddings", served_run.embeddings_location, "--manifest", served_run.manifest_location,
                 "--tasks", served_run.tasks_location, "--compare", other_embeddings, "--out", str(out)]) == 0
    html = out.read_text()
    data = json.loads(re.search(r'<script id="explorer-data" type="application/json">(.*?)</script>', html, re.S)[1])
    assert data["mode"] == "static" and data["compare"]["shared"] == 38 and sorted(data["details"]) == sorted(expected_change)
    assert {g: (d["compare"]["a"], d["compare"]["b"]) for g, d in data["details"].items()} == \
        {g: (a, b) for g, (a, b, _) in expected_change.items()}
    assert data["colours"][OVERLAP] == pytest.approx([expected_change[g][2] for g in data["map"]["ids"]])


def test_browser_shows_an_html_id_as_text(browser, url):
    visit = Visit(browser, url, url)
    try:
        visit.page.fill("#search-id", EVIL_ID)
        visit.page.click("#search-form button")
        visit.page.wait_for_selector("#detail .ranking li", timeout=15_000)
        assert visit.page.locator("#gallery-id").text_content() == EVIL_ID
        assert visit.page.evaluate("window.__xss") is None
        assert visit.page.locator("img[src='x']").count() == 0
        visit.page.fill("#search-id", "no such gallery")
        visit.page.click("#search-form button")
        visit.page.wait_for_selector("#detail .error", timeout=15_000)
        assert "is not among the 40 galleries" in visit.page.locator("#detail .error").text_content()
        assert visit.errors == [] and visit.refused == []
    finally:
        visit.close()


def test_exported_explorer_works_offline(browser, service, served_run, tmp_path):
    out = export_explorer(service, str(tmp_path / "explorer.html"), k=5, log=lambda line: None)
    html = Path(out).read_text()
    assert not re.search(r"<script[^>]+src=|<link[^>]+href=(?!\"data:)", html) and EVIL_ID not in html
    visit = Visit(browser, Path(out).as_uri(), Path(out).as_uri())
    try:
        assert visit.points() == 40
        hovered = visit.click_an_isolated_point()
        visit.page.wait_for_selector("#detail .ranking li", timeout=15_000)
        assert visit.page.locator("#gallery-id").text_content() == hovered
        assert visit.page.locator("#detail .photos img").count() == min(4, len(photos_of(served_run, hovered)))
        assert visit.rankings("#detail") == {r.search: [h.gallery_id for h in r.hits] for r in service.neighbours(hovered, 5)}
        assert visit.relevant("#detail") == {r.search: {h.gallery_id: list(h.relevant) for h in r.hits if h.relevant}
                                             for r in service.neighbours(hovered, 5)}
        assert "gallery serve --run fixture" in visit.page.locator("#drop-label").text_content()
        boxed = visit.box_select("map", holding=EVIL_ID)  # the id with quotes: the CSV must quote it
        assert visit.chosen() == boxed and EVIL_ID in boxed and 0 < len(boxed) < 40
        assert visit.exported_csv() == [["gallery_id"]] + [[g] for g in boxed]
        visit.shot("explorer-exported.png")
        assert visit.errors == [] and visit.refused == [] and all(u.startswith(("file:", "data:")) for u in visit.requests)
    finally:
        visit.close()


def test_smoke_run_explorer(browser, smoke_run):
    """The README's picture: the explorer of a real (smoke) training run, a gallery clicked, seed photos dropped."""
    from gallery.runs import trained_run

    run = trained_run(smoke_run.id)
    service = service_from_run(run, log=lambda line: None)
    with live(create_app(service, Limits())) as base:
        visit = Visit(browser, base, base)
        try:
            assert visit.points() == len(service.ids)
            hovered = visit.click_an_isolated_point()
            visit.page.wait_for_selector("#detail .ranking li", timeout=15_000)
            assert visit.page.locator("#gallery-id").text_content() == hovered
            assert len(visit.rankings("#detail")["code"]) == 10
            seed = service.ids[len(service.ids) // 2]
            visit.drop(photos_of(run, seed)[:3])
            visit.page.wait_for_selector("#seed-results .ranking li", timeout=30_000)
            assert seed in visit.rankings("#seed-results")["float"][:3]
            visit.page.mouse.move(5, 5)
            visit.shot("explorer.png", full_page=True)
            assert visit.errors == [] and visit.refused == []
        finally:
            visit.close()


# ---------------------------------------------------------------- the real server


def test_a_200_mb_body_on_a_real_socket_gets_413_without_being_read(url):
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /api/search/photos HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                  b"Content-Length: %d\r\n\r\n" % (200 << 20))  # the headers only: the answer cannot wait for the body
        answer = b""
        while chunk := s.recv(65536):  # until the server closes
            answer += chunk
        answer = answer.decode(errors="replace")
    assert answer.startswith("HTTP/1.1 413") and "209,715,200" in answer


def test_cli_serves_an_embeddings_file(served_run, tmp_path):
    """`gallery serve --embeddings` of a file whose run is not in the datastore: served without a model."""
    import urllib.request

    port = free_port()
    command = [sys.executable, "-m", "gallery", "serve", "--embeddings", served_run.embeddings_location,
               "--manifest", served_run.manifest_location, "--tasks", served_run.tasks_location, "--port", str(port)]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(300):
            try:
                health = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1))
                break
            except OSError:
                assert server.poll() is None, server.stdout.read()
                time.sleep(0.2)
        assert health["galleries"] == 40 and health["seed_photos"] is False and health["catalogue"] is True
    finally:
        server.terminate()
        output = server.communicate(timeout=30)[0]
    assert "without a model" in output
    out = tmp_path / "explorer.html"
    done = subprocess.run([sys.executable, "-m", "gallery", "explorer", "--embeddings", served_run.embeddings_location,
                           "--manifest", served_run.manifest_location, "--out", str(out), "-k", "3"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert out.stat().st_size > 4_000_000 and "3 neighbours each" in done.stderr
