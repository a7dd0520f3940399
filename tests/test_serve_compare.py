"""The compare view's comparison without a browser or a map (no UMAP): a file against itself, its HTTP
answer, and the CLI's error for two files without a gallery in common."""
import numpy as np
import pytest
from fastapi.testclient import TestClient

from gallery.cli import main
from gallery.retrieval.embeddings import embeddings_table, write_embeddings
from gallery.serve.app import create_app
from gallery.serve.compare import CompareView
from gallery.serve.problems import NotFound
from gallery.serve.service import Service


def embeddings(path, ids: list[str], seed: int = 0) -> str:
    vectors = np.random.default_rng(seed).normal(size=(len(ids), 8)).astype(np.float32)
    write_embeddings(str(path), embeddings_table(ids, ["train"] * len(ids), vectors, {"run_id": "compare-test"}))
    return str(path)


def test_a_file_compared_with_itself_keeps_every_neighbour(tmp_path):
    ids = [f"g{i:02d}" for i in range(30)]
    location = embeddings(tmp_path / "a.parquet", ids)
    service = Service(location, log=lambda line: None)
    comparison = CompareView(service, location, log=lambda line: None)
    assert comparison.ids == ids and (comparison.change.overlap == 1).all()
    shown = comparison.neighbours("g03")
    assert shown["a"] == shown["b"] and len(shown["a"]) == 10 and "g03" not in shown["a"] and shown["overlap"] == 1
    with pytest.raises(NotFound, match="both"):
        comparison.neighbours("g99")
    with TestClient(create_app(service, comparison=comparison)) as client:
        assert client.get("/api/compare", params={"id": "g03"}).json() == shown
    with TestClient(create_app(service)) as client:
        assert client.get("/api/compare", params={"id": "g03"}).status_code == 404  # served only with --compare


def test_cli_names_both_files_when_they_share_no_gallery(tmp_path, capsys):
    a = embeddings(tmp_path / "a.parquet", [f"a{i}" for i in range(5)])
    b = embeddings(tmp_path / "b.parquet", [f"b{i}" for i in range(5)])
    out = tmp_path / "explorer.html"
    assert main(["explorer", "--embeddings", a, "--compare", b, "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert a in error and b in error and "no gallery_id in common" in error and not out.exists()
