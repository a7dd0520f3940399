"""The flows on an S3 datastore, against an S3-compatible server on 127.0.0.1 (moto): the run-scoped
store and the reports in the bucket, reached with Metaflow's S3 settings only (METAFLOW_S3_ENDPOINT_URL).

One smoke run serves the tests here, and is made to meet two failures on the way: a synthetic
catalogue half-uploaded by a start step that died, and a training killed on its first attempt, which
Metaflow's @retry must continue from that attempt's checkpoint."""
import io
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import pytest
from conftest import EMBED_FLOW, FLOW, METAFLOW_ROOT, S3_ENV, SMOKE, run_flow
from metaflow import Runner, Task

import gallery.data.synth.stored as stored
import gallery.storage as storage
from gallery.cli import main
from gallery.config import load_settings
from gallery.retrieval.embeddings import read_embeddings
from gallery.runs import use_metaflow_s3_settings

pytestmark = pytest.mark.flow  # whole-flow runs on an S3 datastore


def crash_while_uploading_the_catalogue(store_root: str, config: str) -> None:
    """What a start step killed half-way through uploading the smoke catalogue leaves: its manifest
    and task spec, and none of its images."""
    def upload_manifest_then_die(local_dir, location):
        for name in ("manifest.parquet", "tasks.yaml"):
            storage.write_bytes(storage.join(location, name), Path(local_dir, name).read_bytes())
        raise KeyboardInterrupt("killed while uploading")

    with pytest.MonkeyPatch.context() as m:
        m.setattr(storage, "upload_dir", upload_manifest_then_die)
        with pytest.raises(KeyboardInterrupt):
            stored.synthetic_source(store_root, load_settings(config), log=lambda _: None)


@pytest.fixture(scope="module")
def s3_config(tmp_path_factory) -> str:
    """The smoke preset on 80 galleries without the task-optimal models, the end-to-end arm and the comparison
    models for retrieval (the metric tasks and their co-view file, read from the bucket, stay): every request
    goes through moto's server, so fewer images and models keep the S3 run near the local smoke run's time."""
    settings = json.loads(Path(SMOKE).read_text())
    settings["data"]["synth"]["galleries"] = 80
    settings["evaluation"].update(task_optimal=False, end_to_end=False, retrieval_arms=False)
    config = tmp_path_factory.mktemp("config") / "smoke_s3.json"
    config.write_text(json.dumps(settings))
    return str(config)


@pytest.fixture(scope="module")
def s3_run(s3_bucket, s3_config):
    """That preset with `--datastore s3`; every training process SIGKILLs itself after epoch 1's
    checkpoint in its first attempt (gallery.faults), unless its control task's failure ended it first."""
    use_metaflow_s3_settings()  # this process reads the bucket too
    crash_while_uploading_the_catalogue(f"{s3_bucket}/metaflow/gallery", s3_config)  # where the run's store will be
    started = time.perf_counter()
    status, run, stderr = run_flow(env={**S3_ENV, "GALLERY_KILL_AT": "train.epoch:1", "GALLERY_KILL_FIRST_ATTEMPT": "1"}, config=s3_config, datastore="s3",
                                   reports=f"{s3_bucket}/reports")
    assert status == "successful", stderr[-3000:]
    print(f"smoke run on S3, one training retried: {time.perf_counter() - started:.0f}s")
    return run


def test_a_run_checks_at_start_that_it_can_write_under_an_s3_prefix(s3_bucket):
    """gallery.preflight's probe: an object written and deleted under the prefix; a bucket that does not exist
    is named with the option that moves the store."""
    from gallery.preflight import write_problem

    use_metaflow_s3_settings()
    assert write_problem(f"{s3_bucket}/probed", "the store", "--store") is None
    fs, path = storage.filesystem(f"{s3_bucket}/probed")
    assert fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=True)) == []
    problem = write_problem("s3://no-such-bucket/store", "the store", "--store")
    assert problem.startswith("the store s3://no-such-bucket/store cannot be written (") and "give --store" in problem


def test_the_run_keeps_everything_in_the_bucket(s3_run, s3_bucket):
    end = s3_run["end"].task.data
    assert end.store_root == f"{s3_bucket}/metaflow/gallery"  # beside the S3 datastore, by default
    assert end.embeddings_location == f"{s3_bucket}/metaflow/gallery/{s3_run.id}/embeddings.parquet"
    table, meta = read_embeddings(end.embeddings_location)
    assert table.num_rows == end.exported_galleries == 80 and meta["run_id"] == s3_run.id
    for name in ("report.md", "metrics.json", "table2.csv"):
        assert storage.exists(f"{s3_bucket}/reports/{s3_run.id}/{name}"), name
    assert storage.exists(f"{s3_bucket}/metaflow/gallery/{s3_run.id}/checkpoints/pseudo_uniform/best.pt")
    assert storage.exists(f"{s3_bucket}/metaflow/{s3_run.parent.id}/data")  # Metaflow's own artifacts
    assert not (Path(METAFLOW_ROOT) / ".gallery" / s3_run.id).exists()


def test_a_half_uploaded_catalogue_is_generated_again(s3_run):
    assert "generating the synthetic catalogue" in s3_run["start"].task.stdout
    quality = s3_run["end"].task.data.quality
    assert quality.skipped == [] and quality.excluded == []  # every image there: none reused from the crash
    location = storage.parent(s3_run["start"].task.data.manifest_location)
    assert storage.exists(storage.join(location, stored.CATALOGUE_COMPLETE))


def test_a_killed_training_is_retried_from_its_attempts_checkpoint(s3_run):
    nodes = list(s3_run["train"].tasks())
    assert sorted(t.model.weighting for task in nodes for t in task.data.trained) == ["kendall", "pseudo_uniform"]
    for task in nodes:
        assert task.current_attempt == 1 and task.origin_pathspec is None  # retried by Metaflow, not resumed
        ((result, _),) = task.data.trained.values()
        # epoch 0 came from the killed attempt's checkpoint; the other node may have been ended by its control
        # task's failure (gallery.runs.end_with_the_control_task) before writing its own: it starts again
        control = "_node_" not in task.id
        assert result.resumed_at_epoch == 1 or (not control and result.resumed_at_epoch is None)
        assert [h.epoch for h in result.history] == [0, 1]
    first_attempts = "".join(Task(t.pathspec, attempt=0).stdout for t in nodes)  # workers log through node 0
    assert "GALLERY_KILL_AT: killing this process at train.epoch (arrival 1, rank 0)" in first_attempts


def test_resume_from_a_late_step(s3_run, s3_bucket):
    with Runner(FLOW, show_output=False, env=S3_ENV, cwd=METAFLOW_ROOT, datastore="s3").resume(
            origin_run_id=s3_run.id, step_to_rerun="end") as running:
        assert running.status == "successful", running.stderr[-3000:]
        resumed = running.run
    for name in ("start", "preprocess", "train", "export", "evaluate", "report"):
        assert resumed[name].task.origin_pathspec.startswith(f"GalleryTrainFlow/{s3_run.id}/"), name
    assert resumed["end"].task.origin_pathspec is None  # run again, from the artifacts cloned in the bucket
    assert resumed["end"].task.data.embeddings_location == s3_run["end"].task.data.embeddings_location
    assert resumed["end"].task.data.report_location == s3_run["end"].task.data.report_location


def test_embed_flow_and_search_on_s3(s3_run, s3_bucket, capsys):
    """A few galleries whose images are s3:// URIs, embedded by the S3 run's model on the S3 datastore,
    then searched with the `gallery` command (by a gallery, and by seed images in the bucket)."""
    start = s3_run["start"].task.data
    folder = storage.parent(start.manifest_location)
    manifest = pd.read_parquet(io.BytesIO(storage.read_bytes(start.manifest_location))).iloc[:12]
    manifest = manifest[["gallery_id", "images"]].assign(
        images=lambda d: d["images"].map(lambda imgs: [storage.join(folder, i) for i in imgs]))
    buffer = io.BytesIO()
    manifest.to_parquet(buffer)
    storage.write_bytes(f"{s3_bucket}/inputs/few.parquet", buffer.getvalue())

    status, run, stderr = run_flow(env=S3_ENV, flow=EMBED_FLOW, config=None, datastore="s3",
                                   manifest=f"{s3_bucket}/inputs/few.parquet", train_run=s3_run.id)
    assert status == "successful", stderr[-3000:]
    location = run["end"].task.data.embeddings_location
    assert location.startswith(f"{s3_bucket}/metaflow/gallery/{run.id}/")
    ours, _ = read_embeddings(location)
    theirs, _ = read_embeddings(s3_run["end"].task.data.embeddings_location)
    theirs = dict(zip(theirs["gallery_id"].to_pylist(), theirs["embedding"].to_pylist()))
    assert sorted(ours["gallery_id"].to_pylist()) == sorted(manifest["gallery_id"])
    for gallery_id, embedding in zip(ours["gallery_id"].to_pylist(), ours["embedding"].to_pylist()):
        assert np.abs(np.array(embedding) - np.array(theirs[gallery_id])).max() < 1e-4, gallery_id

    gallery_id, seeds = manifest["gallery_id"][3], manifest["images"][3]
    assert main(["search", "--embeddings", location, "--gallery-id", gallery_id, "-k", "3"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[1] == gallery_id
    assert main(["search", "--embeddings", location, "--images", *seeds, "-k", "3"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[1] == gallery_id
