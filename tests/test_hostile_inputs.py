"""Hostile and unlucky input: every path that reads user input fails fast, bounded and clearly.

One test per kind of bad input, in the five families of the issue that asked for it: hangs (special
files, silent or slow hosts), tracebacks that must be messages, inputs silently accepted wrong, failures
that came late, and wrong messages. Each asserts the exit code (or the typed error), that the message
names the input, and no traceback; whatever could hang runs under `within` (a hang fails it after BOUND s).
No network exists here: a host that never answers is a local socket that listens and never accepts.
"""
import codecs
import http.server
import json
import os
import socket
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

import gallery.storage as storage
from gallery.cli import main
from gallery.config import load_settings
from gallery.data.images import ImageProblem, load_galleries, load_image
from gallery.data.ingest import ingest
from gallery.data.inputs import (
    Limits,
    MissingInput,
    NotAFile,
    TooLarge,
    Unreachable,
    UnsupportedLocation,
    check_bounded,
    read_bounded,
    read_input,
)
from gallery.errors import ContractError
from gallery.retrieval.codes import code_that_fits, fit_code
from gallery.retrieval.embeddings import NonFiniteEmbeddings, embeddings_table, read_embeddings, write_embeddings
from gallery.runs import use_metaflow_s3_settings

BOUND = 30       # seconds: any test past this is a hang
TIMEOUT = 1.0    # GALLERY_INPUT_TIMEOUT in these tests
SILENT = 2 * TIMEOUT + 1  # when the input layer gives up on a silent host

SPEC = {
    "tasks": [
        {"name": "pool", "column": "has_pool", "kind": "binary"},
        {"name": "region", "column": "region", "kind": "multiclass"},
        {"name": "rate", "column": "rate", "kind": "regression"},
    ],
    "holdout": [{"name": "stars", "column": "stars", "kind": "multiclass"}],
}


def within(seconds, fn, *args, **kwargs):
    """fn(*args) in a daemon thread; fails the test if it has not returned after `seconds`."""
    outcome = {}

    def run():
        try:
            outcome["value"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            outcome["error"] = e

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"{getattr(fn, '__name__', fn)} still running after {seconds} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


@pytest.fixture
def cli(capsys):
    """Run `gallery ARGS`: (exit status, stderr); never a traceback, never past BOUND seconds."""
    def run(*argv):
        capsys.readouterr()
        code = within(BOUND, main, [str(a) for a in argv])
        err = capsys.readouterr().err
        assert "Traceback" not in err, err
        return code, err
    return run


@pytest.fixture(autouse=True)
def short_timeouts(monkeypatch):
    monkeypatch.setenv("GALLERY_INPUT_TIMEOUT", str(TIMEOUT))
    monkeypatch.setenv("GALLERY_INPUT_DEADLINE", "4")


def png(path: Path, colour=(200, 30, 30)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 12), colour).save(path, "PNG")
    return str(path)


def manifest_frame(n=20) -> pd.DataFrame:
    """n products with two images each, every task learnable, an explicit split (no hashing luck)."""
    return pd.DataFrame({
        "gallery_id": [f"g{i}" for i in range(n)],
        "images": [["img/a.png", "img/b.png"] for _ in range(n)],
        "split": ["train"] * (n - 4) + ["valid"] * 2 + ["test"] * 2,
        "has_pool": [i % 2 == 0 for i in range(n)],
        "region": [["north", "south", "east"][i % 3] for i in range(n)],
        "rate": [50.0 + i for i in range(n)],
        "stars": [1 + i % 3 for i in range(n)],
    })


def write_catalogue(folder: Path, df=None, spec=SPEC) -> tuple[Path, Path]:
    png(folder / "img" / "a.png")
    png(folder / "img" / "b.png", (30, 30, 200))
    manifest, tasks = folder / "manifest.parquet", folder / "tasks.yaml"
    (manifest_frame() if df is None else df).to_parquet(manifest)
    tasks.write_text(yaml.safe_dump(spec))
    return manifest, tasks


@pytest.fixture
def catalogue(tmp_path) -> tuple[Path, Path]:
    return write_catalogue(tmp_path)


@pytest.fixture
def embeddings(tmp_path) -> str:
    location = str(tmp_path / "embeddings.parquet")
    x = np.random.default_rng(0).normal(size=(6, 8)).astype(np.float32)
    write_embeddings(location, embeddings_table([f"g{i}" for i in range(6)], ["train"] * 6, x, {"run_id": "1"}))
    return location


@pytest.fixture
def fifo(tmp_path):
    def make(name):
        path = tmp_path / "special" / name
        path.parent.mkdir(exist_ok=True)
        os.mkfifo(path)
        return path
    return make


@pytest.fixture(scope="module")
def silent_host():
    """host:port of a socket that listens and never accepts: connections hang, as on a dead network."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        yield f"127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture(scope="module")
def closed_host():
    """host:port where nothing listens: connections are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"127.0.0.1:{port}"


class Handler(http.server.BaseHTTPRequestHandler):
    """/files/<name>: the bytes in FILES; /trickle: one byte every 0.3 s; /endless: bytes forever."""

    FILES: dict = {}

    def do_GET(self):  # noqa: N802 - http.server's name
        try:
            if self.path.startswith("/files/") and self.path[7:] in self.FILES:
                body = self.FILES[self.path[7:]]
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            elif self.path == "/trickle":
                self.send_response(200)
                self.send_header("Content-Length", "1000")
                self.end_headers()
                for _ in range(1000):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.3)
            elif self.path == "/endless":
                self.send_response(200)
                self.end_headers()
                chunk = b"\0" * 65536
                while True:
                    self.wfile.write(chunk)
            else:
                self.send_error(404)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the reader gave up, as it should

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def web():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture
def s3_endpoint():
    """Point s3:// at an endpoint for one test, then back at Metaflow's settings."""
    def point(host):
        storage.configure_s3(endpoint_url=f"http://{host}")
    yield point
    use_metaflow_s3_settings()


def image_problem(location) -> str:
    with pytest.raises(ImageProblem) as info:
        within(BOUND, load_image, location, 8)
    return str(info.value)


# ================================================================ family 1: hangs

def test_fifo_as_image_is_refused_without_reading(fifo):
    assert image_problem(str(fifo("photo.jpg"))) == "not a regular file (is a named pipe)"


def test_fifo_as_manifest(cli, catalogue, fifo):
    path = fifo("manifest.parquet")
    code, err = cli("validate", "--manifest", path, "--tasks", catalogue[1])
    assert code == 2 and f"{path}: file: is a named pipe" in err


def test_fifo_as_task_spec(cli, catalogue, fifo):
    path = fifo("tasks.yaml")
    code, err = cli("validate", "--manifest", catalogue[0], "--tasks", path)
    assert code == 2 and str(path) in err and "named pipe" in err


def test_fifo_as_seed_photo_named_before_any_run_is_looked_up(cli, embeddings, fifo):
    path = fifo("seed.jpg")
    code, err = cli("search", "--embeddings", embeddings, "--images", path)
    assert code == 2 and f"seed image {path}: not a regular file" in err and "run" not in err.split("seed image")[0]


def test_fifo_as_embeddings_file(cli, fifo):
    path = fifo("embeddings.parquet")
    code, err = cli("search", "--embeddings", path, "--gallery-id", "g1")
    assert code == 2 and f"embeddings file {path}: is a named pipe" in err


def test_dev_zero_as_image_is_never_read():
    assert image_problem("/dev/zero") == "not a regular file (is a character device)"


def test_dev_zero_as_settings(cli, catalogue):
    code, err = cli("model-summary", "--config", "/dev/zero", "--tasks", catalogue[1])
    assert code == 2 and "/dev/zero: is a character device" in err


def test_link_to_dev_zero_named_like_a_photo(tmp_path):
    (tmp_path / "photo.jpg").symlink_to("/dev/zero")
    assert "character device" in image_problem(str(tmp_path / "photo.jpg"))


def test_socket_file_as_image():
    with tempfile.TemporaryDirectory(prefix="g") as folder:  # a socket path must be short
        path = os.path.join(folder, "s.jpg")
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(path)
            assert "is a socket" in image_problem(path)


def test_a_file_checked_before_it_is_read_meets_the_same_refusals(fifo, web, silent_host, tmp_path):
    """check_bounded (a model.weights file, checked when a run starts) refuses what read_bounded would, and
    reads nothing: a pipe, a URL whose Content-Length is over the limit (a trickling one too), a silent host."""
    limits = Limits(model=500, timeout=TIMEOUT, deadline=4)
    with pytest.raises(NotAFile, match="is a named pipe"):
        within(BOUND, check_bounded, str(fifo("w.pth")), "model", limits)
    for url in (f"{web}/trickle", f"{web}/files/missing.pth"):
        with pytest.raises(TooLarge if url.endswith("trickle") else MissingInput):
            within(SILENT, check_bounded, url, "model", limits)
    with pytest.raises(Unreachable):
        within(BOUND, check_bounded, f"http://{silent_host}/w.pth", "model", limits)
    small = tmp_path / "w.pth"
    small.write_bytes(b"x" * 500)
    check_bounded(str(small), "model", limits)


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_image_on_a_host_that_never_answers(silent_host, scheme):
    start = time.monotonic()
    location = f"{scheme}://{silent_host}/photo.jpg"
    assert image_problem(location).startswith("unreachable (")
    assert time.monotonic() - start < SILENT + 2


def test_manifest_on_a_host_that_never_answers(cli, silent_host, catalogue):
    location = f"http://{silent_host}/manifest.csv"
    start = time.monotonic()
    code, err = cli("validate", "--manifest", location, "--tasks", catalogue[1])
    assert code == 2 and f"{location}: file: no answer" in err
    assert time.monotonic() - start < SILENT + 2


def test_s3_image_with_an_endpoint_that_never_answers(silent_host, s3_endpoint):
    s3_endpoint(silent_host)
    start = time.monotonic()
    assert image_problem("s3://bucket/photo.jpg").startswith("unreachable (")
    assert time.monotonic() - start < SILENT + 2


def test_gs_image_with_an_endpoint_that_never_answers(silent_host, monkeypatch):
    """pyarrow's GCS client has no connect timeout: the watchdog gives up on it."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://{silent_host}")
    start = time.monotonic()
    assert image_problem("gs://bucket/photo.jpg") == f"unreachable (no answer for {SILENT:g} s)"
    assert time.monotonic() - start < SILENT + 2


def test_a_server_that_trickles_hits_the_deadline(web):
    with pytest.raises(Unreachable, match="not read in 4 s"):
        within(BOUND, read_bounded, f"{web}/trickle", "image")


def test_a_body_without_end_stops_at_the_limit(web, monkeypatch):
    monkeypatch.setenv("GALLERY_MAX_IMAGE_BYTES", "1MiB")
    with pytest.raises(TooLarge, match=r"larger than the image limit .*GALLERY_MAX_IMAGE_BYTES"):
        within(BOUND, read_bounded, f"{web}/endless", "image")


def test_a_huge_file_is_refused_before_reading(tmp_path):
    huge = tmp_path / "huge.jpg"
    with open(huge, "wb") as f:
        f.truncate(20 * 1024**3)  # sparse: 20 GiB claimed, no disk used
    assert image_problem(str(huge)).startswith("too large (is larger than the image limit (20.0 GiB > 64.0 MiB)")


# ================================================================ family 2: tracebacks that must be messages

def test_task_spec_in_latin1(cli, catalogue):
    catalogue[1].write_bytes(yaml.safe_dump(SPEC).encode() + "# région côtière\n".encode("latin-1"))
    code, err = cli("validate", "--manifest", catalogue[0], "--tasks", catalogue[1])
    assert code == 2 and f"{catalogue[1]}: file: cannot read the task spec: is not UTF-8 text" in err
    assert "save it as UTF-8" in err


def test_task_spec_in_utf16(cli, catalogue):
    catalogue[1].write_bytes(codecs.BOM_UTF16_LE + yaml.safe_dump(SPEC).encode("utf-16-le"))
    code, err = cli("validate", "--manifest", catalogue[0], "--tasks", catalogue[1])
    assert code == 2 and str(catalogue[1]) in err and "UTF-16/UTF-32 text, not UTF-8" in err


def test_manifest_and_tasks_swapped(cli, catalogue):
    manifest, tasks = catalogue
    code, err = cli("validate", "--manifest", tasks, "--tasks", manifest)
    assert code == 2 and "are --manifest and --tasks swapped?" in err
    assert f"{manifest}: file: cannot read the task spec: is a Parquet file" in err
    assert f"{tasks}: file: unsupported manifest format '.yaml'" in err


def test_json_task_spec_given_as_manifest(cli, catalogue, tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(SPEC, indent=2))
    code, err = cli("validate", "--manifest", spec, "--tasks", catalogue[1])
    assert code == 2 and f"{spec}: line 1" in err and "swapped" in err


def test_image_file_given_as_task_spec(cli, catalogue):
    image = catalogue[0].parent / "img" / "a.png"
    code, err = cli("validate", "--manifest", catalogue[0], "--tasks", image)
    assert code == 2 and f"{image}: file: cannot read the task spec: is a PNG image, not a text file" in err


def test_manifest_over_https_scheme_is_read(cli, web, tmp_path):
    """http(s) manifests are part of the contract: one served locally validates."""
    manifest, tasks = write_catalogue(tmp_path)
    frame = manifest_frame().assign(images=lambda d: d["images"].map(lambda i: [f"{web}/files/a.png"]))
    Handler.FILES["m.csv"] = frame.assign(images=frame["images"].map(json.dumps)).to_csv(index=False).encode()
    code, err = cli("validate", "--manifest", f"{web}/files/m.csv", "--tasks", tasks)
    assert code == 0, err


def test_unsupported_scheme_for_the_manifest(cli, catalogue):
    code, err = cli("validate", "--manifest", "ftp://example.org/m.parquet", "--tasks", catalogue[1])
    assert code == 2 and "ftp://example.org/m.parquet: file: URI scheme 'ftp:' is not supported" in err


@pytest.mark.parametrize("reference,reason", [
    ("ftp://host/a.jpg", "URI scheme 'ftp:' is not supported"),
    ("hdfs://namenode/a.jpg", "URI scheme 'hdfs:' is not supported"),
    ("file://otherhost/a.jpg", "file:// URI of another host ('otherhost')"),
    ("s3://", "s3:// URI without a bucket and key"),
])
def test_unreadable_image_references_stop_validation_not_preprocessing(cli, tmp_path, reference, reason):
    df = manifest_frame()
    df.loc[3, "images"] = ["img/a.png", reference]
    manifest, tasks = write_catalogue(tmp_path, df)
    code, err = cli("validate", "--manifest", manifest, "--tasks", tasks)
    assert code == 2 and f"column 'images': 1 image reference(s): {reason}" in err and "'g3'" in err


def test_s3_endpoint_that_is_down(closed_host, s3_endpoint):
    s3_endpoint(closed_host)
    with pytest.raises(Unreachable, match="s3://bucket/manifest.parquet: could not connect"):
        within(BOUND, read_bounded, "s3://bucket/manifest.parquet", "manifest")


@pytest.mark.parametrize("damage", ["truncated", "text", "empty"])
def test_search_on_a_file_that_is_not_parquet(cli, embeddings, tmp_path, damage):
    bad = tmp_path / f"{damage}.parquet"
    data = Path(embeddings).read_bytes()
    bad.write_bytes({"truncated": data[:len(data) // 2], "text": b"gallery_id,embedding\n", "empty": b""}[damage])
    code, err = cli("search", "--embeddings", bad, "--gallery-id", "g1")
    assert code == 2 and f"embeddings file {bad} is not a readable Parquet file" in err


def test_search_on_ragged_embeddings(cli, tmp_path):
    ragged = tmp_path / "ragged.parquet"
    pq.write_table(pa.table({"gallery_id": ["a", "b"], "embedding": pa.array([[0.1, 0.2], [0.3]], pa.list_(pa.float32()))}), ragged)
    code, err = cli("search", "--embeddings", ragged, "--gallery-id", "a")
    assert code == 2 and f"embeddings file {ragged}: column(s) of the wrong type: embedding (list<" in err
    assert "every gallery the same dimension" in err


def test_search_on_embeddings_without_a_column(cli, tmp_path):
    path = tmp_path / "ids.parquet"
    pq.write_table(pa.table({"gallery_id": ["a"]}), path)
    code, err = cli("search", "--embeddings", path, "--gallery-id", "a")
    assert code == 2 and f"embeddings file {path}: missing column(s) embedding" in err


def test_search_on_embeddings_with_no_rows(cli, tmp_path):
    path = str(tmp_path / "none.parquet")
    write_embeddings(path, embeddings_table([], [], np.zeros((0, 8), np.float32), {}))
    code, err = cli("search", "--embeddings", path, "--gallery-id", "a")
    assert code == 2 and f"embeddings file {path} holds no galleries" in err


@pytest.mark.parametrize("bad,binary", [(np.nan, False), (np.inf, True)])
def test_search_on_embeddings_with_non_finite_vectors(cli, tmp_path, bad, binary):
    """NaN or infinity in stored vectors (a diverged model's export) is refused at read, not ranked into an empty
    result with numpy's warnings; the file and the first galleries are named."""
    path = str(tmp_path / "e.parquet")
    x = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
    x[[1, 6], 2] = bad
    with np.errstate(invalid="ignore"):  # their bits, as the export of a diverged model wrote them
        write_embeddings(path, embeddings_table([f"g{i}" for i in range(8)], ["train"] * 8, x, {"run_id": "1"}))
    code, err = cli("search", "--embeddings", path, "--gallery-id", "g1", *(["--binary"] if binary else []))
    assert code == 2 and f"embeddings file {path}: 2 of 8 galleries have NaN or infinite values in `embedding` " \
                          "(e.g. 'g1', 'g6'); no search can rank by them. Export the embeddings again" in err, err
    with pytest.raises(NonFiniteEmbeddings, match="2 of 8 galleries"):
        read_embeddings(path)


def test_search_on_a_folder(cli, tmp_path):
    code, err = cli("search", "--embeddings", tmp_path, "--gallery-id", "g1")
    assert code == 2 and f"embeddings file {tmp_path}: is a folder" in err


@pytest.mark.parametrize("k", ["0", "-3", "ten"])
def test_search_with_a_k_that_is_not_positive(cli, embeddings, k):
    code, err = cli("search", "--embeddings", embeddings, "--gallery-id", "g1", "-k", k)
    assert code == 2 and f"argument -k: expected a whole number >= 1, got '{k}'" in err


def test_search_binary_where_the_code_is_a_device(cli, tmp_path):
    """The code file an embeddings file names is input too: /dev/zero there is refused, not read."""
    path = str(tmp_path / "e.parquet")
    table = embeddings_table(["a", "b"], ["train"] * 2, np.ones((2, 8), np.float32), {})
    meta = dict(table.schema.metadata) | {b"gallery.code": b"itq8", b"gallery.code_location": b"/dev/zero"}
    pq.write_table(table.replace_schema_metadata(meta), path)
    code, err = cli("search", "--embeddings", path, "--gallery-id", "a", "--binary")
    assert code == 2 and "binary code /dev/zero: is a character device" in err


def test_yaml_alias_bomb(cli, catalogue):
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [{','.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    catalogue[1].write_text("\n".join(lines) + "\ntasks: *a9\n")
    code, err = cli("validate", "--manifest", catalogue[0], "--tasks", catalogue[1])
    assert code == 2 and f"{catalogue[1]}: file: expands to more than 100,000 values" in err and len(err) < 2000


def test_yaml_nested_past_any_use(cli, catalogue):
    catalogue[1].write_text("tasks: " + "[" * 5000 + "]" * 5000 + "\n")
    code, err = cli("validate", "--manifest", catalogue[0], "--tasks", catalogue[1])
    assert code == 2 and str(catalogue[1]) in err and ("nest" in err or "not valid YAML" in err)


def test_task_spec_over_its_size_limit(cli, catalogue):
    catalogue[1].write_text(yaml.safe_dump(SPEC) + "#" * (1024**2 + 10) + "\n")
    code, err = cli("validate", "--manifest", catalogue[0], "--tasks", catalogue[1])
    assert code == 2 and "is larger than the task spec limit (1.0 MiB" in err and "GALLERY_MAX_TASKS_BYTES" in err


def test_empty_task_spec(cli, catalogue):
    catalogue[1].write_text("")
    code, err = cli("validate", "--manifest", catalogue[0], "--tasks", catalogue[1])
    assert code == 2 and f"{catalogue[1]}: top level: None is not of type 'object'" in err


def test_empty_manifest_file(cli, catalogue):
    catalogue[0].write_bytes(b"")
    code, err = cli("validate", "--manifest", catalogue[0], "--tasks", catalogue[1])
    assert code == 2 and f"{catalogue[0]}: file: cannot be read as parquet" in err


def test_csv_manifest_in_latin1(cli, catalogue, tmp_path):
    csv = tmp_path / "m.csv"
    frame = manifest_frame().assign(region="côte")
    csv.write_bytes(frame.assign(images=frame["images"].map(json.dumps)).to_csv(index=False).encode("latin-1"))
    code, err = cli("validate", "--manifest", csv, "--tasks", catalogue[1])
    assert code == 2 and f"{csv}: file: is not UTF-8 text (byte 0xf4" in err


def test_parquet_manifest_that_decodes_past_the_limit(cli, catalogue, monkeypatch):
    """A few KB of Parquet can decode to gigabytes: the decoded size is checked from the footer first."""
    n = 400_000
    pq.write_table(pa.table({"gallery_id": pa.array(["same"] * n), "images": pa.array([["x.jpg"]] * n)}),
                   catalogue[0], compression="zstd")
    assert catalogue[0].stat().st_size < 100_000
    monkeypatch.setenv("GALLERY_MAX_MANIFEST_BYTES", "1MB")
    code, err = cli("validate", "--manifest", catalogue[0], "--tasks", catalogue[1])
    assert code == 2 and f"{catalogue[0]}: file: decodes to" in err and "GALLERY_MAX_MANIFEST_BYTES" in err


def test_settings_with_an_unknown_key(cli, catalogue, tmp_path):
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"train": {"lr": 0.1, "learning_rate": 0.1}}))
    code, err = cli("model-summary", "--config", settings, "--tasks", catalogue[1])
    assert code == 2 and f"settings {settings}: 1 problem" in err and "train.learning_rate: unknown key" in err


def test_nul_character_in_the_manifest_path(cli, catalogue):
    code, err = cli("validate", "--manifest", "data\x00.parquet", "--tasks", catalogue[1])
    assert code == 2 and "the path contains a NUL character" in err


def test_image_path_longer_than_the_system_allows(tmp_path):
    assert image_problem(str(tmp_path / ("x" * 5000))) == "unreadable (cannot be read (File name too long))"


def test_a_huge_bad_value_is_shown_as_an_excerpt(cli, tmp_path):
    df = manifest_frame()
    df["rate"] = df["rate"].astype(str)
    df.loc[2, "rate"] = "not a number " * 100_000
    manifest, tasks = write_catalogue(tmp_path, df)
    code, err = cli("validate", "--manifest", manifest, "--tasks", tasks)
    assert code == 2 and "1 non-numeric value(s) 'not a number not a number" in err and len(err) < 2000


def test_a_limit_that_is_not_a_size(cli, catalogue, monkeypatch):
    monkeypatch.setenv("GALLERY_MAX_IMAGE_BYTES", "lots")
    code, err = cli("validate", "--manifest", catalogue[0], "--tasks", catalogue[1])
    assert code == 2 and "GALLERY_MAX_IMAGE_BYTES='lots': expected a size in bytes" in err


def test_synth_into_a_place_that_cannot_be_a_folder(cli):
    code, err = cli("synth", "--out", "/dev/null/catalogue", "--galleries", "3", "--workers", "1")
    assert code == 2 and "/dev/null/catalogue" in err


def test_manifest_that_is_a_folder(cli, catalogue, tmp_path):
    folder = tmp_path / "listings.parquet"
    folder.mkdir()
    code, err = cli("validate", "--manifest", folder, "--tasks", catalogue[1])
    assert code == 2 and f"{folder}: file: is a folder" in err


def test_image_url_that_is_not_found(web):
    assert image_problem(f"{web}/files/nowhere.jpg") == "missing file (does not exist (HTTP 404))"


def test_s3_objects_are_read_through_the_same_checks(s3_bucket, monkeypatch, tmp_path):
    use_metaflow_s3_settings()
    photo = Path(png(tmp_path / "p.png")).read_bytes()
    storage.write_bytes(f"{s3_bucket}/hostile/photo.png", photo)
    assert read_bounded(f"{s3_bucket}/hostile/photo.png", "image") == photo
    with pytest.raises(MissingInput, match="hostile/none.png: does not exist"):
        read_bounded(f"{s3_bucket}/hostile/none.png", "image")
    with pytest.raises(NotAFile, match="hostile: is a folder"):
        read_bounded(f"{s3_bucket}/hostile", "image")
    monkeypatch.setenv("GALLERY_MAX_IMAGE_BYTES", "10")
    with pytest.raises(TooLarge, match=r"photo.png: is larger than the image limit"):
        read_bounded(f"{s3_bucket}/hostile/photo.png", "image")


def test_a_huge_key_is_shown_as_an_excerpt(cli, catalogue):
    catalogue[1].write_text(yaml.safe_dump({**SPEC, "k" * 200_000: 1}))
    code, err = cli("validate", "--manifest", catalogue[0], "--tasks", catalogue[1])
    assert code == 2 and "Additional properties are not allowed" in err and len(err) < 2000


def test_csv_images_nested_past_any_use(cli, catalogue, tmp_path):
    csv = tmp_path / "m.csv"
    frame = manifest_frame()
    frame = frame.assign(images=frame["images"].map(json.dumps))
    frame.loc[4, "images"] = "[" * 100_000 + "]" * 100_000
    frame.to_csv(csv, index=False)
    code, err = cli("validate", "--manifest", csv, "--tasks", catalogue[1])
    assert code == 2 and f"{csv}: column 'images': 1 row(s) are not a list of image paths: 'g4'" in err


# ================================================================ family 3: silently wrong

def violations(manifest, tasks) -> str:
    with pytest.raises(ContractError) as info:
        within(BOUND, ingest, manifest, tasks)
    return str(info.value)


@pytest.mark.parametrize("value", [1e39, -5e30, 2e19])
def test_regression_labels_too_large_for_float32(tmp_path, value):
    df = manifest_frame()
    df.loc[5, "rate"] = value
    message = violations(*write_catalogue(tmp_path, df))
    assert "column 'rate' (task 'rate'): 1 value(s) of magnitude 1.8e+19 or more" in message and "'g5'" in message


@pytest.mark.parametrize("column,task,value,shown", [
    ("has_pool", "pool", True, "1/true"),
    ("rate", "rate", 7.5, "7.5"),
])
def test_a_task_with_one_value_in_train(tmp_path, column, task, value, shown):
    df = manifest_frame().assign(**{column: value})
    message = violations(*write_catalogue(tmp_path, df))
    assert f"column {column!r} (task {task!r}): all 16 labelled train product(s) have the same value ({shown})" in message


def test_a_declared_multiclass_task_with_one_class_in_train(tmp_path):
    spec = json.loads(json.dumps(SPEC))
    spec["tasks"][1]["classes"] = ["north", "south", "east"]
    df = manifest_frame().assign(region="north")
    message = violations(*write_catalogue(tmp_path, df, spec))
    assert "all 16 labelled train product(s) are of one class ('north')" in message


def test_a_holdout_task_with_no_positive(tmp_path):
    spec = json.loads(json.dumps(SPEC))
    spec["holdout"] = [{"name": "beach", "column": "beach", "kind": "binary"}]
    message = violations(*write_catalogue(tmp_path, manifest_frame().assign(beach=False), spec))
    assert "column 'beach' (task 'beach'): all 16 labelled train product(s) have the same value (0/false)" in message


def test_yaml_with_a_top_level_key_twice(catalogue):
    text = yaml.safe_dump({"tasks": SPEC["tasks"][:1]}) + yaml.safe_dump({"tasks": SPEC["tasks"][1:]})
    catalogue[1].write_text(text)
    message = violations(*catalogue)
    assert f"{catalogue[1]}: file: not valid YAML: key 'tasks' is given twice (first on line 1)" in message


def test_yaml_with_a_task_key_twice(catalogue):
    catalogue[1].write_text("tasks:\n  - name: pool\n    column: has_pool\n    kind: binary\n    kind: regression\n")
    assert "key 'kind' is given twice (first on line 4)" in violations(*catalogue)


def test_json_spec_with_a_key_twice(catalogue, tmp_path):
    spec = tmp_path / "tasks.json"
    spec.write_text('{"tasks": [], "tasks": ' + json.dumps(SPEC["tasks"]) + "}")
    assert f"{spec}: file: not valid JSON: key 'tasks' is given twice" in violations(catalogue[0], spec)


def test_file_uris_are_decoded(tmp_path):
    spaced = png(tmp_path / "my photo #1.png")
    uri = "file://" + spaced.replace(" ", "%20").replace("#", "%23")
    assert load_image(uri, 4).shape == (4, 4, 3)
    assert load_image("file://localhost" + spaced.replace(" ", "%20").replace("#", "%23"), 4).shape == (4, 4, 3)
    assert read_bounded(uri, "image") == Path(spaced).read_bytes()


def test_file_uri_manifest_with_file_uri_images(tmp_path):
    df = manifest_frame().assign(images=lambda d: d["images"].map(
        lambda _: [f"file://localhost{tmp_path}/img/a%20b.png"]))
    manifest, tasks = write_catalogue(tmp_path / "my data", df)
    png(tmp_path / "img" / "a b.png")
    cat = ingest(f"file://{str(manifest).replace(' ', '%20')}", tasks)
    assert cat.frame["images"][0] == [f"{tmp_path}/img/a b.png"]
    assert load_image(cat.frame["images"][0][0], 4).shape == (4, 4, 3)


def test_images_beyond_max_images_are_listed(tmp_path):
    good = png(tmp_path / "a.png")
    kept, arrays, quality = load_galleries(["g"], [[good] * 5], 4, max_images=3)
    assert arrays[0].shape[0] == 3
    assert [(s.gallery_id, s.reason) for s in quality.skipped] == [("g", "beyond data.max_images (3 per gallery)")] * 2
    assert quality.reasons() == {"beyond data.max_images": 2}


def test_utf8_with_a_byte_order_mark_is_accepted(catalogue):
    catalogue[1].write_bytes(codecs.BOM_UTF8 + yaml.safe_dump(SPEC).encode())
    assert [t.name for t in ingest(*catalogue).tasks] == ["pool", "region", "rate"]


# ================================================================ family 4: late failures

@pytest.mark.parametrize("train,chosen", [(64, "itq64"), (63, "itq56"), (24, "itq24"), (9, "itq8"), (7, "median")])
def test_a_small_catalogue_gets_the_largest_code_it_can_fit(train, chosen):
    name, why = code_that_fits("itq64", train)
    assert name == chosen and (why is None) == (train >= 64)
    embeddings = np.abs(np.random.default_rng(0).normal(size=(train, 96))).astype(np.float32)
    assert fit_code(embeddings, name).name == chosen  # fits, where 'itq64' would raise


def test_ingest_for_a_run_says_which_code_a_small_catalogue_gets(catalogue):
    from gallery.data.ingest import describe
    from gallery.steps import ingest_for_run

    cat = ingest_for_run(str(catalogue[0]), str(catalogue[1]), load_settings("smoke"))
    note = "binary code 'itq64' (retrieval.code) needs at least 64 train galleries to fit; this catalogue has 16, " \
           "so the run fits 'itq16' instead"
    assert cat.notes == [note] and f"note: {note}" in describe(cat)


# ================================================================ family 5: wrong messages

def test_search_options_that_exclude_each_other_are_checked_first(cli):
    code, err = cli("search", "--embeddings", "/nowhere.parquet", "--images", "a.jpg", "--gallery-id", "g1")
    assert code == 2 and "argument --gallery-id: not allowed with argument --images" in err


def test_validate_names_both_missing_files(cli, tmp_path):
    manifest, tasks = tmp_path / "m.parquet", tmp_path / "t.yaml"
    code, err = cli("validate", "--manifest", manifest, "--tasks", tasks)
    assert code == 2 and err.startswith("2 data-contract violations")
    assert f"{manifest}: file: the manifest does not exist" in err and f"{tasks}: file: cannot read the task spec" in err


def test_validate_names_a_broken_spec_and_a_missing_manifest_together(cli, catalogue, tmp_path):
    catalogue[1].write_text("tasks: [\n")
    code, err = cli("validate", "--manifest", tmp_path / "none.csv", "--tasks", catalogue[1])
    assert code == 2 and "none.csv: file: the manifest does not exist" in err and "not valid YAML" in err


def test_unknown_preset_names_the_presets(cli, catalogue):
    code, err = cli("model-summary", "--config", "smok", "--tasks", catalogue[1])
    assert code == 2 and "settings 'smok': no such file; give a preset name (" in err and "smoke" in err


def test_unknown_pooling_flag_names_the_allowed_poolings(cli, catalogue):
    code, err = cli("model-summary", "--config", "smoke", "--tasks", catalogue[1], "--pooling", "attention")
    assert code == 2 and 'pooling = "attention": not a known pooling' in err and "`gated_attention`" in err
    assert "bug" not in err


def test_debug_shows_the_traceback(capsys, catalogue):
    assert main(["validate", "--debug", "--manifest", str(catalogue[0]) + ".nope", "--tasks", str(catalogue[1])]) == 2
    assert "Traceback" in capsys.readouterr().err


# ================================================================ the input layer's own contract

def test_bytes_already_received_are_held_to_the_same_limit(monkeypatch):
    monkeypatch.setenv("GALLERY_MAX_IMAGE_BYTES", "10")
    assert read_input(b"0123456789") == b"0123456789"
    with pytest.raises(TooLarge, match="uploaded image: is larger than the image limit"):
        read_input(b"0123456789!")
    with pytest.raises(MissingInput):
        read_input(Path("/nowhere/at/all.jpg"))
    with pytest.raises(NotAFile):
        read_input("/dev/null")


def test_an_unsupported_scheme_read_directly_is_a_typed_error():
    with pytest.raises(UnsupportedLocation, match="ftp://h/a.jpg: URI scheme 'ftp:' is not supported"):
        read_bounded("ftp://h/a.jpg", "image")


def test_limits_from_the_environment():
    limits = Limits.from_env({"GALLERY_MAX_IMAGE_BYTES": "2MiB", "GALLERY_MAX_TASKS_BYTES": "1.5kb",
                              "GALLERY_INPUT_TIMEOUT": "2.5"})
    assert (limits.image, limits.tasks, limits.timeout, limits.manifest) == (2 * 1024**2, 1500, 2.5, Limits().manifest)


# ================================================================ the flows (the first-run flow test, test_first_run.py,
# runs a catalogue with hostile photos and ids)

@pytest.mark.flow
def test_the_flows_stop_bad_input_with_a_message_not_a_traceback(tmp_path):
    """The train flow's ingest step with the arguments swapped, and a flow started with a bad settings file."""
    import subprocess
    import sys

    from conftest import FLOW, run_flow

    manifest, tasks = write_catalogue(tmp_path)
    status, run, _ = run_flow(manifest=str(tasks), tasks=str(manifest))
    log = run["ingest"].task.stderr
    assert status == "failed" and "Input error" in log and "are --manifest and --tasks swapped?" in log, log[-2000:]
    assert "Traceback" not in log

    settings = tmp_path / "settings.json"
    settings.write_text('{"train": {"lr": 0.1}, "train": {"lr": 0.2}}')
    shown = subprocess.run([sys.executable, FLOW, "--config", "settings", str(settings), "show"], capture_output=True,
                           text=True, timeout=BOUND * 4, cwd=tmp_path)
    assert shown.returncode != 0 and "Traceback" not in shown.stderr
    assert "Settings error" in shown.stderr and "key 'train' is given twice" in shown.stderr
