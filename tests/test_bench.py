"""The benchmark's padded baseline computes the same thing as packed batches, and the bench runs."""
import pytest
import torch

from gallery.bench.train import Case, _batches, _model, _padded_vectors, bench_case


def test_padded_baseline_equals_packed_mean():
    case = Case("efficientnet_lite0", 32, 3, 1, 4, 16)
    model = _model(case, log=lambda _: None).eval()
    store, _ = _batches(case, 1)[0]
    x, index = store.gather(range(len(store)))
    with torch.no_grad():
        feats = model.encoder.images.trunk_features(x)
        packed = model.encoder(feats, index, len(store), from_features=True)
        padded = _padded_vectors(model, feats, store.lengths, case.max_images)
    torch.testing.assert_close(padded, packed, rtol=1e-4, atol=1e-5)


def test_bench_case_reports_ratios():
    lines = []
    r = bench_case(Case("efficientnet_lite0", 32, 4, 1, 6, 16), steps=1, device=torch.device("cpu"), log=lines.append)
    v = r["variants"]
    assert r["padded_memory_ratio"] > 1.0  # padding rows cost activations
    assert v["recompute"]["memory_bytes"] == v["cache"]["memory_bytes"]  # the frozen trunk saves nothing for backward
    assert v["recompute"]["images_per_s"] * v["recompute"]["seconds_per_step"] == pytest.approx(
        v["cache"]["images_per_s"] * v["cache"]["seconds_per_step"])  # the same images in both variants
    assert any("ratio: padded vs packed" in line for line in lines)
