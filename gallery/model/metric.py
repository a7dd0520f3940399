"""Metric-learning losses on the L2-normalised gallery embedding z (Pinterest's way of training it).

- `CosineClassifier`: galleries of one group (a class index) belong together. A cosine classifier, the
  normalised softmax of Zhai & Wu 2019 ("Classification is a strong baseline for deep metric
  learning"): logits cos(z, w_c) / temperature over a step's candidate classes, the batch's own
  plus `sampled` others, so a step's cost does not grow with the number of classes.
- `InBatchSoftmax`: known positive pairs of galleries (by node id) belong together. NT-Xent: each gallery
  with a positive in the batch is an anchor, every other gallery of the batch a candidate.

Both return, like `TaskSums`' columns, [loss summed over this rank's anchors, their count, correct]:
the engine divides the sum by the whole batch's count. Data parallel, a rank's anchors are its own
rows but the candidates are the whole batch's (the ranks' rows gathered, pairs with gradient), so N
processes on parts of a batch make one process's update. `ranks` is duck-typed
(gallery.training.distributed.Ranks: model may not import training); None trains alone.
"""
from __future__ import annotations

import hashlib
import math

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def pair_keys(a: np.ndarray, b: np.ndarray, nodes: int) -> torch.LongTensor:
    """Positive pairs (a[i], b[i]) of node ids in [0, nodes) as the sorted, unique keys x*nodes+y
    that `InBatchSoftmax` looks up, in both orders (the pair is symmetric); a node paired with itself is dropped."""
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    a, b = a[a != b], b[a != b]
    return torch.from_numpy(np.unique(np.concatenate([a * nodes + b, b * nodes + a])))


def alone(ranks) -> bool:
    """Training without peers: no ranks given, or a group of one."""
    return ranks is None or ranks.world == 1


def row_counts(n: int, device: torch.device, ranks) -> list[int]:
    """Every rank's number of rows (a host synchronisation: gathering needs them to cut the padding)."""
    size = torch.tensor([n], device=device)
    sizes = [torch.empty_like(size) for _ in range(ranks.world)]
    dist.all_gather(sizes, size, group=ranks.group)
    return torch.cat(sizes).tolist()


class _AllGather(torch.autograd.Function):
    """all_gather of equal shapes whose backward gives each rank the sum of every rank's gradient for
    its own part (every rank's loss reads every rank's rows). All-reduce, not reduce-scatter, so gloo
    runs it; torch.distributed.nn.functional.all_gather does the same but is deprecated (a warning per call)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, ranks) -> torch.Tensor:
        ctx.ranks = ranks
        parts = [torch.empty_like(t) for _ in range(ranks.world)]
        dist.all_gather(parts, t.contiguous(), group=ranks.group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.ranks.group)
        return grad[ctx.ranks.rank], None


def gather_rows(t: torch.Tensor, counts: list[int], ranks, differentiable: bool = False) -> torch.Tensor:
    """Every rank's rows of `t` in rank order; each pads to the longest first (all_gather needs equal shapes)."""
    padded = torch.cat([t, t.new_zeros(max(counts) - len(t), *t.shape[1:])])
    if differentiable:
        parts = _AllGather.apply(padded, ranks)
    else:
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded, group=ranks.group)
    return torch.cat([part[:count] for part, count in zip(parts, counts)])


def same_group(mine: torch.Tensor, theirs: torch.Tensor) -> torch.Tensor:
    return (mine[:, None] == theirs[None, :]) & ~torch.isnan(mine)[:, None]


class CosineClassifier(nn.Module):
    """Normalised softmax over sampled classes. targets: each gallery's class index as a float, NaN where
    it has none. The candidates are the classes of the whole data-parallel batch plus `sampled` others
    (all classes when that many reach them). The others are drawn from a generator seeded by the batch's
    classes: every rank draws the same, as one process would, and the same batch always draws the same.
    "Correct" is the true class scoring highest among the candidates.

    In eval mode (validation) it scores what retrieval asks instead: valid galleries' groups are mostly
    not the classifier's classes (a group's listings may all be new), so the loss is the in-batch softmax
    with the batch's galleries of the same group (same number) as positives."""

    def __init__(self, dim: int, classes: int, temperature: float = 0.05, sampled: int = 1000):
        super().__init__()
        self.classes, self.temperature, self.sampled = classes, temperature, sampled
        self.weight = nn.Parameter(torch.empty(classes, dim))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's initialisation

    def candidates(self, labels: torch.Tensor) -> torch.Tensor:
        """The sorted candidate classes for the whole batch's label column (one host synchronisation)."""
        column = labels.detach().float().cpu().numpy()
        own = np.unique(column[~np.isnan(column)]).astype(np.int64)
        others = self.classes - len(own)
        if self.sampled >= others:
            return torch.arange(self.classes, device=self.weight.device)
        seed = int.from_bytes(hashlib.sha1(own.tobytes()).digest()[:8], "little")
        # Floyd's algorithm when few of many are drawn: O(sampled), not O(classes)
        drawn = np.random.default_rng(seed).choice(others, self.sampled, replace=False, shuffle=False)
        drawn += np.searchsorted(own - np.arange(len(own)), drawn, side="right")  # the drawn-th class not in `own`
        return torch.from_numpy(np.union1d(own, drawn)).to(self.weight.device)

    def forward(self, z: torch.Tensor, targets: torch.Tensor, ranks=None) -> torch.Tensor:
        if not self.training:  # validation: new listings' groups are not classes; are their partners nearest?
            return in_batch_softmax(z, targets, ranks, self.temperature, same_group)
        if alone(ranks):
            everyone = targets
        else:
            everyone = gather_rows(targets, row_counts(len(targets), targets.device, ranks), ranks)
        candidates = self.candidates(everyone)
        if not len(candidates):  # no `sampled` others and no label in the batch: nothing to score
            return (z.sum() + self.weight.sum()).float() * torch.zeros(3, device=z.device)
        weight = (~torch.isnan(targets)).float()
        logits = F.normalize(z.float(), dim=1) @ F.normalize(self.weight.index_select(0, candidates), dim=1).T
        logits = logits / self.temperature
        column = torch.searchsorted(candidates, torch.nan_to_num(targets).long())  # the true class's (any, if none)
        picked = logits.gather(1, column[:, None]).squeeze(1)
        per = (torch.logsumexp(logits, 1) - picked) * weight
        hit = (picked.detach() >= logits.detach().amax(1)).float() * weight
        return torch.stack([per.sum(), weight.sum(), hit.sum()])


class InBatchSoftmax(nn.Module):
    """NT-Xent over known positive pairs. targets: each gallery's node id as a float, NaN where it has
    none (such a gallery is only ever a negative). An anchor is a gallery with at least one positive
    elsewhere in the batch; its loss is the mean over those positives j of
    -s_ij/t + logsumexp over k != i of s_ik/t (s the cosine). Both ends of a pair are anchors.
    "Correct": the anchor's nearest other gallery is a positive."""

    def __init__(self, temperature: float = 0.1):
        super().__init__()
        self.temperature, self.nodes = temperature, 0
        # a plain tensor, not a buffer: data, possibly large, never in the state dict, and not broadcast by
        # data-parallel training at every step as buffers are; moved to the batch's device on first use
        self.keys = torch.zeros(0, dtype=torch.int64)

    def set_pairs(self, keys: torch.LongTensor, nodes: int) -> None:
        """The known pairs as `pair_keys` gives them."""
        self.keys = keys.to(torch.int64).unique()  # sorted, for searchsorted
        self.nodes = nodes

    def known(self, key: torch.Tensor) -> torch.Tensor:
        """Whether each key is a known pair: binary search in the sorted keys, no host synchronisation."""
        if len(self.keys) == 0:
            return torch.zeros_like(key, dtype=torch.bool)
        if self.keys.device != key.device:
            self.keys = self.keys.to(key.device)
        at = torch.searchsorted(self.keys, key).clamp(max=len(self.keys) - 1)
        return self.keys[at] == key

    def forward(self, z: torch.Tensor, targets: torch.Tensor, ranks=None) -> torch.Tensor:
        def related(mine: torch.Tensor, theirs: torch.Tensor) -> torch.Tensor:
            key = torch.nan_to_num(mine).long()[:, None] * self.nodes + torch.nan_to_num(theirs).long()
            return ~torch.isnan(mine)[:, None] & ~torch.isnan(theirs) & self.known(key)

        return in_batch_softmax(z, targets, ranks, self.temperature, related)


def in_batch_softmax(z: torch.Tensor, targets: torch.Tensor, ranks, temperature: float, related) -> torch.Tensor:
    """NT-Xent over the (gathered) batch: anchors are this rank's galleries with a positive elsewhere in the
    batch (`related(my targets, everyone's)`: which pairs are positive), candidates every other gallery."""
    z = F.normalize(z.float(), dim=1)
    if alone(ranks):
        everyone, theirs, start = z, targets, 0
    else:
        counts = row_counts(len(z), z.device, ranks)
        everyone, theirs = gather_rows(z, counts, ranks, differentiable=True), gather_rows(targets, counts, ranks)
        start = sum(counts[:ranks.rank])
    s = z @ everyone.T / temperature
    other = (start + torch.arange(len(z), device=z.device))[:, None] != torch.arange(len(everyone), device=z.device)
    positive = other & related(targets, theirs)
    # self excluded by the smallest float, not -inf: a lone gallery's row stays finite (0 once masked)
    others = s.masked_fill(~other, torch.finfo(s.dtype).min)
    many = positive.float().sum(1)
    anchor = (many > 0).float()
    per = (torch.logsumexp(others, 1) - (s * positive).sum(1) / many.clamp(min=1)) * anchor
    hit = positive.gather(1, others.detach().argmax(1, keepdim=True)).squeeze(1).float()
    return torch.stack([per.sum(), anchor.sum(), hit.sum()])
