"""A study in one smoke run: every loss weighting with two poolings, through metaflow.Runner in the temporary
datastore (a module of its own: pytest-xdist runs it beside the shared smoke run's modules, not after them)."""
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPORTS, SMOKE, run_flow

from gallery.model.weightings import WEIGHTINGS

pytestmark = pytest.mark.flow


def test_a_study_of_every_weighting_with_two_poolings_in_one_smoke_run(tmp_path):
    """Every registered weighting with the preset's pooling and PMA (a study: train.poolings; the other
    poolings are unit-tested in tests/test_poolings.py and tests/test_models.py), trained by two
    processes one model after another (the smoke preset on 80 galleries, one epoch, without the task-optimal
    models and the end-to-end arm, to keep it cheap): each moves its own state and has its row in the report
    and in the ranking against the paper's configuration; the paper's findings stay about the paper's two
    weightings; the report says what the run skipped."""
    settings = json.loads(Path(SMOKE).read_text())
    settings["train"].update(weightings=sorted(WEIGHTINGS), processes=2, max_epochs=1, poolings=["pma"])
    settings["data"]["synth"]["galleries"] = 80
    settings["evaluation"].update(holdout_epochs=1, retrieval_arms=False, task_optimal=False, end_to_end=False)
    config = tmp_path / "smoke_study.json"
    config.write_text(json.dumps(settings))
    status, run, stderr = run_flow(config=str(config))
    assert status == "successful", stderr[-3000:]
    end = run["end"].task.data
    weightings, poolings = sorted(WEIGHTINGS), ["mean", "pma"]
    names = sorted(w if p == "mean" else f"{w}+{p}" for w in weightings for p in poolings)
    assert len(list(run["train"].tasks())) == 2 and sorted(m.label() for m in end.training) == names
    assert sorted((m.weighting, m.pooling) for m in end.training) == sorted((w, p) for w in weightings for p in poolings)
    for name, result in end.training.items():
        assert len(result.history) == 1 and np.isfinite(result.best_criterion), name
        assert all(np.isfinite(list(h.train_task_losses.values())).all() for h in result.history), name
    state = {name: torch.load(Path(end.store_root) / run.id / "checkpoints" / name / "best.pt", weights_only=True)["weighting"]
             for name in weightings}
    shutil.rmtree(Path(end.store_root) / run.id)  # 14 models' checkpoints, ~1 GB: the disk back for the other tests
    assert (state["famo"]["logits"] != 0).any() and (state["imtl_g"]["weights"] != 0).any()
    assert state["rlw"]["_extra_state"][1] > 0  # steps drawn
    folder = Path(REPORTS) / run.id
    per_task = pd.read_csv(folder / "per_task.csv")
    report = (folder / "report.md").read_text()
    labelled = per_task["error_pseudo_uniform"].notna()  # tasks with test labels (80 galleries: not all)
    assert labelled.sum() > 20
    for name in weightings:
        assert (per_task[f"error_{name}"].notna() == labelled).all() and f"| {name} | 1 |" in report, name
    metrics = json.loads((folder / "metrics.json").read_text())
    assert "famo" not in json.dumps(metrics["comparisons"]["findings"])
    study = pd.read_csv(folder / "study.csv")
    assert sorted(zip(study["weighting"], study["pooling"])) == sorted(
        (w, p) for w in weightings for p in poolings if (w, p) != ("pseudo_uniform", "mean"))
    assert "## Study: weightings and poolings against the paper's configuration" in report
    assert {c["model"]["pooling"] for c in metrics["study"]["cells"]} == set(poolings)
    # switched off: no task-optimal branch ran, no end-to-end arm, and the report lists both
    assert len(list(run["evaluate"].tasks())) == 3  # the transfer suite, the explorer, retrieval: no task groups
    assert metrics["task_optimal"]["models"] == {} and not (folder / "task_optimal_scores.parquet").exists()
    assert "end_to_end" not in {a["kind"] for a in metrics["transfer"]["arms"]}
    assert "- the task-optimal models, and with them Figures 5 and 6 (`evaluation.task_optimal` is false)" in report
    assert "- the end-to-end arm of the held-out tasks (`evaluation.end_to_end` is false)" in report
    assert "retrieval's attribute-only and specialised models (`evaluation.retrieval_arms` is false)" in report
    assert len(metrics["not_measured"]) == 4 and per_task["error_task_optimal"].isna().all()
