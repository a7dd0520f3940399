"""Backbones, symmetric pooling over packed galleries, heads and parameter counts."""
import numpy as np
import pytest
import torch
from PIL import Image

from gallery.cli import main
from gallery.config import ModelSettings
from gallery.data.packed import PackedGalleries
from gallery.data.tasks import Task
from gallery.model.backbones import WeightsUnavailable, build_backbone, efficientnet_lite, lite_state_dict, vgg16
from gallery.model.gallery_model import GalleryEncoder, build_model, parameter_counts
from gallery.model.pooling import build_pooling

TASKS = [Task("b", "b", "binary"), Task("m", "m", "multiclass", classes=("x", "y", "z")), Task("r", "r", "regression")]


@pytest.fixture(scope="module")
def lite0_32():
    torch.manual_seed(0)
    return efficientnet_lite(0, "imagenet", trainable_blocks=1, image_size=32).eval()


def random_galleries(lengths, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    arrays = [torch.randint(0, 256, (n, size, size, 3), generator=g, dtype=torch.uint8) for n in lengths]
    return PackedGalleries.from_arrays([f"g{i}" for i in range(len(lengths))], arrays)


@pytest.mark.parametrize("pooling", ["mean", "max", "gem"])
def test_permutation_invariance(lite0_32, pooling):
    """Shuffling images inside each gallery, and the galleries in the batch, changes nothing."""
    encoder = GalleryEncoder(lite0_32, build_pooling(pooling, lite0_32.dim)).eval()
    store = random_galleries([3, 5, 1, 4])
    x, index = store.gather([0, 1, 2, 3])
    with torch.no_grad():
        reference = encoder(x, index, 4)
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))
        shuffled = encoder(x[perm], index[perm], 4)
        order = [2, 0, 3, 1]
        x2, index2 = store.gather(order)
        reordered = encoder(x2, index2, 4)
    torch.testing.assert_close(shuffled, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(reordered, reference[order], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pooling", ["mean", "max", "gem"])
def test_packed_equals_one_gallery_at_a_time(lite0_32, pooling):
    encoder = GalleryEncoder(lite0_32, build_pooling(pooling, lite0_32.dim)).eval()
    store = random_galleries([2, 6, 3])
    with torch.no_grad():
        x, index = store.gather([0, 1, 2])
        packed = encoder(x, index, 3)
        for i in range(3):
            xi, ii = store.gather([i])
            torch.testing.assert_close(encoder(xi, ii, 1)[0], packed[i], rtol=1e-5, atol=1e-5)


def test_pooling_values():
    x = torch.tensor([[1.0, 2.0], [3.0, -4.0], [5.0, 6.0]])
    index = torch.tensor([0, 0, 1])
    torch.testing.assert_close(build_pooling("mean", 2)(x, index, 2), torch.tensor([[2.0, -1.0], [5.0, 6.0]]))
    torch.testing.assert_close(build_pooling("max", 2)(x, index, 2), torch.tensor([[3.0, 2.0], [5.0, 6.0]]))
    gem = build_pooling("gem", 2)(x.abs(), index, 2)
    torch.testing.assert_close(gem[0, 0], torch.tensor((1 + 27) / 2) ** (1 / 3))


@pytest.mark.parametrize("variant,size", [(0, 224), (1, 240), (2, 260)])
def test_lite_imagenet_weights_classify_a_known_photo(variant, size):
    """Our trunk/top split + normalisation + the packaged weights still give ImageNet's answer."""
    import matplotlib

    path = f"{matplotlib.get_data_path()}/sample_data/grace_hopper.jpg"
    img = np.asarray(Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR))
    encoder = efficientnet_lite(variant, "imagenet", trainable_blocks=1, image_size=size).eval()
    state = lite_state_dict(variant, "imagenet")
    with torch.no_grad():
        v = encoder(torch.from_numpy(img.copy())[None])
    logits = v @ state["_fc.weight"].T + state["_fc.bias"]
    top5 = logits.topk(5).indices[0].tolist()
    assert top5[0] == 652  # "military uniform" (Grace Hopper in her uniform)


def test_trainable_split_points():
    lite = efficientnet_lite(0, "random", trainable_blocks=1, image_size=64)
    trainable = sum(p.numel() for p in lite.parameters() if p.requires_grad)
    assert trainable == 605_440 + 320 * 1280 + 2 * 1280  # last MBConv block + head conv + its BatchNorm
    with pytest.raises(ValueError, match="16 MBConv blocks"):
        efficientnet_lite(0, "random", trainable_blocks=17)
    with pytest.raises(ValueError, match="unknown backbone 'resnet'"):
        build_backbone("resnet")


def test_trunk_stays_in_eval_mode(lite0_32):
    lite0_32.train()
    assert not lite0_32.trunk.training and lite0_32.top.training
    lite0_32.eval()


def test_paper_parameter_counts(capsys):
    assert main(["model-summary", "--config", "flows/configs/paper.json",
                 "--tasks", "data_contracts/examples/paper_tasks.yaml"]) == 0
    out = capsys.readouterr().out
    assert "encoder   trainable   7,079,424   frozen  7,635,264" in out
    assert "heads     trainable   5,695,165   frozen          0" in out
    assert "total     trainable  12,774,589" in out


def test_vgg16_block5_and_missing_weights(tmp_path, monkeypatch):
    counts = parameter_counts(build_model(ModelSettings("vgg16", "random", 1, 224, "mean", 315), TASKS))
    assert counts["encoder_trainable"] == 7_079_424 and counts["encoder_frozen"] == 7_635_264
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache: must fail fast, not download
    with pytest.raises(WeightsUnavailable, match="never download"):
        vgg16("imagenet")
    with pytest.raises(WeightsUnavailable, match="does not exist"):
        vgg16(str(tmp_path / "nope.pth"))


def test_batched_heads_equal_one_head_per_task():
    """The wide first layer and grouped second layers compute, for each task, exactly
    Linear(d, hidden) -> ReLU -> Linear(hidden, out) with that task's slice of the parameters, and
    regression heads map back to the label's scale (mean + std * h)."""
    from gallery.data.labels import LabelStats

    tasks = TASKS + [Task("b2", "b2", "binary"), Task("m2", "m2", "multiclass", classes=("p", "q"))]
    stats = {"r": LabelStats("regression", {"train": 10}, mean=100.0, variance=25.0)}
    hidden = 8
    model = build_model(ModelSettings(weights="random", image_size=32, hidden=hidden), tasks, stats).eval()
    store = random_galleries([2, 3])
    x, index = store.gather([0, 1])
    with torch.no_grad():
        z, out = model(x, index, 2)
    heads, layout = model.heads, model.heads.layout
    assert z.shape == (2, 1280) and out.shape == (2, 3 + 3 + 2)  # b, r, b2; then m; then m2
    split = layout.split(out)
    assert [split[t.name].shape for t in tasks] == [(2,), (2, 3), (2,), (2,), (2, 2)]
    classes = iter(heads.class_heads)
    for k, task in enumerate(tasks):
        w1, b1 = heads.first.weight[k * hidden:(k + 1) * hidden], heads.first.bias[k * hidden:(k + 1) * hidden]
        h = torch.relu(z @ w1.T + b1)
        if task.kind == "multiclass":
            head = next(classes)
            expected = h @ head.weight.T + head.bias
        else:
            j = layout.scalar_tasks.index(k)
            expected = h @ heads.scalar_weight[j] + heads.scalar_bias[j]
            if task.kind == "regression":
                expected = 100.0 + 5.0 * expected
        torch.testing.assert_close(split[task.name], expected.detach())
    counts = parameter_counts(model)
    separate = sum(1280 * hidden + hidden + hidden * t.out_dim + t.out_dim for t in tasks)
    assert counts["heads_trainable"] == separate
