"""The benchmarks: the padded baseline and the plain reference compute what they claim, and each
bench measures its variants on the same inputs."""
import pytest
import torch

from gallery.bench.roofline import counted_flops, dominant_gemm
from gallery.bench.train import Case, Reference, _batches, _model, _padded_vectors, bench_case
from gallery.data.labels import LabelStats
from gallery.data.tasks import Task

TASKS = [Task("b", "b", "binary"), Task("c", "c", "multiclass", classes=tuple("abcdefgh")), Task("r", "r", "regression")]
STATS = {"r": LabelStats("regression", {"train": 1}, mean=0.0, variance=1.0)}
CASE = Case("efficientnet_lite0", 32, 3, 1, 4, 16)


def test_padded_baseline_equals_packed_mean():
    model = _model(CASE, lambda _: None, TASKS, STATS).eval()
    store, _ = _batches(CASE, 1, TASKS)[0]
    x, index = store.gather(range(len(store)))
    with torch.no_grad():
        feats = model.encoder.images.trunk_features(x)
        packed = model.encoder(feats, index, len(store), from_features=True)
        padded = _padded_vectors(model, feats, store.lengths, CASE.max_images)
    torch.testing.assert_close(padded, packed, rtol=1e-4, atol=1e-5)


def test_reference_is_the_same_layers_written_plainly():
    """The plain step's model: normalised pixels -> frozen trunk -> top -> spatial mean -> gallery mean
    -> head, the same numbers as the engine's encoder gives, gallery by gallery."""
    model = _model(CASE, lambda _: None, TASKS, STATS).eval()
    images = model.encoder.images
    reference = Reference(images.trunk, images.top, images.mean, images.std, images.dim, 16, 10).eval()
    store, _ = _batches(CASE, 1, TASKS)[0]
    x, index = store.gather(range(len(store)))
    with torch.no_grad():
        logits = reference(x, index, len(store))
        for g in range(len(store)):
            z = model.encoder(store.gather([g])[0], torch.zeros(int(store.lengths[g]), dtype=torch.int64), 1)
            torch.testing.assert_close(logits[g:g + 1], reference.head(z), rtol=1e-4, atol=1e-5)


def test_bench_case_measures_every_variant_on_the_same_images():
    lines = []
    r = bench_case(Case("efficientnet_lite0", 32, 4, 1, 6, 16, 0, True, "tiny"), steps=1, device=torch.device("cpu"),
                   log=lines.append, tasks=TASKS, stats=STATS)
    v = r["variants"]
    assert r["padded_memory_ratio"] > 1.0  # padding rows cost activations
    assert v["recompute"]["memory_bytes"] == v["cache"]["memory_bytes"]  # the frozen trunk saves nothing for backward
    for name in ("reference", "recompute", "cache", "padded"):  # the same images in every variant
        assert v[name]["images_per_s"] * v[name]["seconds_per_step"] == pytest.approx(
            v["cache"]["images_per_s"] * v["cache"]["seconds_per_step"])
    gemm = r["roofline"].gemm  # the head convolution, 320 -> 1280 channels on 1x1 maps at 32 px
    assert (gemm.k, gemm.n) == (320, 1280) and gemm.layer.startswith("encoder.images.top")
    assert any(line.startswith("  roofline: the preset's step (engine, from the feature cache)") for line in lines)


def test_flops_are_counted_from_the_step_by_hand():
    """A linear layer trained one step: forward 2mkn, backward 2mkn for the input's gradient and 2mkn for
    the weight's (a leaf input needs none: 4mkn in all)."""
    layer = torch.nn.Linear(20, 30, bias=False)
    x = torch.randn(8, 20)
    assert counted_flops(lambda: layer(x).sum().backward()) == 2 * 2 * 8 * 20 * 30
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 8, 1))
    model[2].requires_grad_(False)  # frozen layers are not candidates
    gemm = dominant_gemm(model, lambda: model(torch.randn(2, 4, 5, 5)))
    assert (gemm.m, gemm.k, gemm.n, gemm.layer) == (2 * 5 * 5, 4 * 9, 16, "0")


def test_bench_scale_measures_each_phase_in_its_own_process(tmp_path):
    from gallery.bench.scale import bench_scale

    lines = []
    *rows, summary = bench_scale(sizes=(120, 360), image_size=32, min_images=2, max_images=3, code="median",
                                 log=lines.append)
    small, big = rows
    assert big["preprocess"]["images"] > 2 * small["preprocess"]["images"]
    assert big["train_export"]["exported"] == 360 and small["train_export"]["exported"] == 120
    assert summary["rss_ratio"] == pytest.approx(big["train_export"]["peak_rss"] / small["train_export"]["peak_rss"])
    for r in rows:  # a 32 px JPEG is a few hundred bytes; the default trains lite0's head convolution only,
        # so its cache at 32 px is the last block's output: 320 x 1 x 1 in fp16
        assert 100 < r["preprocess"]["image_bytes"] / r["preprocess"]["images"] < 32 * 32 * 3
        assert r["preprocess"]["feature_bytes"] == r["preprocess"]["images"] * 320 * 2
    assert 0 < summary["kb_at_224"]["photo"] < summary["kb_at_224"]["decoded"]
    assert lines[-2].strip().startswith("headline: 3x the galleries")


def test_bench_weightings_times_each_against_pseudo_uniform():
    from gallery.bench.weightings import bench_weightings

    lines = []
    out = bench_weightings(["famo", "imtl_g"], steps=1, rounds=1, device=torch.device("cpu"), log=lines.append,
                           case=Case("efficientnet_lite0", 32, 3, 1, 3, 16), tasks=TASKS, stats=STATS)
    assert [r.weighting for r in out] == ["pseudo_uniform", "famo", "imtl_g"] and out[0].relative == 1.0
    assert [r.relative for r in out] == pytest.approx([r.seconds_per_step / out[0].seconds_per_step for r in out])
    assert [line.split()[0] for line in lines[-3:]] == ["pseudo_uniform", "famo", "imtl_g"]
    assert "trainable blocks 1," in lines[0]  # the case's, not the default preset's 0


def test_the_default_case_is_the_one_its_preset_trains_on_cpu_and_gpu():
    import json

    from gallery.bench.train import cpu_cases, gpu_cases, preset_case
    from gallery.config import PRESETS_DIR

    preset = json.loads((PRESETS_DIR / "default.json").read_text())
    case = preset_case("default")
    assert (case.backbone, case.image_size, case.batch_galleries, case.hidden, case.trainable_blocks) == (
        preset["model"]["backbone"], preset["model"]["image_size"], preset["train"]["batch_galleries"],
        preset["model"]["hidden"], preset["model"]["trainable_blocks"])
    assert (case.min_images, case.max_images) == (preset["data"]["synth"]["min_images"], preset["data"]["synth"]["max_images"])
    assert cpu_cases()[0] == gpu_cases()[0] == case and case.use_cache


MODEL = {"weighting": "pseudo_uniform", "pooling": "mean", "backbone": "efficientnet_lite0"}


def _arm(kind: str, seed: int | None = None, **fields) -> dict:
    """An arm as metrics.json writes it: its fields (gallery.evaluation.arms.EmbeddingArm.as_dict) and label."""
    return {"kind": kind, "model": None if seed is None else {**MODEL, "seed": seed}, "reference": kind == "mtl",
            "backbone": None, "task": None, "label": "", **fields}


def _seed_metrics(primary: float, aggregate: float, retrieval: float, score: float, seed: int) -> dict:
    """The parts of a run's metrics.json the seeds bench reads, as gallery.evaluation.report.metrics writes them;
    the run trained with train.seed `seed`, so its models name that seed."""
    def effect(x, reading):
        return {"estimate": x, "low": x - 0.1, "high": x + 0.1, "p": None, "n": 10, "method": "", "reading": reading}
    mtl, imagenet = _arm("mtl", seed), _arm("imagenet")
    specialised = _arm("specialised", seed, task="same_property", reference=False)
    return {"scorecard": {"primary": {"task": "star_rating", "probe": "linear", "arm": mtl, "baseline": imagenet,
                                      "metric": "accuracy", "difference": effect(primary, "r")},
                          "aggregates": [{"arm": mtl, "baseline": imagenet, "probe": "all", "entries": 8,
                                          "effect": effect(aggregate, "a")}]},
            "retrieval_against_relevance": {"claims": [
                {"claim": "unified_beats_specialised", "task": "same_property", "metric": "recall@10", "arm": mtl,
                 "baseline": specialised, "search": "float", "effect": effect(retrieval, "s")},
                {"claim": "binary_loses_nothing", "task": "same_property", "metric": "recall@10", "arm": mtl,
                 "baseline": mtl, "search": "binary", "effect": effect(0.0, "b")}]},
            "transfer": {"scores": [{"task": "has_spa", "probe": "knn", "arm": mtl, "value": (score + 1.0) / 2,
                                     "galleries": 2}]}}


def test_seeds_bench_counts_the_runs_that_keep_each_readings_sign():
    """Three runs: the primary difference keeps its sign in all three, the aggregate flips once, retrieval's
    claim is 0 in one run (a sign of its own); held-out scores are listed per run with their range."""
    from gallery.bench.seeds import ReadingId, agreement, markdown, readings_of, score_spread
    from gallery.evaluation.arms import IMAGENET_ARM, mtl_arm
    from gallery.model.identity import ModelIdentity

    metrics = [_seed_metrics(0.02, -0.1, 0.03, 0.0, 0), _seed_metrics(0.01, 0.05, 0.0, 1.0, 1),
               _seed_metrics(0.04, -0.2, 0.02, 0.5, 2)]
    first = ModelIdentity("pseudo_uniform", "mean", 0, "efficientnet_lite0")
    mtl = mtl_arm(first, first)   # the first run's reference model; the others' are its repetitions
    table = agreement([readings_of(m, s) for s, m in enumerate(metrics)])
    found = {a.of.kind: a for a in table}
    assert set(found) == {"primary", "aggregate", "retrieval"}  # binary_loses_nothing is not a seeds reading
    assert found["primary"].of == ReadingId("primary", "star_rating", "linear", mtl, IMAGENET_ARM, "accuracy")
    assert (found["primary"].same_sign, found["aggregate"].same_sign, found["retrieval"].same_sign) == (3, 2, 2)
    assert found["aggregate"].estimates == [-0.1, 0.05, -0.2] and found["primary"].readings == ["r", "r", "r"]
    (spread,) = score_spread(metrics)
    assert (spread.task, spread.probe, spread.arm) == ("has_spa", "knn", mtl) and spread.values == [0.5, 1.0, 0.75]
    text = markdown(table, [spread], [0, 1, 2])
    assert "| 2 of 3 |" in text and "+5.0% (a)" in text and "| 0.500 | 1.000 | 0.750 | 0.500 |" in text
    assert "primary: `star_rating` linear, MTL embeddings - ImageNet transfer (accuracy)" in text
    assert "MTL embeddings - `same_property` alone, recall@10" in text


PIPELINE_LOG = """\
2026-12-07 10:00:00.000 Workflow starting (run-id 17):
2026-12-07 10:00:00.500 [17/start/1 (pid 11)] Task is starting.
2026-12-07 10:00:02.000 [17/start/1 (pid 11)] Task finished successfully.
2026-12-07 10:00:02.100 [17/preprocess/2 (pid 12)] Task is starting.
2026-12-07 10:00:02.200 [17/preprocess/3 (pid 13)] Task is starting.
2026-12-07 10:00:06.100 [17/preprocess/2 (pid 12)] some output
2026-12-07 10:00:07.100 [17/preprocess/2 (pid 12)] Task finished successfully.
2026-12-07 10:00:09.600 [17/preprocess/3 (pid 13)] Task finished successfully.
2026-12-07 10:00:10.000 [17/end/4 (pid 14)] Task is starting.
"""


def test_pipeline_bench_reads_each_steps_span_from_metaflows_log():
    """A step's time runs from its first task's start to its last task's end; an unfinished task counts not."""
    from gallery.bench.pipeline import step_times

    run_id, times = step_times(PIPELINE_LOG)
    assert run_id == "17" and times == {"start": (pytest.approx(1.5), 1), "preprocess": (pytest.approx(7.5), 2)}


def test_pipeline_bench_table_puts_each_size_beside_the_first_against_linear():
    from gallery.bench.pipeline import OUTPUTS, SizeRun, StepCost, table

    small = SizeRun(1000, "1", 100.0, [StepCost("train", 40.0, 500 * 2**20, 1), StepCost("evaluate", 50.0, 800 * 2**20, 5)],
                    {name: 2**20 for name in OUTPUTS})
    big = SizeRun(10000, "2", 900.0, [StepCost("train", 400.0, 600 * 2**20, 1), StepCost("evaluate", 450.0, 1200 * 2**20, 5)],
                  {name: 10 * 2**20 for name in OUTPUTS} | {"metrics.json": 2**20})
    text = table([small, big])
    assert "| step | 1,000 | 10,000 | 10,000 / 1,000 (linear: 10x) |" in text
    assert "| train | 40.0 | 400.0 | 10.00x |" in text and "| evaluate | 50.0 | 450.0 | 9.00x |" in text
    assert "| whole run | 100 | 900 | 9.00x |" in text
    assert "| evaluate | 800 | 1,200 | 1.50x |" in text and "| largest step | 800 | 1,200 | 1.50x |" in text
    assert "| metrics.json | 1.00 | 1.00 | 1.00x |" in text and "| checkpoints | 1.00 | 10.00 | 10.00x |" in text


@pytest.mark.flow
def test_pipeline_bench_runs_the_flow_and_measures_each_step(tmp_path):
    """A tiny catalogue (the smoke preset on 60 galleries without metric tasks, one shard, one epoch, the
    costly yardsticks off): every step of the flow is timed and its memory sampled, and the outputs are
    measured where they lie (two sizes side by side: the table's test above)."""
    import json

    import pandas as pd

    from gallery.bench.pipeline import STEPS, bench_pipeline, preset_document

    preset = preset_document("smoke")
    preset["data"].update(shards=1)
    preset["data"]["synth"].update(metric_tasks=False, valid_share=0.2, test_share=0.2)
    preset["evaluation"].update(task_optimal=False, end_to_end=False)
    (tmp_path / "tiny.json").write_text(json.dumps(preset))
    (run,) = bench_pipeline((1,), preset=str(tmp_path / "tiny.json"), image_size=16, epochs=1,
                            base_galleries=60, out=str(tmp_path / "bench"), log=lambda _: None)
    assert [s.step for s in run.steps] == list(STEPS) and run.step("preprocess").tasks == 1
    assert run.step("evaluate").tasks == 2  # the transfer suite and the explorer: no task-optimal group
    assert 100 * 2**20 < run.step("train").peak_rss < 8 * 2**30  # a process that imported torch, and its children
    store = tmp_path / "bench" / "x1" / "store" / run.run_id
    embeddings = pd.read_parquet(store / "embeddings.parquet")
    assert len(embeddings) == run.galleries and run.outputs["embeddings"] == (store / "embeddings.parquet").stat().st_size
    metrics = tmp_path / "bench" / "x1" / "reports" / run.run_id / "metrics.json"
    assert run.outputs["metrics.json"] == metrics.stat().st_size
    assert run.galleries == 60
    text = (tmp_path / "bench" / "pipeline.md").read_text()
    assert "| step | 60 |\n| --- | --- |\n| start | " in text and "| largest step |" in text
    assert json.loads((tmp_path / "bench" / "pipeline.json").read_text())[0]["galleries"] == 60
