"""Any timm model as a backbone (`timm:<name>`), cut at its blocks and pooled by timm's own head.

timm models share a shape: `forward_features` (stem -> blocks -> final norm) then `forward_head`
(its pooling: average, class token or attention, and a norm), so one procedure covers the
families whose features are a chain of the model's parts: it records which parts
`forward_features` calls, in order, takes the block container (`stages`, `blocks`, `layers`,
`features`, or ResNet's `layer1..4` / RegNet's `s1..4`) as the blocks, what runs before as the
stem, what runs after as the neck, and checks on one image that the chain gives exactly what
`forward_features` gives. Vision transformers (ViT, DeiT, DINOv2, CLIP and SigLIP towers) add
class and position tokens between the patches and the blocks: their stem is timm's own embedding
step. A model that is neither is refused with the reason. The vector is
`forward_head(pre_logits=True)`: what timm's classifier reads.

Weights: "imagenet" means the model's default pretrained weights in timm, read from the Hugging
Face cache (or torch.hub's, for weights timm fetches by URL), never downloaded during a run; a path
is a weights file (.safetensors or .pth) that timm loads (and adapts, e.g. a ViT's position embedding
to the image size).
"""
from __future__ import annotations

import os
import re

import torch
from torch import nn

from gallery.data.inputs import is_remote
from gallery.model.image_encoder import BlockLayout, Normalization, WeightsUnavailable, checked_file, torch_hub_file

CONTAINERS = ("stages", "blocks", "layers", "features")
NUMBERED_STAGE = re.compile(r"(layer|stage|s)\d+")


def known(name: str) -> bool:
    import timm

    return timm.is_model(name)


class _TimmHead(nn.Module):
    """timm's `forward_head(pre_logits=True)`. Registers only the head's own parts; the model is
    held outside the module tree, since its other parts belong to the trunk and the top."""

    def __init__(self, model: nn.Module, parts: dict[str, nn.Module]):
        super().__init__()
        self.parts = nn.ModuleDict(parts)
        self._model = (model,)

    def forward(self, x):
        return self._model[0].forward_head(x, pre_logits=True)


class _ViTEmbedding(nn.Module):
    """A timm vision transformer up to its blocks: patches, then timm's `_pos_embed` (class and
    register tokens, position embedding), patch dropout and pre-norm."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.patch_embed, self.patch_drop, self.norm_pre = vit.patch_embed, vit.patch_drop, vit.norm_pre
        self.pos_drop = vit.pos_drop
        self.tokens = nn.ParameterList([p for p in (vit.cls_token, vit.reg_token, vit.pos_embed) if p is not None])
        self._vit = (vit,)

    def forward(self, x):
        return self.norm_pre(self.patch_drop(self._vit[0]._pos_embed(self.patch_embed(x))))


def layout(name: str, weights: str, image_size: int) -> BlockLayout:
    from timm.models.vision_transformer import VisionTransformer

    model = create(name, weights, image_size).eval()
    children = dict(model.named_children())
    if isinstance(model, VisionTransformer):
        stem, blocks, neck, unit = _ViTEmbedding(model), list(model.blocks), model.norm, "transformer blocks"
        used = {"patch_embed", "pos_drop", "patch_drop", "norm_pre", "blocks", "norm"}
    else:
        stem, blocks, neck, unit, used = _chain(name, model, image_size)
    head = _TimmHead(model, {k: m for k, m in children.items() if k not in used})
    _check_every_parameter_placed(name, model, [stem, *blocks, neck, head])
    cfg = model.pretrained_cfg
    norm = Normalization(tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225))))
    return BlockLayout(stem, blocks, neck, head, norm, unit)


def _chain(name: str, model: nn.Module, image_size: int):
    """(stem, blocks, neck, unit, names of the parts used) of a model whose forward_features is a chain."""
    children = dict(model.named_children())
    order: list[str] = []
    hooks = [m.register_forward_hook(lambda *_, k=k: order.append(k) if k not in order else None)
             for k, m in children.items()]
    x = torch.randn(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            reference = model.forward_features(x)
    finally:
        for h in hooks:
            h.remove()
    container = next((k for k in order if k in CONTAINERS), None)
    stages = [container] if container else [k for k in order if NUMBERED_STAGE.fullmatch(k)]
    refuse = f"timm:{name} cannot be cut into a frozen trunk and a trainable top"
    if not stages:
        raise ValueError(f"{refuse}: forward_features calls {order}, none of them a block container "
                         f"({', '.join(CONTAINERS)}, or numbered stages)")
    first, last = order.index(stages[0]), order.index(stages[-1])
    if order[first:last + 1] != stages:
        raise ValueError(f"{refuse}: its stages {stages} are not called one after another ({order})")
    stem = nn.Sequential(*[children[k] for k in order[:first]])
    neck = nn.Sequential(*[children[k] for k in order[last + 1:]])
    blocks = list(children[container]) if container else [children[k] for k in stages]
    with torch.no_grad():
        chained = neck(nn.Sequential(*blocks)(stem(x)))
    if chained.shape != reference.shape or not torch.allclose(chained, reference, rtol=1e-4, atol=1e-5):
        raise ValueError(f"{refuse}: its forward_features does more than call {order} in turn")
    return stem, blocks, neck, container or "stages", set(order)


def _check_every_parameter_placed(name: str, model: nn.Module, parts: list[nn.Module]) -> None:
    placed = {id(p) for part in parts for p in part.parameters()}
    stray = [k for k, p in model.named_parameters() if id(p) not in placed]
    if stray:
        raise ValueError(f"timm:{name} cannot be cut into a frozen trunk and a trainable top: parameters "
                         f"{stray[:3]} belong to no part of it")


def create(name: str, weights: str, image_size: int) -> nn.Module:
    """The timm model without its classifier (num_classes=0), at `image_size` where its input size is fixed."""
    import timm

    if not timm.is_model(name):
        raise ValueError(f"timm has no model {name!r}; see timm.list_models()")
    cfg = timm.models.get_pretrained_cfg(name)
    kwargs = {"num_classes": 0, **({"img_size": image_size} if cfg is not None and cfg.fixed_input_size else {})}
    path = weights_file(name, weights)
    if path is None:
        return timm.create_model(name, pretrained=False, **kwargs)
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": path}, **kwargs)


def weights_file(name: str, weights: str) -> str | None:
    """Where the weights of `name` are (None for random ones): its default pretrained weights in a local
    cache, or a local file, checked by the input layer without reading it; timm reads the file itself
    (it unwraps training checkpoints and adapts, e.g., a ViT's position embedding), so it must be local."""
    import timm

    if weights == "random":
        return None
    if weights == "imagenet":
        return cached_weights(name, timm.models.get_pretrained_cfg(name))
    if is_remote(weights):
        raise WeightsUnavailable(f"timm:{name} weights file {weights}: timm reads its weights from this machine's "
                                 "disk; copy the file here and set model.weights to its path")
    return checked_file(weights, f"timm:{name}")


def cached_weights(name: str, cfg) -> str:
    """The local file of the model's default pretrained weights: Hugging Face's cache, then torch.hub's."""
    from huggingface_hub import constants, try_to_load_from_cache

    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise WeightsUnavailable(f"timm:{name} has no pretrained weights in timm; set model.weights to a weights "
                                 "file, or to random")
    if cfg.hf_hub_id:
        for filename in [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]:
            found = try_to_load_from_cache(cfg.hf_hub_id, filename, cache_dir=constants.HF_HUB_CACHE)
            if isinstance(found, str):
                return found
    if cfg.url and os.path.isfile(torch_hub_file(cfg.url)):
        return torch_hub_file(cfg.url)
    where = (f"Hugging Face's cache ({constants.HF_HUB_CACHE}, repository {cfg.hf_hub_id})" if cfg.hf_hub_id
             else f"torch.hub's cache ({torch_hub_file(cfg.url)})")
    raise WeightsUnavailable(
        f"timm:{name} pretrained weights are not in {where} and runs never download. Either (a) on a machine "
        f"with network run `python -c \"import timm; timm.create_model('{name}', pretrained=True)\"` and copy "
        "the cache folder it fills (~/.cache/huggingface/hub, or $TORCH_HOME/hub/checkpoints) to the same place "
        "here (or point HF_HUB_CACHE / TORCH_HOME at it), or (b) set model.weights to the path of the weights "
        "file (.safetensors or .pth) in your settings JSON.")
