"""Which trained model a thing belongs to, as fields: a model's identity is never a name to split.

Names (folders, table labels, file names) are made from an identity in one place (`folder`, `label`),
and never read back into one.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

PAPER_POOLING = "mean"  # the paper's pooling and every preset's: a label leaves it unsaid


@dataclass(frozen=True, order=True)
class ModelIdentity:
    """One trained gallery model: the loss weighting and pooling it trained with, its seed and backbone."""

    weighting: str
    pooling: str
    seed: int
    backbone: str

    def label(self) -> str:
        """As tables show it: the weighting, `+<pooling>` where the pooling is not the paper's mean."""
        return self.weighting if self.pooling == PAPER_POOLING else f"{self.weighting}+{self.pooling}"

    def folder(self, first_seed: int) -> str:
        """Its checkpoints folder's name: the label, `-seed<k>` for a repetition with another seed than the
        run's first (`first_seed`, train.seed: what the embed flow and `gallery search` load)."""
        return self.label() if self.seed == first_seed else f"{self.label()}-seed{self.seed}"

    def with_seed(self, seed: int) -> "ModelIdentity":
        """The same configuration trained with another seed."""
        return replace(self, seed=seed)

    def as_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "ModelIdentity":
        return ModelIdentity(str(d["weighting"]), str(d["pooling"]), int(d["seed"]), str(d["backbone"]))
