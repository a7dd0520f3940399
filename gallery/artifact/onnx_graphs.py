"""The model as two ONNX graphs, so a service in any language can embed a gallery:

- `model.onnx`, the per-photo encoder: `photos` uint8 (N, H, W, 3) RGB, any N -> `features` float32 (N, d)
  (normalisation inside; H = W = the config's image_size);
- `pooling.onnx`, the gallery pooling over ONE gallery's per-photo features: `features` (P, d), any P ->
  `embedding` (1, d), and for an attention pooling `photo_weights` (P,), each photo's weight (sum 1).

Embedding a gallery is the encoder on its photos, then the pooling on their features. Exported with
PyTorch's TorchScript-based exporter (opset 18; a few seconds, where the dynamo exporter took ten times
longer on the default model) and checked with onnxruntime against PyTorch on random inputs.
"""
from __future__ import annotations

import os
import tempfile
import warnings

import numpy as np
import torch
from torch import nn

from gallery.model.gallery_model import GalleryEncoder
from gallery.model.pooling import AttentionPooling

OPSET = 18
ENCODER_FILE, POOLING_FILE = "model.onnx", "pooling.onnx"


class OneGalleryPooling(nn.Module):
    """The pooling of one gallery's photos: (P, d) -> (1, d) [, (P,) photo weights]."""

    def __init__(self, pooling: nn.Module):
        super().__init__()
        self.pooling = pooling

    def forward(self, features: torch.Tensor):
        index = torch.zeros_like(features[:, 0], dtype=torch.long)
        if isinstance(self.pooling, AttentionPooling):
            return self.pooling.pool_with_weights(features, index, 1)
        return self.pooling(features, index, 1)


def _export(module: nn.Module, example: torch.Tensor, inputs: list[str], outputs: list[str], axes: dict) -> bytes:
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes: nothing a user can act on
        path = os.path.join(folder, "graph.onnx")
        torch.onnx.export(module.eval(), (example,), path, input_names=inputs, output_names=outputs,
                          dynamic_axes=axes, opset_version=OPSET, dynamo=False)
        with open(path, "rb") as f:
            return f.read()


def onnx_graphs(encoder: GalleryEncoder, image_size: int) -> dict[str, bytes]:
    """{file name: serialized graph} of the encoder and its pooling (on the CPU, in float32)."""
    encoder = encoder.cpu().float().eval()
    photos = torch.zeros(2, image_size, image_size, 3, dtype=torch.uint8)
    with torch.no_grad():
        features = encoder.images(photos)
    weights = ["photo_weights"] if encoder.has_photo_weights else []
    return {ENCODER_FILE: _export(encoder.images, photos, ["photos"], ["features"],
                                  {"photos": {0: "photos"}, "features": {0: "photos"}}),
            POOLING_FILE: _export(OneGalleryPooling(encoder.pooling), features, ["features"], ["embedding", *weights],
                                  {"features": {0: "photos"}, **({"photo_weights": {0: "photos"}} if weights else {})})}


def onnx_difference(graphs: dict[str, bytes], encoder: GalleryEncoder, image_size: int, photos: int = 5,
                    seed: int = 0) -> dict[str, tuple[float, float]]:
    """Per output, on random photos: the largest absolute difference between onnxruntime and PyTorch, and
    PyTorch's largest absolute value (the scale the difference is read against; NaN stays NaN)."""
    import onnxruntime

    encoder = encoder.cpu().float().eval()
    pixels = np.random.default_rng(seed).integers(0, 256, (photos, image_size, image_size, 3), dtype=np.uint8)
    sessions = {name: onnxruntime.InferenceSession(graph, providers=["CPUExecutionProvider"])
                for name, graph in graphs.items()}
    features = sessions[ENCODER_FILE].run(None, {"photos": pixels})[0]
    pooled = sessions[POOLING_FILE].run(None, {"features": features})
    with torch.no_grad():
        expected_features = encoder.images(torch.from_numpy(pixels))
        expected = OneGalleryPooling(encoder.pooling)(expected_features)
    expected = expected if isinstance(expected, tuple) else (expected,)
    names = ["features", "embedding", "photo_weights"]
    return {name: (float(np.abs(got - want.numpy()).max()), float(np.abs(want.numpy()).max()))
            for name, got, want in zip(names, [features, *pooled], [expected_features, *expected])}
