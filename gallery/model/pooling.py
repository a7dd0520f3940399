"""Symmetric pooling over packed galleries: a segment reduction, so order never matters.

A batch is all images of B galleries concatenated plus `index` (gallery of each image), never
padded: x (N, d), index (N,) in [0, B) -> (B, d).
"""
from __future__ import annotations

import torch
from torch import nn


def segment_mean(x: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """Counts by index_add, not bincount: bincount's output size depends on the data, so it makes the
    host wait for the device in the middle of every step."""
    sums = x.new_zeros(n, x.shape[1]).index_add_(0, index, x)
    counts = x.new_zeros(n).index_add_(0, index, torch.ones_like(index, dtype=x.dtype)).clamp(min=1)
    return sums / counts[:, None]


def segment_max(x: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    out = x.new_zeros(n, x.shape[1])
    return out.scatter_reduce(0, index[:, None].expand_as(x), x, reduce="amax", include_self=False)


class MeanPool(nn.Module):
    """The paper's choice: cheap, and every image counts equally."""

    def forward(self, x, index, n):
        return segment_mean(x, index, n)


class MaxPool(nn.Module):
    """Keeps the strongest evidence of each feature (a pool shown once is still a pool)."""

    def forward(self, x, index, n):
        return segment_max(x, index, n)


class GeMPool(nn.Module):
    """Generalised mean (mean of x^p)^(1/p) with a learned p: between mean (p=1) and max (p->inf)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x, index, n):
        return segment_mean(x.clamp(min=self.eps).pow(self.p), index, n).pow(1.0 / self.p)


POOLINGS = {"mean": MeanPool, "max": MaxPool, "gem": GeMPool}


def build_pooling(name: str) -> nn.Module:
    if name not in POOLINGS:
        raise ValueError(f"unknown pooling {name!r}; known: {sorted(POOLINGS)}")
    return POOLINGS[name]()
