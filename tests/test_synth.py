"""The synthetic catalogue: deterministic, the contract of docs/design.md §3, Table 1 tasks, visible evidence."""
import filecmp
import subprocess
import sys
from collections import Counter

import numpy as np
import pandas as pd
import yaml

from gallery.data.ingest import ingest
from gallery.data.split import hash_unit
from gallery.data.synth import SynthSettings, generate


def test_same_arguments_give_identical_files(tmp_path):
    settings = SynthSettings(galleries=25, seed=7, image_size=32, min_images=2, max_images=5)
    generate(tmp_path / "a", settings, workers=2)
    generate(tmp_path / "b", settings, workers=1)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) > 50
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "a", tmp_path / "b", [str(f) for f in files], shallow=False)
    assert not mismatch and not errors
    generate(tmp_path / "c", SynthSettings(galleries=25, seed=8, image_size=32, min_images=2, max_images=5))
    assert (tmp_path / "a" / "manifest.parquet").read_bytes() != (tmp_path / "c" / "manifest.parquet").read_bytes()


def test_table1_tasks_and_holdout(small_catalogue):
    spec = yaml.safe_load((small_catalogue / "tasks.yaml").read_text())
    kinds = Counter(t["kind"] for t in spec["tasks"])
    assert kinds == {"binary": 17, "multiclass": 7, "regression": 7}
    ids = [t["name"].split("_")[0] for t in spec["tasks"]]
    assert ids == [f"C{i}" for i in range(1, 8)] + [f"B{i}" for i in range(1, 18)] + [f"R{i}" for i in range(1, 8)]
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
