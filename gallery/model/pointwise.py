"""1x1 convolutions computed as the matrix multiplies they are.

A 1x1 convolution with stride 1 and no padding is one (N*h*w, C_in) @ (C_in, C_out) product over the
channels_last view of its input. On the CPU, oneDNN's weight gradient of the default's head convolution
(320 -> 1280 channels on 2x2 maps) was the slowest kernel of the training step; the same forward and
backward as a GEMM ran 1.7x faster in bf16 and 1.1x faster in fp32 (docs/benchmarks.md). The trainable
top of every encoder gets them (gallery.model.image_encoder.split); parameters, their names and the
state dict are unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PointwiseConv2d(nn.Conv2d):
    """A 1x1 convolution as F.linear over an (N, h, w, C) view; returns channels_last (N, C, h, w)."""

    @staticmethod
    def of(conv: nn.Conv2d) -> "PointwiseConv2d":
        """The same layer, sharing `conv`'s weight and bias Parameters."""
        pointwise = PointwiseConv2d(conv.in_channels, conv.out_channels, 1, bias=conv.bias is not None,
                                    device="meta")
        pointwise.weight, pointwise.bias = conv.weight, conv.bias
        return pointwise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.permute(0, 2, 3, 1), self.weight.flatten(1), self.bias).permute(0, 3, 1, 2)


def _is_plain_pointwise(conv: nn.Module) -> bool:
    return (isinstance(conv, nn.Conv2d) and not isinstance(conv, PointwiseConv2d) and conv.groups == 1
            and tuple(conv.kernel_size) == (1, 1) and tuple(conv.stride) == (1, 1)
            and tuple(conv.dilation) == (1, 1) and tuple(conv.padding) == (0, 0))


@torch.no_grad()
def _computes_the_same(conv: nn.Conv2d, pointwise: PointwiseConv2d) -> bool:
    """Subclasses (e.g. EfficientNet's 'same'-padded convolution) may do more in forward: compare on a
    small random input before swapping."""
    generator = torch.Generator(conv.weight.device).manual_seed(0)  # the global stream stays the seed's own
    x = torch.randn(2, conv.in_channels, 3, 3, generator=generator, device=conv.weight.device, dtype=conv.weight.dtype)
    return torch.allclose(conv(x), pointwise(x), rtol=1e-4, atol=1e-4)


def as_gemms(module: nn.Module) -> nn.Module:
    """Replace, in place, every 1x1 stride-1 unpadded convolution under `module` by a PointwiseConv2d."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if _is_plain_pointwise(child):
                try:
                    pointwise = PointwiseConv2d.of(child)
                    same = _computes_the_same(child, pointwise)
                except (TypeError, RuntimeError):  # a computed weight (parametrizations), another output shape
                    same = False
                if same:
                    setattr(parent, name, pointwise)
    return module
