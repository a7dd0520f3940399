"""A trained model as a self-describing folder (weights, ONNX graphs, binary code, model card, config)
that anyone can load without the pipeline: `gallery export-model` writes it, `gallery.load_model` reads it."""
