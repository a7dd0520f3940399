"""`gallery bench search` measures every variant on the same synthetic catalogue, and falls back to codes only."""
import numpy as np
import pytest

import gallery.bench.search as bench
from gallery.bench.search import FAMILY_SIZE, bench_search, structured_vectors


def test_structured_vectors_are_the_same_rows_in_any_slice():
    whole = structured_vectors(250_000, 8, families=50, stream=0)
    part = structured_vectors(120_000, 8, families=50, stream=0, start=90_000)
    np.testing.assert_array_equal(part, whole[90_000:210_000])
    np.testing.assert_allclose(np.linalg.norm(whole, axis=1), 1, rtol=1e-5)


def test_bench_search_measures_every_variant():
    lines = []
    (result,) = bench_search(sizes=(20_000,), dim=64, queries=10, code_name="itq32", log=lines.append)
    v = result["variants"]
    breadths = {"efSearch": (16, 32, 64, 128, 256), "nprobe": (32, 64, 128, 256, 512)}  # the defaults x 1/4 .. 4
    assert list(v) == (["exact float"] + [f"approximate float (efSearch {b})" for b in breadths["efSearch"]]
                       + ["exact binary"] + [f"approximate binary (nprobe {b})" for b in breadths["nprobe"]]
                       + [f"two-stage, {where}" for where in ("float32 in RAM", "float16 in RAM", "float16 mapped")])
    assert 20_000 * 64 * 4 <= v["exact float"]["index_bytes"] < 20_000 * 64 * 4 + 4096
    assert 20_000 * 4 <= v["exact binary"]["index_bytes"] < 20_000 * 4 + 4096
    assert v["exact float"]["recall_vs_exact_float"] == 1.0 and v["exact binary"]["recall_vs_exact_same_kind"] == 1.0
    assert v["two-stage, float32 in RAM"]["rerank_bytes"] == 2 * v["two-stage, float16 mapped"]["rerank_bytes"] == 20_000 * 64 * 4
    two_stage = v["two-stage, float32 in RAM"]["recall_vs_exact_float"]
    assert two_stage > v["approximate binary (nprobe 128)"]["recall_vs_exact_float"]  # re-ranking recovers the float order
    assert v["two-stage, float16 in RAM"]["recall_vs_exact_float"] == pytest.approx(two_stage, abs=0.05)
    assert all(row["p50_ms"] > 0 and row["p99_ms"] >= row["p50_ms"] for row in v.values())
    assert "20,000 galleries, 64-d, code itq32" in lines[-1] and len(lines[-1].splitlines()) == 2 + len(v)


def test_bench_search_keeps_to_codes_where_floats_do_not_fit(monkeypatch):
    monkeypatch.setattr(bench, "_available_bytes", lambda: 1)
    lines = []
    (result,) = bench_search(sizes=(2 * FAMILY_SIZE * 10,), dim=32, queries=5, code_name="itq16", log=lines.append)
    assert [name.split(" (")[0] for name in result["variants"]] == ["exact binary"] + ["approximate binary"] * 5
    assert all(row["recall_vs_exact_float"] is None for row in result["variants"].values())
    assert any("do not fit" in line and "codes only" in line for line in lines)
