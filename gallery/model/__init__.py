"""Model: the gallery encoder and its heads (docs/design.md §5), as small composable nn.Modules.

Owns the backbone registry (built-ins, torchvision:<name> and timm:<name>, each cut into a frozen
trunk + trainable top, weights as local files), pooling over packed galleries (symmetric
reductions and attention poolings with per-photo weights), the task heads, the gallery model, masked
per-task losses and the loss weightings (one class each behind one interface). May import gallery.data (tasks, label statistics)
and the base modules; never training, evaluation, retrieval or Metaflow.
"""
