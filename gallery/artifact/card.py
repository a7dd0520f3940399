"""MODEL_CARD.md: the sections of a Hugging Face model card, written from the model's config."""
from __future__ import annotations

from gallery.training.model_config import ModelConfig
from gallery.artifact.onnx_graphs import ENCODER_FILE, POOLING_FILE

CARD_FILE = "MODEL_CARD.md"


def _tasks(config: ModelConfig) -> str:
    lines = []
    for t in config.tasks:
        what = {"multiclass": f"{len(t.classes or ()) or t.num_classes} classes", "binary": "yes/no",
                "regression": "a number", "identity": "which group (metric learning)",
                "pairs": "engaged-together pairs (metric learning)"}.get(t.kind, t.kind)
        lines.append(f"- `{t.name}` ({t.kind}: {what})" + (f": {t.description}" if t.description else ""))
    return "\n".join(lines)


def _trained_on(config: ModelConfig) -> str:
    labelled = [s.labelled.get("train", 0) for s in config.stats.values()]
    return f"Up to {max(labelled):,} train-split galleries labelled per task." if labelled else ""


def model_card(config: ModelConfig, evaluation: str | None = None) -> str:
    """The card's Markdown; `evaluation` is the run report's headline (Markdown), when there is one."""
    i, p = config.identity, config.preprocessing
    attention = config.onnx is not None and config.onnx.photo_weights
    return f"""---
library_name: gallery
tags: [image-feature-extraction, multi-task-learning, gallery-embedding]
---
# Gallery embedding model — {i.backbone}, {i.weighting} weighting, {i.pooling} pooling, seed {i.seed}

One {config.embedding_dim}-dimensional embedding per product gallery (a set of photos), learned by
multi-task learning over the product's attributes (gallery {config.gallery_version}, training run
`{config.run_id or 'unknown'}`).

## Intended use
Search and recommendation over product galleries: nearest galleries by cosine similarity, or by
Hamming distance on the binary code (`{config.code_file or 'sign bits'}`), and features for new
attribute classifiers. Not for decisions about people, and not for photos unlike the training
catalogue's without checking transfer first (see Limitations).

## Training data
{_trained_on(config)} The tasks it learned (per-gallery labels of the training catalogue, train split only):
{_tasks(config)}

Backbone `{config.model.backbone}`, pretrained weights: `{config.model.weights}`; trainable: {config.trainable};
photos at {p.image_size}x{p.image_size} px.

## Evaluation
{evaluation or "No evaluation was attached to this export: the training run's report (report.md) holds it."}

## Limitations
- The embedding carries what the training tasks needed; attributes no task asked about may be weak in it.
- Photos are resized to {p.image_size} px squares: detail smaller than that is lost.
- A retrained model's embeddings live in another space: re-embed the whole catalogue, never mix
  vectors of two models (`gallery compare` says how much the neighbours change).

## How to load
```python
import gallery
model = gallery.load_model("this/folder")          # checks every file's SHA-256
vectors = model.embed([["a.jpg", "b.jpg"], ["c.jpg"]])   # one row per gallery
bits = model.binarize(vectors)                       # packed uint8 codes
```
Without Python: `{ENCODER_FILE}` maps `photos` (uint8, N x {p.image_size} x {p.image_size} x 3, RGB, resized
{p.resize}, then encoded as {p.stored_as} at quality {p.stored_quality} and decoded, as in training) to `features`
(N x {config.embedding_dim}); `{POOLING_FILE}` maps one gallery's `features`
(P x {config.embedding_dim}) to its `embedding` (1 x {config.embedding_dim}){" and `photo_weights` (P)" if attention else ""}.
`config.json` holds everything else (tasks, preprocessing, file hashes).
"""
