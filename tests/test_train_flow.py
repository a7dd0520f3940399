"""GalleryTrainFlow end to end through metaflow.Runner, smoke preset, temporary datastore: the default path,
damaged images, a contract violation, and two data-parallel processes killed and resumed (every loss
weighting in one run: test_study_flow.py). What a unit test
can check (the statistics, the report's layout) is checked in test_comparisons.py and test_report.py."""
import base64
import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pandas as pd
import pytest
from conftest import FLOW, METAFLOW_ROOT, REPORTS, SMOKE, run_flow
from metaflow import Runner
from metaflow.cards import get_cards

from gallery.data.contracts import load_schema
from gallery.evaluation.statistics import CONSISTENT, NOISE, OPPOSITE
from gallery.retrieval.embeddings import code_matrix, embedding_matrix, embeddings_code, read_embeddings

pytestmark = pytest.mark.flow


def card_text(task) -> str:
    """The text of a task's card (Metaflow embeds it as base64 JSON in the HTML)."""
    html = get_cards(task)[0].get()
    payload = re.search(r'window\.__MF_DATA__\["[^"]+"\] = "([^"]+)"', html).group(1)
    return json.dumps(json.loads(base64.b64decode(payload)))


def test_smoke_run_exports_one_embedding_per_gallery(smoke_run):
    end = smoke_run["end"].task.data
    table, meta = read_embeddings(end.embeddings_location)
    frame = end.catalogue.frame
    assert table.num_rows == len(frame) == end.exported_galleries == 200
    assert sorted(table["gallery_id"].to_pylist()) == sorted(frame["gallery_id"])
    assert meta["dimension"] == "1280" and meta["backbone"] == "efficientnet_lite0" and meta["pooling"] == "mean"
    assert meta["weighting"] == "pseudo_uniform" and meta["run_id"] == smoke_run.id
    embeddings = np.stack(table["embedding"].to_numpy(zero_copy_only=False))
    assert embeddings.shape == (200, 1280) and np.isfinite(embeddings).all()
    bits = code_matrix(table)  # the preset's code (itq64: 8 bytes), fitted at export; more in test_codes.py
    assert bits.shape == (200, 8) and (embeddings_code(end.embeddings_location).encode(embeddings) == bits).all()
    assert set(table["split"].to_pylist()) == {"train", "valid", "test"}
    schema = load_schema("embeddings")
    for row in table.slice(0, 5).to_pylist():
        row["embedding_bits"] = base64.b64encode(row["embedding_bits"]).decode()
        jsonschema.validate(row, schema)
    required = {k[len("gallery."):] for k in schema["x-schema-metadata"]} - {"embed_run_id"}
    assert required <= set(meta)


def test_the_run_ships_its_model_and_a_fresh_process_embeds_as_the_export_did(smoke_run, tmp_path):
    """The store's model folder, loaded with no Metaflow import, embeds 50 of the catalogue's galleries from
    their photo files as the export did from the (float32) feature cache; onnxruntime agrees per photo."""
    end = smoke_run["end"].task.data
    table, _ = read_embeddings(end.embeddings_location)
    frame = end.catalogue.frame.set_index("gallery_id")
    ids = table["gallery_id"].to_pylist()[:50]
    photos = [list(frame.loc[g, "images"])[:4] for g in ids]  # smoke: at most 4 photos per gallery, all readable
    (tmp_path / "photos.json").write_text(json.dumps(photos))
    script = f"""
import json, sys, numpy as np, onnxruntime, torch, gallery
model = gallery.load_model({end.model_location!r})
assert "metaflow" not in sys.modules
galleries = json.load(open({str(tmp_path / 'photos.json')!r}))
np.save({str(tmp_path / 'vectors.npy')!r}, model.embed(galleries))
pixels = np.stack([model.photo(p, p) for p in galleries[0]])
features = onnxruntime.InferenceSession({end.model_location + '/model.onnx'!r}).run(None, {{"photos": pixels}})[0]
with torch.no_grad():
    print(float(np.abs(features - model.model.encoder.images(torch.from_numpy(pixels)).numpy()).max()))
"""
    done = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True)
    assert float(done.stdout.split()[-1]) <= 1e-4
    exported = embedding_matrix(table)[:50]
    np.testing.assert_allclose(np.load(tmp_path / "vectors.npy"), exported, atol=1e-5)


def test_export_model_ships_another_trained_model_and_names_those_there_are(smoke_run, tmp_path, capsys):
    from gallery.artifact.loaded import load_model
    from gallery.cli import main

    assert main(["export-model", "--run", smoke_run.id, "--weighting", "kendall", "--out", str(tmp_path / "k")]) == 0
    kendall = load_model(tmp_path / "k")
    assert (kendall.identity.weighting, kendall.config.run_id, kendall.code.name) == ("kendall", smoke_run.id, "sign")
    assert "No evaluation was attached" in (tmp_path / "k" / "MODEL_CARD.md").read_text()
    assert main(["export-model", "--run", smoke_run.id, "--seed", "7", "--out", str(tmp_path / "none")]) == 2
    assert re.search(r"trained no model with pseudo_uniform weighting, mean pooling and seed 7; it trained: "
                     r".*--weighting kendall --pooling mean --seed 0", capsys.readouterr().err)


def test_a_run_compared_with_itself_differs_in_nothing(smoke_run, tmp_path):
    from gallery.cli import main

    assert main(["compare", smoke_run.id, smoke_run.id, "--out", str(tmp_path)]) == 0
    c = json.loads((tmp_path / "compare.json").read_text())
    common = smoke_run["end"].task.data.exported_galleries
    assert c["common"] == common and c["verdict"] == "no clear difference"
    assert c["stability"]["mean_overlap"]["estimate"] == 1.0 and c["stability"]["histogram"][-1] == common
    rows = ([r["scores"] for r in c["transfer"] + c["retrieval"]] + [r["errors"] for r in c["task_errors"]]
            + [r["shares"] for r in c["agreement"]])
    assert c["transfer"] and c["task_errors"] and c["agreement"]
    assert all(r["difference"]["estimate"] == 0 for r in rows)
    assert c["transfer_error_change"]["estimate"] == 0
    assert "## Verdict: **no clear difference**" in (tmp_path / "compare.md").read_text()


def test_smoke_run_trains_both_weightings_and_writes_a_card(smoke_run):
    end = smoke_run["end"].task.data
    assert {m.weighting for m in end.training} == {"pseudo_uniform", "kendall"} and end.reference in end.training
    for result in end.training.values():
        assert len(result.history) >= 1 and np.isfinite(result.best_criterion)
        assert result.test.split == "test" and len(result.test.gallery_ids) == (end.catalogue.frame["split"] == "test").sum()
    text = card_text(smoke_run["report"].task)
    for section in ("no damaged images", "## Training", "pseudo_uniform", "kendall", "(Table 2)", "(Figure 5)",
                    "(Figure 6)", "## Outputs", end.embeddings_location, '"type": "image"'):
        assert section in text, section


def test_smoke_run_keeps_task_optimal_results_not_checkpoints(smoke_run):
    end = smoke_run["end"].task.data
    folder = Path(end.store_root) / smoke_run.id / "task_optimal"
    assert sorted(p.name for p in folder.iterdir()) == sorted(t.name for t in end.catalogue.tasks)
    assert {p.name for p in folder.rglob("*") if p.is_file()} == {"result.json"}
    assert (Path(end.store_root) / smoke_run.id / "checkpoints" / "pseudo_uniform" / "best.pt").exists()


def test_smoke_run_report(smoke_run):
    """Files present and valid; Table 2 is 3 arms x 6 rows + baseline on the test split; every task x both
    weightings; metrics.json agrees with the CSVs and states, per block, the split it was measured on and
    the one that selected it. (The readings and the layout are unit-tested in test_report.py.)"""
    from PIL import Image

    folder = Path(REPORTS) / smoke_run.id
    names = {"report.md", "metrics.json", "table2.csv", "table2_comparisons.csv", "per_task.csv", "class_balance.csv",
             "training_curves.png", "relative_error.png", "class_balance.png", "projection.png", "retrieval.png"}
    assert names <= {p.name for p in folder.iterdir()}
    for png in folder.glob("*.png"):
        with Image.open(png) as img:
            img.verify()
        assert png.stat().st_size > 5000 and Image.open(png).size[0] > 300
    metrics = json.loads((folder / "metrics.json").read_text())
    report = (folder / "report.md").read_text()
    frame = smoke_run["end"].task.data.catalogue.frame
    test_ids = set(frame.query("split == 'test'")["gallery_id"])
    unseen = set(frame.query("split != 'train'")["gallery_id"])  # no model trained on them

    table2 = pd.read_csv(folder / "table2.csv").query("holdout_task == 'star_rating'")
    arms = table2[table2["row"] != "baseline"]
    assert sorted(arms["arm"].unique()) == ["End-to-end model", "ImageNet transfer", "MTL embeddings",
                                            "MTL embeddings (kendall)"]   # the arms' labels
    assert set(table2["split"]) == {"valid+test"}
    assert (arms.groupby("arm").size() == 6).all() and (table2["row"] == "baseline").sum() == 1
    mtl_rows = arms[arms["arm"] == "MTL embeddings"]
    assert list(mtl_rows["row"]) == [f"{p}% of one epoch" for p in (20, 40, 60, 80, 100)] + ["2 epochs"]
    holdout = next(h for h in metrics["holdout"]["tasks"] if h["task"] == "star_rating")
    head_scores = pd.read_parquet(folder / metrics["holdout"]["per_gallery"])  # per-gallery data: beside metrics.json
    assert holdout["split"] == "valid+test" and set(head_scores.query("task == 'star_rating'")["gallery_id"]) <= unseen
    transfer = pd.read_csv(folder / "transfer.csv")
    entries = transfer[transfer["row"] == "entry"]
    assert set(entries["task"]) == {"star_rating", "has_spa", "decor_style", "building_age_years"}
    assert set(entries["probe"]) == {"head", "linear", "knn"} and "## Transfer scorecard" in report
    transfer_scores = pd.read_parquet(folder / metrics["transfer"]["per_gallery"])
    assert set(transfer_scores["gallery_id"]) <= unseen
    assert len(transfer_scores) == sum(s["galleries"] for s in metrics["transfer"]["scores"])
    (mtl,) = [a for a in holdout["arms"] if a["arm"]["kind"] == "mtl" and a["arm"]["reference"]]  # fields, not names
    assert mtl["arm"]["model"] == {"weighting": "pseudo_uniform", "pooling": "mean", "seed": 0, "backbone": "efficientnet_lite0"}
    assert [r["value"] for r in mtl["rows"]] == pytest.approx(list(mtl_rows["value"]))
    assert metrics["reference_model"] == mtl["arm"]["model"] and metrics["primary_task"] == "star_rating"
    assert "| majority class baseline |" in report and "paper (MTL / ImageNet / end-to-end)" in report

    per_task = pd.read_csv(folder / "per_task.csv")
    assert len(per_task) == 31 and per_task["task"].is_unique
    for w in ("pseudo_uniform", "kendall"):
        assert per_task[f"error_{w}"].notna().all() and len(per_task[f"relative_error_increase_{w}"].dropna()) > 20
    assert metrics["per_task"]["measured_on"] == "test" and metrics["per_task"]["selected_on"] == "valid"
    assert [next(m["error"] for m in r["models"] if m["model"]["weighting"] == "kendall")
            for r in metrics["per_task"]["rows"]] == pytest.approx(per_task["error_kendall"].tolist())
    optimal_scores = pd.read_parquet(folder / metrics["task_optimal"]["per_gallery"])
    assert set(optimal_scores["gallery_id"]) <= test_ids and set(optimal_scores["task"]) == set(per_task["task"])
    for name, model in metrics["task_optimal"]["models"].items():
        assert model["test_labelled"] == (optimal_scores["task"] == name).sum() and model["selected_on"] == "valid", name
    balance = pd.read_csv(folder / "class_balance.csv").set_index("weighting")
    for b in metrics["comparisons"]["class_balance"]["models"]:
        assert b["pearson"]["estimate"] == pytest.approx(balance.loc[b["model"]["weighting"], "pearson_estimate"],
                                                         nan_ok=True)
    wins = metrics["comparisons"]["pseudo_uniform_wins"]["wins"]
    assert wins["wins"] == int((per_task["error_pseudo_uniform"] < per_task["error_kendall"]).sum())
    assert metrics["binary_vs_float"]["measured_on"] == "test (queries)"
    for block in ("mtl_vs_task_optimal", "mtl_vs_baseline", "class_balance", "findings"):
        assert metrics["comparisons"][block]["measured_on"] == "test", block
    assert "`valid` selects each model's best epoch" in report


def test_smoke_run_report_reads_every_comparison_from_its_test(smoke_run):
    """Table 2's differences are paired on the same galleries (recomputed here from the arms' per-gallery
    scores), each has its interval and a reading, and every paper finding is sorted by its reading."""
    folder = Path(REPORTS) / smoke_run.id
    metrics = json.loads((folder / "metrics.json").read_text())
    report = (folder / "report.md").read_text()
    holdout = next(h for h in metrics["holdout"]["tasks"] if h["task"] == "star_rating")
    scores = pd.read_parquet(folder / metrics["holdout"]["per_gallery"]).query("task == 'star_rating'")
    last = holdout["arms"][0]["rows"][-1]["label"]
    mtl, imagenet = (scores.query(f"arm_kind == '{kind}' and arm_reference == {reference} and row == '{last}'")
                     .sort_values("gallery_id")["score"].to_numpy() for kind, reference in (("mtl", True), ("imagenet", False)))
    assert len(mtl) == len(imagenet) == holdout["scored_galleries"]
    versus = metrics["comparisons"]["table2"][holdout["task"]]["rows"][-1]["versus"]
    assert [v["arm"]["kind"] for v in versus] == ["imagenet", "end_to_end"]
    final = versus[0]["effect"]
    assert final["estimate"] == pytest.approx(mtl.mean() - imagenet.mean())
    assert final["low"] <= final["estimate"] <= final["high"]
    side = 1 if final["low"] > 0 else -1 if final["high"] < 0 else 0
    reading = {1: CONSISTENT, -1: OPPOSITE, 0: NOISE}[side if final["p"] < 0.05 else 0]  # McNemar must agree
    assert final["reading"] == reading and "MTL - ImageNet transfer = " in report
    compared = pd.read_csv(folder / "table2_comparisons.csv")
    assert len(compared) == 2 * 6 and set(compared["reading"]) <= {CONSISTENT, NOISE, OPPOSITE}
    found = metrics["comparisons"]["findings"]["findings"]
    assert len(found) >= 2 + 2 + 1 + 2 + 2 and "## What this run reproduces" in report
    from gallery.evaluation import comparisons

    claims = {getattr(comparisons, name) for name in ("TRANSFER_BEATS", "TABLE2_BEATS", "WORSE_THAN_OPTIMAL",
                                                      "NAMED_TASK_BETTER", "PU_BEATS_KENDALL", "BEATS_MAJORITY",
                                                      "HELPS_IMBALANCED")}
    for f in found:  # data: an identifier, its fields and effect; the words are the report's
        assert f["reading"] in (CONSISTENT, NOISE, OPPOSITE) and f["claim"] in claims and "estimate" in f["effect"]
    listed = report.split("## What this run reproduces")[1].split("\n## ")[0]
    assert listed.count("\n- ") == len(found)  # each finding put into words once


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """The smoke preset's Kendall model (the weighting with state of its own) trained by 2 data-parallel
    processes (gloo), killed after epoch 1's checkpoint (GALLERY_KILL_AT SIGKILLs every training process in
    every attempt), then resumed."""
    config = tmp_path_factory.mktemp("config") / "smoke_2_workers.json"
    settings = json.loads(Path(SMOKE).read_text())
    settings["train"].update(workers=2, weightings=["kendall"], reference_weighting="kendall")
    settings["evaluation"].update(task_optimal=False, end_to_end=False, retrieval_arms=False)  # the smoke run has them
    settings["resources"] = {"retries": 0}  # no automatic retry: the run fails, and `resume` recovers it
    config.write_text(json.dumps(settings))
    status, killed, _ = run_flow(env={"GALLERY_KILL_AT": "train.epoch:1"}, config=str(config))
    assert status == "failed"
    with Runner(FLOW, show_output=False, cwd=METAFLOW_ROOT).resume(origin_run_id=killed.id) as running:  # its config
        assert running.status == "successful", running.stderr[-3000:]
        return killed, running.run


def test_killed_two_process_training_resumes_from_its_checkpoint(two_process_run):
    killed, resumed = two_process_run
    assert all(not t.successful for t in killed["train"].tasks())
    for name in ("start", "ingest", "preprocess", "data_quality"):
        assert resumed[name].task.origin_pathspec.startswith(f"GalleryTrainFlow/{killed.id}/"), name
    nodes = list(resumed["train"].tasks())
    assert len(nodes) == 2 and sorted((t.model.weighting, task.data.rank) for task in nodes for t in task.data.trained) == [
        ("kendall", 0), ("kendall", 1)]
    for task in nodes:
        assert task.origin_pathspec is None  # re-executed, not cloned
        ((result, _),) = task.data.trained.values()
        assert result.resumed_at_epoch == 1  # epoch 1 came from the killed run's checkpoint
        assert [h.epoch for h in result.history] == [0, 1]
    assert resumed["end"].task.data.exported_galleries == 200


def test_two_processes_train_one_model(two_process_run, smoke_run):
    """Both ranks end with identical weights, and task by task the validation loss stays close to the
    one-process run's (the median ratio within 20%). Not closer: the smoke model's top normalises each
    rank's half batch with its own BatchNorm statistics (gloo on CPU has no SyncBatchNorm), and 11 valid
    galleries make each loss noisy; the median, because a mean of raw losses is one regression's (the
    daily rate's, in squared euros). Without BatchNorm two ranks equal one process to 1e-5
    (tests/test_distributed.py)."""
    _, resumed = two_process_run
    digests = {result.weights_digest for task in resumed["train"].tasks() for result, _ in task.data.trained.values()}
    assert len(digests) == 1
    two, one = (next(r for m, r in run["end"].task.data.training.items() if m.weighting == "kendall").history
                for run in (resumed, smoke_run))
    assert len(two) == len(one)
    for a, b in zip(two, one):
        ratios = [a.valid_task_losses[t] / b.valid_task_losses[t] for t in a.valid_task_losses
                  if np.isfinite(a.valid_task_losses[t])]
        assert len(ratios) > 20 and np.median(ratios) == pytest.approx(1, abs=0.2), a.epoch
