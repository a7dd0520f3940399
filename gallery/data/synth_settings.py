"""What the synthetic catalogue generator makes (settings `data.synth`, `gallery synth`'s options), apart from
the generator (gallery.data.synth), so the settings load without its imaging libraries."""
from __future__ import annotations

from typing import Annotated

from pydantic import ConfigDict, Field, Strict, ValidationInfo, field_validator
from pydantic.dataclasses import dataclass
from pydantic_core import PydanticCustomError

from gallery.data.split import TEST_FRACTION, VALID_FRACTION, Share

Whole = Annotated[int, Strict()]
Flag = Annotated[bool, Strict()]  # "yes" or 1 is not true/false here


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class SynthSettings:
    """What to generate; checked when made (settings `data.synth`, or `gallery synth`'s options)."""
    galleries: Annotated[Whole, Field(ge=1)] = 2500
    seed: Annotated[Whole, Field(ge=0)] = 0
    image_size: Annotated[Whole, Field(ge=8)] = 96
    min_images: Annotated[Whole, Field(ge=1)] = 4
    max_images: Annotated[Whole, Field(ge=1)] = 12
    # the manifest's `split` column: these shares of the galleries to valid and test by the usual hash
    # (gallery.data.split); a small catalogue evaluates with more power when it holds out more
    valid_share: Share = VALID_FRACTION
    test_share: Share = TEST_FRACTION
    # metric-learning ground truth (metric.py): re-listings with a property_id column, co_views.parquet, and
    # their two tasks; off, the catalogue has none of them (the rest as with them)
    metric_tasks: Flag = True
    # the share of galleries that are one of a property's 2-3 listings (the rest are listed once) ...
    relisted_share: Annotated[float, Strict(), Field(ge=0, le=0.9)] = 0.4
    # ... all in one split (each split holds that share: evaluated properties are never trained on), or
    # drawn across splits (an evaluated gallery's other listings mostly train: its labels leak through them)
    relisted_across_splits: Flag = False

    @field_validator("max_images")
    @classmethod
    def _not_below_min(cls, value: int, info: ValidationInfo) -> int:
        if value < info.data.get("min_images", 1):
            raise PydanticCustomError("below_min_images", "fewer than min_images ({min_images})",
                                      {"min_images": info.data["min_images"]})
        return value
