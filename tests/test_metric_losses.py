"""The metric-learning losses (gallery.model.metric): the sampled cosine softmax against a full one
computed here, the in-batch NT-Xent against a hand computation, batches without labels, and two gloo
processes on halves of a batch making one process's update (the candidates span the whole batch)."""
import math

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from gallery.model.metric import CosineClassifier, InBatchSoftmax, pair_keys
from gallery.training.distributed import join, leave
from test_distributed import free_port  # conftest's is not imported: the ranks would load everything it loads

NAN = float("nan")


def full_softmax(z, weight, labels, temperature):
    """[summed cross-entropy, count, correct] over all classes, by F.cross_entropy."""
    labelled = ~torch.isnan(labels)
    logits = F.normalize(z[labelled], dim=1) @ F.normalize(weight, dim=1).T / temperature
    target = labels[labelled].long()
    return torch.stack([F.cross_entropy(logits, target, reduction="sum"), labelled.sum().float(),
                        (logits.argmax(1) == target).sum().float()])


@pytest.mark.parametrize("sampled", [6, 50, 3])  # 3: the batch's 3 classes and 3 others are all 6
def test_the_sampled_softmax_is_the_full_one_when_the_sample_covers_every_class(sampled):
    torch.manual_seed(0)
    loss = CosineClassifier(4, 6, temperature=0.1, sampled=sampled)
    labels = torch.tensor([0, 3, NAN, 3, 5, NAN, 0, 5])
    z = torch.randn(8, 4)
    z[:2] += 3 * loss.weight.detach()[[0, 3]]  # near their class weights: some are correct
    z.requires_grad_()
    out = loss(z * 3, labels)  # any norm: the loss normalises
    expected = full_softmax(z.detach(), loss.weight.detach(), labels, 0.1)
    torch.testing.assert_close(out.detach(), expected)
    assert out[2] > 0  # the correct count means something
    out[0].backward()
    z2, w2 = z.detach().clone().requires_grad_(), loss.weight.detach().clone().requires_grad_()
    full_softmax_grad = torch.autograd.grad(full_softmax(z2, w2, labels, 0.1)[0], (z2, w2))
    torch.testing.assert_close(z.grad, full_softmax_grad[0])
    torch.testing.assert_close(loss.weight.grad, full_softmax_grad[1])


def test_the_candidates_are_the_batchs_classes_and_exactly_sampled_others():
    torch.manual_seed(0)
    loss = CosineClassifier(4, 1000, temperature=0.1, sampled=20)
    labels = torch.tensor([999, 3, NAN, 17, 500, 3])
    candidates = loss.candidates(labels)
    assert len(candidates) == 24 and len(candidates.unique()) == 24
    assert {3, 17, 500, 999} <= set(candidates.tolist()) and 0 <= candidates.min() and candidates.max() < 1000
    assert torch.equal(candidates, candidates.sort().values)
    # the same batch (on another rank, or in another order) draws the same others; another batch others
    assert torch.equal(CosineClassifier(4, 1000, sampled=20).candidates(labels.flip(0)), candidates)
    assert not torch.equal(loss.candidates(torch.tensor([999, 3, 17, 501])), candidates)
    # the loss is the cross-entropy over exactly these candidates
    z = torch.randn(6, 4)
    out = loss(z, labels)
    labelled = ~torch.isnan(labels)
    logits = F.normalize(z[labelled], dim=1) @ F.normalize(loss.weight.detach()[candidates], dim=1).T / 0.1
    target = (candidates[None, :] == labels[labelled, None].long()).float().argmax(1)
    torch.testing.assert_close(out[0].detach(), F.cross_entropy(logits, target, reduction="sum"))


def test_every_class_outside_the_batch_can_be_drawn():
    """The drawn positions among the non-batch classes map to class ids past every batch class too."""
    loss, rng, seen = CosineClassifier(2, 40, sampled=4), np.random.default_rng(0), set()
    batch = {0, 1, 38, 39, 20}
    for _ in range(100):
        extra = rng.choice([c for c in range(40) if c not in batch], 1)
        labels = torch.tensor(sorted(batch) + extra.tolist(), dtype=torch.float32)
        drawn = set(loss.candidates(labels).tolist()) - set(labels.long().tolist())
        assert len(drawn) == 4
        seen |= drawn
    assert seen == set(range(2, 38)) - {20}


def test_pair_keys_are_sorted_unique_symmetric_and_not_saved():
    keys = pair_keys(np.array([0, 0, 2, 1, 4]), np.array([1, 3, 5, 0, 4]), 6)
    assert keys.tolist() == [1, 3, 6, 17, 18, 32]  # (0,1) (0,3) (1,0) (2,5) (3,0) (5,2); (4,4) and the repeat dropped
    assert keys.dtype == torch.int64
    loss = InBatchSoftmax()
    loss.set_pairs(keys, 6)
    assert "keys" not in loss.state_dict() and torch.equal(loss.keys, keys)


def test_in_batch_nt_xent_by_hand():
    """Galleries g0..g4 with nodes 0, 1, none, 2, 3 and pairs (0,1), (0,3), (2,5): g0's positives are
    g1 and g4, g1's and g4's is g0; g3's partner is not in the batch and g2 has no node, so both are
    only negatives. Cosines: s01 .6, s02 0, s03 -1, s04 .8, s12 .8, s13 -.6, s14 0, s23 0, s24 -.6, s34 -.8."""
    t = 0.5
    z = torch.tensor([[2.0, 0.0], [3.0, 4.0], [0.0, 0.5], [-1.0, 0.0], [0.8, -0.6]], requires_grad=True)
    nodes = torch.tensor([0, 1, NAN, 2, 3])
    loss = InBatchSoftmax(temperature=t)
    loss.set_pairs(pair_keys(np.array([0, 0, 2]), np.array([1, 3, 5]), 6), 6)

    def lse(*s):
        return math.log(sum(math.exp(x / t) for x in s))

    l0 = lse(0.6, 0.0, -1.0, 0.8) - (0.6 + 0.8) / 2 / t
    l1 = lse(0.6, 0.8, -0.6, 0.0) - 0.6 / t
    l4 = lse(0.8, 0.0, -0.6, -0.8) - 0.8 / t
    out = loss(z, nodes)
    # g0's nearest is g4 (a positive), g1's is g2 (not), g4's is g0 (a positive)
    torch.testing.assert_close(out.detach(), torch.tensor([l0 + l1 + l4, 3.0, 2.0]))
    out[0].backward()
    assert torch.isfinite(z.grad).all() and z.grad[2].abs().sum() > 0  # a negative is pushed away


def test_batches_without_labels_give_zeros_and_a_backward():
    z = torch.randn(5, 4, requires_grad=True)
    identity = CosineClassifier(4, 10, sampled=3)
    out = identity(z, torch.full((5,), NAN))
    assert torch.equal(out, torch.zeros(3))
    out[0].backward()
    assert torch.equal(z.grad, torch.zeros(5, 4)) and torch.equal(identity.weight.grad, torch.zeros(10, 4))
    pairs = InBatchSoftmax()
    pairs.set_pairs(pair_keys(np.array([0]), np.array([7]), 8), 8)
    for nodes in (torch.tensor([0.0, 1, NAN, 2, 3]), torch.full((5,), NAN)):  # nodes without a partner here; none
        z.grad = None
        out = pairs(z, nodes)
        assert torch.equal(out, torch.zeros(3))
        out[0].backward()
        assert torch.equal(z.grad, torch.zeros(5, 4))
    assert torch.equal(CosineClassifier(4, 10, sampled=0)(z, torch.full((5,), NAN)), torch.zeros(3))  # no candidate
    lone = pairs(z[:1], torch.tensor([0.0]))  # one gallery: no other to compare with
    assert torch.equal(lone, torch.zeros(3))
    assert torch.equal(InBatchSoftmax()(z, torch.zeros(5)), torch.zeros(3))  # no pairs set


def test_low_precision_embeddings_are_scored_in_float32():
    torch.manual_seed(0)
    z = torch.randn(6, 4).bfloat16()
    identity, labels = CosineClassifier(4, 5, sampled=2), torch.tensor([0, 1, 1, NAN, 4, 2])
    pairs, nodes = InBatchSoftmax(), torch.tensor([0, 1, 2, 3, NAN, 5])
    pairs.set_pairs(pair_keys(np.array([0, 2]), np.array([1, 5]), 6), 6)
    for loss, targets in ((identity, labels), (pairs, nodes)):
        out = loss(z, targets)
        assert out.dtype == torch.float32 and out[1] > 0
        torch.testing.assert_close(out, loss(z.float(), targets), rtol=0, atol=0)


# ---------------------------------------------------------------- data parallel

CUT = 5  # rank 0 reads galleries [0, 5), rank 1 [5, 12): unequal parts, so the gather pads


class Encoded(torch.nn.Module):
    """A small "encoder" before the loss: its weight gradient is what DDP averages."""

    def __init__(self, loss):
        super().__init__()
        self.encoder, self.loss = torch.nn.Linear(5, 4), loss

    def forward(self, x, targets, ranks=None):
        return self.loss(self.encoder(x), targets, ranks)


def problem(kind: str):
    """An encoder (Linear) and the loss on 12 galleries; labels of 6 classes among 20, with 3 sampled:
    a rank's own classes alone would make other candidates."""
    torch.manual_seed(0)
    x = torch.randn(12, 5)
    if kind == "identity":
        loss = CosineClassifier(4, 20, temperature=0.2, sampled=3)
        targets = torch.tensor([0, 4, NAN, 4, 9, 11, 0, NAN, 15, 9, 18, 11])
    else:
        loss = InBatchSoftmax(temperature=0.2)
        loss.set_pairs(pair_keys(np.array([0, 1, 2, 5, 6]), np.array([3, 4, 7, 8, 1]), 10), 10)
        targets = torch.tensor([0, 1, NAN, 2, 3, 4, 5, NAN, 6, 7, 8, 9])
    return Encoded(loss), x, targets


def step(model, x, targets, ranks=None):
    """The engine's rule: the rank's sum over the whole batch's count, times the world size."""
    out = model(x, targets, ranks)
    world = 1 if ranks is None else ranks.world
    count = out[1].detach() if ranks is None else ranks.all_reduce(out[1].detach().clone())
    (out[0] * world / count.clamp(min=1)).backward()
    return out.detach()


def rank_process(rank: int, port: int, folder: str) -> None:
    torch.set_num_threads(1)
    ranks = join(rank, 2, 2, "127.0.0.1", port, torch.device("cpu"))
    for kind in ("identity", "pairs"):
        model, x, targets = problem(kind)
        part = slice(0, CUT) if rank == 0 else slice(CUT, None)
        model.train()
        out = step(ranks.wrap(model, torch.device("cpu")), x[part], targets[part], ranks)
        total = ranks.all_reduce(out.clone())
        torch.save({"out": total, "grads": {k: p.grad for k, p in model.named_parameters()}},
                   f"{folder}/{kind}-rank{rank}.pt")
    leave()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("metric-ddp")
    mp.spawn(rank_process, args=(free_port(), str(folder)), nprocs=2)
    return {kind: [torch.load(folder / f"{kind}-rank{r}.pt", weights_only=True) for r in (0, 1)]
            for kind in ("identity", "pairs")}


@pytest.mark.parametrize("kind", ["identity", "pairs"])
def test_two_ranks_on_halves_of_a_batch_make_one_process_update(two_ranks, kind):
    model, x, targets = problem(kind)
    out = step(model, x, targets)
    assert out[1] >= 4 and out[2] > 0
    for rank in two_ranks[kind]:
        torch.testing.assert_close(rank["out"], out, rtol=1e-6, atol=1e-6)  # a float32 sum of ~40
        for name, p in model.named_parameters():
            assert p.grad.abs().sum() > 0, name
            torch.testing.assert_close(rank["grads"][name], p.grad, rtol=0, atol=1e-6, msg=name)


def test_identity_validation_scores_new_groups_in_the_batch():
    """In eval mode an identity task's loss is the in-batch softmax with the batch's galleries of the same
    group as positives (valid groups are new: not classes): the pairs loss over those very pairs."""
    torch.manual_seed(1)
    z = torch.randn(7, 4)
    groups = torch.tensor([5.0, 5.0, 9.0, float("nan"), 9.0, 9.0, 2.0])
    identity = CosineClassifier(4, 3, temperature=0.2, sampled=1).eval()
    a, b = np.array([0, 2, 2, 4]), np.array([1, 4, 5, 5])
    pairs = InBatchSoftmax(temperature=0.2)
    pairs.set_pairs(pair_keys(a, b, 7), 7)
    nodes = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    torch.testing.assert_close(identity(z, groups), pairs(z, nodes))
    assert identity(z, groups)[1].item() == 5  # galleries 0, 1, 2, 4, 5 have a partner in the batch
