"""The limit to measure a training step against: the machine's own matrix throughput.

A step's FLOPs are counted from the model as it runs (torch.utils.flop_counter.FlopCounterMode: matrix
multiplies and convolutions, forward and backward), its time is measured, and the achieved FLOP/s is
compared with a matrix multiply of the step's dominant shape (its largest trainable convolution or
linear layer, as the GEMM it is), timed in the same process, device and dtype. A step at 1.0 would
spend all its time in matrix multiplies as fast as the largest one runs alone.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass
class Gemm:
    """An (m x k) @ (k x n) matrix multiply: what a convolution or linear layer computes."""

    m: int
    k: int
    n: int
    layer: str

    @property
    def flops(self) -> int:
        return 2 * self.m * self.k * self.n


def counted_flops(step) -> int:
    """FLOPs of one call of `step()` (forward and backward when it trains)."""
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def dominant_gemm(model: nn.Module, forward) -> Gemm:
    """The trainable convolution or linear layer with the most FLOPs in one `forward()`, as its GEMM."""
    found: list[Gemm] = []

    def hook(name):
        def record(module, args, output):
            x = args[0]
            if isinstance(module, nn.Conv2d):
                kh, kw = module.kernel_size
                found.append(Gemm(output.shape[0] * output.shape[2] * output.shape[3],
                                  module.in_channels // module.groups * kh * kw, module.out_channels // module.groups
                                  * module.groups, name))
            else:
                found.append(Gemm(x.numel() // x.shape[-1], module.in_features, module.out_features, name))
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in model.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear)) and any(p.requires_grad for p in m.parameters(recurse=False))]
    try:
        with torch.no_grad():
            forward()
    finally:
        for h in handles:
            h.remove()
    return max(found, key=lambda g: g.flops)


def gemm_flops_per_second(gemm: Gemm, device: torch.device, dtype: torch.dtype, seconds: float = 0.5) -> float:
    """How fast this machine multiplies matrices of that shape, in that dtype, on one process's threads."""
    a = torch.randn(gemm.m, gemm.k, device=device, dtype=dtype)
    b = torch.randn(gemm.k, gemm.n, device=device, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b)
    _sync(device)
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or reps < 3:
        torch.mm(a, b)
        reps += 1
    _sync(device)
    return gemm.flops * reps / (time.perf_counter() - start)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@dataclass
class Roofline:
    step_flops: int
    seconds_per_step: float
    gemm: Gemm
    gemm_flops_per_s: float

    @property
    def achieved(self) -> float:
        return self.step_flops / self.seconds_per_step

    @property
    def fraction(self) -> float:
        return self.achieved / self.gemm_flops_per_s if self.gemm_flops_per_s else math.nan

    def line(self) -> str:
        g = self.gemm
        return (f"{self.step_flops / 1e9:.2f} GFLOP/step in {self.seconds_per_step * 1000:.1f} ms: "
                f"{self.achieved / 1e9:.1f} GFLOP/s = {self.fraction:.0%} of a {g.m}x{g.k}x{g.n} matrix multiply "
                f"({g.layer}) at {self.gemm_flops_per_s / 1e9:.1f} GFLOP/s")
