"""Deterministic train/valid split: the same on every machine, Python version and run."""
from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

VALID_FRACTION = 0.1  # the paper's 9:1 train:valid split


def hash_unit(gallery_id: str) -> float:
    """A stable uniform number in [0, 1) for an id (SHA-1; Python's hash() is salted per process)."""
    digest = hashlib.sha1(gallery_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def hash_split(gallery_ids, valid_fraction: float = VALID_FRACTION) -> np.ndarray:
    return np.array(["valid" if hash_unit(str(g)) < valid_fraction else "train" for g in gallery_ids], dtype=object)


def assign_splits(manifest: pd.DataFrame, valid_fraction: float = VALID_FRACTION) -> np.ndarray:
    """The manifest's `split` where given, else the hashed 9:1 split."""
    split = hash_split(manifest["gallery_id"], valid_fraction)
    if "split" in manifest.columns:
        given = manifest["split"]
        split = np.where(given.notna().to_numpy(), given.astype(object).to_numpy(), split)
    return split
