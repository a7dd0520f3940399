"""The synthetic catalogue: deterministic, the contract of docs/design.md §3, Table 1 tasks, visible evidence."""
import filecmp
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from gallery.data.ingest import ingest
from gallery.data.split import hash_unit
from gallery.data.synth import SynthSettings, catalogue_properties, generate
from gallery.data.synth.metric import relisting_groups, taste_parts, taste_similarity


def test_same_arguments_give_identical_files(tmp_path):
    settings = SynthSettings(galleries=25, seed=7, image_size=32, min_images=2, max_images=5)
    generate(tmp_path / "a", settings, workers=2)
    generate(tmp_path / "b", settings, workers=1)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) > 50 and Path("co_views.parquet") in files
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "a", tmp_path / "b", [str(f) for f in files], shallow=False)
    assert not mismatch and not errors
    generate(tmp_path / "c", SynthSettings(galleries=25, seed=8, image_size=32, min_images=2, max_images=5))
    assert (tmp_path / "a" / "manifest.parquet").read_bytes() != (tmp_path / "c" / "manifest.parquet").read_bytes()


def test_table1_tasks_and_holdout(small_catalogue):
    spec = yaml.safe_load((small_catalogue / "tasks.yaml").read_text())
    attribute, metric = spec["tasks"][:-2], spec["tasks"][-2:]  # the metric tasks come after Table 1's
    kinds = Counter(t["kind"] for t in attribute)
    assert kinds == {"binary": 17, "multiclass": 7, "regression": 7}
    ids = [t["name"].split("_")[0] for t in attribute]
    assert ids == [f"C{i}" for i in range(1, 8)] + [f"B{i}" for i in range(1, 18)] + [f"R{i}" for i in range(1, 8)]
    assert [(t["name"], t["kind"], t.get("column"), t.get("file")) for t in metric] == [
        ("same_property", "identity", "property_id", None), ("co_viewed", "pairs", None, "co_views.parquet")]
    assert [t["name"] for t in spec["holdout"]] == ["star_rating", "has_spa", "decor_style", "building_age_years"]
    cat = ingest(small_catalogue / "manifest.parquet", small_catalogue / "tasks.yaml")  # passes the contract
    assert len(cat.frame) == 120
    n = cat.frame["images"].map(len)
    assert n.min() >= 3 and n.max() <= 6
    star = cat.frame["star_rating"].to_numpy()
    assert 0.35 < (star >= 0).mean() < 0.7  # about half the products carry a star rating
    city = next(t for t in cat.tasks if t.name == "C1_city")
    assert 0.05 < (cat.frame[city.name] >= 0).mean() < 0.6  # city only for top destinations
    for task in cat.tasks:
        assert cat.stats[task.name].labelled["train"] > 0


def test_images_show_the_attributes(small_catalogue):
    """Listings with a pool show pool photos (not all: short galleries omit some), listings without one
    (but for 2% label noise) do not. The scene is in each file's name."""
    m = pd.read_parquet(small_catalogue / "manifest.parquet")
    shows_pool = m["images"].map(lambda imgs: any("_pool.jpg" in i for i in imgs))
    has_pool = m["has_pool"].astype("boolean")
    assert shows_pool[has_pool.fillna(False)].mean() > 0.4
    assert shows_pool[~has_pool.fillna(True)].mean() < 0.1
    sea = m["images"].map(lambda imgs: sum("_beach.jpg" in i for i in imgs) > 0)
    assert sea[m["beach_access"].astype("boolean").fillna(False)].mean() > sea[~m["beach_access"].astype("boolean").fillna(True)].mean()


def test_luxury_is_visible_in_pixels(small_catalogue):
    """Star rating (hidden from training) shows in the rooms' colour saturation: the holdout is learnable."""
    from PIL import Image

    def saturation(path):
        a = np.asarray(Image.open(small_catalogue / path)).astype(float)
        return (a.max(2) - a.min(2)).mean()

    m = pd.read_parquet(small_catalogue / "manifest.parquet").dropna(subset=["star_rating"])
    rooms = [np.mean([saturation(i) for i in imgs if "_room" in i] or [np.nan]) for imgs in m["images"]]
    frame = pd.DataFrame({"star": m["star_rating"].astype(float), "saturation": rooms}).dropna()
    assert len(frame) > 30 and frame["star"].corr(frame["saturation"]) > 0.5


def test_cli_synth_then_validate(tmp_path):
    out = tmp_path / "cat"
    run = [sys.executable, "-m", "gallery"]
    subprocess.run(run + ["synth", "--out", str(out), "--galleries", "200", "--seed", "1", "--image-size", "32"], check=True)
    done = subprocess.run(run + ["validate", "--manifest", str(out / "manifest.parquet"), "--tasks", str(out / "tasks.yaml")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "galleries: 200" in done.stdout and "star_rating" in done.stdout
    bad = subprocess.run(run + ["synth", "--out", str(out), "--min-images", "5", "--max-images", "2"], capture_output=True, text=True)
    assert bad.returncode == 2 and "max_images = 2: fewer than min_images (5)" in bad.stderr


def test_every_size_of_every_building_renders():
    """The smallest hostel (one floor) left no room for its lights and crashed a 1,500-gallery catalogue."""
    from gallery.data.synth.render import Canvas, Look, building

    for arch in ("tower", "block", "hostel", "villa", "cabin"):
        for size in range(4):
            p = {"_archetype": arch, "_size": size, "_luxury": 0.5, "_region": 1, "_country": 2, "_type": 3,
                 "_has_balcony": True, "_is_chain": True, "_age": 40.0, "_decor": 1}
            building(Canvas(32, np.random.default_rng(size)), p, Look(p), horizon=0.6)


def test_the_manifest_carries_the_split_at_the_settings_shares(tmp_path):
    settings = SynthSettings(galleries=60, seed=1, image_size=16, min_images=1, max_images=1, valid_share=0.3, test_share=0.2)
    frame = pd.read_parquet(generate(tmp_path, settings, workers=1))
    units = np.array([hash_unit(g) for g in frame["gallery_id"]])
    assert list(frame["split"]) == list(np.where(units < 0.3, "valid", np.where(units < 0.5, "test", "train")))


# ---------------------------------------------------------------- metric-learning ground truth

METRIC = SynthSettings(galleries=400, seed=5, image_size=16, min_images=2, max_images=3)


@pytest.fixture(scope="module")
def metric_catalogue(tmp_path_factory):
    out = tmp_path_factory.mktemp("metric")
    generate(out, METRIC, workers=1)
    return out, pd.read_parquet(out / "manifest.parquet"), pd.read_parquet(out / "co_views.parquet")


def _rows(manifest, pairs):
    position = pd.Index(manifest["gallery_id"])
    return position.get_indexer(pairs["gallery_a"]), position.get_indexer(pairs["gallery_b"])


def test_co_views_follow_the_pairs_contract(metric_catalogue):
    out, manifest, pairs = metric_catalogue
    schema = pq.read_schema(out / "co_views.parquet")
    assert [(f.name, f.type) for f in schema] == [("gallery_a", pa.string()), ("gallery_b", pa.string()),
                                                   ("weight", pa.float64())]
    spec = yaml.safe_load((out / "tasks.yaml").read_text())
    assert (out / next(t for t in spec["tasks"] if t["kind"] == "pairs")["file"]).is_file()
    a, b = _rows(manifest, pairs)
    assert (a >= 0).all() and (b >= 0).all()  # every id is in the manifest
    assert (a != b).all()  # no self-pairs
    assert not pd.DataFrame({"low": np.minimum(a, b), "high": np.maximum(a, b)}).duplicated().any()  # each pair once
    weight = pairs["weight"].to_numpy()
    assert (weight > 0).all() and (weight == np.round(weight)).all()  # co-view counts
    degree = np.bincount(np.concatenate([a, b]), minlength=len(manifest))
    assert (degree > 0).mean() > 0.8  # most galleries have a partner
    assert 1.5 < len(pairs) / len(manifest) < 5  # a few pairs per gallery


def test_relistings_share_the_property_not_the_pixels(metric_catalogue):
    from PIL import Image

    out, manifest, _ = metric_catalogue
    assert manifest["property_id"].map(lambda v: isinstance(v, str) and v != "").all()
    members = manifest.groupby("property_id")["gallery_id"].transform("size")
    assert set(members) == {1, 2, 3} and abs((members > 1).mean() - METRIC.relisted_share) < 0.02
    groups = manifest[members > 1].groupby("property_id")
    assert (groups["split"].nunique() == 1).all()  # a property is trained on or evaluated, never both
    spec = yaml.safe_load((out / "tasks.yaml").read_text())
    labels = [t["column"] for t in spec["tasks"] + spec["holdout"] if t["kind"] not in ("identity", "pairs")]
    grouped = (members > 1).to_numpy()
    values = manifest.loc[grouped, labels].astype(str).groupby(manifest.loc[grouped, "property_id"])
    assert (values.nunique(dropna=False) == 1).to_numpy().all()  # the labels (and held-out labels) are the property's
    props = catalogue_properties(METRIC)
    assert list(props["property_id"]) == list(manifest["property_id"])
    latents = props[members > 1].groupby("property_id")[["_luxury", "_decor", "_age", "_taste_hue", "_setting"]]
    assert (latents.nunique() == 1).to_numpy().all()

    def pixels(path):
        return np.asarray(Image.open(out / path), np.float32)

    for _, rows in groups:  # photographed again: the same scene of two listings is not a copy
        exteriors = [pixels(next(i for i in imgs if "_exterior" in i)) for imgs in rows["images"]]
        for other in exteriors[1:]:
            assert np.abs(exteriors[0] - other).mean() > 8


def test_relisting_groups_take_the_share_of_each_split():
    split = np.array(["train"] * 71 + ["valid"] * 9 + ["test"] * 3)
    for share in (0.0, 0.1, 0.4, 0.9):
        source = relisting_groups(split, share, seed=1)
        for name in ("train", "valid", "test"):
            rows = np.flatnonzero(split == name)
            sizes = np.bincount(source[rows])
            sizes = sizes[sizes > 0]
            assert set(sizes) <= {1, 2, 3} and (split[source[rows]] == name).all()
            grouped = max(round(share * len(rows)), 2 if share else 0)  # at least one group where asked
            assert sizes[sizes > 1].sum() in (grouped, grouped - 1)
    assert (relisting_groups(split, 0.0, seed=1) == np.arange(len(split))).all()
    source = relisting_groups(split, 0.4, seed=1, across_splits=True)  # one draw over all galleries
    sizes = np.bincount(source)
    assert set(sizes[sizes > 0]) <= {1, 2, 3} and sizes[sizes > 1].sum() == round(0.4 * len(split))
    assert (split[source] != split).any()


def test_a_few_galleries_draw_most_co_views(metric_catalogue):
    _, manifest, pairs = metric_catalogue
    a, b = _rows(manifest, pairs)
    degree = np.sort(np.bincount(np.concatenate([a, b]), minlength=len(manifest)))[::-1]
    top = degree[:len(degree) // 20].sum() / degree.sum()
    assert top > 0.15  # the top 5% of galleries hold over 3x their share of the pair ends
    assert pairs["weight"].max() >= 5


def test_closer_tastes_are_co_viewed_more(metric_catalogue):
    """Co-viewed pairs are closer in taste than random pairs: in the part MTL tasks read and in the part
    they do not (the signature hue)."""
    _, manifest, pairs = metric_catalogue
    parts = taste_parts(catalogue_properties(METRIC))
    a, b = _rows(manifest, pairs)
    ra, rb = np.random.default_rng(0).integers(0, len(manifest), (2, 20000))
    for which, lift in ((("hue",), 0.3), (("luxury", "setting", "region", "archetype"), 0.3)):
        assert taste_similarity(parts, a, b, which).mean() > taste_similarity(parts, ra, rb, which).mean() + lift


def test_the_taste_hue_is_drawn():
    """The taste's own latent shows: a room's curtains carry the property's hue (a new building: an old
    one's photos turn every hue toward ochre, test_the_held_out_labels_have_a_ceiling...)."""
    import colorsys

    from gallery.data.synth.render import Look, render

    p = {"_luxury": 0.3, "_region": 1, "_country": 2, "_type": 3, "_age": 0.0, "_decor": 0, "_archetype": "house",
         "_sea_view": False, "_mountain_view": False, "_city_view": False, "_has_kitchen": False,
         "_has_balcony": False}
    def room(hue):
        p["_taste_hue"] = 2 * np.pi * hue
        return np.asarray(render("room", p, Look(p), 64, np.random.default_rng(0)), np.float32)

    for hue in (0.0, 0.3, 0.6):
        a = room(hue)
        changed = np.abs(a - room(hue + 0.5)).sum(2) > 100  # the same photo with the opposite hue
        assert changed.mean() > 0.03  # the curtains, a few percent of the photo
        drawn = colorsys.rgb_to_hsv(*(a[changed].mean(0) / 255))[0]
        assert min(abs(drawn - hue), 1 - abs(drawn - hue)) < 0.05


def test_without_metric_tasks_the_catalogue_is_as_before(tmp_path, metric_catalogue):
    _, with_metric, _ = metric_catalogue
    settings = SynthSettings(galleries=400, seed=5, image_size=16, min_images=2, max_images=3, metric_tasks=False)
    frame = pd.read_parquet(generate(tmp_path, settings, workers=1))
    assert not (tmp_path / "co_views.parquet").exists() and "property_id" not in frame.columns
    spec = yaml.safe_load((tmp_path / "tasks.yaml").read_text())
    assert {t["kind"] for t in spec["tasks"] + spec["holdout"]} == {"binary", "multiclass", "regression"}
    # the latents' streams are the same: a gallery listed once has the labels it had before
    single = (with_metric.groupby("property_id")["gallery_id"].transform("size") == 1).to_numpy()
    labels = [c for c in frame.columns if c not in ("gallery_id", "images")]
    assert single.sum() > 200
    assert frame.loc[single, labels].astype(str).equals(with_metric.loc[single, labels].astype(str))


def test_the_held_out_labels_have_a_ceiling_and_their_latents_show_in_the_photos():
    """Version 4's calibration: a spa in about a quarter of the listings, 4% of spa labels flipped, 6% of
    decor labels another style, the age read with a 15-year error (counted against the latents here); and
    an old building's room walls are yellowed toward ochre where a new one's are not."""
    import colorsys

    from gallery.data.synth.attributes import sample_properties
    from gallery.data.synth.render import AGED, Look, render

    props = sample_properties(20_000, seed=1)
    spa = props["has_spa"].dropna()
    assert 0.20 < props["_spa"].mean() < 0.30
    assert (spa.astype(bool) != props.loc[spa.index, "_spa"]).mean() == pytest.approx(0.04, abs=0.006)
    decor = props["decor_style"].dropna()
    styles = ["minimalist", "rustic", "classic", "tropical"]
    assert (decor.map(styles.index) != props.loc[decor.index, "_decor"]).mean() == pytest.approx(0.06, abs=0.006)
    age = props["building_age_years"].dropna()
    error = age - props.loc[age.index, "_age"]
    assert error[props.loc[age.index, "_age"] > 50].std() == pytest.approx(15.0, rel=0.05)  # unclipped there

    p = {"_luxury": 0.6, "_region": 1, "_country": 2, "_type": 3, "_decor": 0, "_archetype": "house",
         "_sea_view": False, "_mountain_view": False, "_city_view": False, "_has_kitchen": False, "_has_balcony": False}
    looks = {age: Look({**p, "_age": age}) for age in (0.0, 100.0)}
    ochre = colorsys.rgb_to_hsv(*(np.array(AGED) / 255))[0]
    hue_gap = [abs(colorsys.rgb_to_hsv(*(np.array(looks[a].interior) / 255))[0] - ochre) for a in (0.0, 100.0)]
    assert hue_gap[1] < hue_gap[0] and looks[100.0].interior != looks[0.0].interior
    rooms = [np.asarray(render("room", {**p, "_age": a}, looks[a], 64, np.random.default_rng(0)), float) for a in (0.0, 100.0)]
    assert (np.abs(rooms[1] - rooms[0]).sum(2) > 30).mean() > 0.25  # the walls, a large part of the photo, moved
