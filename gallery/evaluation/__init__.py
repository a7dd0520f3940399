"""Evaluation: does the embedding transfer, and how does MTL compare (docs/design.md §7)?

Owns the held-out task (Table 2), task-optimal models and the per-task comparison (Figures 5
and 6), neighbour quality (binary vs float, attribute agreement), the 2-D projection, retrieval
examples, and the report: its pieces (render) and their assembly (report). May import
gallery.retrieval, gallery.training, gallery.model, gallery.data, gallery.config and the base
modules; never the step bodies or Metaflow.
"""
