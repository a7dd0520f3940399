"""A newcomer's first run, as in a container: no USER, USERNAME or LOGNAME in the environment, the README's
quick-start files (their rows copied to a size the smoke preset can split and fit), the smoke preset;
then the `gallery` command reading that run."""
import pytest
from conftest import run_flow
from readme_example import write_example

from gallery.cli import main

pytestmark = pytest.mark.flow

USER_VARIABLES = ("USER", "USERNAME", "LOGNAME", "SUDO_USER", "METAFLOW_USER")
NAMED = "runs are recorded as user"


@pytest.fixture
def no_user_name(monkeypatch):
    """The environment of `docker run python:3.12` as far as user names go (metaflow.Runner copies os.environ)."""
    for name in USER_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def test_the_quick_start_runs_with_no_user_name_in_the_environment(tmp_path, no_user_name, capsys):
    manifest, tasks = write_example(tmp_path, copies=40)  # 120 galleries: 40 train, 40 valid, 40 test
    status, run, stderr = run_flow(manifest=str(manifest), tasks=str(tasks))
    assert status == "successful", stderr[-3000:]
    assert stderr.count(NAMED) == 1  # said once, by the process that started the run; the steps inherit the name
    end = run["end"].task.data
    assert end.exported_galleries == 120 and set(end.training) == {"pseudo_uniform", "kendall"}
    assert [(h.task, h.scored_galleries) for h in end.transfer_by_seed[0].holdouts] == [("stars", 80)]

    # The `gallery` command reads the run's model from Metaflow, with no user name either.
    assert main(["search", "--embeddings", end.embeddings_location, "--images",
                 str(tmp_path / "photos" / "h1_000_a.jpg"), "-k", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["rank", "gallery_id", "cosine"] and len(out) == 4
