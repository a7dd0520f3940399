"""Serving: `gallery serve`, an online search service over a training run's embeddings, and the explorer page.

Owns the loaded service (service: the run's embeddings, float and code indexes, model, catalogue), the
catalogue's attributes and photos as served (catalogue), the 2-D map (gallery.evaluation.projection), the limits a request must
keep and the paths a request may name (limits), the HTTP app (app: FastAPI, run by uvicorn), the
deadlines and limits of its connections (connections: uvicorn's h11 protocol, guarded) and the explorer
page, served or exported as one self-contained HTML file (explorer), its compare view of two
embeddings of the same galleries (compare), and the 4xx each bad request gets (problems). May import
gallery.compare, gallery.runs, gallery.evaluation, gallery.artifact, gallery.retrieval and everything below
them; never the flows or the CLI.
"""
