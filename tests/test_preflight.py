"""What a run checks at start (gallery.preflight): the backbone's weights, a store and a reports location it
can write. A run that cannot finish stops in `start`, before any work, with every reason and its fix alone."""
import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import REPO, SMOKE, run_flow

from gallery.config import ModelSettings, Settings
from gallery.preflight import NotReady, preflight

VGG_MISSING = "torchvision:vgg16 ImageNet weights are not in torchvision's cache"


def with_weights(weights: str, backbone: str = "efficientnet_lite0") -> Settings:
    return replace(Settings(), model=replace(ModelSettings(), backbone=backbone, weights=weights))


def test_a_run_that_can_start_passes_and_leaves_nothing_behind(tmp_path):
    preflight(Settings(), str(tmp_path / "store"), str(tmp_path / "reports"))  # lite0's weights ship in its package
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reports", "store"]
    assert not any((tmp_path / "store").iterdir()) and not any((tmp_path / "reports").iterdir())


def test_an_unwritable_store_and_reports_location_are_named_with_the_option_that_moves_them(tmp_path):
    blocker = tmp_path / "a-file"  # a folder inside a file cannot be made, even by root
    blocker.write_text("")
    with pytest.raises(NotReady) as stopped:
        preflight(Settings(), str(blocker / "store"), str(blocker / "reports"))
    message = str(stopped.value)
    assert message.startswith("the run cannot start (nothing was run):")
    assert f"the store {blocker / 'store'} cannot be written (" in message and "give --store a folder" in message
    assert f"the reports location {blocker / 'reports'} cannot be written (" in message and "--reports" in message


@pytest.mark.parametrize("damage,reason", [
    ("missing", "does not exist; check the path"),
    ("device", "is a character device; give the path of a regular file"),
    ("too large", "is larger than the model file limit (100 bytes > 10 bytes); give a smaller file, or raise the "
                  "limit with GALLERY_MAX_MODEL_BYTES"),
])
def test_a_weights_file_that_cannot_be_read_stops_the_run_before_it_is_read(tmp_path, monkeypatch, damage, reason):
    path = {"missing": str(tmp_path / "nope.pth"), "device": "/dev/zero", "too large": str(tmp_path / "w.pth")}[damage]
    if damage == "too large":
        Path(path).write_bytes(b"\0" * 100)
        monkeypatch.setenv("GALLERY_MAX_MODEL_BYTES", "10")
    expected = f"efficientnet_lite0 weights file {path}: {reason}, or fix model.weights"
    with pytest.raises(NotReady, match=re.escape(expected)):
        preflight(with_weights(path), str(tmp_path / "store"), str(tmp_path / "reports"))


def test_every_problem_is_listed_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-cache"))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(NotReady) as stopped:
        preflight(with_weights("imagenet", "vgg16"), str(blocker / "store"), str(tmp_path / "reports"))
    assert len(stopped.value.problems) == 2
    assert VGG_MISSING in stopped.value.problems[0] and "the store" in stopped.value.problems[1]


@pytest.mark.flow
def test_the_paper_model_without_its_weights_stops_in_start_with_the_message_alone(tmp_path):
    """The paper preset's model on the smoke catalogue, VGG16's weights not in the (empty) torchvision cache:
    the run stops in `start` (no catalogue ingested, no image decoded) with the message and no traceback."""
    paper = json.loads((REPO / "flows" / "configs" / "paper.json").read_text())
    settings = json.loads(Path(SMOKE).read_text()) | {"model": paper["model"]}
    (tmp_path / "empty-cache").mkdir()
    config = tmp_path / "paper-model.json"
    config.write_text(json.dumps(settings))
    status, run, stderr = run_flow(env={"TORCH_HOME": str(tmp_path / "empty-cache")}, config=str(config))
    log = run["start"].task.stderr
    assert status == "failed" and [step.id for step in run] == ["start"], stderr[-3000:]
    assert "Input error" in log and "the run cannot start (nothing was run)" in log and VGG_MISSING in log, log[-3000:]
    assert "set model.weights to the path of the .pth file" in log
    assert "Traceback" not in log and "Traceback" not in stderr
