"""Deterministic train/valid/test split: the same on every machine, Python version and run.

`train` fits, `valid` selects (best epoch, early stopping, probe regularisation), `test` reports: no
reported number is selected on the split it is reported on.
"""
from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Annotated

from pydantic import Field, Strict

if TYPE_CHECKING:  # numpy and pandas load where a split is computed: the settings import this module
    import numpy as np
    import pandas as pd

VALID_FRACTION = 0.1  # 8:1:1 train:valid:test unless the settings say otherwise (data.split)
TEST_FRACTION = 0.1
Share = Annotated[float, Strict(), Field(gt=0, lt=0.5)]  # a setting's share for valid or test: train keeps the rest


def hash_unit(gallery_id: str) -> float:
    """A stable uniform number in [0, 1) for an id (SHA-1; Python's hash() is salted per process)."""
    digest = hashlib.sha1(gallery_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def hash_split(gallery_ids, valid_fraction: float = VALID_FRACTION, test_fraction: float = TEST_FRACTION) -> np.ndarray:
    """valid below `valid_fraction`, test in the next `test_fraction`, train above."""
    import numpy as np

    def split(u: float) -> str:
        return "valid" if u < valid_fraction else "test" if u < valid_fraction + test_fraction else "train"

    return np.array([split(hash_unit(str(g))) for g in gallery_ids], dtype=object)


def assign_splits(manifest: pd.DataFrame, valid_fraction: float = VALID_FRACTION,
                  test_fraction: float = TEST_FRACTION) -> np.ndarray:
    """The manifest's `split` where given, else the hashed split (8:1:1 by default)."""
    import numpy as np

    split = hash_split(manifest["gallery_id"], valid_fraction, test_fraction)
    if "split" in manifest.columns:
        given = manifest["split"]
        split = np.where(given.notna().to_numpy(), given.astype(object).to_numpy(), split)
    return split


def stable_sample(gallery_ids, limit: int, purpose: str) -> np.ndarray:
    """The positions of at most `limit` of `gallery_ids`, in their order: those with the lowest hash of
    `purpose` and the id, so a capped evaluation picks the same galleries on every machine and run, and a
    larger catalogue's sample holds a smaller one's (the ids they share)."""
    import numpy as np

    ids = [str(g) for g in gallery_ids]
    if len(ids) <= limit:
        return np.arange(len(ids))
    keys = np.array([hash_unit(f"{purpose}:{g}") for g in ids])
    return np.sort(np.argpartition(keys, limit - 1)[:limit])
