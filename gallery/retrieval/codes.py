"""Binary codes of gallery embeddings (Pinterest's binarized embeddings, docs/design.md §10).

A code turns an embedding into bits: L2-normalise; for ITQ, subtract the train mean, re-normalise and
project (PCA, then the ITQ rotation, both fitted by faiss.ITQTransform); then bit = value > threshold,
the train split's median of that value. It is fitted once on the train split at export and saved
with the run, and every binarization (the export, the embed flow, search queries) loads it, so the
same gallery always gets the same bits. Codes by name:

- ``itq<bits>``: PCA to <bits> dimensions, ITQ rotation, median thresholds (itq256: 32 bytes).
- ``median``: one bit per dimension, above its median.
- ``sign``: bit = value > 0, nothing fitted (the export's bits before learned codes). On a mean of
  ReLU6 outputs every value is >= 0, so it only says whether a channel fired.

The projection runs in float64: faiss's float32 matrix product rounds differently for one query than
for a batch, and flipped a bit in 123 of 2,000 default-run galleries between the two.
Bits are packed 8 per byte, most significant first (numpy.packbits), as the export always packed them.
"""
from __future__ import annotations

import io
import re
import zipfile
from dataclasses import dataclass, replace

import faiss
import numpy as np

import gallery.storage as storage
from gallery.data.inputs import InputProblem, MissingInput, read_bounded
from gallery.errors import UserError, excerpt
from gallery.retrieval.index import BLOCK_ROWS, normalize, one_faiss_thread

CODE_FILE = "binary_code.npz"


class CodeError(UserError):
    """A binary code that cannot be fitted or loaded as asked; the message names the code and the fix."""


@dataclass(frozen=True)
class BinaryCode:
    name: str
    thresholds: np.ndarray                # (bits,): bit = projected value > threshold
    center: np.ndarray | None = None      # (dim,): subtracted from the unit embedding, then re-normalised
    projection: np.ndarray | None = None  # (bits, dim): PCA then ITQ rotation
    location: str | None = None           # where the fitted code is saved (None: sign bits, nothing to load)

    @property
    def bits(self) -> int:
        return len(self.thresholds)

    @property
    def bytes_per_gallery(self) -> int:
        return -(-self.bits // 8)

    def project(self, embeddings: np.ndarray) -> np.ndarray:
        """(n, bits) float64 values that the thresholds cut."""
        x = normalize(np.atleast_2d(embeddings), np.float64)
        if self.center is not None:
            x = normalize(x - self.center, np.float64)
        return x if self.projection is None else x @ self.projection.T

    def encode(self, embeddings: np.ndarray) -> np.ndarray:
        """(n, dim) embeddings -> (n, bytes_per_gallery) uint8 packed bits, the same for a row alone or in a batch."""
        embeddings = np.atleast_2d(embeddings)
        out = np.empty((len(embeddings), self.bytes_per_gallery), np.uint8)
        for start in range(0, len(embeddings), BLOCK_ROWS):
            block = embeddings[start:start + BLOCK_ROWS]
            out[start:start + len(block)] = np.packbits(self.project(block) > self.thresholds, axis=1)
        return out

    def metadata(self) -> dict:
        """What an embeddings file records about the code that made its bits."""
        return {"code": self.name, "code_bits": self.bits} | ({"code_location": self.location} if self.location else {})


def sign_code(dim: int) -> BinaryCode:
    return BinaryCode("sign", np.zeros(dim))


def code_bits(name: str, dim: int) -> int:
    """Bits of the code `name` for `dim`-d embeddings; a clear error for a name that is not a code."""
    if name in ("sign", "median"):
        return dim
    match = re.fullmatch(r"itq(\d+)", name)
    if match and 0 < int(match[1]) <= dim:
        return int(match[1])
    raise CodeError(f"binary code {name!r} (setting retrieval.code): use 'itq<bits>' with 1 to {dim} bits "
                    "(e.g. 'itq256': ITQ rotation, 32 bytes per gallery), 'median' (one bit per dimension) or 'sign'")


def code_that_fits(name: str, train_galleries: int) -> tuple[str, str | None]:
    """The code to fit on `train_galleries` train embeddings when `name` is asked for, and why it differs:
    an itq code fits its PCA on at least as many galleries as it has bits, so a small catalogue gets the
    largest itq code (whole bytes) it can fit, or 'median' (one bit per dimension) below 8 galleries."""
    match = re.fullmatch(r"itq(\d+)", name)
    if not match or train_galleries >= int(match[1]):
        return name, None
    smaller = f"itq{train_galleries // 8 * 8}" if train_galleries >= 8 else "median"
    return smaller, (f"binary code {name!r} (retrieval.code) needs at least {match[1]} train galleries to fit; this "
                     f"catalogue has {train_galleries}, so the run fits {smaller!r} instead")


def fit_code(train_embeddings: np.ndarray, name: str) -> BinaryCode:
    """The code `name` fitted on the train split's embeddings; save it (save_code) before writing bits with it."""
    train = np.asarray(train_embeddings, np.float32)
    bits = code_bits(name, train.shape[1])
    if name == "sign":
        return sign_code(bits)
    if name.startswith("itq") and len(train) < bits:
        raise CodeError(f"binary code {name!r} needs at least {bits} train galleries to fit its PCA, this catalogue "
                        f"has {len(train)}: set retrieval.code to an itq code of at most {len(train)} bits, or 'median'")
    if name == "median":
        return BinaryCode(name, _midpoints(normalize(train, np.float64)))
    itq = faiss.ITQTransform(train.shape[1], bits, True)
    with one_faiss_thread():
        itq.train(normalize(train))
    unthresholded = BinaryCode(name, np.zeros(bits), faiss.vector_to_array(itq.mean).astype(np.float64),
                               faiss.vector_to_array(itq.pca_then_itq.A).reshape(bits, -1).astype(np.float64))
    return replace(unthresholded, thresholds=_midpoints(unthresholded.project(train)))


def _midpoints(values: np.ndarray) -> np.ndarray:
    """Per column, halfway between the two middle train values: a median that no train value sits on, so a
    last-digit rounding difference cannot flip a bit (np.median of an odd count is a train value itself)."""
    ordered = np.sort(values, axis=0)
    middle = len(ordered) // 2
    return (ordered[middle - 1] + ordered[middle]) / 2


def code_location(embeddings_location: str) -> str:
    """Where the export saves the code it fitted: beside the run's embeddings."""
    return storage.join(storage.parent(embeddings_location), CODE_FILE)


def save_code(code: BinaryCode, location: str) -> BinaryCode:
    """Write the fitted code (numpy .npz: name, thresholds, center, projection); returns it with its location."""
    arrays = {"name": np.array(code.name), "thresholds": code.thresholds, "center": code.center,
              "projection": code.projection}
    buffer = io.BytesIO()
    np.savez(buffer, **{k: v for k, v in arrays.items() if v is not None})
    storage.write_bytes(location, buffer.getvalue())
    return replace(code, location=location)


def load_code(location: str) -> BinaryCode:
    """A code saved by save_code (a folder path or an s3:// URI)."""
    try:
        data = read_bounded(location, "embeddings")
    except MissingInput:
        raise CodeError(f"binary code {location} does not exist: the export writes it beside the training run's "
                        f"embeddings ({CODE_FILE}); keep it with the embeddings file that names it, or export again") from None
    except InputProblem as e:
        raise CodeError(f"binary code {e}") from None
    return parse_code(data, location)


def parse_code(data: bytes, location: str) -> BinaryCode:
    """A code from the bytes save_code wrote (`location`: where they were read, for messages)."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as f:
            return BinaryCode(str(f["name"]), f["thresholds"], f.get("center"), f.get("projection"), location)
    except (ValueError, OSError, KeyError, zipfile.BadZipFile) as e:
        raise CodeError(f"binary code {location} is not a code saved by gallery ({excerpt(str(e), 120, quote=False)}): "
                        "export again, or point the embeddings file at the right binary_code.npz") from None


def code_of(metadata: dict) -> BinaryCode:
    """The code that made an embeddings file's bits, from its schema metadata (read_embeddings_metadata):
    the fitted code it names, or sign bits when it names none (ImageNet-transfer files, older exports)."""
    if "code_location" in metadata:
        return load_code(metadata["code_location"])
    return sign_code(int(metadata["dimension"]))
