"""Search structures saved beside an embeddings file, built once and reused until the file changes.

`<embeddings>.<name>` holds the structure (a serialized faiss index, or the float16 vectors that
two-stage search re-ranks with), and `<embeddings>.<name>.json` what it was built from: the
embeddings file's fingerprint and the build parameters. Either differing means build again. Every
byte goes through gallery.storage, so a folder and an s3:// store behave the same.
"""
from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable

import faiss
import numpy as np

import gallery.storage as storage

SAMPLED_BLOCKS, BLOCK_BYTES = 16, 16_384  # data the fingerprint hashes besides the footer


def fingerprint(embeddings_location: str) -> dict:
    """The file's size and a hash of its Parquet footer plus 16 evenly spaced 16 KB blocks of its data.

    The footer holds the schema metadata (run ids, code), row counts and every column chunk's offsets,
    sizes and min/max statistics; the blocks catch what those miss: float vectors change but barely
    compress, so a re-export with another model can keep every size and extreme. A rewrite changes the
    hash, a copy does not (unlike a modification time), and it costs 17 small reads however large the
    file (unlike hashing all of it). An edit confined to bytes no block covers would go unnoticed."""
    with storage.open_input_file(embeddings_location) as f:
        size = f.size()
        footer_length = int.from_bytes(f.read_at(4, size - 8), "little")
        data_end = size - 8 - footer_length
        digest = hashlib.sha256(f.read_at(footer_length, data_end))
        for start in np.linspace(0, max(0, data_end - BLOCK_BYTES), SAMPLED_BLOCKS).astype(int):
            digest.update(f.read_at(min(BLOCK_BYTES, data_end), int(start)))
    return {"bytes": size, "sha256_footer_and_blocks": digest.hexdigest()}


def _stamp(embeddings_location: str, params: dict) -> dict:
    return {"embeddings": fingerprint(embeddings_location), "build": params}


def _is_current(location: str, stamp: dict) -> bool:
    return (storage.exists(location) and storage.exists(f"{location}.json")
            and json.loads(storage.read_bytes(f"{location}.json")) == stamp)


def _save(location: str, data, stamp: dict, log) -> None:
    storage.write_bytes(location, data)
    storage.write_bytes(f"{location}.json", json.dumps(stamp, indent=1).encode())  # last: a half-written pair rebuilds
    log(f"saved {location}")


def saved_index(embeddings_location: str, name: str, params: dict, build: Callable, binary: bool, log=print):
    """A faiss index (binary or float) saved beside the embeddings; `build()` makes it when missing or stale."""
    location, stamp = f"{embeddings_location}.{name}.faiss", _stamp(embeddings_location, params)
    if _is_current(location, stamp):
        data = np.frombuffer(storage.read_bytes(location), np.uint8)
        return (faiss.deserialize_index_binary if binary else faiss.deserialize_index)(data)
    log(f"building {location} (once for these embeddings)")
    index = build()
    _save(location, (faiss.serialize_index_binary if binary else faiss.serialize_index)(index), stamp, log)
    return index


def saved_vectors(embeddings_location: str, name: str, params: dict, build: Callable[[], np.ndarray], log=print):
    """An array saved beside the embeddings as .npy; `build()` makes it when missing or stale. Memory-mapped
    from a local folder (the OS pages in the rows a query reads), read into memory from an object store."""
    location, stamp = f"{embeddings_location}.{name}.npy", _stamp(embeddings_location, params)
    if not _is_current(location, stamp):
        log(f"building {location} (once for these embeddings)")
        buffer = io.BytesIO()
        np.save(buffer, build())
        _save(location, buffer.getbuffer(), stamp, log)
    if storage.is_uri(location):
        return np.load(io.BytesIO(storage.read_bytes(location)))
    return np.load(location.removeprefix("file://"), mmap_mode="r")
