"""What an evaluation compares: an embedding *arm*, as fields (docs/design.md §7). One type for the transfer
suite, Table 2, the scorecard, the study, retrieval against relevance, the report and metrics.json.

An arm is of a kind, and the fields that say which: a trained model's identity (gallery.model.identity) for
the arms a run trains, a backbone for a pretrained baseline, a metric task for a specialised model. Its label
in tables is made from the fields in one place (`arm_label`), and never read back into an arm.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from gallery.model.identity import ModelIdentity

MTL = "mtl"                          # an MTL model's embeddings (with metric tasks: the unified model)
ATTRIBUTES_ONLY = "attributes_only"  # the reference weighting's model of the attribute tasks alone (retrieval)
SPECIALISED = "specialised"          # one metric task alone, through the same engine (retrieval)
IMAGENET = "imagenet"                # the preset backbone's pretrained features, mean-pooled
BASELINE = "baseline"                # another pretrained backbone's (evaluation.baselines), mean-pooled
END_TO_END = "end_to_end"            # the architecture trained on the held-out task alone (the 2-layer head's)
KINDS = (MTL, ATTRIBUTES_ONLY, SPECIALISED, IMAGENET, BASELINE, END_TO_END)
TRAINED = (MTL, ATTRIBUTES_ONLY, SPECIALISED)  # the kinds a run trains: each names its model


@dataclass(frozen=True)
class EmbeddingArm:
    """One arm: its kind (KINDS) and what says which of that kind."""

    kind: str
    model: ModelIdentity | None = None  # the trained kinds: the model whose embeddings these are
    reference: bool = False             # mtl: the run's reference model (train.reference_weighting with
    #                                     model.pooling: the exported one, and its repetitions with other seeds)
    backbone: str | None = None         # baseline: the pretrained backbone (imagenet: the preset's own)
    task: str | None = None             # specialised: the metric task it learned alone

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"arm kind {self.kind!r}; known: {', '.join(KINDS)}")
        if (self.model is not None) != (self.kind in TRAINED):
            raise ValueError(f"a {self.kind} arm {'names' if self.kind in TRAINED else 'has no'} trained model")
        if (self.backbone is not None) != (self.kind == BASELINE) or (self.task is not None) != (self.kind == SPECIALISED):
            raise ValueError(f"a {self.kind} arm with backbone {self.backbone!r} and task {self.task!r}")
        if self.reference and self.kind != MTL:
            raise ValueError("only an MTL arm is the reference model's")

    @property
    def label(self) -> str:
        return arm_label(self)

    def with_seed(self, seed: int) -> "EmbeddingArm":
        """The same arm of the repetition with `seed` (arms that train nothing have no seed)."""
        return self if self.model is None else replace(self, model=self.model.with_seed(seed))

    def as_dict(self) -> dict:
        return {"kind": self.kind, "model": None if self.model is None else self.model.as_dict(),
                "reference": self.reference, "backbone": self.backbone, "task": self.task}

    @staticmethod
    def from_dict(d: dict) -> "EmbeddingArm":
        """As metrics.json holds it (`as_dict`)."""
        model = d.get("model")
        return EmbeddingArm(d["kind"], None if model is None else ModelIdentity.from_dict(model),
                            bool(d.get("reference", False)), d.get("backbone"), d.get("task"))


IMAGENET_ARM = EmbeddingArm(IMAGENET)
END_TO_END_ARM = EmbeddingArm(END_TO_END)


def mtl_arm(model: ModelIdentity, reference: ModelIdentity) -> EmbeddingArm:
    """The arm of a trained MTL model; `reference`: the run's reference model (of any of its seeds)."""
    return EmbeddingArm(MTL, model, model.with_seed(reference.seed) == reference)


def baseline_arm(backbone: str) -> EmbeddingArm:
    return EmbeddingArm(BASELINE, backbone=backbone)


def arm_label(arm: EmbeddingArm) -> str:
    """An arm as a reader reads it: the one place labels are made (never parsed back)."""
    if arm.kind == MTL:
        return "MTL embeddings" if arm.reference else f"MTL embeddings ({arm.model.label()})"
    if arm.kind == ATTRIBUTES_ONLY:
        return "attribute tasks only"
    if arm.kind == SPECIALISED:
        return f"`{arm.task}` alone"
    if arm.kind == BASELINE:
        return f"{arm.backbone} ImageNet features"
    return {IMAGENET: "ImageNet transfer", END_TO_END: "End-to-end model"}[arm.kind]


def arm_columns(arm: EmbeddingArm | None, prefix: str = "arm") -> dict:
    """An arm in a table's row: its label, and its fields beside it (so a table is filtered by fields, not by label)."""
    if arm is None:
        return {prefix: None}
    model = arm.model
    return {prefix: arm_label(arm), f"{prefix}_kind": arm.kind, f"{prefix}_reference": arm.reference,
            f"{prefix}_weighting": model.weighting if model else None, f"{prefix}_pooling": model.pooling if model else None,
            f"{prefix}_seed": model.seed if model else None,
            f"{prefix}_backbone": model.backbone if model else arm.backbone, f"{prefix}_task": arm.task}


def reference_arm(arms) -> EmbeddingArm | None:
    """The reference model's MTL arm among `arms`, if there is one."""
    return next((a for a in arms if a.kind == MTL and a.reference), None)


def paper_arms(arms) -> list[EmbeddingArm]:
    """Table 2's arms among `arms`, in its column order: the reference MTL arm, ImageNet, end-to-end."""
    found = [reference_arm(arms), IMAGENET_ARM if IMAGENET_ARM in arms else None,
             END_TO_END_ARM if END_TO_END_ARM in arms else None]
    return [a for a in found if a is not None]
