import os
import shutil
import tempfile
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

# metaflow.Runner type-checks its arguments with a vendored typeguard whose vendored typing_extensions
# patches `typing` for TypeVar defaults; torch modules that define generic classes after that (torch.fx's
# symbolic shapes, loaded lazily by torch.testing.assert_close) then fail to import. Load them first.
import torch.distributed.tensor  # noqa: E402,F401


def pytest_sessionfinish(session, exitstatus):
    """The temporary datastore holds every test run's shards, caches and checkpoints: give the disk back."""
    shutil.rmtree(METAFLOW_ROOT, ignore_errors=True)


REPO = Path(__file__).resolve().parents[1]
FLOW = str(REPO / "flows" / "train_flow.py")
SMOKE = str(REPO / "flows" / "configs" / "smoke.json")
REPORTS = os.path.join(METAFLOW_ROOT, "reports")


def run_flow(env=None, flow=FLOW, config=SMOKE, **params):
    """Run a flow through metaflow.Runner in the temporary datastore: (status, run, runtime stderr)."""
    from metaflow import Runner

    if flow == FLOW:
        params.setdefault("reports", REPORTS)
    runner = Runner(flow, show_output=False, env=env or {}, cwd=METAFLOW_ROOT,
                    **({"config": [("settings", config)]} if config else {}))
    with runner.run(**params) as running:
        return running.status, running.run, running.stderr


@pytest.fixture(scope="session")
def smoke_run():
    """One smoke-preset training run (synthetic catalogue), shared by the tests that only read it."""
    status, run, stderr = run_flow()
    assert status == "successful", stderr[-3000:]
    return run


@pytest.fixture(scope="session")
def small_catalogue(tmp_path_factory) -> Path:
    """A 120-gallery synthetic catalogue at 32 px, shared by the tests that only read it."""
    from gallery.data.synth import SynthSettings, generate

    out = tmp_path_factory.mktemp("catalogue")
    generate(out, SynthSettings(galleries=120, seed=3, image_size=32, min_images=3, max_images=6), workers=1)
    return out
