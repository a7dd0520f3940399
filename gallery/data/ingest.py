"""Ingestion: validated manifest + task spec -> a Catalogue with split, encoded labels and statistics."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

import gallery.storage as storage
from gallery.data.contracts import SPLITS, validate_manifest
from gallery.data.ingest_checks import catalogue_problems, load_inputs
from gallery.data.inputs import normalize, scheme_of
from gallery.data.labels import LabelStats, encode_labels, label_statistics
from gallery.data.pairs import Pairs, SkippedPair, pair_notes, read_pairs
from gallery.data.split import TEST_FRACTION, VALID_FRACTION, assign_splits
from gallery.data.tasks import Task
from gallery.errors import ContractError, Violation


@dataclass
class Catalogue:
    """Everything downstream steps need to know about the user's data, in memory.

    `frame` has one row per product: gallery_id, images (resolved locations), split, and one
    encoded label column per task, named after the task (see gallery.data.labels for the encodings; a
    pairs task's column holds the gallery's own frame row where it is an end of a pair within its split,
    the id the pair loss looks pairs up by). Metric tasks keep their ground truth whole for the retrieval
    evaluation: an identity task's group of every product (`groups`), a pairs task's pairs (`pairs`).
    """

    manifest_path: str
    spec_path: str
    tasks: list[Task]
    holdout: list[Task]
    frame: pd.DataFrame
    stats: dict[str, LabelStats]
    notes: list[str] = field(default_factory=list)
    metric: list[Task] = field(default_factory=list)
    groups: dict[str, np.ndarray] = field(default_factory=dict)   # identity task -> each row's group (None: none)
    pairs: dict[str, Pairs] = field(default_factory=dict)         # pairs task -> its pairs, as frame rows
    skipped_pairs: list[SkippedPair] = field(default_factory=list)

    @property
    def trained(self) -> list[Task]:
        """Every task a unified model learns: the attribute tasks, then the metric tasks (none in a run
        stored before metric tasks existed, whose catalogue has no `metric`)."""
        return self.tasks + getattr(self, "metric", [])


def resolve_image(ref: str, base: str) -> str:
    """A manifest image reference as an absolute path or URI (relative ones are from the manifest's folder)."""
    if scheme_of(ref):
        return normalize(ref)  # file:// decoded; remote URIs as given
    return ref if Path(ref).is_absolute() else storage.join(base, ref)


def ingest(manifest_path, tasks_path=None, valid_fraction: float = VALID_FRACTION,
           test_fraction: float = TEST_FRACTION) -> Catalogue:
    """Validate the inputs against the contract and build the Catalogue.

    Without a task spec only the manifest's own columns are checked (labels are optional when
    embedding a catalogue). Products without a `split` are hashed into valid and test at the given
    fractions. Raises ContractError listing every violation found; the user's files are only read.
    """
    manifest_path = normalize(manifest_path)
    spec, raw = load_inputs(manifest_path, tasks_path)
    violations = validate_manifest(raw, manifest_path, spec)
    if any(v.where in ("column 'gallery_id'", "column 'images'") and "missing" in v.problem for v in violations):
        raise ContractError(violations)  # nothing more can be checked without ids and images

    ids = raw["gallery_id"].astype("string").fillna("")
    split = assign_splits(raw.assign(gallery_id=ids), valid_fraction, test_fraction)
    is_train = split == "train"
    empty = [s for s in SPLITS if not (split == s).any()] if spec.tasks else []
    if empty:
        violations.append(Violation(
            manifest_path, "column 'split'", f"no product falls in the {' or '.join(empty)} split "
            f"({len(split)} products: {', '.join(f'{s} {int((split == s).sum())}' for s in SPLITS)})",
            "train fits, valid selects (best epoch) and test reports, so each needs products: give more products "
            f"(the hashed split sends about {valid_fraction:.0%} to valid and {test_fraction:.0%} to test: "
            "data.split in the settings) or a `split` column"))
    base = storage.parent(manifest_path)
    frame = pd.DataFrame({
        "gallery_id": ids.astype(str).to_numpy(dtype=object),
        "images": [[resolve_image(r, base) for r in (imgs or [])] for imgs in raw["images"]],
        "split": split,
    })
    tasks, holdout, metric, stats, notes = [], [], [], {}, []
    groups, pairs, skipped = {}, {}, []
    for group, resolved in ((spec.tasks, tasks), (spec.holdout, holdout), (spec.metric, metric)):
        for task in group:
            if task.kind == "pairs":
                try:
                    pairs[task.name], dropped = read_pairs(task, frame["gallery_id"])
                except ContractError as e:
                    violations += e.violations
                    continue
                skipped += dropped
                if not len(pairs[task.name].within(split, "train")):
                    violations.append(Violation(task.file, f"task {task.name!r} (pairs file)",
                                                "no pair joins two train galleries: nothing to train on",
                                                "give pairs between train galleries (pairs that cross splits only "
                                                "serve the retrieval evaluation)"))
                notes += pair_notes(task, pairs[task.name], dropped, split)
                frame[task.name] = paired_rows(pairs[task.name], split)
                resolved.append(task)
                continue
            if task.column not in raw.columns:
                continue  # already reported by validate_manifest
            enc = encode_labels(raw[task.column], task, is_train, frame["gallery_id"])
            violations += [Violation(manifest_path, f"column {task.column!r} (task {task.name!r})", p, f)
                           for p, f in enc.problems]
            notes += enc.notes
            resolved.append(enc.task)
            frame[task.name] = enc.values
            if task.kind == "identity":
                groups[task.name] = raw[task.column].astype("string").to_numpy(dtype=object, na_value=None)
    violations += catalogue_problems(frame, raw, [t for t in spec.tasks + spec.holdout + spec.metric
                                                  if t.kind not in ("identity", "pairs")], manifest_path)
    if violations:
        raise ContractError(violations)
    for task in tasks + holdout + metric:
        stats[task.name] = label_statistics(frame[task.name].to_numpy(), task, split)
    return Catalogue(manifest_path, str(tasks_path), tasks, holdout, frame, stats, notes, metric, groups, pairs,
                     skipped)


def paired_rows(pairs: Pairs, split: np.ndarray) -> np.ndarray:
    """A pairs task's column: each gallery's own frame row where it ends a pair within its split (what the
    pair loss looks pairs up by), NaN elsewhere (exact in float32 up to 16M galleries)."""
    within = np.zeros(len(split), bool)
    same = split[pairs.a] == split[pairs.b]
    within[pairs.a[same]] = within[pairs.b[same]] = True
    return np.where(within, np.arange(len(split)), np.nan).astype(np.float32)


def describe(cat: Catalogue) -> str:
    """Human summary printed by `gallery validate` and the ingest step."""
    n_images = cat.frame["images"].map(len).to_numpy()
    splits = cat.frame["split"].value_counts()
    lines = [
        f"manifest: {cat.manifest_path}",
        f"tasks:    {cat.spec_path} ({len(cat.tasks)} MTL, {len(cat.holdout)} holdout"
        + (f", {len(cat.metric)} metric" if cat.metric else "") + ")",
        f"galleries: {len(cat.frame)} ({', '.join(f'{s} {n}' for s, n in splits.items())})",
        f"images:    {int(n_images.sum())}; per gallery min {n_images.min()} / median {np.median(n_images):g} "
        f"/ max {n_images.max()}",
        "",
        f"{'task':<28} {'kind':<10} {'role':<7} {'labelled (train/valid/test)':>27}  balance / distribution (train)",
    ]
    for role, group in (("mtl", cat.tasks), ("holdout", cat.holdout), ("metric", cat.metric)):
        for task in group:
            st = cat.stats[task.name]
            labelled = "/".join(str(st.labelled.get(s, 0)) for s in SPLITS)
            if task.kind == "identity":
                detail = f"{task.num_classes} groups train as classes"
            elif task.kind == "pairs":
                p, split = cat.pairs[task.name], cat.frame["split"].to_numpy()
                detail = f"{len(p)} pairs, {len(p.within(split, 'train'))} within train"
            elif task.kind == "binary":
                pos = st.class_counts[1] / max(sum(st.class_counts), 1)
                detail = f"positive {pos:.1%}, minority {st.minority_fraction:.1%}"
            elif task.kind == "multiclass":
                counts = np.array(st.class_counts)
                detail = f"{len(counts)} classes, largest {counts.max() / max(counts.sum(), 1):.1%}"
            else:
                detail = f"mean {st.mean:.4g}, variance {st.variance:.4g}" if st.variance is not None else "n/a"
            lines.append(f"{task.name:<28} {task.kind:<10} {role:<7} {labelled:>27}  {detail}")
    lines += [f"note: {n}" for n in cat.notes]
    return "\n".join(lines)

