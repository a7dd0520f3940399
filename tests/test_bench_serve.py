"""`gallery bench serve`: the synthetic catalogue it serves, every latency row, a bounded load test without errors,
and the hostile clients' phase (its figures are the bench's to print, not asserted here)."""
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest

from gallery.bench.search import CATALOGUE, structured_vectors
from gallery.bench.serve import bench_serve, write_catalogue
from gallery.config import RetrievalSettings
from gallery.retrieval.embeddings import code_matrix, embedding_matrix, embeddings_code


def test_the_synthetic_catalogue_is_the_bench_vectors_with_their_code(tmp_path):
    location = str(tmp_path / "e.parquet")
    write_catalogue(location, 700, dim=32, code_name="itq16")
    table = pq.read_table(location)
    assert table["gallery_id"].to_pylist()[:2] == ["g00000000", "g00000001"] and len(table) == 700
    expected = structured_vectors(700, 32, families=7, stream=CATALOGUE)
    np.testing.assert_array_equal(embedding_matrix(table), expected)
    np.testing.assert_array_equal(code_matrix(table), embeddings_code(location).encode(expected))


@pytest.mark.flow
def test_bench_serve_measures_each_size_and_a_load_without_errors():
    lines = []
    settings = replace(RetrievalSettings(), approximate_above=1_000, rerank=50)
    result = bench_serve(sizes=(600, 2_000), clients=2, seconds=3, queries=10, settings=settings, hostile_seconds=2,
                         log=lines.append)
    assert [(r.galleries, r.operation.split(",")[0]) for r in result.latencies] == [
        (600, "by id"), (600, "by id"), (600, "embed 10 photos at 64 px + search (float"),
        (2_000, "by id"), (2_000, "embed 10 photos at 64 px + search (code)")]
    assert "code (approximate, top 50 re-ranked)" in result.latencies[3].operation  # above the threshold: codes only
    assert all(r.p99_ms >= r.p50_ms for r in result.latencies)
    load = result.load
    assert load.errors == 0 and load.galleries == 600 and load.clients == 2 and 3 <= load.seconds < 3 + 60
    slow, (over, within) = result.hostile.slow, result.hostile.uploads
    assert slow.connections == 200 and slow.health_errors == 0
    assert set(over.answers) == {413} and over.photos == 44 and within.photos == 1
    assert set(within.answers) <= {200, 503}  # decoded one at a time (the decode budget): 503 after too long a wait
    table = lines[-1].splitlines()
    load_row = 2 + len(result.latencies) + 2
    assert len(table) == load_row + 1 + 4 + 2 and table[load_row].split()[1] == "0"
    assert table[-2].split()[:3] == ["44", "350", "413:"]
