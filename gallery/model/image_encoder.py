"""The image encoder every backbone becomes: frozen trunk -> trainable top -> one vector per image.

A backbone of any family is first described as a `BlockLayout`: the stem (what runs before its
blocks), its blocks in order (stages of a CNN, transformer blocks of a ViT), the neck (what runs
after the last block, e.g. a final norm or head convolution) and the pool that turns the neck's
output into the network's pre-logits vector (spatial mean of an (N, C, h, w) map, a ViT's class
token, timm's own head). `split` cuts it: the trunk is the stem and all but the last
`trainable_blocks` blocks, frozen and in eval mode, so its output (maps or tokens, any shape) can
be cached once (gallery.training.cache); the top is the rest, trained.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass

import torch
from torch import nn

from gallery.data.inputs import InputProblem, check_bounded, normalize, read_bounded
from gallery.errors import UserError, excerpt
from gallery.model.pointwise import as_gemms


class WeightsUnavailable(UserError):
    """Pretrained weights are not on this machine, or their file cannot be used; the message says how to
    provide them (a UserError: a run stops on it with the message, not a traceback)."""


@dataclass(frozen=True)
class Normalization:
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


IMAGENET = Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
TF_LITE = Normalization((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # EfficientNet-Lite was trained on [-1, 1] inputs


class SpatialMean(nn.Module):
    """(N, C, h, w) -> (N, C): global average pooling, the pre-logits vector of most CNNs. Averaged over
    an (N, h*w, C) view, so on channels_last maps the gradient flows back channels_last too: the
    default's top (1x1 convolution, BatchNorm, ReLU6 on 2x2 maps) trained 1.5x faster than with
    `x.mean(dim=(2, 3))`, whose NCHW gradient sent BatchNorm's backward down a slow path (measured)."""

    def forward(self, x):
        return x.permute(0, 2, 3, 1).flatten(1, 2).mean(1)


class ClassToken(nn.Module):
    """(N, tokens, D) -> (N, D): a ViT's class token (the first), what its classifier reads."""

    def forward(self, x):
        return x[:, 0]


class ImageEncoder(nn.Module):
    """uint8 images (N, H, W, 3) -> (N, dim) vectors: normalize, frozen trunk, trainable top, pool."""

    def __init__(self, name: str, trunk: nn.Module, top: nn.Module, dim: int, norm: Normalization,
                 pool: nn.Module | None = None):
        super().__init__()
        self.name, self.dim = name, dim
        self.split = "as built"  # which blocks the top holds, in the family's terms (set by `split`)
        self.trunk, self.top = trunk, top
        self.pool = pool if pool is not None else SpatialMean()
        self.register_buffer("mean", torch.tensor(norm.mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(norm.std).view(1, 3, 1, 1) * 255, persistent=False)
        for p in self.trunk.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.trunk.eval()  # frozen means frozen: BatchNorm statistics too, or the cache would go stale
        return self

    @torch.no_grad()
    def trunk_features(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float()  # NHWC in memory: the layout channels_last kernels want
        return self.trunk((x - self.mean) / self.std)

    def top_vectors(self, features: torch.Tensor) -> torch.Tensor:
        """Trunk output (maps or tokens, from pixels or the cache) -> (N, dim)."""
        x = features.float()
        if x.dim() == 4:  # maps arrive as NCHW; NHWC kernels are the fast ones (GPU, and CPU on small maps)
            x = x.contiguous(memory_format=torch.channels_last)
        return self.pool(self.top(x))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.top_vectors(self.trunk_features(images))


@dataclass
class BlockLayout:
    """A network in forward order: stem -> blocks -> neck -> pool (see the module's docstring).
    `unit` names what a block is in this family ("stages", "transformer blocks"), for messages."""

    stem: nn.Module
    blocks: list[nn.Module]
    neck: nn.Module
    pool: nn.Module
    norm: Normalization
    unit: str = "blocks"
    dim: int | None = None  # the pooled width, when the family states it; else measured


# BatchNorm in the trainable top tracks its statistics at PyTorch's default rate. Weights ported from
# TensorFlow (EfficientNet-Lite, timm's tf_ models) carry 0.01: after the 60-70 steps of the default's training
# (0.99^65 = 0.52) the running statistics still half describe the pretrained layer, so a model evaluated after
# a few epochs (eval mode) normalises with stale statistics.
TOP_NORM_MOMENTUM = 0.1


def split(name: str, layout: BlockLayout, trainable_blocks: int, image_size: int) -> ImageEncoder:
    """The trunk: stem and the first blocks; the top: the last `trainable_blocks` blocks and the neck,
    its 1x1 convolutions as matrix multiplies (gallery.model.pointwise) and its BatchNorm at momentum
    TOP_NORM_MOMENTUM or more.
    Where the layout does not state the embedding width, it is measured on one blank image."""
    n = len(layout.blocks)
    if not 0 <= trainable_blocks <= n:
        raise ValueError(f"{name} has {n} {layout.unit}; trainable_blocks={trainable_blocks} must be 0..{n}")
    trunk = nn.Sequential(layout.stem, *layout.blocks[: n - trainable_blocks])
    top = as_gemms(nn.Sequential(*layout.blocks[n - trainable_blocks:], layout.neck))
    for norm in top.modules():
        if isinstance(norm, nn.modules.batchnorm._BatchNorm) and norm.momentum is not None:
            norm.momentum = max(norm.momentum, TOP_NORM_MOMENTUM)
    encoder = ImageEncoder(name, trunk, top, layout.dim or 0, layout.norm, layout.pool)
    encoder.split = f"last {trainable_blocks} of {n} {layout.unit}"
    if layout.dim is None:
        with torch.no_grad():
            encoder.dim = encoder.eval()(torch.zeros(1, image_size, image_size, 3, dtype=torch.uint8)).shape[1]
    return encoder.train()


def checked_file(path: str, name: str) -> str:
    """`path` (a file:// URI as a path), once the input layer found a regular file there within
    GALLERY_MAX_MODEL_BYTES, without reading it: what a run checks at start, before the file is read."""
    try:
        check_bounded(path, "model")
    except InputProblem as e:
        raise _unusable(name, e) from None
    return normalize(path)


def load_file(path: str, name: str) -> dict:
    """A state dict from a .pth/.pt (torch) or .safetensors file, read through the input layer (regular
    files only, within GALLERY_MAX_MODEL_BYTES), so a FIFO, a device or a huge file is refused, not read."""
    try:
        data = read_bounded(path, "model")
    except InputProblem as e:
        raise _unusable(name, e) from None
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load as load_safetensors

            return load_safetensors(data)
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any decoding failure is the file's, named with the fix
        raise WeightsUnavailable(
            f"{name} weights file {path} is not a state dict "
            f"({e.__class__.__name__}: {excerpt(str(e), 160, quote=False)}); "
            "give a .pth/.pt file saved with torch.save(model.state_dict(), path) or a .safetensors file, "
            "or fix model.weights in the settings") from None


def _unusable(name: str, problem: InputProblem) -> WeightsUnavailable:
    return WeightsUnavailable(f"{name} weights file {problem.location}: {problem.reason}; {problem.fix}, "
                              "or fix model.weights in the settings")


def torch_hub_file(url: str) -> str:
    """Where torch.hub (torchvision's weights API) caches the file of `url`: $TORCH_HOME/hub/checkpoints/."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
