"""Loss weightings behind one interface: each against a hand computation, pseudo-uniform and Kendall with
the losses and gradients of their first implementation, DWA's weights from its formula, and the hooks the
training loop calls."""
import math

import numpy as np
import pytest
import torch

from gallery.data.labels import LabelStats
from gallery.data.packed import PackedGalleries
from gallery.data.tasks import Task
from gallery.model.gallery_model import GalleryModel
from gallery.model.weightings import DWA, WEIGHTINGS, Kendall, PseudoUniform, Weighting, build_weighting
from gallery.training.engine import FitConfig, TrainData, fit

TASKS = [Task("b", "b", "binary"), Task("c", "c", "multiclass", classes=("x", "y")), Task("r", "r", "regression")]
STATS = {"r": LabelStats("regression", {"train": 5}, mean=3.0, variance=4.0)}
LOSSES = torch.tensor([0.7, 1.3, 10.0])
ALL = torch.tensor([True, True, True])


def test_pseudo_uniform_by_hand():
    assert PseudoUniform(TASKS, STATS).loss(LOSSES, ALL).item() == pytest.approx(0.7 + 1.3 + 10.0 / 4.0)


def test_kendall_by_hand():
    weighting = Kendall(TASKS, STATS)
    assert weighting.log_vars[2].item() == pytest.approx(math.log(4.0))  # starts at the pseudo-uniform point
    with torch.no_grad():
        weighting.log_vars.copy_(torch.tensor([0.5, -0.2, 1.0]))
    expected = (math.exp(-0.5) * 0.7 + 0.25) + (math.exp(0.2) * 1.3 - 0.1) + (0.5 * math.exp(-1.0) * 10.0 + 0.5)
    assert weighting.loss(LOSSES, ALL).item() == pytest.approx(expected, rel=1e-6)
    # a task without a label in the batch contributes neither its loss (0) nor its ½·s term
    absent = torch.tensor([True, False, True])
    assert weighting.loss(LOSSES * absent, absent).item() == pytest.approx(expected - (math.exp(0.2) * 1.3 - 0.1), rel=1e-6)
    assert [n for n, _ in weighting.named_parameters()] == ["log_vars"]


def first_implementation(name: str, losses: torch.Tensor, present: torch.Tensor, log_vars: torch.Tensor):
    """The paper's two objectives as the pipeline first computed them (a function of the per-task means)."""
    scale = torch.tensor([1.0, 1.0, 1 / 4.0])
    if name == "pseudo_uniform":
        return (scale * losses).sum()
    factor = torch.tensor([1.0, 1.0, 0.5])
    return (factor * torch.exp(-log_vars) * losses + 0.5 * log_vars * present.float()).sum()


@pytest.mark.parametrize("name", ["pseudo_uniform", "kendall"])
def test_backward_gives_the_losses_and_gradients_of_the_first_implementation(name):
    """On a fixed batch (per-task losses that depend on a shared parameter), `backward` through the
    interface leaves the same objective and the same gradients as the original formula."""
    shared = torch.tensor([0.3, -1.2, 2.0], requires_grad=True)
    present = torch.tensor([True, False, True])

    def losses_of(x):
        return torch.stack([x[0] ** 2 + 0.1, (x[1] - 1) ** 2, 3 * (x[2] + 0.5) ** 2]) * present

    weighting = build_weighting(name, TASKS, STATS)
    with torch.no_grad():
        for p in weighting.parameters():
            p.copy_(torch.tensor([0.4, -0.3, 1.1]))
    value = weighting.backward(losses_of(shared), present)
    ours = [shared.grad.clone()] + [p.grad.clone() for p in weighting.parameters()]

    reference_shared = shared.detach().clone().requires_grad_()
    log_vars = torch.tensor([0.4, -0.3, 1.1], requires_grad=True)
    expected = first_implementation(name, losses_of(reference_shared), present, log_vars)
    expected.backward()
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)
    torch.testing.assert_close(ours[0], reference_shared.grad)
    if name == "kendall":
        torch.testing.assert_close(ours[1], log_vars.grad)
        assert ours[1][1].item() == 0.0  # the absent task's s gets no gradient


def test_dwa_weights_from_the_last_two_epochs_by_hand():
    weighting = DWA(TASKS, STATS)
    assert weighting.loss(LOSSES, ALL).item() == pytest.approx(0.7 + 1.3 + 10.0 / 4.0)  # epochs 1 and 2: w = 1
    weighting.on_epoch_end(0, torch.tensor([1.0, 2.0, 8.0]))
    assert weighting.weights.tolist() == [1.0, 1.0, 1.0]  # one epoch seen: still uniform
    weighting.on_epoch_end(1, torch.tensor([0.5, 2.0, 10.0]))
    ratios = np.array([0.5 / 1.0, 2.0 / 2.0, 10.0 / 8.0])
    expected = 3 * np.exp(ratios / 2) / np.exp(ratios / 2).sum()   # K exp(r_k / T) / sum_j exp(r_j / T), T = 2
    np.testing.assert_allclose(weighting.weights.numpy(), expected, rtol=1e-6)
    assert weighting.weights[2] > weighting.weights[1] > weighting.weights[0]  # the slowest learner gains weight
    present = torch.tensor([True, False, True])
    value = weighting.loss(LOSSES * present, present)  # the loop gives an absent task's loss as 0
    assert value.item() == pytest.approx(expected[0] * 0.7 + expected[2] * 10.0 / 4.0, rel=1e-6)
    weighting.on_epoch_end(2, torch.tensor([0.4, math.nan, 9.0]))  # task c had no label all epoch: r = 1
    ratios = np.array([0.4 / 0.5, 1.0, 9.0 / 10.0])
    np.testing.assert_allclose(weighting.weights.numpy(), 3 * np.exp(ratios / 2) / np.exp(ratios / 2).sum(), rtol=1e-6)
    state = DWA(TASKS, STATS)
    state.load_state_dict(weighting.state_dict())  # checkpointed with the model, so a resume continues
    torch.testing.assert_close(state.weights, weighting.weights)


class Recording(Weighting):
    """A weighting written outside gallery/: plain sums, and a record of every hook the loop calls."""

    calls: list

    def __init__(self, tasks, stats):
        super().__init__(tasks, stats)
        self.calls = []

    def loss(self, losses, present):
        return losses.sum()

    def after_step(self, losses, present, recompute):
        again, _ = recompute()
        self.calls.append(("after_step", losses.shape, present.dtype, bool((again <= losses + 1e-3).all())))

    def on_epoch_end(self, epoch, train_losses):
        self.calls.append(("on_epoch_end", epoch, train_losses.tolist()))


def test_a_new_weighting_needs_no_change_to_the_loop(monkeypatch):
    """Registered like the built-ins, a weighting gets its hooks from `fit`: after every step (with the
    batch's losses recomputed under the new weights), and each epoch's per-task training losses."""
    monkeypatch.setitem(WEIGHTINGS, "recording", Recording)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 4)).astype(np.float32)
    targets = np.stack([(x[:, 0] > 0), rng.integers(0, 2, 40), x[:, 1]], 1).astype(np.float32)
    targets[30:, 1] = np.nan
    data = TrainData(PackedGalleries(list(map(str, range(40))), torch.arange(41), torch.from_numpy(x)),
                     torch.from_numpy(targets), np.arange(30), np.arange(30, 35), np.arange(35, 40))
    torch.manual_seed(0)
    from gallery.evaluation.holdout import VectorInput

    model = GalleryModel(VectorInput(4), TASKS, 8, STATS)
    weighting = build_weighting("recording", TASKS, STATS)
    fit(model, weighting, data, FitConfig(lr=1e-2, batch_galleries=10, max_epochs=2, patience=5, precision="fp32"),
        log=lambda _: None)
    steps = [c for c in weighting.calls if c[0] == "after_step"]
    epochs = [c for c in weighting.calls if c[0] == "on_epoch_end"]
    assert len(steps) == 6 and all(c[1] == (3,) and c[2] == torch.bool for c in steps)
    assert [c[1] for c in epochs] == [0, 1] and all(len(c[2]) == 3 for c in epochs)
    assert sum(c[3] for c in steps) >= 4  # a step lowers the batch's losses it was computed on, mostly
