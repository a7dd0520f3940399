"""Serving: `gallery serve`, an online search service over a training run's embeddings, and the explorer page.

Owns the loaded service (service: the run's embeddings, float and code indexes, model, catalogue), the
catalogue's attributes and photos as served (catalogue), the 2-D map (gallery.evaluation.projection), the limits a request must
keep and the paths a request may name (limits), the HTTP app (app: FastAPI, run by uvicorn) and the
explorer page, served or exported as one self-contained HTML file (explorer), and the 4xx each bad request
gets (problems). May import gallery.runs,
gallery.evaluation, gallery.retrieval and everything below them; never the flows or the CLI.
"""
