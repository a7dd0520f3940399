"""Retrieval: using the embeddings (DESIGN §10).

Owns the embeddings export (Parquet per data_contracts/embeddings.schema.json, packed sign bits),
nearest-neighbour indexes (faiss) and search by a gallery or by seed images. May import
gallery.training, gallery.model, gallery.data and the base modules; never evaluation, the step
bodies or Metaflow.
"""
