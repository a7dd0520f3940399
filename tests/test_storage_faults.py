"""Storage faults (docs/bad-input.md, Faults): the run-scoped store met by a failing object store and a full disk.

S3: pyarrow talks to the tests' moto server through a proxy (tests/s3_faults.py) that answers chosen requests
with 500 InternalError, 503 SlowDown, a reset connection or silence. Each write and read either completes
through the client's retries, whole, or fails with a StorageError naming the object within the stated bound;
it never hangs and never leaves a half-written object. The limits are shortened here (3 tries, 1 s timeouts)
so that a test takes seconds; the figures printed are what each case took.

Local disk: a full disk is injected under the writes (and met for real as a file-size limit in a child
process): the error names the path, no temporary file is left and an older version stays intact; once
space is freed the same write succeeds. gs://: the client's stated retry limit, and a read of a silent
endpoint abandoned by the watchdog."""
import errno
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import S3_ENDPOINT
from s3_faults import FaultyS3

import gallery.data.shards as shards
import gallery.storage as storage
from gallery.data.shards import GALLERIES, IMAGES, ShardWriter
from gallery.retrieval.embeddings import write_embeddings
from gallery.storage import StorageError

ATTEMPTS, TIMEOUT = 3, 1.0  # per request, here: the store's own are S3_ATTEMPTS, S3_*_TIMEOUT
HANG = 60  # seconds: a case still running after this has hung
SIZE = 32


def within(seconds, fn, *args):
    """fn(*args), failing the test (instead of hanging it) when it has not returned after `seconds`;
    prints how long it took."""
    outcome = {}

    def run():
        started = time.monotonic()
        try:
            outcome["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - raised in the test's thread
            outcome["error"] = e
        outcome["seconds"] = time.monotonic() - started

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"{getattr(fn, '__name__', fn)} still running after {seconds} s: a hang"
    test = os.environ.get("PYTEST_CURRENT_TEST", "").split("::")[-1].removesuffix(" (call)")
    print(f"\n{test}: {getattr(fn, '__name__', fn)} {'failed' if 'error' in outcome else 'done'} in "
          f"{outcome['seconds']:.2f} s", end=" ")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


@pytest.fixture(scope="module")
def proxy(s3_bucket):
    faulty = FaultyS3(S3_ENDPOINT)
    yield faulty
    faulty.close()


@pytest.fixture
def s3(proxy, s3_bucket, monkeypatch, request):
    """A prefix of the bucket for one test, reached through the proxy with the short limits."""
    monkeypatch.setattr(storage, "_S3_OPTIONS", {})
    monkeypatch.setattr(storage, "_S3_LIMITS", {})
    storage.configure_s3(endpoint_url=proxy.endpoint, attempts=ATTEMPTS, connect_timeout=TIMEOUT,
                         request_timeout=TIMEOUT)
    proxy.clear()
    proxy.log.clear()
    yield f"{s3_bucket}/faults/{request.node.name.replace('[', '-').rstrip(']')}"
    proxy.clear()
    storage._s3_filesystem.cache_clear()  # the proxy's filesystem goes with the settings monkeypatch restores


def blob(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


# ---------------------------------------------------------------- S3: retried to completion

def test_a_500_on_a_shard_upload_is_retried(s3, proxy):
    location = f"{s3}/shard/images.bin"
    proxy.fail("PUT", "shard/images.bin", "500")
    within(HANG, storage.write_bytes, location, data := blob(300_000))
    assert proxy.faulted("500") == 1 and storage.read_bytes(location) == data


def test_a_500_on_each_file_of_a_shard_is_retried(s3, proxy):
    """A whole shard written to S3 (staged locally, then published file by file)."""
    for name in (IMAGES, GALLERIES):
        proxy.fail("PUT", f"shard/{name}", "500")

    def write_shard():
        with ShardWriter(f"{s3}/shard", SIZE) as writer:
            writer.add("g1", "train", np.full((3, SIZE, SIZE, 3), 7, np.uint8))
            return writer.finish(quality=None)

    shard = within(HANG, write_shard)
    assert proxy.faulted("500") == 2
    assert len(storage.read_bytes(f"{s3}/shard/{IMAGES}")) == shard.image_bytes
    assert pq.read_table(io.BytesIO(storage.read_bytes(f"{s3}/shard/{GALLERIES}")))["gallery_id"].to_pylist() == ["g1"]


def test_a_500_on_a_checkpoint_upload_is_retried(s3, proxy):
    location = f"{s3}/checkpoints/last.pt"
    checkpoint = {"model": {"w": torch.arange(50_000, dtype=torch.float32)}, "epoch": 3}
    proxy.fail("PUT", "checkpoints/last.pt", "500")
    within(HANG, storage.save_torch, location, checkpoint)
    assert proxy.faulted("500") == 1
    loaded = storage.load_torch(location)
    assert loaded["epoch"] == 3 and torch.equal(loaded["model"]["w"], checkpoint["model"]["w"])


def test_slowdown_twice_on_a_download_is_retried(s3, proxy):
    location = f"{s3}/shard/images.bin"
    storage.write_bytes(location, data := blob(200_000))
    proxy.fail("GET", "shard/images.bin", "503", times=2)
    assert within(HANG, storage.read_bytes, location) == data
    assert proxy.faulted("503") == 2


def test_slowdown_on_a_small_objects_download_is_retried(s3, proxy):
    """An object smaller than S3's error document (the SDK, left alone, gives up on the first 503)."""
    location = f"{s3}/checkpoints/config.json"
    storage.write_bytes(location, b'{"epoch": 3}')
    proxy.fail("GET", "checkpoints/config.json", "503", times=2)
    assert within(HANG, storage.read_bytes, location) == b'{"epoch": 3}'
    assert proxy.faulted("503") == 2


@pytest.mark.parametrize("direction", ["upload", "download"])
def test_a_reset_connection_is_retried(s3, proxy, direction):
    location = f"{s3}/embeddings.parquet"
    data = blob(100_000)
    if direction == "download":
        storage.write_bytes(location, data)
    proxy.fail("PUT" if direction == "upload" else "GET", "embeddings.parquet", "reset")
    if direction == "upload":
        within(HANG, storage.write_bytes, location, data)
    assert within(HANG, storage.read_bytes, location) == data
    assert proxy.faulted("reset") == 1


@pytest.mark.parametrize("fault", ["stall", "stall-body", "cut-body"])
def test_a_stalled_or_cut_download_is_retried_never_read_half(s3, proxy, fault):
    """Silence (from the start, or after half the body) for longer than the request timeout, or half the body
    then a reset: the try is abandoned and the next one reads the whole object."""
    location = f"{s3}/checkpoints/best.pt"
    storage.write_bytes(location, data := blob(200_000))
    proxy.fail("GET", "checkpoints/best.pt", fault)
    assert within(HANG, storage.read_bytes, location) == data
    assert proxy.faulted(fault) == 1


# ---------------------------------------------------------------- S3: what the retries cannot mend

@pytest.mark.parametrize("method, fault", [("GET", "500"), ("GET", "stall"), ("PUT", "503"), ("HEAD", "reset")])
def test_a_fault_on_every_try_is_an_error_naming_the_object(s3, proxy, method, fault):
    location = f"{s3}/checkpoints/best.pt"
    storage.write_bytes(location, b"checkpoint")
    proxy.fail(method, "checkpoints/best.pt", fault, times=100)
    action = {"GET": lambda: storage.read_bytes(location), "HEAD": lambda: storage.exists(location),
              "PUT": lambda: storage.write_bytes(location, b"another")}[method]
    with pytest.raises(StorageError) as error:
        within(HANG, action)
    message = str(error.value)
    assert message.startswith(f"could not {'write' if method == 'PUT' else 'read' if method == 'GET' else 'look up'} "
                              f"{location} (gave up after ")
    assert f"{ATTEMPTS} tries per request" in message and error.value.location == location
    assert proxy.faulted(fault) in (ATTEMPTS, ATTEMPTS + 1)  # every try, and no more (curl itself re-sends a
    # request once when the kept-alive connection it reused turns out reset)
    proxy.clear()
    assert storage.read_bytes(location) == b"checkpoint"  # a failed upload left the object as it was


def test_an_upload_cut_midway_leaves_the_object_whole_or_absent(s3, proxy):
    """Half a part reaches the server, then the connection breaks: retried, the object is whole; never
    completed, the key holds its older version, or nothing."""
    location, fresh = f"{s3}/shard/images.bin", f"{s3}/shard/features.bin"
    proxy.fail("PUT", "shard/images.bin", "cut-upload")
    within(HANG, storage.write_bytes, location, first := blob(400_000, seed=1))
    assert storage.read_bytes(location) == first
    proxy.fail("PUT", "shard/", "cut-upload", times=100)
    for key in (location, fresh):
        with pytest.raises(StorageError, match=f"could not write {key} "):
            within(HANG, storage.write_bytes, key, blob(400_000, seed=2))
    proxy.clear()
    assert storage.read_bytes(location) == first and not storage.exists(fresh)


def embeddings_file(rows: int = 2700) -> pa.Table:
    """An embeddings table of 2700 x 1024 float32 (11 MB, incompressible): two parts of pyarrow's multipart upload
    (10 MiB each)."""
    vectors = np.random.default_rng(0).standard_normal((rows, 1024), dtype=np.float32)
    return pa.table({"gallery_id": [f"g{i}" for i in range(rows)],
                     "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), 1024)})


def test_a_fault_in_a_multipart_embeddings_upload(s3, proxy):
    table = embeddings_file()
    location, lost = f"{s3}/run/embeddings.parquet", f"{s3}/run/lost.parquet"
    proxy.fail("PUT", "embeddings.parquet?partNumber=2", "500")
    within(HANG, write_embeddings, location, table)
    assert proxy.faulted("500") == 1 and any("partNumber=2" in path for _, _, path, done in proxy.log if done == "passed")
    assert pq.read_table(io.BytesIO(storage.read_bytes(location))).equals(table)
    proxy.fail("PUT", "lost.parquet?partNumber=2", "cut-upload", times=100)
    with pytest.raises(StorageError, match=f"could not write {lost} "):
        within(HANG, write_embeddings, lost, table)
    proxy.clear()
    assert not storage.exists(lost)  # part 1 was uploaded, but the upload was never completed


# ---------------------------------------------------------------- a full local disk

class FullDisk:
    """`open` for a module under test whose files take at most `free` more bytes, then fail as a full disk
    does (ENOSPC, the bytes that fitted written); `free = None` is space freed."""

    def __init__(self, free: int):
        self.free = free

    def open(self, path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        return self.File(f, self) if "w" in mode or "a" in mode else f

    class File:
        def __init__(self, f, disk):
            self.f, self.disk = f, disk

        def write(self, data) -> int:
            if self.disk.free is not None and len(data) > self.disk.free:
                self.f.write(data[:self.disk.free])
                self.disk.free = 0
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            if self.disk.free is not None:
                self.disk.free -= len(data)
            return self.f.write(data)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def __getattr__(self, name):
            return getattr(self.f, name)


@pytest.mark.parametrize("write", ["write_bytes", "save_torch"])
def test_a_full_disk_while_checkpointing(tmp_path, monkeypatch, write):
    folder = tmp_path / "checkpoints"
    location = str(folder / "last.pt")
    old, new = {"epoch": 1, "w": torch.zeros(1000)}, {"epoch": 2, "w": torch.ones(100_000)}
    save = storage.save_torch if write == "save_torch" else lambda loc, obj: storage.write_bytes(loc, _saved(obj))
    save(location, old)
    disk = FullDisk(free=50_000)
    monkeypatch.setattr(storage, "open", disk.open, raising=False)
    with pytest.raises(StorageError) as error:
        within(HANG, save, location, new)
    message = str(error.value)
    assert message.startswith(f"could not write {location}: No space left on device; free space on the disk that "
                              f"holds {folder}, or choose another --store")
    assert error.value.errno == errno.ENOSPC and error.value.location == location
    assert os.listdir(folder) == ["last.pt"]  # no temporary file left
    assert storage.load_torch(location)["epoch"] == 1  # the older checkpoint, intact
    disk.free = None  # space freed: the same write goes through
    save(location, new)
    assert storage.load_torch(location)["epoch"] == 2 and os.listdir(folder) == ["last.pt"]


def _saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def test_a_full_disk_while_writing_a_shard(tmp_path, monkeypatch):
    location = tmp_path / "shards" / "0"
    disk = FullDisk(free=2_000)
    monkeypatch.setattr(shards, "open", disk.open, raising=False)
    rng = np.random.default_rng(0)
    galleries = [rng.integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8) for _ in range(4)]

    def write_shard():
        with ShardWriter(str(location), SIZE, "png") as writer:
            for k, pixels in enumerate(galleries):
                writer.add(f"g{k}", "train", pixels)
            return writer.finish(quality=None)

    with pytest.raises(StorageError, match=rf"could not write {location}/\.staging-\w+: No space left on device; "
                                           rf"free space on the disk that holds {location},"):
        within(HANG, write_shard)
    assert os.listdir(location) == []  # nothing published, no staging folder left
    disk.free = None
    shard = write_shard()  # the step run again, once space is freed
    assert sorted(os.listdir(location)) == sorted([GALLERIES, IMAGES]) and shard.images == 12


def test_a_full_disk_while_publishing(tmp_path, monkeypatch):
    """A rename that needs a new directory block can meet a full disk too: the staged file stays, to publish again."""
    staged, location = tmp_path / "staged.bin", tmp_path / "shard" / "images.bin"
    staged.write_bytes(b"images")
    location.parent.mkdir()
    location.write_bytes(b"older")
    replace = os.replace

    def full(src, dst):
        if str(dst) == str(location):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        replace(src, dst)

    monkeypatch.setattr(storage.os, "replace", full)
    with pytest.raises(StorageError, match=f"could not write {location}: No space left on device"):
        storage.publish(str(staged), str(location))
    assert location.read_bytes() == b"older" and staged.read_bytes() == b"images"
    monkeypatch.setattr(storage.os, "replace", replace)
    storage.publish(str(staged), str(location))
    assert location.read_bytes() == b"images" and not staged.exists()


FILE_SIZE_LIMIT = """
import json, os, resource, signal, sys
import gallery.storage as storage

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead of killing
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
location, outcome = sys.argv[1], {}
storage.write_bytes(location, b"o" * 1000)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))
try:
    storage.write_bytes(location, b"n" * (2 << 20))
except storage.StorageError as e:
    outcome["error"], outcome["errno"] = str(e), e.errno
outcome["after_error"] = sorted(os.listdir(os.path.dirname(location))), os.path.getsize(location)
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # space freed
storage.write_bytes(location, b"n" * (2 << 20))
outcome["after_freeing"] = os.path.getsize(location)
print(json.dumps(outcome))
"""


def test_a_file_size_limit_met_for_real(tmp_path):
    """The kernel's own refusal (RLIMIT_FSIZE: EFBIG, as a quota or a full disk refuses), in a child process."""
    location = tmp_path / "store" / "embeddings.parquet"
    done = subprocess.run([sys.executable, "-c", FILE_SIZE_LIMIT, str(location)], capture_output=True, text=True,
                          timeout=HANG)
    assert done.returncode == 0, done.stderr[-2000:]
    outcome = json.loads(done.stdout)
    assert outcome["error"].startswith(f"could not write {location}: File too large; free space on the disk")
    assert outcome["errno"] == errno.EFBIG
    assert outcome["after_error"] == [["embeddings.parquet"], 1000]  # no temp file; the older file intact
    assert outcome["after_freeing"] == 2 << 20


# ---------------------------------------------------------------- gs://

def test_the_gcs_client_retries_for_the_stated_time(monkeypatch):
    import pyarrow.fs as pafs

    built = []
    monkeypatch.setattr(pafs, "GcsFileSystem", lambda **options: built.append(options) or "gcs")
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    assert storage.filesystem("gs://bucket/run/embeddings.parquet") == ("gcs", "bucket/run/embeddings.parquet")
    assert built == [{"retry_time_limit": timedelta(seconds=storage.GCS_RETRY_LIMIT)}]


@pytest.fixture
def silent_gcs(monkeypatch):
    """A GCS endpoint that accepts connections and never answers, with a 1 s connect timeout for reads."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{s.getsockname()[1]}")
        monkeypatch.setattr(storage, "GCS_CONNECT_TIMEOUT", TIMEOUT)
        monkeypatch.setattr(storage, "GCS_RETRY_LIMIT", 1)
        yield


@pytest.mark.parametrize("read", ["read_bytes", "exists"])
def test_a_gs_read_from_a_silent_endpoint_is_abandoned(silent_gcs, read):
    location = "gs://bucket/run/checkpoints/best.pt"
    with pytest.raises(StorageError) as error:
        within(HANG, getattr(storage, read), location)
    assert str(error.value).startswith(f"could not {'read' if read == 'read_bytes' else 'look up'} {location} "
                                       "(gave up after 1.0 s; a read is abandoned after 1 s without an answer")
    assert str(error.value).endswith(": no answer for 1 s")
