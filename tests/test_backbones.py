"""Backbones by name: torchvision:<model> and timm:<model> cut into a frozen trunk and a trainable top,
giving the network's own pre-logits vector, weights only from local caches or files, and the
frozen-trunk feature cache for maps and tokens alike."""
import os
import re
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from gallery.cli import main
from gallery.config import DataSettings, ModelSettings, RetrievalSettings, Settings
from gallery.data.ingest import ingest
from gallery.model.backbones import WeightsUnavailable, build_backbone, efficientnet_lite, known_backbone, lite_state_dict
from gallery.model.image_encoder import IMAGENET
from gallery.retrieval.embeddings import embed_galleries
from gallery.steps import preprocess_shard, shard_rows, shard_source

SIZE = 32


def images(n=2, size=SIZE, seed=0):
    return torch.randint(0, 256, (n, size, size, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def normalized(x, norm=IMAGENET):
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) * 255 for v in (norm.mean, norm.std))
    return (x.permute(0, 3, 1, 2).float() - mean) / std


def last_linear_input(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the network's final Linear (its ImageNet classifier) reads: the pre-logits vector."""
    last = [m for m in net.modules() if isinstance(m, nn.Linear)][-1]
    seen = []
    handle = last.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        net(x)
    handle.remove()
    return seen[0]


def same_init(build, seed=0):
    torch.manual_seed(seed)
    return build()


FAST_TORCHVISION = [("resnet18", 2, "layer3|layer4")]
SLOW_TORCHVISION = [("mobilenet_v3_small", 1, "features.11"), ("efficientnet_b0", 1, "features.7"), ("convnext_tiny", 1, "features.6|features.7"),
                    ("shufflenet_v2_x0_5", 1, "stage4"), ("mnasnet0_5", 1, "layers.13"),
                    ("vit_b_16", 2, "encoder.layers.encoder_layer_10|encoder.layers.encoder_layer_11"),
                    ("swin_t", 1, "features.6|features.7"), ("regnet_x_400mf", 1, "trunk_output.block4"),
                    ("densenet121", 1, "features.denseblock4")]


def modules_params(net, names: str) -> int:
    return sum(p.numel() for n in names.split("|") for p in net.get_submodule(n).parameters())


@pytest.mark.parametrize("name,k,top_blocks", FAST_TORCHVISION
                         + [pytest.param(*c, marks=pytest.mark.flow) for c in SLOW_TORCHVISION])
def test_torchvision_family_gives_its_pre_logits_vector_and_trains_its_last_blocks(name, k, top_blocks):
    from torchvision import models

    kwargs = {"image_size": SIZE} if name.startswith("vit") else {}
    encoder = same_init(lambda: build_backbone(f"torchvision:{name}", "random", k, SIZE)).eval()
    net = same_init(lambda: models.get_model(name, weights=None, **kwargs)).eval()
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), last_linear_input(net, normalized(x)), rtol=1e-4, atol=1e-5)
    trainable = sum(p.numel() for p in encoder.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in encoder.parameters() if not p.requires_grad)
    classifier = [m for m in net.modules() if isinstance(m, nn.Linear)][-1]
    neck_and_pool = sum(p.numel() for p in encoder.top[-1].parameters()) + sum(p.numel() for p in encoder.pool.parameters())
    assert trainable == modules_params(net, top_blocks) + neck_and_pool
    assert trainable + frozen == sum(p.numel() for p in net.parameters()) - sum(p.numel() for p in classifier.parameters())
    assert encoder.dim == classifier.in_features


@pytest.mark.flow
@pytest.mark.parametrize("name", ["squeezenet1_0", "vgg11", "alexnet"])
def test_max_pool_families_average_their_last_map(name):
    from torchvision import models

    encoder = same_init(lambda: build_backbone(f"torchvision:{name}", "random", 1, 64)).eval()
    net = same_init(lambda: models.get_model(name, weights=None)).eval()
    x = images(size=64)
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), net.features(normalized(x)).mean(dim=(2, 3)), rtol=1e-4, atol=1e-5)
    last_pool = max(i for i, m in enumerate(net.features) if isinstance(m, nn.MaxPool2d))
    prev_pool = max(i for i, m in enumerate(net.features[:last_pool]) if isinstance(m, nn.MaxPool2d))
    top = net.features[prev_pool + 1:last_pool + 1] if last_pool == len(net.features) - 1 else net.features[last_pool + 1:]
    assert sum(p.numel() for p in encoder.parameters() if p.requires_grad) == sum(p.numel() for p in top.parameters())


@pytest.mark.parametrize("name,k,top_blocks", [
    ("vit_tiny_patch16_224", 1, "blocks.11|norm"),
    ("resnet18", 1, "layer4"),
    pytest.param("vit_small_patch16_224", 2, "blocks.10|blocks.11|norm", marks=pytest.mark.flow),
    pytest.param("convnext_atto", 1, "stages.3|head.norm", marks=pytest.mark.flow),
    pytest.param("efficientnet_b0", 2, "blocks.5|blocks.6|conv_head|bn2", marks=pytest.mark.flow),
    pytest.param("mobilenetv3_small_050", 1, "blocks.5|conv_head", marks=pytest.mark.flow),
    pytest.param("regnety_002", 1, "s4", marks=pytest.mark.flow),
])
def test_timm_model_gives_its_pre_logits_vector_and_trains_its_last_blocks(name, k, top_blocks):
    import timm

    kwargs = {"img_size": SIZE} if name.startswith("vit") else {}
    encoder = same_init(lambda: build_backbone(f"timm:{name}", "random", k, SIZE)).eval()
    net = same_init(lambda: timm.create_model(name, pretrained=False, num_classes=0, **kwargs)).eval()
    x = images()
    norm = type(IMAGENET)(tuple(net.pretrained_cfg["mean"]), tuple(net.pretrained_cfg["std"]))
    with torch.no_grad():
        expected = net.forward_head(net.forward_features(normalized(x, norm)), pre_logits=True)
        torch.testing.assert_close(encoder(x), expected, rtol=1e-4, atol=1e-5)
    assert sum(p.numel() for p in encoder.parameters() if p.requires_grad) == modules_params(net, top_blocks)
    assert sum(p.numel() for p in encoder.parameters()) == sum(p.numel() for p in net.parameters())
    assert encoder.dim == expected.shape[1]
    if name.startswith("vit"):  # the trunk's output, what the feature cache stores, is the tokens
        assert encoder.trunk_features(x).shape == (2, 1 + (SIZE // 16) ** 2, expected.shape[1])  # class token + patches
        assert encoder.split == f"last {k} of 12 transformer blocks" and len(encoder.top) == k + 1
        encoder.train()
        assert not encoder.trunk.training and encoder.top.training


def test_trainable_blocks_out_of_range_and_unknown_names():
    with pytest.raises(ValueError, match=r"torchvision:resnet18 has 4 stages; trainable_blocks=5 must be 0\.\.4"):
        build_backbone("torchvision:resnet18", "random", 5, SIZE)
    with pytest.raises(ValueError, match="torchvision has no classification model 'resnet7'"):
        build_backbone("torchvision:resnet7", "random", 1, SIZE)
    with pytest.raises(ValueError, match="torchvision:googlenet cannot be cut.*auxiliary classifiers"):
        build_backbone("torchvision:googlenet", "random", 1, SIZE)
    with pytest.raises(ValueError, match="timm has no model 'vit_nonexistent'"):
        build_backbone("timm:vit_nonexistent", "random", 1, SIZE)
    with pytest.raises(ValueError, match="unknown backbone 'keras:resnet50'.*torchvision:<model name>"):
        build_backbone("keras:resnet50")


@pytest.mark.parametrize("name,known", [
    ("efficientnet_lite0", True), ("efficientnet_lite2", True), ("vgg16", True),
    ("torchvision:convnext_tiny", True), ("timm:vit_small_patch16_224", True),
    ("timm:vit_small_patch16_224.augreg_in21k_ft_in1k", True),
    ("torchvision:googlenet", False), ("torchvision:nope", False), ("timm:nope", False), ("timm:", False),
    ("convnext_tiny", False), ("keras:resnet50", False),
])
def test_known_backbone(name, known):
    assert known_backbone(name) is known


def test_torchvision_imagenet_weights_come_from_torch_hub_cache_only(tmp_path, monkeypatch):
    from torchvision import models

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache: must fail fast, not download
    with pytest.raises(WeightsUnavailable, match=r"(?s)torchvision:resnet18 ImageNet weights are not in torchvision's "
                                                 r"cache .*hub/checkpoints/resnet18-.*never download.*"
                                                 r"models.get_model\('resnet18', weights='DEFAULT'\).*model.weights"):
        build_backbone("torchvision:resnet18", "imagenet", 1, SIZE)
    net = models.resnet18()  # put "the" weights where torchvision's cache keeps them
    url = models.get_model_weights("resnet18").DEFAULT.url
    cached = tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[1]
    cached.parent.mkdir(parents=True)
    torch.save(net.state_dict(), cached)
    encoder = build_backbone("torchvision:resnet18", "imagenet", 1, SIZE)
    assert torch.equal(encoder.top[0][0].conv1.weight, net.layer4[0].conv1.weight)
    path = tmp_path / "mine.pth"  # or any file named by model.weights
    torch.save(net.state_dict(), path)
    assert torch.equal(build_backbone("torchvision:resnet18", str(path), 1, SIZE).trunk[0][0].weight, net.conv1.weight)
    with pytest.raises(WeightsUnavailable, match="does not exist"):
        build_backbone("torchvision:resnet18", str(tmp_path / "nope.pth"), 1, SIZE)


@pytest.mark.parametrize("damage,reason", [
    ("not a state dict", r" is not a state dict \(\w+: .*\); give a \.pth/\.pt file saved with "
                         r"torch\.save\(model\.state_dict\(\), path\) or a \.safetensors file, or fix model\.weights"),
    ("safetensors header", r" is not a state dict \(SafetensorError: .*\); give a \.pth/\.pt file"),
    ("named pipe", r": is a named pipe; give the path of a regular file, or fix model\.weights"),
    ("too large", r": is larger than the model file limit \(.* > 1\.0 KiB\); give a smaller file, or raise "
                  r"the limit with GALLERY_MAX_MODEL_BYTES"),
])
def test_a_weights_file_is_read_through_the_input_layer(tmp_path, monkeypatch, damage, reason):
    """model.weights is a user's file: bounded like every input (a pipe is refused, never opened for a read
    that would hang; a file over GALLERY_MAX_MODEL_BYTES is refused), and bytes that are no state dict are
    named with the fix, not a pickle or safetensors traceback."""
    path = tmp_path / ("w.safetensors" if damage == "safetensors header" else "w.pth")
    if damage == "named pipe":
        os.mkfifo(path)
    else:
        path.write_bytes(b"\x80\x04junk" * (200 if damage == "too large" else 8))
    monkeypatch.setenv("GALLERY_MAX_MODEL_BYTES", "1KiB")
    with pytest.raises(WeightsUnavailable, match=rf"^torchvision:resnet18 weights file {re.escape(str(path))}{reason}"):
        build_backbone("torchvision:resnet18", str(path), 1, SIZE)


def test_timm_pretrained_weights_come_from_the_hugging_face_cache_only(tmp_path, monkeypatch):
    """The default weights of timm:<name>, found in a Hugging Face cache laid out as huggingface_hub
    writes it; with none there, the error says how to put them there. Nothing is downloaded."""
    import huggingface_hub.constants
    import timm
    from safetensors.torch import save_file

    name = "vit_tiny_patch16_224"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(WeightsUnavailable, match=r"(?s)timm:vit_tiny_patch16_224 pretrained weights are not in "
                                                 r"Hugging Face's cache .*repository timm/vit_tiny_patch16_224\..*"
                                                 r"never download.*timm.create_model\('vit_tiny_patch16_224', "
                                                 r"pretrained=True\).*model.weights"):
        build_backbone(f"timm:{name}", "imagenet", 1, SIZE)
    repo = timm.models.get_pretrained_cfg(name).hf_hub_id
    snapshot = tmp_path / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    net = timm.create_model(name, pretrained=False)  # at 224 px with its classifier, as published
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(snapshot / "model.safetensors"))
    encoder = build_backbone(f"timm:{name}", "imagenet", 1, SIZE)  # at 32 px: timm resamples the position embedding
    assert torch.equal(encoder.top[0].attn.qkv.weight, net.blocks[11].attn.qkv.weight)
    assert encoder.trunk[0].tokens[-1].shape == (1, 1 + (SIZE // 16) ** 2, 192)


def test_timm_model_without_a_block_chain_is_refused():
    """A model whose forward_features is not stem -> blocks -> neck is refused, not cut wrongly."""
    with pytest.raises(ValueError, match="timm:eva02_tiny_patch14_224 cannot be cut"):
        build_backbone("timm:eva02_tiny_patch14_224", "random", 1, 28)


@pytest.mark.parametrize("variant,blocks", [(1, 21), (2, 21)])
def test_efficientnet_lite1_and_lite2_load_their_packaged_weights(variant, blocks):
    encoder = efficientnet_lite(variant, "imagenet", trainable_blocks=1, image_size=SIZE)
    state = lite_state_dict(variant, "imagenet")
    assert torch.equal(encoder.trunk[0][0].weight, state["_conv_stem.weight"])
    assert torch.equal(encoder.top[-1][0].weight, state["_conv_head.weight"])
    assert encoder.split == f"last 1 of {blocks} MBConv blocks" and encoder.dim == 1280


def test_the_tops_batchnorm_follows_its_training_the_trunks_keeps_its_own():
    """EfficientNet-Lite's TensorFlow-ported BatchNorm tracks statistics at 0.01: raised to 0.1 in the top,
    so after 10 training batches its running mean has moved most of the way to the data's."""
    encoder = efficientnet_lite(0, "random", trainable_blocks=1, image_size=SIZE)
    top_norms = [m for m in encoder.top.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert top_norms and {m.momentum for m in top_norms} == {0.1}
    assert {round(m.momentum, 6) for m in encoder.trunk.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {0.01}
    head_norm = encoder.top[-1][1]
    head_norm.reset_running_stats()
    x = torch.randn(64, 1280, 2, 2) + 5.0
    for _ in range(10):
        head_norm.train()(x)
    assert head_norm.running_mean.mean().item() == pytest.approx(5.0 * (1 - 0.9 ** 10), abs=0.05)


@pytest.mark.flow
@pytest.mark.parametrize("backbone,line", [
    ("torchvision:convnext_tiny", "image trunk (frozen)    12,348,000   image top (trainable)  15,472,128"),
    ("timm:vit_small_patch16_224", "image trunk (frozen)    19,821,312   image top (trainable)   1,775,232"),
])
def test_model_summary_for_a_backbone_by_name(capsys, backbone, line):
    """The counts of the last stage / block, independently: convnext_tiny's downsample + stage 4 +
    the final LayerNorm; one ViT-S block (1,774,464) and its final norm (768), at the default's 64 px."""
    assert main(["model-summary", "--config", "default", "--tasks", "data_contracts/examples/paper_tasks.yaml",
                 "--backbone", backbone, "--trainable-blocks", "1"]) == 0
    out = capsys.readouterr().out
    assert f"model: {backbone} at" in out and line in out


@pytest.mark.parametrize("backbone", ["timm:vit_tiny_patch16_224",
                                      pytest.param("torchvision:resnet18", marks=pytest.mark.flow)])
def test_feature_cache_holds_the_trunk_output_of_any_family(small_catalogue, tmp_path, backbone):
    """Preprocess caches the trunk's output (a ViT's tokens, a CNN's maps); embedding from the cache
    equals embedding from the stored pixels."""
    catalogue = ingest(small_catalogue / "manifest.parquet", small_catalogue / "tasks.yaml")
    catalogue = replace(catalogue, frame=catalogue.frame.iloc[:12])
    s = Settings(model=ModelSettings(backbone=backbone, weights="random", image_size=SIZE, hidden=8),
                 data=DataSettings(shards=1, image_format="png"), retrieval=RetrievalSettings(code="sign"))
    torch.manual_seed(0)  # random weights: the cache's trunk and the model's are the same draw
    shards = [preprocess_shard(catalogue, rows, s, str(tmp_path / "shard"), log=lambda _: None)
              for rows in shard_rows(len(catalogue.frame), 1)]
    from gallery.model.gallery_model import build_model

    torch.manual_seed(0)
    model = build_model(s.model, catalogue.tasks, catalogue.stats)
    cached = shard_source(shards, s)
    pixels = shard_source(shards, replace(s, train=replace(s.train, use_cache=False)))
    assert cached.index.feature_shape == tuple(model.encoder.images.trunk_features(images(1)).shape[1:])
    from_cache = embed_galleries(model.encoder, cached, from_features=True)
    from_pixels = embed_galleries(model.encoder, pixels, from_features=False)
    np.testing.assert_allclose(from_cache, from_pixels, rtol=2e-2, atol=2e-2)
    assert pd.Series(from_pixels[:, 0]).nunique() > 1
