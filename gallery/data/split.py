"""Deterministic train/valid/test split: the same on every machine, Python version and run.

`train` fits, `valid` selects (best epoch, early stopping, probe regularisation), `test` reports: no
reported number is selected on the split it is reported on.
"""
from __future__ import annotations

import hashlib
from typing import Annotated

import numpy as np
import pandas as pd
from pydantic import Field, Strict

VALID_FRACTION = 0.1  # 8:1:1 train:valid:test unless the settings say otherwise (data.split)
TEST_FRACTION = 0.1
Share = Annotated[float, Strict(), Field(gt=0, lt=0.5)]  # a setting's share for valid or test: train keeps the rest


def hash_unit(gallery_id: str) -> float:
    """A stable uniform number in [0, 1) for an id (SHA-1; Python's hash() is salted per process)."""
    digest = hashlib.sha1(gallery_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def hash_split(gallery_ids, valid_fraction: float = VALID_FRACTION, test_fraction: float = TEST_FRACTION) -> np.ndarray:
    """valid below `valid_fraction`, test in the next `test_fraction`, train above."""
    def split(u: float) -> str:
        return "valid" if u < valid_fraction else "test" if u < valid_fraction + test_fraction else "train"

    return np.array([split(hash_unit(str(g))) for g in gallery_ids], dtype=object)


def assign_splits(manifest: pd.DataFrame, valid_fraction: float = VALID_FRACTION,
                  test_fraction: float = TEST_FRACTION) -> np.ndarray:
    """The manifest's `split` where given, else the hashed split (8:1:1 by default)."""
    split = hash_split(manifest["gallery_id"], valid_fraction, test_fraction)
    if "split" in manifest.columns:
        given = manifest["split"]
        split = np.where(given.notna().to_numpy(), given.astype(object).to_numpy(), split)
    return split
