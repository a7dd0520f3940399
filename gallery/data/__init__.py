"""Data: what the user gives and what preprocessing makes of it.

Owns the bounded input layer every user file is read through (inputs), strict YAML/JSON
(documents), the input contracts (manifest and task spec, checked against data_contracts/, and the
ingest-time checks beyond them), label encoding and statistics, the deterministic split, ingestion
into a Catalogue, the one image decoder and its data-quality list, packed galleries, and the
synthetic catalogue (synth/).
Imports only the base modules (gallery.errors, gallery.storage, gallery.progress); no torch model,
no training, no Metaflow.
"""
