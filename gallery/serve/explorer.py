"""The explorer page: the 2-D map of the galleries, a gallery's photos and attributes beside its nearest
galleries (float and two-stage code search side by side), a search box and a seed-photo drop zone.

One page, two ways to get it. Served by `gallery serve`, it asks the service for neighbours, photos and
seed-photo searches. Exported (`export_explorer`), it is one self-contained HTML file: plotly.js inline,
every shown gallery's neighbours computed ahead and its photos inlined as small JPEGs, a Content
Security Policy that forbids any network request; seed-photo search needs the live service and says so.
With a comparison (gallery.serve.compare) the page is the compare view: two maps side by side, linked, and
each gallery's top k under A and under B. In both views a lasso or box selection lists the selected
galleries and exports their ids as CSV (in the browser: nothing is sent anywhere).

Gallery ids and attributes are user data: the page puts them in the document as text (never as HTML)
and the embedded JSON has `<`, `>` and `&` escaped, so an id like `</script><script>...` stays text.
"""
from __future__ import annotations

import base64
import json
from importlib import resources

import gallery.storage as storage
from gallery.config import Settings
from gallery.data.images import ImageProblem, load_image
from gallery.serve.compare import CompareView
from gallery.serve.service import Service, jpeg

ASSETS = resources.files("gallery") / "serve"
PLOTLY_ROUTE = "assets/plotly.min.js"
SERVED_POLICY = ("default-src 'self'; script-src 'self' 'unsafe-inline' 'unsafe-eval'; style-src 'self' 'unsafe-inline'; "
                 "img-src 'self' data: blob:; connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'")
EXPORTED_POLICY = ("default-src 'none'; script-src 'unsafe-inline' 'unsafe-eval'; style-src 'unsafe-inline'; "
                   "img-src data: blob:; base-uri 'none'; form-action 'none'")
OVERLAP = "neighbour overlap (A vs B)"  # the compare view's own colouring: the share of a gallery's top k that B keeps


def plotly_js() -> str:
    """plotly.js as the plotly package ships it (offline: nothing is fetched)."""
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


def json_for_script(data) -> str:
    """JSON that can sit inside <script>: no `</script>`, `<!--` or `&` can end or change the element."""
    return json.dumps(data, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c").replace(
        ">", "\\u003e").replace("&", "\\u0026")


def colourable(service: Service) -> list[dict]:
    """Attributes the map can be coloured by: tasks and held-out attributes first, then other columns
    that are numbers or have a short list of values."""
    if service.catalogue is None:
        return []
    return [{"name": a.name, "kind": a.kind, "role": a.role, "numeric": a.numeric, "values": list(a.values)}
            for a in service.catalogue.attributes if a.numeric or a.values]


def default_colouring(attributes: list[dict]) -> str:
    """What the map is coloured by at first, as the report's map picks: the first held-out multiclass
    attribute, else the multiclass task with the fewest values, else any task with 2 to 12 values;
    '' when there is none."""
    few = [a for a in attributes if not a["numeric"] and 2 <= len(a["values"]) <= 12 and a["role"] != "column"]
    holdout = [a for a in few if a["role"] == "holdout" and a["kind"] == "multiclass"]
    few.sort(key=lambda a: (a["kind"] != "multiclass", len(a["values"])))
    return (holdout + few)[0]["name"] if few else ""


def _coordinates(xy) -> dict:
    return {"x": xy[:, 0].round(4).tolist(), "y": xy[:, 1].round(4).tolist()}


def _view(service: Service, rows: list[int], xy, k: int) -> dict:
    """The page's data for the galleries at `rows` of the service's file, placed at `xy` on the map."""
    attributes = colourable(service)
    return {"mode": "live", "run_id": service.run_id, "galleries": len(service.ids), "k": k,
            "searches": list(service.indexes), "seed_photos": service.embedder is not None, "code": service.code.name,
            "map": {"ids": [service.ids[r] for r in rows]} | _coordinates(xy),
            "attributes": attributes, "colour_by": default_colouring(attributes),
            "colours": {a["name"]: service.catalogue.colour(a["name"], rows) for a in attributes}}


def explorer_data(service: Service, k: int = 10, comparison: CompareView | None = None) -> dict:
    """What the page draws: the map's points, their colourings and the run's description. With a comparison:
    the shared galleries on both maps (A's in `map`, B's in `compare.map_b`, one order), coloured by their
    neighbour overlap first, and the comparison's own k."""
    if comparison is None:
        atlas = service.map()
        return _view(service, atlas.rows.tolist(), atlas.xy, k)
    maps = comparison.maps()
    data = _view(service, comparison.a_rows[maps.shown].tolist(), maps.a_xy, comparison.change.k)
    data["attributes"].insert(0, {"name": OVERLAP, "kind": "overlap", "role": "compare", "numeric": True, "values": [],
                                  "range": [0, 1]})
    data["colours"][OVERLAP] = comparison.change.overlap[maps.shown].round(4).tolist()
    return data | {"colour_by": OVERLAP, "compare": comparison.describe() | {"map_b": _coordinates(maps.b_xy)}}


def page(data: dict, plotly_tag: str, policy: str) -> str:
    template = (ASSETS / "explorer.html").read_text()
    parts = {"/*POLICY*/": policy, "/*CSS*/": (ASSETS / "explorer.css").read_text(), "<!--PLOTLY-->": plotly_tag,
             "/*DATA*/": json_for_script(data), "/*JS*/": (ASSETS / "explorer.js").read_text()}
    for marker, text in parts.items():
        template = template.replace(marker, text, 1)
    return template


def served_page(service: Service, k: int = 10, comparison: CompareView | None = None) -> str:
    """The page `gallery serve` answers at /: plotly.js from the same server, data asked for as needed."""
    return page(explorer_data(service, k, comparison), f'<script src="{PLOTLY_ROUTE}"></script>', SERVED_POLICY)


def _inline_script(js: str) -> str:
    return "<script>" + js.replace("</script", "<\\/script").replace("</SCRIPT", "<\\/SCRIPT") + "</script>"


def _photo_uri(location: str, size: int) -> str | None:
    try:
        return "data:image/jpeg;base64," + base64.b64encode(jpeg(load_image(location, size), quality=80)).decode()
    except ImageProblem:
        return None


def export_explorer(service: Service, out_path: str, k: int = 10, photos_per_gallery: int = 4, thumbnail_px: int = 96,
                    log=print, comparison: CompareView | None = None) -> str:
    """Write the explorer as one self-contained HTML file (viewable offline, e.g. in a run's report folder):
    the map, and for each shown gallery its attributes, first photos and k nearest galleries by every search
    the service holds (with a comparison: both maps, and its top k under A and under B). Returns out_path."""
    data = explorer_data(service, k, comparison) | {"mode": "static"}
    details = {}
    for gallery_id in data["map"]["ids"]:
        shown = service.gallery(gallery_id)
        locations = service.catalogue.photos(service.row(gallery_id))[:photos_per_gallery] if service.catalogue else []
        shown["photo_data"] = [_photo_uri(loc, thumbnail_px) for loc in locations]
        if comparison is None:
            shown["neighbours"] = {r.search: {"score": r.score,
                                              "hits": [[h.gallery_id, round(h.score, 4), list(h.relevant)] for h in r.hits]}
                                   for r in service.neighbours(gallery_id, k, list(service.indexes))}
        else:
            shown["compare"] = comparison.neighbours(gallery_id)
        details[gallery_id] = shown
    data["details"] = details
    html = page(data, _inline_script(plotly_js()), EXPORTED_POLICY)
    storage.write_bytes(out_path, html.encode())
    log(f"wrote {out_path} ({len(html) / 2**20:.1f} MiB, {len(details):,} galleries, {data['k']} neighbours each)")
    return out_path


def export_catalogue_explorer(embeddings_location: str, manifest_location: str, tasks_location: str | None, out_path: str,
                              settings: Settings = Settings(), k: int = 10, log=print) -> str:
    """The explorer of an embeddings file and its catalogue, exported to out_path without loading a model
    (what a flow's report step calls: `settings` gives the code's re-ranking depth and the map's size)."""
    service = Service(embeddings_location, None, (manifest_location, tasks_location), settings.retrieval,
                      map_points=settings.evaluation.projection_points, log=log)
    return export_explorer(service, out_path, k, log=log)
