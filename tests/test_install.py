"""A plain, non-editable `pip install .` (how a step image is built) carries the schemas, presets and
examples with the package: installed offline (no index, no dependency fetched: they come from this
environment) into a temporary target from a copy of the project, which is then deleted, the `gallery`
command works from another directory."""
import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.flow  # installs the package into a temporary folder


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(the `gallery` command of the installed copy, its environment, a working folder outside both trees)."""
    root = tmp_path_factory.mktemp("install")
    source, target, work = root / "source", root / "site", root / "elsewhere"
    for name in ("gallery", "data_contracts", "flows"):
        shutil.copytree(REPO / name, source / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                          "--no-build-isolation", "--target", str(target), str(source)], capture_output=True, text=True)
    assert pip.returncode == 0, pip.stderr[-3000:]
    shutil.rmtree(source)  # nothing may be read from the project's tree any more
    work.mkdir()
    return [str(target / "bin" / "gallery")], {**os.environ, "PYTHONPATH": str(target)}, work


def gallery(installed, *args):
    command, env, work = installed
    return subprocess.run(command + list(args), cwd=work, env=env, capture_output=True, text=True, timeout=300)


def test_the_installed_package_is_the_one_that_runs(installed):
    _, env, work = installed
    out = subprocess.run([sys.executable, "-c", "import gallery.config as c, gallery.data.contracts as d; "
                          "print(c.__file__, c.PRESETS_DIR, d.CONTRACTS_DIR, sep='\\n')"],
                         cwd=work, env=env, capture_output=True, text=True)
    site = env["PYTHONPATH"]
    assert out.returncode == 0 and all(line.startswith(site) for line in out.stdout.split()), out


def test_synth_validate_and_a_preset_from_the_installed_package(installed):
    synth = gallery(installed, "synth", "--out", "cat", "--galleries", "80", "--image-size", "16",
                    "--min-images", "1", "--max-images", "2", "--workers", "1")
    assert synth.returncode == 0, synth.stderr[-3000:]  # reads the paper's task spec (an example) from the package
    valid = gallery(installed, "validate", "--manifest", "cat/manifest.parquet", "--tasks", "cat/tasks.yaml")
    assert valid.returncode == 0 and "galleries: 80 " in valid.stdout, valid.stderr[-3000:]
    summary = gallery(installed, "model-summary", "--config", "smoke", "--tasks", "cat/tasks.yaml")
    assert summary.returncode == 0 and "hidden width 32" in summary.stdout, summary.stderr[-3000:]  # smoke.json's


def test_a_contract_violation_is_explained_from_the_installed_schema(installed):
    _, _, work = installed
    (work / "bad.jsonl").write_text('{"gallery_id": "a"}\n')
    (work / "tasks.yaml").write_text("tasks:\n  - {name: t, column: t, kind: binary}\n")
    out = gallery(installed, "validate", "--manifest", "bad.jsonl", "--tasks", "tasks.yaml")
    assert out.returncode == 2 and "column 'images': required column is missing" in out.stderr, out.stderr[-3000:]
