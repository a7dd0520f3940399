"""Files by location: a local path or a URI any pyarrow filesystem understands (s3://, gs://, ...).

The run-scoped store (shards, caches, checkpoints, embeddings) and the inputs are all read and
written through here, so the same flow runs on a laptop (local folder) and on a cluster
(object store) without a step relying on another step's local disk. Local writes are atomic
(temp file + rename); object-store PUTs are atomic by nature.

s3:// is reached with pyarrow's S3 filesystem, set up by `configure_s3` with the settings Metaflow's
datastore uses (gallery.runs passes them), so the store lives wherever the datastore does.
"""
from __future__ import annotations

import functools
import io
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pyarrow.fs as pafs


def _fs():
    """pyarrow.fs, loaded on first use: the flow's light steps (join_shards, end) never import pyarrow."""
    import pyarrow.fs

    return pyarrow.fs

_S3_OPTIONS: dict = {}


def configure_s3(endpoint_url: str | None = None, ca_bundle: str | bool | None = None) -> None:
    """Reach s3:// through `endpoint_url` (an S3-compatible store: MinIO, Ceph, a company gateway)
    trusting the certificates in `ca_bundle` (a file; boto3's `verify`), as Metaflow's S3 client does.
    Credentials come from the standard AWS chain, which boto3 (Metaflow) and pyarrow both read:
    the environment, ~/.aws files (AWS_PROFILE), the machine's or pod's role."""
    _S3_OPTIONS.clear()
    if endpoint_url:
        _S3_OPTIONS["endpoint_override"] = endpoint_url  # with its scheme: http://127.0.0.1:9000
    if isinstance(ca_bundle, str) and ca_bundle:
        _S3_OPTIONS["tls_ca_file_path"] = ca_bundle
    _s3_filesystem.cache_clear()


@functools.lru_cache(maxsize=None)
def _s3_filesystem(bucket: str, timeout: float | None = None) -> pafs.S3FileSystem:
    options = dict(_S3_OPTIONS)
    if "endpoint_override" not in options:
        options["region"] = _fs().resolve_s3_region(bucket)  # AWS itself answers a bucket only in its region
    if timeout is not None:  # a user's input: give up on a store that does not answer, after one retry
        options |= {"connect_timeout": timeout, "request_timeout": timeout,
                    "retry_strategy": _fs().AwsStandardS3RetryStrategy(max_attempts=2)}
    return _fs().S3FileSystem(**options)


def is_uri(location: str) -> bool:
    return "://" in str(location) and not str(location).startswith("file://")


def filesystem(location: str, timeout: float | None = None) -> tuple[pafs.FileSystem, str]:
    """The filesystem of a location and the path in it; with `timeout`, an s3:// store that does not
    connect or answer within that many seconds is an error (gallery.data.inputs reads users' files so)."""
    location = str(location)
    if location.startswith("file://"):
        location = location[len("file://"):]
    if location.startswith("s3://"):
        path = location[len("s3://"):]
        return _s3_filesystem(path.split("/", 1)[0], timeout), path
    if is_uri(location):
        return _fs().FileSystem.from_uri(location)
    return _fs().LocalFileSystem(), os.path.abspath(location)


def join(base: str, *parts: str) -> str:
    base = str(base)
    if is_uri(base):
        return "/".join([base.rstrip("/")] + [p.strip("/") for p in parts])
    return str(Path(base, *parts))


def parent(location: str) -> str:
    location = str(location)
    return location.rstrip("/").rsplit("/", 1)[0] if is_uri(location) else str(Path(location).resolve().parent)


def exists(location: str) -> bool:
    fs, path = filesystem(location)
    return fs.get_file_info(path).type != _fs().FileType.NotFound


def read_bytes(location: str) -> bytes:
    fs, path = filesystem(location)
    with fs.open_input_stream(path) as f:
        return f.read()


def open_input_file(location: str):
    """A random-access file (pyarrow NativeFile): read a footer or a byte range without the rest."""
    fs, path = filesystem(location)
    return fs.open_input_file(path)


def write_bytes(location: str, data: bytes) -> None:
    fs, path = filesystem(location)
    if isinstance(fs, _fs().LocalFileSystem):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    else:
        with fs.open_output_stream(path) as f:
            f.write(data)


def delete(location: str) -> None:
    """Remove one file; a file that is already gone is fine."""
    fs, path = filesystem(location)
    if fs.get_file_info(path).type != _fs().FileType.NotFound:
        fs.delete_file(path)


def staging_dir(location: str) -> str:
    """A local folder to write files destined for `location` (a folder or prefix), then `publish` them:
    inside the destination for a local store (so publishing is a rename), a temporary folder otherwise."""
    fs, path = filesystem(location)
    if isinstance(fs, _fs().LocalFileSystem):
        os.makedirs(path, exist_ok=True)
        return tempfile.mkdtemp(prefix=".staging-", dir=path)
    return tempfile.mkdtemp(prefix="gallery-staging-")


def publish(local_path: str, location: str) -> None:
    """Move a finished local file to `location`: an atomic rename locally, an upload to an object store."""
    fs, path = filesystem(location)
    if isinstance(fs, _fs().LocalFileSystem):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.replace(local_path, path)
        return
    with open(local_path, "rb") as src, fs.open_output_stream(path) as dst:
        shutil.copyfileobj(src, dst, length=8 << 20)
    os.remove(local_path)


def save_torch(location: str, obj) -> None:
    buffer = io.BytesIO()
    import torch  # here: storage is imported by a flow's light steps

    torch.save(obj, buffer)
    write_bytes(location, buffer.getvalue())


def load_torch(location: str, map_location="cpu"):
    """Load with weights_only=True: checkpoints and shards hold tensors and plain containers only."""
    import torch

    return torch.load(io.BytesIO(read_bytes(location)), map_location=map_location, weights_only=True)


def upload_dir(local_dir: str, location: str) -> None:
    """Copy a local folder to a location (an object-store prefix, or another folder)."""
    fs, path = filesystem(location)
    fs.create_dir(path, recursive=True)
    fs_module = _fs()
    fs_module.copy_files(os.path.abspath(local_dir), path, source_filesystem=fs_module.LocalFileSystem(),
                         destination_filesystem=fs)
