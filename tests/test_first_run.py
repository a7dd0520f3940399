"""A newcomer's first run on their own data, as in a container and as data really is: no USER, USERNAME or
LOGNAME in the environment; the README's quick-start files (their rows copied to a catalogue a run can split);
galleries with hostile ids and photos of every kind of damage (a named pipe, /dev/zero, a folder, an empty
file, text, a truncated JPEG, a missing file, a host that never answers, more photos than data.max_images);
the smoke preset. One run covers them all: it finishes, says whose run it is once, lists every damaged
photo, keeps the ids as they are, fits the binary code the catalogue can hold and says so, and never
touches the user's files; then the `gallery` command reads the run, with no user name either."""
import hashlib
import json
import os
import socket
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import REPORTS, run_flow
from readme_example import write_example

from gallery.cli import main

pytestmark = pytest.mark.flow

USER_VARIABLES = ("USER", "USERNAME", "LOGNAME", "SUDO_USER", "METAFLOW_USER")
NAMED = "runs are recorded as user"
HOSTILE_IDS = ["../../etc/passwd", "a/b\\c", 'quote " and, comma', "new\nline", "ünïcødé 🙂", " padded ", "x" * 300]


@pytest.fixture
def no_user_name(monkeypatch):
    """The environment of `docker run python:3.12` as far as user names go (metaflow.Runner copies os.environ)."""
    for name in USER_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def silent_host():
    """host:port of a socket that listens and never accepts: connections hang, as on a dead network."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        yield f"127.0.0.1:{s.getsockname()[1]}"


def hostile_photos(folder: Path, silent_host: str) -> dict[str, str]:
    """Photos of every kind of damage, each with the reason the data-quality list gives."""
    special = folder / "special"
    special.mkdir()
    os.mkfifo(special / "fifo.jpg")
    (special / "zero.jpg").symlink_to("/dev/zero")
    (special / "empty.jpg").write_bytes(b"")
    (special / "text.jpg").write_text("not a photo")
    (special / "folder.jpg").mkdir()
    good = next(folder.glob("photos/*.jpg")).read_bytes()
    (special / "truncated.jpg").write_bytes(good[:100])
    return {f"{special}/fifo.jpg": "not a regular file", f"{special}/zero.jpg": "not a regular file",
            f"{special}/empty.jpg": "zero-byte file", f"{special}/text.jpg": "not an image",
            f"{special}/folder.jpg": "not a regular file", f"{special}/missing.jpg": "missing file",
            f"{special}/truncated.jpg": "damaged image", f"http://{silent_host}/photo.jpg": "unreachable"}


def test_a_first_run_on_your_own_data_with_damaged_photos_and_no_user_name(tmp_path, no_user_name, silent_host, capsys):
    manifest_csv, tasks = write_example(tmp_path, copies=8)  # 32 galleries: 16 train, 8 valid, 8 test
    frame = pd.read_csv(manifest_csv, dtype={"gallery_id": str})
    frame["images"] = frame["images"].map(lambda cell: [str(tmp_path / p) for p in json.loads(cell)])
    hostile = hostile_photos(tmp_path, silent_host)
    good = frame["images"][0][0]
    extra = frame.iloc[[k % 2 for k in range(len(HOSTILE_IDS))]].copy()  # labels of the two train rows
    extra["gallery_id"], extra["split"] = HOSTILE_IDS, "train"
    extra["images"] = [[good, image] for image in list(hostile)[:len(HOSTILE_IDS)]]
    frame = pd.concat([frame, extra], ignore_index=True)
    frame.at[0, "images"] = frame["images"][0] + [good] * 44       # past data.max_images (44)
    frame.at[1, "images"] = list(hostile)                           # nothing readable: excluded
    manifest = tmp_path / "manifest.parquet"
    frame.to_parquet(manifest)
    before = hashlib.sha1(manifest.read_bytes() + tasks.read_bytes()).hexdigest()

    status, run, stderr = run_flow(env={"GALLERY_INPUT_TIMEOUT": "1"}, manifest=str(manifest), tasks=str(tasks))
    assert status == "successful", stderr[-3000:]
    assert stderr.count(NAMED) == 1  # said once, by the process that started the run; the steps inherit the name

    quality = pd.read_csv(run["data_quality"].task.data.quality_location, keep_default_na=False)
    listed = set(zip(quality["gallery_id"], quality["image"], quality["reason"].str.split(" \\(").str[0]))
    for gallery_id, image in zip(HOSTILE_IDS, hostile):
        assert (gallery_id, image, hostile[image]) in listed
    for image, reason in hostile.items():
        assert (frame["gallery_id"][1], image, reason) in listed
    assert (frame["gallery_id"][1], "", "gallery excluded: no readable image") in listed
    beyond = quality[quality["gallery_id"] == frame["gallery_id"][0]]
    assert list(beyond["reason"]) == ["beyond data.max_images (44 per gallery)"] * (len(frame["images"][0]) - 44)

    end = run["end"].task.data
    exported = pq.read_table(end.embeddings_location)
    assert exported.num_rows == len(frame) - 1 and set(HOSTILE_IDS) <= set(exported["gallery_id"].to_pylist())
    assert exported.schema.metadata[b"gallery.code"] == b"itq16"  # 23 train galleries, one excluded: 22 readable
    assert [(h.task, h.scored_galleries) for h in end.transfer_by_seed[0].holdouts] == [("stars", 16)]
    report = (Path(REPORTS) / run.id / "report.md").read_text()
    assert "needs at least 64 train galleries to fit; this catalogue has 23, so the run fits 'itq16' instead" in report
    assert (Path(REPORTS) / run.id / "explorer.html").stat().st_size > 100_000
    assert hashlib.sha1(manifest.read_bytes() + tasks.read_bytes()).hexdigest() == before  # only read

    # The `gallery` command reads the run's model from Metaflow, with no user name either.
    assert main(["search", "--embeddings", end.embeddings_location, "--images", good, "-k", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["rank", "gallery_id", "cosine"] and len(out) == 4
