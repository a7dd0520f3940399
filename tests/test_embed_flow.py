"""Using a trained model: GalleryEmbedFlow reproduces the export with the training run's code; `gallery
search` end to end."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import REPO, REPORTS, run_flow

from gallery.cli import main
from gallery.retrieval.embeddings import (code_matrix, embedding_matrix, embeddings_code, embeddings_table,
                                          read_embeddings, write_embeddings)

pytestmark = pytest.mark.flow  # they read the smoke run (a whole flow)

EMBED_FLOW = str(REPO / "flows" / "embed_flow.py")


def as_frame(location):
    table, meta = read_embeddings(location)
    return pd.DataFrame({"gallery_id": table["gallery_id"].to_pylist(),
                         "embedding": list(np.stack(table["embedding"].to_numpy(zero_copy_only=False)))}), meta


@pytest.fixture(scope="module")
def embed_run(smoke_run, tmp_path_factory):
    """The embed flow on the smoke run's catalogue, without labels (the contract's own columns only)."""
    start = smoke_run["start"].task.data
    manifest = pd.read_parquet(start.manifest_location)
    unlabelled = tmp_path_factory.mktemp("embed") / "catalogue.parquet"
    manifest[["gallery_id", "images"]].assign(
        images=lambda d: d["images"].map(lambda imgs: [str(Path(start.manifest_location).parent / i) for i in imgs])
    ).to_parquet(unlabelled)
    status, run, stderr = run_flow(flow=EMBED_FLOW, config=None, manifest=str(unlabelled), train_run=smoke_run.id)
    assert status == "successful", stderr[-3000:]
    return run


def test_embed_flow_reproduces_the_training_export(smoke_run, embed_run):
    run = embed_run
    ours, meta = as_frame(run["end"].task.data.embeddings_location)
    theirs, _ = as_frame(smoke_run["end"].task.data.embeddings_location)
    assert meta["run_id"] == smoke_run.id and meta["embed_run_id"] == run.id
    merged = theirs.merge(ours, on="gallery_id", suffixes=("_train", "_embed"))
    assert len(merged) == len(theirs) == len(ours) == 200
    diff = np.abs(np.stack(merged["embedding_train"]) - np.stack(merged["embedding_embed"])).max()
    assert diff < 1e-4, diff


def test_embed_flow_binarizes_with_the_training_runs_code(smoke_run, embed_run):
    ours = embed_run["end"].task.data.embeddings_location
    theirs = smoke_run["end"].task.data.embeddings_location
    assert embeddings_code(ours).location == embeddings_code(theirs).location  # the run's code, not a new fit
    table, _ = read_embeddings(ours)
    assert (embeddings_code(theirs).encode(embedding_matrix(table)) == code_matrix(table)).all()


def test_search_cli_by_gallery_and_by_images(smoke_run, capsys):
    end = smoke_run["end"].task.data
    gallery_id = end.catalogue.frame["gallery_id"][7]
    for extra in ([], ["--binary"]):
        assert main(["search", "--embeddings", end.embeddings_location, "--gallery-id", gallery_id, "-k", "5"] + extra) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[1].split()[1] == gallery_id and len(out) == 6
    seeds = end.catalogue.frame["images"][7]
    assert main(["search", "--embeddings", end.embeddings_location, "--images", *seeds, "-k", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 4 and out[1].split()[1] == gallery_id  # its own photos find the gallery itself first


def test_search_cli_wrong_inputs(smoke_run, tmp_path, capsys):
    end = smoke_run["end"].task.data
    seeds = list(end.catalogue.frame["images"][0])
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    assert main(["search", "--embeddings", end.embeddings_location, "--images", str(bad)]) == 2
    assert f"seed image {bad}: not an image" in capsys.readouterr().err

    assert main(["search", "--embeddings", end.embeddings_location, "--run", "42", "--images", *seeds]) == 2
    assert "no GalleryTrainFlow run '42'" in capsys.readouterr().err

    other = str(tmp_path / "other.parquet")  # 512-d embeddings, e.g. from a vgg16 run
    x = np.random.default_rng(0).normal(size=(4, 512)).astype(np.float32)
    write_embeddings(other, embeddings_table(["a", "b", "c", "d"], ["train"] * 4, x, {"run_id": smoke_run.id, "backbone": "vgg16"}))
    assert main(["search", "--embeddings", other, "--images", *seeds]) == 2
    err = capsys.readouterr().err
    assert "holds 512-d embeddings (vgg16)" in err and "makes 1280-d ones" in err

    foreign = str(tmp_path / "foreign.parquet")
    table, _ = read_embeddings(end.embeddings_location)
    write_embeddings(foreign, embeddings_table(table["gallery_id"].to_pylist(), table["split"].to_pylist(),
                                               np.stack(table["embedding"].to_numpy(zero_copy_only=False)),
                                               {"run_id": "1234", "backbone": "efficientnet_lite0"}))
    assert main(["search", "--embeddings", foreign, "--run", smoke_run.id, "--images", *seeds]) == 2
    assert "was made by run 1234" in capsys.readouterr().err


def test_report_compares_binary_and_float(smoke_run):
    metrics = json.loads((Path(REPORTS) / smoke_run.id / "metrics.json").read_text())
    b = metrics["binary_vs_float"]["result"]
    assert b["k"] == 10 and 0.0 <= b["recall_two_stage"] <= 1.0 and b["split"] == "test"
    assert set(b["agreement"]) == {"C2_world_region", "C4_property_type"}
    for values in b["agreement"].values():
        assert set(values) == {"float", "binary", "imagenet_float"}
        assert all(0.0 <= v <= 1.0 for v in values.values())
    assert "## Binarized embeddings" in (Path(REPORTS) / smoke_run.id / "report.md").read_text()
