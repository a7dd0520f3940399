"""1x1 convolutions as matrix multiplies: the same layer (outputs, gradients, state dict), swapped only where
it computes the same thing."""
import torch
import torch.nn.functional as F
from torch import nn

from gallery.model.pointwise import PointwiseConv2d, as_gemms


def test_outputs_and_gradients_are_the_convolutions():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 5, 1)
    pointwise = PointwiseConv2d.of(conv)
    assert pointwise.weight is conv.weight and pointwise.bias is conv.bias
    x = torch.randn(3, 8, 2, 2).contiguous(memory_format=torch.channels_last).requires_grad_()
    y = pointwise(x)
    expected = torch.einsum("nchw,oc->nohw", x, conv.weight[:, :, 0, 0]) + conv.bias[None, :, None, None]
    torch.testing.assert_close(y, expected)
    assert y.is_contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(y)
    (grad_x, grad_w, grad_b) = torch.autograd.grad(y, (x, conv.weight, conv.bias), g)
    x2 = x.detach().clone().requires_grad_()
    ref = F.conv2d(x2, conv.weight, conv.bias)
    ref_x, ref_w, ref_b = torch.autograd.grad(ref, (x2, conv.weight, conv.bias), g)
    torch.testing.assert_close((grad_x, grad_w, grad_b), (ref_x, ref_w, ref_b))


class AddsOne(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) + 1


class SamePadded(nn.Conv2d):
    """Like EfficientNet's 'same'-padded convolution: a padding module that is the identity at 1x1."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.static_padding = nn.Identity()

    def forward(self, x):
        return super().forward(self.static_padding(x))


def test_only_convolutions_that_compute_the_same_are_swapped():
    model = nn.Sequential(nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1, stride=2),
                          nn.Conv2d(4, 4, 1, groups=2), AddsOne(4, 4, 1), nn.Sequential(SamePadded(4, 6, 1)))
    keys = list(model.state_dict())
    x = torch.randn(2, 4, 4, 4)
    before = model(x)
    as_gemms(model)
    assert [type(m).__name__ for m in model[:5]] == ["PointwiseConv2d", "Conv2d", "Conv2d", "Conv2d", "AddsOne"]
    assert type(model[5][0]) is PointwiseConv2d
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(model(x), before)


def test_a_convolution_with_a_computed_weight_is_kept_not_a_crash():
    from torch.nn.utils import parametrize

    class Doubled(nn.Module):
        def forward(self, w):
            return 2 * w

    conv = nn.Conv2d(4, 4, 1)
    parametrize.register_parametrization(conv, "weight", Doubled())
    model = as_gemms(nn.Sequential(conv, nn.Conv2d(4, 4, 1)))
    assert model[0] is conv and type(model[1]) is PointwiseConv2d


def test_the_default_encoders_trainable_top_multiplies_matrices():
    from gallery.model.backbones import build_backbone

    encoder = build_backbone("efficientnet_lite0", "random", 0, 64)
    assert [type(m).__name__ for m in encoder.top.modules() if isinstance(m, nn.Conv2d)] == ["PointwiseConv2d"]
    assert not any(isinstance(m, PointwiseConv2d) for m in encoder.trunk.modules())


def test_swapping_leaves_the_global_random_stream_alone():
    model = nn.Sequential(nn.Conv2d(4, 4, 1), nn.Conv2d(4, 8, 1))
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    as_gemms(model)
    assert type(model[1]) is PointwiseConv2d
    torch.testing.assert_close(torch.rand(4), expected)
