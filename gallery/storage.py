"""Files by location: a local path or a URI any pyarrow filesystem understands (s3://, gs://, ...).

The run-scoped store (shards, caches, checkpoints, embeddings) and the inputs are all read and
written through here, so the same flow runs on a laptop (local folder) and on a cluster
(object store) without a step relying on another step's local disk. Local writes are atomic
(temp file + rename); object-store PUTs are atomic by nature.
"""
from __future__ import annotations

import io
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import pyarrow.fs as pafs
import torch


def is_uri(location: str) -> bool:
    return "://" in str(location) and not str(location).startswith("file://")


def _resolve(location: str) -> tuple[pafs.FileSystem, str]:
    location = str(location)
    if location.startswith("file://"):
        location = location[len("file://"):]
    if is_uri(location):
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), os.path.abspath(location)


def join(base: str, *parts: str) -> str:
    base = str(base)
    if is_uri(base):
        return "/".join([base.rstrip("/")] + [p.strip("/") for p in parts])
    return str(Path(base, *parts))


def parent(location: str) -> str:
    location = str(location)
    return location.rstrip("/").rsplit("/", 1)[0] if is_uri(location) else str(Path(location).resolve().parent)


def exists(location: str) -> bool:
    fs, path = _resolve(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(location: str) -> bytes:
    fs, path = _resolve(location)
    with fs.open_input_stream(path) as f:
        return f.read()


def open_input_file(location: str):
    """A random-access file (pyarrow NativeFile): read a footer or a byte range without the rest."""
    fs, path = _resolve(location)
    return fs.open_input_file(path)


def write_bytes(location: str, data: bytes) -> None:
    fs, path = _resolve(location)
    if isinstance(fs, pafs.LocalFileSystem):
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
    fs, path = _resolve(location)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_file(path)


def staging_dir(location: str) -> str:
    """A local folder to write files destined for `location` (a folder or prefix), then `publish` them:
    inside the destination for a local store (so publishing is a rename), a temporary folder otherwise."""
    fs, path = _resolve(location)
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(path, exist_ok=True)
        return tempfile.mkdtemp(prefix=".staging-", dir=path)
    return tempfile.mkdtemp(prefix="gallery-staging-")


def publish(local_path: str, location: str) -> None:
    """Move a finished local file to `location`: an atomic rename locally, an upload to an object store."""
    fs, path = _resolve(location)
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.replace(local_path, path)
        return
    with open(local_path, "rb") as src, fs.open_output_stream(path) as dst:
        shutil.copyfileobj(src, dst, length=8 << 20)
    os.remove(local_path)


def save_torch(location: str, obj) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes(location, buffer.getvalue())


def load_torch(location: str, map_location="cpu"):
    """Load with weights_only=True: checkpoints and shards hold tensors and plain containers only."""
    return torch.load(io.BytesIO(read_bytes(location)), map_location=map_location, weights_only=True)


def upload_dir(local_dir: str, location: str) -> None:
    """Copy a local folder to a location (an object-store prefix, or another folder)."""
    fs, path = _resolve(location)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(os.path.abspath(local_dir), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
