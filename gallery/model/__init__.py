"""Model: the gallery encoder and its heads (docs/design.md §5), as small composable nn.Modules.

Owns the backbone registry (frozen trunk + trainable top, weights as local files), symmetric
pooling over packed galleries, the task heads, the gallery model, masked per-task losses and the
two loss weightings (pseudo-uniform, Kendall). May import gallery.data (tasks, label statistics)
and the base modules; never training, evaluation, retrieval or Metaflow.
"""
