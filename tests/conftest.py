import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

# Metaflow refuses to run without a user name (CI has none), and its local datastore (and our
# run-scoped store beside it) must not land in the checkout. Set before metaflow is imported.
# Flows under test run with this folder as their working directory too: Metaflow's card writer
# finds its root from the working directory, its card reader from the datastore root.
os.environ.setdefault("USERNAME", "tests")
METAFLOW_ROOT = tempfile.mkdtemp(prefix="gallery-tests-metaflow-")
os.makedirs(os.path.join(METAFLOW_ROOT, ".metaflow"))
os.environ["METAFLOW_DATASTORE_SYSROOT_LOCAL"] = METAFLOW_ROOT

# Under pytest-xdist two workers share the cores, each with flows whose tasks take a thread per core:
# OpenMP threads that spin while they wait made two such processes on 2 cores train 80x slower
# (gallery.training.device.share_cores). Waiting threads sleep instead (read by the OpenMP runtime when
# torch loads, here and in every process the tests start).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# metaflow.Runner type-checks its arguments with a vendored typeguard whose vendored typing_extensions
# patches `typing` for TypeVar defaults; torch modules that define generic classes after that (torch.fx's
# symbolic shapes, loaded lazily by torch.testing.assert_close; torch._dynamo, by the first optimizer)
# then fail to import. Load them first.
import torch._dynamo  # noqa: E402,F401 - imported by the first optimizer
import torch.distributed.tensor  # noqa: E402,F401


# Modules that read one session-scoped run: pytest-xdist sends them to one worker, so the run is made once.
SHARED_RUNS = {"smoke_run": ("test_codes", "test_embed_flow", "test_explorer", "test_train_flow"),
               "s3_bucket": ("test_deploy", "test_hostile_inputs", "test_s3")}
GROUP_OF = {module: run for run, modules in SHARED_RUNS.items() for module in modules}


def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist's units of work: a module (its module-scoped runs are made once), or all the modules of
    one shared run. (Its own `--dist loadgroup` marks are lost on pytest 9, which ignores the node id it
    rewrites.)"""
    from xdist.scheduler import LoadScopeScheduling

    class SharedRunScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = Path(nodeid.split("::")[0]).stem
            return GROUP_OF.get(module, module)

    return SharedRunScheduling(config, log)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The S3-compatible server of the S3 tests (moto's, on 127.0.0.1, started on first use). Metaflow reads
# its S3 settings once, at import, so they are fixed here: only the endpoint is Metaflow's, as a user
# would set it; the credentials are the standard AWS ones that boto3 and pyarrow both read.
S3_ENDPOINT = f"http://127.0.0.1:{free_port()}"
S3_BUCKET = "gallery-tests"
os.environ.update({"METAFLOW_S3_ENDPOINT_URL": S3_ENDPOINT, "AWS_ACCESS_KEY_ID": "testing",
                   "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"})
S3_ENV = {"METAFLOW_DATASTORE_SYSROOT_S3": f"s3://{S3_BUCKET}/metaflow"}  # with `--datastore s3`


def pytest_sessionfinish(session, exitstatus):
    """The temporary datastore holds every test run's shards, caches and checkpoints: give the disk back."""
    shutil.rmtree(METAFLOW_ROOT, ignore_errors=True)


REPO = Path(__file__).resolve().parents[1]
FLOW = str(REPO / "flows" / "train_flow.py")
EMBED_FLOW = str(REPO / "flows" / "embed_flow.py")
SMOKE = str(REPO / "flows" / "configs" / "smoke.json")
REPORTS = os.path.join(METAFLOW_ROOT, "reports")


def run_flow(env=None, flow=FLOW, config=SMOKE, datastore=None, **params):
    """Run a flow through metaflow.Runner in the temporary datastore (or `--datastore s3`):
    (status, run, runtime stderr)."""
    from metaflow import Runner

    if flow == FLOW:
        params.setdefault("reports", REPORTS)
    options = {"config": [("settings", config)]} if config else {}
    if datastore:
        options["datastore"] = datastore
    runner = Runner(flow, show_output=False, env=env or {}, cwd=METAFLOW_ROOT, **options)
    with runner.run(**params) as running:
        return running.status, running.run, running.stderr


@pytest.fixture(scope="session")
def smoke_run():
    """One smoke-preset training run (synthetic catalogue), shared by the tests that only read it."""
    status, run, stderr = run_flow()
    assert status == "successful", stderr[-3000:]
    return run


@pytest.fixture(scope="session")
def s3_bucket():
    """An S3-compatible server on 127.0.0.1 (moto's standalone server) with one empty bucket: its s3:// URI."""
    boto3 = pytest.importorskip("boto3")
    pytest.importorskip("moto.server", reason="the S3 tests need moto's server: pip install -e '.[dev]'")
    port = S3_ENDPOINT.rsplit(":", 1)[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", port],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = boto3.client("s3", endpoint_url=S3_ENDPOINT)
        for _ in range(100):
            try:
                client.create_bucket(Bucket=S3_BUCKET)
                break
            except Exception:  # noqa: BLE001 - not listening yet
                time.sleep(0.1)
        else:
            raise RuntimeError(f"moto's S3 server did not start on {S3_ENDPOINT}")
        yield f"s3://{S3_BUCKET}"
    finally:
        server.terminate()
        server.wait()


@pytest.fixture(scope="session")
def small_catalogue(tmp_path_factory) -> Path:
    """A 120-gallery synthetic catalogue at 32 px, shared by the tests that only read it."""
    from gallery.data.synth import SynthSettings, generate

    out = tmp_path_factory.mktemp("catalogue")
    generate(out, SynthSettings(galleries=120, seed=3, image_size=32, min_images=3, max_images=6), workers=1)
    return out


EVIL_ID = '<img src=x onerror="window.__xss=1">"</script><script>window.__xss=2</script>'


@pytest.fixture(scope="session")
def served_run(tmp_path_factory):
    """A training run in miniature, without a flow: 40 synthetic galleries at 32 px (one with HTML in its
    id), a lite0 model with random weights saved as a checkpoint, its embeddings and itq16 code, as a
    gallery.runs.TrainedRun. What the `gallery serve` tests serve."""
    from dataclasses import replace

    import numpy as np
    import pandas as pd
    import torch

    import gallery.storage as storage
    from gallery.config import ModelSettings, RetrievalSettings, Settings
    from gallery.data.images import load_galleries
    from gallery.data.ingest import ingest
    from gallery.data.synth import SynthSettings, generate
    from gallery.model.gallery_model import build_model
    from gallery.model.identity import ModelIdentity
    from gallery.retrieval.codes import code_location, fit_code, save_code
    from gallery.retrieval.embeddings import embed_images, embeddings_table, write_embeddings
    from gallery.runs import TrainedRun
    from gallery.training.checkpoints import save_config
    from gallery.training.model_config import model_config

    out = tmp_path_factory.mktemp("served-run")
    manifest = generate(out / "catalogue", SynthSettings(galleries=40, seed=7, image_size=32, min_images=2, max_images=4),
                        workers=1)
    frame = pd.read_parquet(manifest)
    frame.loc[0, "gallery_id"] = EVIL_ID
    frame["split"] = ["valid" if i % 8 == 3 else "test" if i % 8 == 5 else "train" for i in range(len(frame))]
    frame.to_parquet(manifest)
    catalogue = ingest(manifest, out / "catalogue" / "tasks.yaml")
    settings = replace(Settings(), model=ModelSettings(weights="random", image_size=32, hidden=16),
                       retrieval=RetrievalSettings(code="itq16", rerank=20))
    torch.manual_seed(0)
    model = build_model(settings.model, catalogue.tasks, catalogue.stats).eval()
    storage.save_torch(str(out / "checkpoints" / "best.pt"), {"model": model.state_dict()})
    save_config(str(out / "checkpoints"), model_config(ModelIdentity("pseudo_uniform", "mean", 0, "efficientnet_lite0"),
                                                       settings, catalogue.tasks, catalogue.stats, model.encoder,
                                                       "fixture"))
    ids, galleries, _ = load_galleries(catalogue.frame["gallery_id"], catalogue.frame["images"], 32)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small inputs: on shared cores, two spinning threads made this 10x slower
    try:
        vectors = np.stack([embed_images(model.encoder, list(g)) for g in galleries])  # as the service embeds uploads
    finally:
        torch.set_num_threads(threads)
    splits = catalogue.frame.set_index("gallery_id").loc[ids, "split"]
    location = str(out / "run" / "embeddings.parquet")
    code = save_code(fit_code(vectors[(splits == "train").to_numpy()], "itq16"), code_location(location))
    write_embeddings(location, embeddings_table(ids, splits, vectors, {"run_id": "fixture"}, code))
    return TrainedRun("fixture", settings, str(out / "checkpoints"), location,
                      str(manifest), str(out / "catalogue" / "tasks.yaml"))
