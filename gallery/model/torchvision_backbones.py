"""Any torchvision classification model as a backbone (`torchvision:<name>`), cut at its stages.

Each torchvision family keeps its stages under its own names (ResNet's layer1-4, RegNet's
trunk_output, ConvNeXt's and Swin's features with a downsampling layer before each stage, ViT's
encoder layers), so each has a small layout function saying what its stem, blocks, neck and pool
are. The pool ends where the network's last Linear (its classifier) begins: the vector is the
pre-logits vector the ImageNet classifier reads (VGG, AlexNet and SqueezeNet, whose classifiers read
a flattened map, give the spatial mean of their last map instead, as the paper's VGG16 does).

Weights: "imagenet" is torchvision's default weights for the name, read from torch.hub's cache
(never downloaded during a run); a path is a state-dict file of the torchvision model.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from gallery.model.image_encoder import (IMAGENET, BlockLayout, ClassToken, SpatialMean, WeightsUnavailable,
                                         checked_file, load_file, torch_hub_file)


def _sequential(*parts) -> nn.Sequential:
    return nn.Sequential(*[p for p in parts if p is not None])


def _pre_logits(*parts, classifier: nn.Module | None = None) -> nn.Sequential:
    """`parts`, then the classifier up to (not including) its final Linear."""
    head = list(classifier)[:-1] if isinstance(classifier, nn.Sequential) else []
    return _sequential(*parts, *head)


def _downsample_then_stage(features: nn.Sequential) -> list[nn.Module]:
    """ConvNeXt and Swin: features = [stem, stage, downsample, stage, ...]; a block is a downsample and its stage."""
    rest = list(features)[1:]
    return [rest[0]] + [nn.Sequential(rest[i], rest[i + 1]) for i in range(1, len(rest), 2)]


def _pooling_blocks(features: nn.Sequential) -> list[nn.Module]:
    """VGG, AlexNet, SqueezeNet: a block ends with each max-pool (what follows the last one is a block too)."""
    blocks, current = [], []
    for layer in features:
        current.append(layer)
        if isinstance(layer, nn.MaxPool2d):
            blocks.append(nn.Sequential(*current))
            current = []
    return blocks + ([nn.Sequential(*current)] if current else [])


def _resnet(net) -> BlockLayout:
    return BlockLayout(_sequential(net.conv1, net.bn1, net.relu, net.maxpool),
                       [net.layer1, net.layer2, net.layer3, net.layer4], nn.Identity(), SpatialMean(), IMAGENET, "stages")


def _regnet(net) -> BlockLayout:
    return BlockLayout(net.stem, list(net.trunk_output), nn.Identity(), SpatialMean(), IMAGENET, "stages")


def _convnext(net) -> BlockLayout:
    return BlockLayout(net.features[0], _downsample_then_stage(net.features), nn.Identity(),
                       _pre_logits(net.avgpool, classifier=net.classifier), IMAGENET, "stages")


def _swin(net) -> BlockLayout:
    return BlockLayout(net.features[0], _downsample_then_stage(net.features), _sequential(net.norm, net.permute),
                       _sequential(net.avgpool, net.flatten), IMAGENET, "stages")


def _features_stem_blocks_neck(net) -> BlockLayout:
    """EfficientNet (v1, v2), MobileNet v2 and v3: features = [stem conv, blocks..., last 1x1 conv]."""
    f = list(net.features)
    return BlockLayout(f[0], f[1:-1], f[-1], _pre_logits(SpatialMean(), classifier=net.classifier), IMAGENET,
                       "stages" if type(net).__name__ == "EfficientNet" else "inverted-residual blocks")


def _densenet(net) -> BlockLayout:
    f = dict(net.features.named_children())
    blocks = [_sequential(f[f"denseblock{i}"], f.get(f"transition{i}")) for i in range(1, 5)]
    return BlockLayout(_sequential(f["conv0"], f["norm0"], f["relu0"], f["pool0"]), blocks,
                       _sequential(f["norm5"], nn.ReLU()), SpatialMean(), IMAGENET, "dense blocks")


def _shufflenet(net) -> BlockLayout:
    return BlockLayout(_sequential(net.conv1, net.maxpool), [net.stage2, net.stage3, net.stage4], net.conv5,
                       SpatialMean(), IMAGENET, "stages")


def _mnasnet(net) -> BlockLayout:
    layers = list(net.layers)
    return BlockLayout(_sequential(*layers[:8]), layers[8:14], _sequential(*layers[14:]), SpatialMean(), IMAGENET,
                       "stacks")


def _maxvit(net) -> BlockLayout:
    return BlockLayout(net.stem, list(net.blocks), nn.Identity(), _pre_logits(classifier=net.classifier), IMAGENET,
                       "stages")


def _pooled_features(net) -> BlockLayout:
    return BlockLayout(nn.Identity(), _pooling_blocks(net.features), nn.Identity(), SpatialMean(), IMAGENET,
                       "blocks (each ending in a max-pool)")


class _ViTEmbedding(nn.Module):
    """torchvision ViT up to its encoder layers: patches, class token, position embedding."""

    def __init__(self, vit):
        super().__init__()
        self.conv_proj, self.dropout = vit.conv_proj, vit.encoder.dropout
        self.class_token, self.pos_embedding = vit.class_token, vit.encoder.pos_embedding
        self.patch_size = vit.patch_size

    def forward(self, x):
        x = self.conv_proj(x).flatten(2).transpose(1, 2)  # (N, patches, D), as VisionTransformer._process_input
        x = torch.cat([self.class_token.expand(len(x), -1, -1), x], dim=1)
        return self.dropout(x + self.pos_embedding)


def _vit(net) -> BlockLayout:
    return BlockLayout(_ViTEmbedding(net), list(net.encoder.layers), net.encoder.ln, ClassToken(), IMAGENET,
                       "transformer blocks")


FAMILIES = {  # torchvision module of the model's builder -> its layout
    "resnet": _resnet, "regnet": _regnet, "convnext": _convnext, "swin_transformer": _swin,
    "efficientnet": _features_stem_blocks_neck, "mobilenetv2": _features_stem_blocks_neck,
    "mobilenetv3": _features_stem_blocks_neck, "densenet": _densenet, "shufflenetv2": _shufflenet,
    "mnasnet": _mnasnet, "maxvit": _maxvit, "vgg": _pooled_features, "alexnet": _pooled_features,
    "squeezenet": _pooled_features, "vision_transformer": _vit,
}
UNSUPPORTED = {"googlenet": "auxiliary classifiers and an input transform", "inception": "the same"}


def family(name: str) -> str | None:
    """The torchvision family of a classification model name, or None if torchvision has no such model."""
    from torchvision import models

    if name not in models.list_models(module=models):
        return None
    return models.get_model_builder(name).__module__.rsplit(".", 1)[1]


def known(name: str) -> bool:
    return family(name) in FAMILIES


def layout(name: str, weights: str, image_size: int) -> BlockLayout:
    """The model `name` with its weights, described for `split`."""
    from torchvision import models

    kind = family(name)
    if kind is None:
        raise ValueError(f"torchvision has no classification model {name!r}; see torchvision.models.list_models()")
    if kind not in FAMILIES:
        raise ValueError(f"torchvision:{name} cannot be cut into a frozen trunk and a trainable top "
                         f"({UNSUPPORTED.get(kind, 'an unrecognised layout')}); use the timm version or another model")
    state = state_dict(name, weights)  # first: missing weights fail before a large model is built
    kwargs = {"image_size": image_size} if kind == "vision_transformer" else {}
    net = models.get_model(name, weights=None, **kwargs)
    if state is not None:
        if kind == "vision_transformer" and state["encoder.pos_embedding"].shape != net.encoder.pos_embedding.shape:
            from torchvision.models.vision_transformer import interpolate_embeddings

            state = interpolate_embeddings(image_size, net.patch_size, state)
        net.load_state_dict(state)
    return FAMILIES[kind](net)


def weights_file(name: str, weights: str) -> str | None:
    """Where the weights of `name` are (None for random ones): torchvision's default weights in torch.hub's
    cache, or a local file; found and checked without reading them."""
    label = f"torchvision:{name}"
    if weights == "random":
        return None
    if weights != "imagenet":
        return checked_file(weights, label)
    from torchvision import models

    url = models.get_model_weights(name).DEFAULT.url
    cached = torch_hub_file(url)
    if not os.path.isfile(cached):
        raise WeightsUnavailable(
            f"{label} ImageNet weights are not in torchvision's cache ({cached}) and runs never download. "
            f"Either (a) on a machine with network run `python -c \"from torchvision import models; "
            f"models.get_model('{name}', weights='DEFAULT')\"` and copy the file to that path "
            "(or point TORCH_HOME at a folder holding hub/checkpoints/), or (b) set "
            "model.weights to the path of the .pth file in your settings JSON.")
    return cached


def state_dict(name: str, weights: str) -> dict | None:
    """None for random weights; else the file `weights_file` finds, read through the input layer."""
    path = weights_file(name, weights)
    return None if path is None else load_file(path, f"torchvision:{name}")
