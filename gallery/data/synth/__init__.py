"""The embedded default data: a deterministic synthetic accommodation catalogue (docs/design.md §9).

It writes exactly the input contract of docs/design.md §3 (manifest.parquet, tasks.yaml, images/, and
with metric tasks co_views.parquet), so a run on it exercises the same path as real data.
"""
from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from gallery.data.contracts import CONTRACTS_DIR
from gallery.data.split import hash_split
from gallery.data.synth_settings import SynthSettings
from gallery.data.synth.attributes import (
    DECOR_STYLES,
    REGIONS,
    RENTAL_TYPES,
    SEGMENTS,
    SIZE_BUCKETS,
    TYPES,
    cardinalities,
    sample_properties,
)
from gallery.data.synth.metric import co_views, relist, relisting_groups, taste_hues
from gallery.data.synth.render import Camera, Look, gallery_scenes, render

PAPER_TASKS = CONTRACTS_DIR / "examples" / "paper_tasks.yaml"
VERSION = 4  # of what the generator draws: part of a stored catalogue's cache key (gallery.data.synth.stored)
# Held-out tasks beside the paper's star rating: attributes of latents no MTL task reads (attributes.py)
HELD_OUT = [
    {"name": "has_spa", "column": "has_spa", "kind": "binary",
     "description": "A spa (~24%): its own scene in most of its galleries; no MTL task reads it"},
    {"name": "decor_style", "column": "decor_style", "kind": "multiclass", "classes": DECOR_STYLES,
     "description": "Decor of rooms and lounges, four styles drawn on the walls; no MTL task reads it"},
    {"name": "building_age_years", "column": "building_age_years", "kind": "regression",
     "description": "The building's age: a darker, cracked facade, walls yellowed inside and out; no MTL task reads it"},
]
CO_VIEWS = "co_views.parquet"
# Metric tasks, learned jointly with the attribute tasks (metric.py)
METRIC_TASKS = [
    {"name": "same_property", "column": "property_id", "kind": "identity",
     "description": "Listings of one property (re-listings, photographed again) share a property_id"},
    {"name": "co_viewed", "kind": "pairs", "file": CO_VIEWS,
     "description": "Galleries viewed in one session, weighted by co-views: more often the closer their "
                    "tastes (luxury, setting, region, building, and a signature colour no other task reads)"},
]


def class_lists(n: int) -> dict[str, list]:
    """Declared classes of each multiclass column for a catalogue of n products."""
    card = cardinalities(n)
    return {
        "city": [f"city_{c:04d}" for c in range(card["city"])],
        "world_region": list(REGIONS),
        "country": [f"country_{c:03d}" for c in range(card["country"])],
        "property_type": [t[0] for t in TYPES[:card["property_type"]]],
        "size_bucket": list(SIZE_BUCKETS),
        "hotel_segment": list(SEGMENTS),
        "vacation_rental_type": list(RENTAL_TYPES),
    }


def task_spec(n: int, metric_tasks: bool = False) -> dict:
    """The paper's Table 1 spec with this catalogue's (scaled) classes declared, held-out tasks beside the
    paper's star rating, and the metric tasks after the attribute tasks when asked."""
    spec = yaml.safe_load(PAPER_TASKS.read_text())
    classes = class_lists(n)
    for task in spec["tasks"]:
        if task["kind"] == "multiclass":
            task.pop("num_classes", None)
            task["classes"] = classes[task["column"]]
    spec["holdout"] = spec["holdout"] + [dict(t) for t in HELD_OUT]
    if metric_tasks:
        spec["tasks"] = spec["tasks"] + [dict(t) for t in METRIC_TASKS]
    return spec


def gallery_ids(n: int) -> list[str]:
    return [f"acc_{i:06d}" for i in range(n)]


def catalogue_properties(s: SynthSettings) -> pd.DataFrame:
    """Each gallery's latents (prefixed `_`) and labels; with metric tasks, re-listings copy their
    property's row, `property_id` names it and `_taste_hue` is the taste's own latent."""
    props = sample_properties(s.galleries, s.seed)
    if not s.metric_tasks:
        return props
    props["_taste_hue"] = taste_hues(s.galleries, s.seed)
    split = hash_split(gallery_ids(s.galleries), s.valid_share, s.test_share)
    return relist(props, relisting_groups(split, s.relisted_share, s.seed, s.relisted_across_splits))


def _gallery_sizes(props: pd.DataFrame, s: SynthSettings) -> np.ndarray:
    """Richer listings show more photos (the content score reads this)."""
    rng = np.random.default_rng([s.seed, 1])
    u = np.clip(0.6 * props["_luxury"].to_numpy() + 0.4 * rng.random(len(props)), 0, 1)
    return s.min_images + np.round(u * (s.max_images - s.min_images)).astype(int)


def _render_gallery(job) -> list[str]:
    index, prop, n_images, s, image_dir = job
    rng = np.random.default_rng([s.seed, 2, index])
    look = Look(prop)
    # with metric tasks, each listing its own photographer (two listings of a property differ)
    camera = Camera.draw(np.random.default_rng([s.seed, 7, index]), n_images, s.image_size) if s.metric_tasks else None
    names = []
    for k, scene in enumerate(gallery_scenes(prop, n_images, rng)):
        name = f"acc_{index:06d}_{k:02d}_{scene}.jpg"
        render(scene, prop, look, s.image_size, rng, camera, k).save(image_dir / name, quality=90)
        names.append(f"images/{name}")
    return names


def generate(out_dir, settings: SynthSettings = SynthSettings(), workers: int | None = None) -> Path:
    """Write the catalogue to out_dir and return the manifest path; same settings -> same bytes."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    props = catalogue_properties(settings)
    sizes = _gallery_sizes(props, settings)
    records = props.to_dict("records")
    jobs = [(i, records[i], int(sizes[i]), settings, out / "images") for i in range(len(records))]
    workers = workers or min(os.cpu_count() or 1, 8)
    if workers > 1:
        with multiprocessing.get_context().Pool(workers) as pool:  # the platform's safe default: macOS spawns
            images = pool.map(_render_gallery, jobs, chunksize=max(1, len(jobs) // (workers * 8)))
    else:
        images = [_render_gallery(job) for job in jobs]

    spec = task_spec(settings.galleries, settings.metric_tasks)
    columns = [t["column"] for t in spec["tasks"] + spec["holdout"] if "column" in t]
    ids = gallery_ids(len(props))
    manifest = pd.concat([pd.DataFrame({"gallery_id": ids, "images": images,
                                        "split": hash_split(ids, settings.valid_share, settings.test_share)}),
                          props[columns]], axis=1)
    (out / "tasks.yaml").write_text("# Generated by `gallery synth`: the paper's Table 1 tasks on a synthetic catalogue.\n"
                                    + yaml.safe_dump(spec, sort_keys=False))
    if settings.metric_tasks:
        a, b, weight = co_views(props, settings.seed)
        names = np.array(ids, dtype=object)
        pq.write_table(pa.table({"gallery_a": pa.array(names[a], pa.string()),
                                 "gallery_b": pa.array(names[b], pa.string()),
                                 "weight": pa.array(weight, pa.float64())}), out / CO_VIEWS)
    manifest_path = out / "manifest.parquet"
    tmp = out / "manifest.parquet.tmp"
    pq.write_table(pa.Table.from_pandas(manifest, preserve_index=False), tmp)
    tmp.replace(manifest_path)  # last: an interrupted run leaves no manifest
    return manifest_path
