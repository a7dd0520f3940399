"""The train flow compiles for a production scheduler: Argo Workflows' template, from
`argo-workflows create --only-json` (which deploys nothing; it only uploads the code package, here to
the test S3 server), carries each heavy step's GPU, CPU, memory, disk, shared memory and retries from the preset."""
import json
import os
import re
import subprocess
import sys

import pytest
import yaml
from conftest import FLOW, METAFLOW_ROOT, REPO, S3_ENV

from gallery.config import load_settings

pytestmark = pytest.mark.flow  # compiles the flow for Argo Workflows in a subprocess

PAPER = str(REPO / "flows" / "configs" / "paper.json")
STEPS = {"preprocess": "preprocess", "train": "train", "export": "export", "evaluate": "evaluate"}  # Argo template
# name -> the preset's resources it carries


def pods_of(template: dict) -> list[tuple[dict, str | None]]:
    """(resources, size of /dev/shm) of each pod a template starts: its container's, or for a @parallel
    step the control and worker jobs of its JobSet (YAML text, with Argo's {{...}} placeholders in it)."""
    if "container" in template:
        pods = [{"containers": [template["container"]], "volumes": template["volumes"]}]
    else:
        manifest = yaml.safe_load(re.sub(r"\{\{.*?\}\}", "argo", template["resource"]["manifest"], flags=re.S))
        pods = [job["template"]["spec"]["template"]["spec"] for job in manifest["spec"]["replicatedJobs"]]
    found = []
    for pod in pods:
        container, volumes = pod["containers"][0], {v["name"]: v for v in pod["volumes"]}
        shm = [volumes[m["name"]]["emptyDir"]["sizeLimit"] for m in container.get("volumeMounts") or []
               if m["mountPath"] == "/dev/shm"]
        found.append((container["resources"], shm[0] if shm else None))
    return found


@pytest.fixture(scope="module")
def argo_template(s3_bucket):
    pytest.importorskip("kubernetes", reason="Metaflow compiles for Argo Workflows only with the kubernetes "
                                             "package: pip install -e '.[dev]'")
    env = {**os.environ, **S3_ENV, "METAFLOW_KUBERNETES_NAMESPACE": "gallery"}
    out = subprocess.run([sys.executable, FLOW, "--datastore", "s3", "--config", "settings", PAPER, "argo-workflows",
                          "create", "--only-json"], cwd=METAFLOW_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return {t["name"]: t for t in json.loads(out.stdout)["spec"]["templates"]}


def test_heavy_steps_carry_the_presets_resources_and_retries(argo_template):
    resources = load_settings(PAPER).resources
    for name, step in STEPS.items():
        want = getattr(resources, step)
        pods = pods_of(argo_template[name])
        assert len(pods) == (2 if step == "train" else 1), name  # train: a JobSet's control and workers
        for r, shm in pods:
            assert (float(r["requests"]["cpu"]), r["requests"]["memory"]) == (want.cpu, f"{float(want.memory)}M"), name
            assert r["limits"].get("nvidia.com/gpu") == (str(want.gpu) if want.gpu else None), name
            if want.disk:
                assert r["requests"]["ephemeral-storage"] == f"{float(want.disk)}M", name
            assert shm == (f"{want.shared_memory}Mi" if want.shared_memory else None), name
        assert argo_template[name]["retryStrategy"]["limit"] == resources.retries, name


def test_light_steps_are_not_retried(argo_template):
    assert "retryStrategy" not in argo_template["ingest"] and "retryStrategy" not in argo_template["report"]
