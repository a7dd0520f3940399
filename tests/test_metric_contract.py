"""The metric task kinds in the contract (docs/design.md §3): an identity column and an engagement pairs file.
Each bad input ends in a clear error or a counted, listed skip; training sees only pairs within train."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from gallery.cli import main
from gallery.data.images import DataQuality, quality_csv
from gallery.data.ingest import ingest
from gallery.data.readers import PairedLabels, PairRows, with_pairs
from gallery.errors import ContractError

SPLITS = ["train"] * 8 + ["valid"] * 2 + ["test"] * 2


def manifest(tmp_path, groups=None):
    frame = pd.DataFrame({
        "gallery_id": [f"g{i}" for i in range(12)], "split": SPLITS,
        "images": [[f"{i}.jpg"] for i in range(12)], "pool": [i % 2 for i in range(12)],
        # p0: g0, g1 (train), g10, g11 (test); p1: g2, g3; p2: g4, g5; the rest alone
        "property": groups or ["p0", "p0", "p1", "p1", "p2", "p2", "p6", "p7", "p8", "p9", "p0", "p0"]})
    path = tmp_path / "manifest.parquet"
    frame.to_parquet(path)
    return path


def spec(tmp_path, pairs_file="pairs.csv", extra=()):
    tasks = [{"name": "pool", "column": "pool", "kind": "binary"},
             {"name": "same", "column": "property", "kind": "identity"},
             {"name": "co_viewed", "kind": "pairs", "file": pairs_file}, *extra]
    path = tmp_path / "tasks.yaml"
    path.write_text(yaml.safe_dump({"tasks": tasks}))
    return path


def pairs(tmp_path, rows, name="pairs.csv", columns=("gallery_a", "gallery_b", "weight")):
    frame = pd.DataFrame(rows, columns=list(columns))
    path = tmp_path / name
    if name.endswith(".csv"):
        frame.to_csv(path, index=False)
    elif name.endswith(".parquet"):
        frame.to_parquet(path)
    else:
        path.write_text("\n".join(json.dumps(r) for r in frame.to_dict("records")))
    return path


GOOD = [("g0", "g2", 1.0), ("g3", "g4", 2.0), ("g8", "g9", 1.0), ("g1", "g10", 1.0)]


@pytest.mark.parametrize("name", ["pairs.csv", "pairs.parquet", "pairs.jsonl"])
def test_identity_and_pairs_are_encoded(tmp_path, name):
    pairs(tmp_path, GOOD, name)
    cat = ingest(manifest(tmp_path), spec(tmp_path, name))
    assert [t.name for t in cat.tasks] == ["pool"] and [t.name for t in cat.metric] == ["same", "co_viewed"]
    same = cat.frame["same"].to_numpy()
    # classes: the groups with two train galleries (p0, p1, p2), in every split; the rest train nothing
    np.testing.assert_array_equal(same, [0, 0, 1, 1, 2, 2] + [np.nan] * 4 + [0, 0])
    assert cat.metric[0].num_classes == 3
    assert list(cat.groups["same"][[6, 10]]) == ["p6", "p0"]
    p = cat.pairs["co_viewed"]
    assert sorted(zip(p.a.tolist(), p.b.tolist())) == [(0, 2), (1, 10), (3, 4), (8, 9)]
    # a gallery's own row where it ends a pair within its split (g1-g10 crosses splits: evaluation only)
    np.testing.assert_array_equal(cat.frame["co_viewed"].to_numpy(), [0, np.nan, 2, 3, 4] + [np.nan] * 3 + [8, 9]
                                  + [np.nan] * 2)
    assert any("1 pair(s) join galleries of two splits" in n for n in cat.notes)


def test_bad_pairs_are_dropped_counted_and_listed(tmp_path):
    rows = GOOD + [("g0", "g0", 1.0), ("g2", "g0", 3.0), ("nobody", "g1", 1.0), ("g5", "g6", -2.0), ("", "g1", 1.0)]
    pairs(tmp_path, rows)
    cat = ingest(manifest(tmp_path), spec(tmp_path))
    assert len(cat.pairs["co_viewed"]) == 4
    reasons = {(s.row, s.reason) for s in cat.skipped_pairs}
    assert reasons == {(5, "a gallery paired with itself"), (6, "repeats an earlier pair (in either order)"),
                       (7, "names a gallery the manifest does not list"), (8, "weight is not a positive number"),
                       (9, "an empty gallery id")}
    assert any("5 pair(s) dropped" in n for n in cat.notes)
    csv = quality_csv(DataQuality([], [], cat.skipped_pairs))
    assert "nobody" in csv and "row 7 of its file" in csv and "names a gallery the manifest does not list" in csv
    assert "5 engagement pair(s) dropped" in DataQuality([], [], cat.skipped_pairs).summary()


def test_a_pairs_file_left_without_pairs_is_an_error(tmp_path):
    pairs(tmp_path, [("x", "y", 1.0), ("g1", "g1", 1.0)])
    with pytest.raises(ContractError, match="no usable pair among its 2 row"):
        ingest(manifest(tmp_path), spec(tmp_path))


def test_pairs_only_across_splits_train_nothing(tmp_path):
    pairs(tmp_path, [("g1", "g10", 1.0), ("g8", "g9", 1.0)])
    with pytest.raises(ContractError, match="no pair joins two train galleries"):
        ingest(manifest(tmp_path), spec(tmp_path))


def test_a_pairs_file_with_missing_columns_or_missing_file(tmp_path):
    pairs(tmp_path, [("g0", "g2")], columns=("gallery_a", "other"))
    with pytest.raises(ContractError) as info:
        ingest(manifest(tmp_path), spec(tmp_path))
    assert "missing column(s) 'gallery_b'" in str(info.value) and "pairs.csv" in str(info.value)
    with pytest.raises(ContractError, match="the file does not exist") as info:
        ingest(manifest(tmp_path), spec(tmp_path, "absent.parquet"))
    assert "relative paths are from the task spec's folder" in str(info.value)


def test_identity_column_with_a_single_group(tmp_path):
    pairs(tmp_path, GOOD)
    with pytest.raises(ContractError, match="every labelled product is in one group"):
        ingest(manifest(tmp_path, ["p"] * 12), spec(tmp_path))


def test_metric_tasks_cannot_be_held_out_and_keys_must_fit_their_kind(tmp_path):
    pairs(tmp_path, GOOD)
    path = tmp_path / "tasks.yaml"
    path.write_text(yaml.safe_dump({"tasks": [{"name": "pool", "column": "pool", "kind": "binary"}],
                                    "holdout": [{"name": "same", "column": "property", "kind": "identity"}]}))
    with pytest.raises(ContractError, match="identity tasks cannot be held out"):
        ingest(manifest(tmp_path), path)
    path.write_text(yaml.safe_dump({"tasks": [{"name": "pool", "column": "pool", "kind": "binary"},
                                              {"name": "co", "column": "pool", "kind": "pairs", "file": "pairs.csv"}]}))
    with pytest.raises(ContractError, match="'file' to pairs tasks only"):
        ingest(manifest(tmp_path), path)


def test_validate_prints_the_metric_tasks(tmp_path, capsys):
    pairs(tmp_path, GOOD)
    assert main(["validate", "--manifest", str(manifest(tmp_path)), "--tasks", str(spec(tmp_path))]) == 0
    out = capsys.readouterr().out
    assert "same" in out and "3 groups train as classes" in out and "4 pairs, 2 within train" in out


def test_batches_hold_both_ends_of_drawn_pairs_and_only_pairs_carry_pair_labels():
    """Pair-aware sampling beside the usual sample: each batch is the epoch order's galleries plus both ends
    of drawn pairs (more weight, drawn more often); the drawn ones carry only the pairs labels, the usual
    ones every other label, so the attribute tasks see exactly the usual sample."""
    pair_rows = PairRows(np.array([0, 2, 4]), np.array([1, 3, 5]), np.array([1.0, 1.0, 98.0]))
    rows, drawn = with_pairs(np.arange(10, 30), 8, [pair_rows], 1, [0, 0])
    assert [len(r) for r in rows] == [10, 10, 6]
    for r, d in zip(rows, drawn):
        ends = r[d]
        assert len(ends) == 2 and ends[1] == ends[0] + 1 and ends[0] in (0, 2, 4)
    assert np.concatenate([r[~d] for r, d in zip(rows, drawn)]).tolist() == list(range(10, 30))
    heavy = sum(int(4 in r) for seed in range(20) for r in with_pairs(np.arange(10, 30), 8, [pair_rows], 1, [seed, 0])[0])
    assert heavy > 50  # of 60 batches: drawn in proportion to the weight
    halves = [with_pairs(np.arange(10, 30), 8, [pair_rows], 1, [0, 0], rank, 2) for rank in (0, 1)]
    for k, whole in enumerate(rows):  # two ranks split each whole batch between them
        assert sorted(np.concatenate([halves[0][0][k], halves[1][0][k]]).tolist()) == sorted(whole.tolist())
    targets = torch.tensor([[1.0, 5.0], [0.0, 7.0], [1.0, float("nan")]])
    masked = PairedLabels([np.array([False, True, True])], torch.tensor([False, True])).mask(0, targets)
    torch.testing.assert_close(masked, torch.tensor([[1.0, float("nan")], [float("nan"), 7.0],
                                                     [float("nan"), float("nan")]]), equal_nan=True)
