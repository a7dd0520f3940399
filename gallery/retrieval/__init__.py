"""Retrieval: using the embeddings (docs/design.md §10).

Owns the embeddings export (Parquet per data_contracts/embeddings.schema.json), the binary codes
fitted on the train split and saved with the run (codes), nearest-neighbour indexes chosen by
catalogue size (index: exact, HNSW, binary IVF, two-stage re-ranking), the indexes saved beside an
embeddings file (saved) and search by a gallery or by seed images (search). May import
gallery.training, gallery.model, gallery.data, gallery.config and the base modules; never
evaluation, the step bodies or Metaflow.
"""
