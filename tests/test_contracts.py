"""Every contract violation of docs/design.md §3 stops ingestion with a message naming file, column, ids and fix."""
import json

import numpy as np
import pandas as pd
import pytest
import yaml

from gallery.cli import main
from gallery.data.ingest import ingest
from gallery.data.labels import MISSING_CLASS
from gallery.data.split import hash_split
from gallery.errors import ContractError

SPEC = {
    "tasks": [
        {"name": "B15_pool", "column": "has_pool", "kind": "binary"},
        {"name": "C2_region", "column": "world_region", "kind": "multiclass", "classes": ["africa", "asia", "europe"]},
        {"name": "R3_adr", "column": "avg_daily_rate", "kind": "regression"},
    ],
    "holdout": [{"name": "star_rating", "column": "star_rating", "kind": "multiclass"}],
}


def rows(n=40):
    return pd.DataFrame({
        "gallery_id": [f"g{i}" for i in range(n)],
        "split": ["valid" if i % 10 == 4 else "test" if i % 10 == 6 else "train" for i in range(n)],
        "images": [[f"img/{i}_a.jpg", f"img/{i}_b.jpg"] for i in range(n)],
        "has_pool": [bool(i % 2) if i % 5 else None for i in range(n)],
        "world_region": [["africa", "asia", "europe"][i % 3] for i in range(n)],
        "avg_daily_rate": [100.0 + i if i % 7 else np.nan for i in range(n)],
        "star_rating": [1 + i % 5 if i % 2 else None for i in range(n)],
    })


def write(tmp_path, df, spec=SPEC, fmt="parquet", spec_name="tasks.yaml"):
    manifest = tmp_path / f"manifest.{fmt}"
    if fmt == "parquet":
        df.to_parquet(manifest)
    elif fmt == "csv":
        df.assign(images=df["images"].map(json.dumps)).to_csv(manifest, index=False)
    else:
        manifest.write_text("\n".join(json.dumps(r, default=str) for r in df.to_dict("records")))
    tasks = tmp_path / spec_name
    tasks.write_text(json.dumps(spec) if spec_name.endswith(".json") else yaml.safe_dump(spec))
    return manifest, tasks


def violations(tmp_path, df, spec=SPEC):
    return ingest_error(tmp_path, df, spec)


def ingest_error(tmp_path, df, spec=SPEC, **split):
    with pytest.raises(ContractError) as info:
        ingest(*write(tmp_path, df, spec), **split)
    return str(info.value)


def test_valid_inputs_are_encoded(tmp_path):
    cat = ingest(*write(tmp_path, rows()))
    f = cat.frame
    assert list(f["gallery_id"][:2]) == ["g0", "g1"]
    assert f["images"][0] == [str(tmp_path / "img/0_a.jpg"), str(tmp_path / "img/0_b.jpg")]
    assert np.isnan(f["B15_pool"][0]) and f["B15_pool"][1] == 1.0 and f["B15_pool"][2] == 0.0
    assert list(f["C2_region"][:3]) == [0, 1, 2]
    assert np.isnan(f["R3_adr"][0]) and f["R3_adr"][1] == pytest.approx(101.0)
    star = cat.holdout[0]
    assert star.classes == ("1", "2", "3", "4", "5")  # inferred from train, numeric order
    assert f["star_rating"][0] == MISSING_CLASS
    assert cat.stats["R3_adr"].variance == pytest.approx(np.var(f["R3_adr"][(f["split"] == "train")].dropna(), ddof=1), rel=1e-5)


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_csv_and_jsonl_read_like_parquet(tmp_path, fmt):
    reference = ingest(*write(tmp_path, rows())).frame
    other = ingest(*write(tmp_path, rows(), fmt=fmt)).frame
    pd.testing.assert_frame_equal(reference, other)


def test_json_task_spec(tmp_path):
    cat = ingest(*write(tmp_path, rows(), spec_name="tasks.json"))
    assert [t.name for t in cat.tasks] == ["B15_pool", "C2_region", "R3_adr"]


@pytest.mark.parametrize("column", ["gallery_id", "images"])
def test_missing_required_column(tmp_path, column):
    msg = violations(tmp_path, rows().drop(columns=[column]))
    assert f"manifest.parquet: column '{column}': required column is missing" in msg
    assert f"add a '{column}' column" in msg


def test_missing_task_column(tmp_path):
    msg = violations(tmp_path, rows().drop(columns=["has_pool"]))
    assert "column 'has_pool': task 'B15_pool'" in msg and "names a column the manifest lacks" in msg


def test_duplicate_and_empty_ids_listed_together(tmp_path):
    df = rows()
    df.loc[3, "gallery_id"] = "g1"
    df.loc[5, "gallery_id"] = ""
    msg = violations(tmp_path, df)
    assert msg.startswith("2 data-contract violations")
    assert "appear more than once: 'g1'" in msg and "make gallery_id unique" in msg
    assert "1 empty id(s) at 'row 6'" in msg


def test_empty_image_list(tmp_path):
    df = rows()
    df.at[4, "images"] = []
    msg = violations(tmp_path, df)
    assert "column 'images': 1 product(s) with an empty image list or an empty path: 'g4'" in msg


def test_unknown_kind(tmp_path):
    spec = json.loads(json.dumps(SPEC))
    spec["tasks"][0]["kind"] = "clasification"
    msg = violations(tmp_path, rows(), spec)
    assert "tasks.yaml: tasks[0].kind: 'clasification' is not one of ['binary', 'multiclass', 'regression', 'identity', 'pairs']" in msg
    assert "fix: use one of" in msg


@pytest.mark.parametrize("name", [".", "..", "a/b", "..\\x"])
def test_task_names_that_are_path_components_are_refused(tmp_path, name):
    """A task name becomes a folder name in the run's store (checkpoints, task-optimal results): '.', '..'
    and names with a path separator would write outside their folder."""
    spec = json.loads(json.dumps(SPEC))
    spec["holdout"][0]["name"] = name
    msg = violations(tmp_path, rows(), spec)
    assert f"tasks.yaml: holdout[0].name: task name {name!r} is not allowed" in msg
    assert "fix: name it with letters, digits, '_', '.' and '-' only, and not '.' or '..' alone" in msg


def test_binary_with_third_value(tmp_path):
    df = rows()
    df["has_pool"] = df["has_pool"].astype(object)
    df.loc[7, "has_pool"] = "maybe"
    df["has_pool"] = df["has_pool"].astype(str).replace("None", None)
    msg = violations(tmp_path, df)
    assert "column 'has_pool' (task 'B15_pool'): binary column has 3 distinct values" in msg
    assert "'maybe'" in msg and "kind: multiclass" in msg


def test_binary_with_other_words_needs_positive(tmp_path):
    df = rows().assign(has_pool=lambda d: d["has_pool"].map({True: "pool", False: "none", None: None}))
    assert "declare `positive:" in violations(tmp_path, df)
    spec = json.loads(json.dumps(SPEC))
    spec["tasks"][0]["positive"] = "pool"
    cat = ingest(*write(tmp_path, df, spec))
    assert cat.frame["B15_pool"][1] == 1.0 and cat.frame["B15_pool"][2] == 0.0


def test_label_outside_declared_classes(tmp_path):
    df = rows()
    df.loc[[2, 9], "world_region"] = "mars"
    msg = violations(tmp_path, df)
    assert "2 label(s) outside the declared classes: values 'mars' at ids 'g2', 'g9'" in msg


def test_task_without_train_labels(tmp_path):
    df = rows().assign(avg_daily_rate=np.nan)
    msg = violations(tmp_path, df)
    assert "column 'avg_daily_rate' (task 'R3_adr'): no labels in the train split" in msg


def test_holdout_that_is_also_mtl(tmp_path):
    spec = json.loads(json.dumps(SPEC))
    spec["holdout"][0]["column"] = "has_pool"
    msg = violations(tmp_path, rows(), spec)
    assert "holdout task 'star_rating': column 'has_pool' is also an MTL task ('B15_pool')" in msg


def test_unknown_split_value(tmp_path):
    df = rows().assign(split=["train"] * 38 + ["training", "valid"])
    msg = violations(tmp_path, df)
    assert "column 'split': unknown split value(s) 'training' (ids 'g38')" in msg


def test_split_without_valid_rows(tmp_path):
    msg = violations(tmp_path, rows().assign(split="train"))
    assert "column 'split': no product falls in the valid or test split (40 products: train 40, valid 0, test 0)" in msg


def test_split_without_test_rows_is_refused_at_ingest(tmp_path):
    """Every reported number is measured on test: a catalogue without test galleries stops at ingest."""
    msg = violations(tmp_path, rows().assign(split=["train"] * 30 + ["valid"] * 10))
    assert "no product falls in the test split" in msg and "test reports" in msg


def test_given_split_wins_and_nulls_are_hashed(tmp_path):
    df = rows().assign(split=["valid"] * 5 + ["test"] * 5 + [None] * 30)
    cat = ingest(*write(tmp_path, df))
    assert list(cat.frame["split"][:10]) == ["valid"] * 5 + ["test"] * 5
    assert set(cat.frame["split"][10:]) <= {"train", "valid", "test"}


def test_the_settings_fractions_hash_the_products_without_a_split(tmp_path):
    df = rows(400).assign(split=["test"] * 3 + [None] * 397)
    cat = ingest(*write(tmp_path, df), valid_fraction=0.3, test_fraction=0.3)
    assert list(cat.frame["split"][:3]) == ["test"] * 3  # given ones win
    hashed = cat.frame["split"][3:]
    assert list(hashed) == list(hash_split(df["gallery_id"][3:], 0.3, 0.3))
    assert 0.5 < ((hashed == "valid") | (hashed == "test")).mean() < 0.7
    too_few = ingest_error(tmp_path, rows(3).assign(split=None), valid_fraction=0.01, test_fraction=0.01)
    assert "the hashed split sends about 1% to valid and 1% to test: data.split in the settings" in too_few


def test_a_runs_split_setting_reaches_its_ingest_and_validate(tmp_path, capsys):
    from gallery.config import settings_from_dict
    from gallery.steps import ingest_for_run

    df = rows(400).assign(split=None)
    manifest, tasks = write(tmp_path, df)
    shares = {"data": {"split": {"valid": 0.3, "test": 0.25}}}
    expected = hash_split(df["gallery_id"], 0.3, 0.25)
    assert list(ingest_for_run(str(manifest), str(tasks), settings_from_dict(shares)).frame["split"]) == list(expected)
    config = tmp_path / "settings.json"
    config.write_text(json.dumps(shares))
    assert main(["validate", "--config", str(config), "--manifest", str(manifest), "--tasks", str(tasks)]) == 0
    counts = {s: int((expected == s).sum()) for s in ("train", "valid", "test")}
    assert counts["valid"] > 80 and "galleries: 400 (" in (out := capsys.readouterr().out)
    assert all(f"{s} {n}" in out for s, n in counts.items())


def test_a_manifest_to_embed_is_hashed_as_its_training_run_hashed(tmp_path):
    from types import SimpleNamespace

    from gallery.config import settings_from_dict
    from gallery.steps import ingest_for_embedding

    df = rows(400).assign(split=None)
    manifest, _ = write(tmp_path, df)
    run = settings_from_dict({"data": {"split": {"valid": 0.3, "test": 0.25}}})
    assert list(ingest_for_embedding(str(manifest), run).frame["split"]) == list(hash_split(df["gallery_id"], 0.3, 0.25))
    before_the_setting = SimpleNamespace(data=SimpleNamespace())  # a run's pickled settings from an older version
    assert list(ingest_for_embedding(str(manifest), before_the_setting).frame["split"]) == list(hash_split(df["gallery_id"]))


def test_regression_nan_inf_missing_and_text_rejected(tmp_path):
    df = rows()
    df.loc[1, "avg_daily_rate"] = np.inf
    cat = ingest(*write(tmp_path, df))
    assert np.isnan(cat.frame["R3_adr"][1])
    df = df.astype({"avg_daily_rate": object})
    df.loc[2, "avg_daily_rate"] = "cheap"
    df["avg_daily_rate"] = df["avg_daily_rate"].astype(str)
    assert "1 non-numeric value(s) 'cheap' at ids 'g2'" in violations(tmp_path, df)


def test_csv_images_must_be_json_arrays(tmp_path):
    manifest, tasks = write(tmp_path, rows(), fmt="csv")
    text = manifest.read_text().splitlines()
    text[1] = text[1].replace('"[""img/0_a.jpg"", ""img/0_b.jpg""]"', "img/0_a.jpg")
    manifest.write_text("\n".join(text) + "\n")
    with pytest.raises(ContractError, match=r"column 'images': 1 row\(s\) are not a list of image paths: 'g0'"):
        ingest(manifest, tasks)


def test_manifest_without_task_spec(tmp_path):
    """Embedding a catalogue needs no labels: only the manifest's own columns are checked."""
    manifest, _ = write(tmp_path, rows()[["gallery_id", "images"]].head(5))
    cat = ingest(manifest)
    assert cat.tasks == [] and list(cat.frame.columns) == ["gallery_id", "images", "split"]
    df = rows()[["gallery_id", "images"]]
    df.loc[1, "gallery_id"] = "g0"
    manifest, _ = write(tmp_path, df)
    with pytest.raises(ContractError, match="appear more than once"):
        ingest(manifest)


def test_user_files_untouched(tmp_path):
    manifest, tasks = write(tmp_path, rows())
    before = manifest.read_bytes(), tasks.read_bytes()
    ingest(manifest, tasks)
    assert (manifest.read_bytes(), tasks.read_bytes()) == before


def test_cli_validate_exit_codes(tmp_path, capsys):
    manifest, tasks = write(tmp_path, rows())
    assert main(["validate", "--manifest", str(manifest), "--tasks", str(tasks)]) == 0
    out = capsys.readouterr().out
    assert "galleries: 40" in out and "per gallery min 2 / median 2 / max 2" in out
    assert "B15_pool" in out and "minority" in out and "variance" in out

    df = rows()
    df.loc[3, "gallery_id"] = "g1"
    manifest, tasks = write(tmp_path, df)
    assert main(["validate", "--manifest", str(manifest), "--tasks", str(tasks)]) == 2
    err = capsys.readouterr().err
    assert "appear more than once" in err and "Traceback" not in err


def test_unsupported_and_missing_files(tmp_path):
    (tmp_path / "tasks.yaml").write_text(yaml.safe_dump(SPEC))
    with pytest.raises(ContractError, match="unsupported manifest format '.xlsx'"):
        ingest(tmp_path / "m.xlsx", tmp_path / "tasks.yaml")
    with pytest.raises(ContractError, match="the manifest does not exist"):
        ingest(tmp_path / "nope.parquet", tmp_path / "tasks.yaml")
    with pytest.raises(ContractError, match="cannot read the task spec"):
        ingest(tmp_path / "nope.parquet", tmp_path / "none.yaml")
