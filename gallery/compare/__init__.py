"""Should model B replace model A: two runs (or model folders with their embeddings) paired on the galleries
both embedded, with neighbour stability and a stated decision rule (`gallery compare`)."""
