"""Training: how a model is fitted and where it runs (see docs/design.md, "Training engine").

Owns the one training loop (the engine: early stopping on valid, per-epoch checkpoints, exact resume,
used by every model the pipeline trains), the group of single-task models trained as one, loading a trained
model from its checkpoints, the frozen-trunk feature cache, device choice and mixed precision,
May import gallery.model, gallery.data, gallery.config
and the base modules; never evaluation, retrieval or Metaflow.
"""
