"""Symmetric pooling over packed galleries: segment reductions, so order never matters.

A batch is all images of B galleries concatenated plus `index` (gallery of each image), never
padded: x (N, d), index (N,) in [0, B) -> (B, d). Every reduction (sum, max, softmax) runs per
gallery over its own rows only, so no gallery's photos reach another's embedding.

Two poolings learn which photos matter: gated attention (Ilse et al. 2018) and PMA (pooling by
multi-head attention, Set Transformer, Lee et al. 2019). They are `AttentionPooling`s:
`pool_with_weights` also returns each photo's weight in its gallery (summing to 1 per gallery),
which the export writes beside the embedding ("which photo drove this gallery's embedding").
"""
from __future__ import annotations

import math

import torch
from torch import nn


def segment_sum(x: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """(N, ...) rows summed per gallery -> (n, ...)."""
    if torch.onnx.is_in_onnx_export():  # ONNX has no index_add: a product with the (n, N) membership matrix
        return (membership(index, n).to(x.dtype) @ x.reshape(x.shape[0], -1)).view(n, *x.shape[1:])
    return x.new_zeros(n, *x.shape[1:]).index_add_(0, index, x)


def segment_mean(x: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """Counts by index_add, not bincount: bincount's output size depends on the data, so it makes the
    host wait for the device in the middle of every step."""
    counts = segment_sum(torch.ones_like(index, dtype=x.dtype), index, n).clamp(min=1)
    return segment_sum(x, index, n) / counts[:, None]


def segment_max(x: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    if torch.onnx.is_in_onnx_export():  # ONNX's scatters cannot skip the initial value: a masked dense maximum
        inside = membership(index, n)[(..., *[None] * (x.dim() - 1))]
        return torch.where(inside, x[None], torch.finfo(x.dtype).min).amax(1)
    out = x.new_zeros(n, *x.shape[1:])
    return out.scatter_reduce(0, _expand(index, x), x, reduce="amax", include_self=False)


def membership(index: torch.Tensor, n: int) -> torch.Tensor:
    """(n, N) bool: row g marks gallery g's photos. Dense, so only for exported graphs of a few galleries."""
    return index[None, :] == torch.arange(n, device=index.device)[:, None]


def segment_softmax(scores: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """Softmax of (N, ...) scores over the rows of each gallery, separately for every trailing position.

    In float32 whatever the autocast dtype: the weights are exported and must sum to 1. The
    per-gallery maximum is subtracted for stability (softmax does not change with a shift, so it
    carries no gradient)."""
    s = scores.float()
    peak = segment_max(s.detach(), index, n)
    e = torch.exp(s - peak[index])
    return e / segment_sum(e, index, n).clamp(min=torch.finfo(e.dtype).tiny)[index]


def _expand(index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return index.view(-1, *([1] * (like.dim() - 1))).expand_as(like)


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


class AttentionPooling(nn.Module):
    """A pooling that weighs each photo of its gallery. `forward` gives the embeddings only (what
    training needs); `pool_with_weights` gives (embeddings (n, d), photo weights (N,)), the weights
    summing to 1 over each gallery's photos."""

    def pool_with_weights(self, x: torch.Tensor, index: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def forward(self, x, index, n):
        return self.pool_with_weights(x, index, n)[0]


class GatedAttentionPool(AttentionPooling):
    """Ilse et al. 2018 (attention-based deep MIL), gated: a_i = softmax over the gallery of
    w·(tanh(V x_i) ⊙ sigmoid(U x_i)), z = Σ a_i x_i. A label that one photo in twenty decides
    ("has a pool") can get that photo's features whole instead of a twentieth of them."""

    def __init__(self, dim: int, hidden: int = 128):
        super().__init__()
        self.hidden = hidden
        self.gates = nn.Linear(dim, 2 * hidden)  # V and U side by side: one matrix product
        self.score = nn.Linear(hidden, 1)

    def pool_with_weights(self, x, index, n):
        v, u = self.gates(x).split(self.hidden, dim=1)
        weights = segment_softmax(self.score(torch.tanh(v) * torch.sigmoid(u)).squeeze(1), index, n)
        return segment_sum(weights[:, None] * x.float(), index, n).to(x.dtype), weights


class PMAPool(AttentionPooling):
    """Set Transformer's PMA_k: k learned seed vectors attend (multi-head) to the gallery's photos,
    H = LN(Q + Attention(Q, K, V)), O = LN(H + relu(W_o H)) as in the authors' MAB, then one Linear
    from the k seeds' outputs (k x width) to the embedding width `dim`, so the heads see the same
    width as with mean pooling. A photo's weight is its attention averaged over seeds and heads."""

    def __init__(self, dim: int, seeds: int = 4, heads: int = 4, width: int = 256):
        super().__init__()
        if width % heads:
            raise ValueError(f"PMA width {width} must be a multiple of its {heads} heads")
        self.seeds, self.heads, self.width = seeds, heads, width
        self.seed = nn.Parameter(torch.empty(seeds, width))
        nn.init.xavier_uniform_(self.seed)
        self.query = nn.Linear(width, width)
        self.key_value = nn.Linear(dim, 2 * width)
        self.norm_attention = nn.LayerNorm(width)
        self.feed_forward = nn.Linear(width, width)
        self.norm_output = nn.LayerNorm(width)
        self.out = nn.Linear(seeds * width, dim)

    def pool_with_weights(self, x, index, n):
        k, h, w = self.seeds, self.heads, self.width
        q = self.query(self.seed).view(k, h, w // h)
        keys, values = self.key_value(x).float().view(-1, 2, h, w // h).unbind(1)
        scores = torch.einsum("nhd,khd->nkh", keys, q.float()) / math.sqrt(w // h)
        attention = segment_softmax(scores, index, n)                             # (N, k, h)
        mixed = segment_sum(attention[..., None] * values[:, None], index, n)     # (n, k, h, w/h)
        hidden = self.norm_attention(q.reshape(1, k, w) + mixed.reshape(n, k, w))
        hidden = self.norm_output(hidden + torch.relu(self.feed_forward(hidden)))
        return self.out(hidden.reshape(n, k * w)), attention.mean(dim=(1, 2))


POOLINGS = {
    "mean": lambda dim: MeanPool(),
    "max": lambda dim: MaxPool(),
    "gem": lambda dim: GeMPool(),
    "gated_attention": GatedAttentionPool,
    "pma": PMAPool,
}  # name -> factory taking the image vectors' width


def build_pooling(name: str, dim: int) -> nn.Module:
    if name not in POOLINGS:
        raise ValueError(f"unknown pooling {name!r}; known: {sorted(POOLINGS)}")
    return POOLINGS[name](dim)
