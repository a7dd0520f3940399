"""Training: how a model is fitted and where it runs (docs/design.md §6).

Owns the training loop (early stopping, per-epoch checkpoints, exact resume), loading a trained
model from its checkpoints, the frozen-trunk feature cache, device choice and mixed precision,
and the fault injection that proves recovery. May import gallery.model, gallery.data, gallery.config
and the base modules; never evaluation, retrieval or Metaflow.
"""
