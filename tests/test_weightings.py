"""Loss weightings behind one interface: each against a hand computation, pseudo-uniform and Kendall with
the losses and gradients of their first implementation, DWA's, RLW's, FAMO's and IMTL-G's weights from their
papers' formulas (written here independently of gallery/), absent tasks masked, state restored from a
state_dict, and the hooks the training loop calls. Data parallel: tests/test_distributed.py."""
import math

import numpy as np
import pytest
import torch

from gallery.data.labels import LabelStats
from gallery.data.packed import PackedGalleries
from gallery.data.tasks import Task
from gallery.model.gallery_model import GalleryModel
from gallery.model.weightings import (DWA, FAMO, IMTLG, RLW, SI, WEIGHTINGS, Kendall, PseudoUniform, Weighting,
                                      build_weighting, imtl_g_weights)
from gallery.training.engine import FitConfig, FitOptions, TrainData, fit

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
        FitOptions(log=lambda _: None))
    steps = [c for c in weighting.calls if c[0] == "after_step"]
    epochs = [c for c in weighting.calls if c[0] == "on_epoch_end"]
    assert len(steps) == 6 and all(c[1] == (3,) and c[2] == torch.bool for c in steps)
    assert [c[1] for c in epochs] == [0, 1] and all(len(c[2]) == 3 for c in epochs)
    assert sum(c[3] for c in steps) >= 4  # a step lowers the batch's losses it was computed on, mostly


def test_every_weighting_is_known_by_name():
    assert {"pseudo_uniform", "kendall", "dwa", "si", "rlw", "famo", "imtl_g"} <= set(WEIGHTINGS)
    assert [type(build_weighting(n, TASKS, STATS)) for n in ("si", "rlw", "famo", "imtl_g")] == [SI, RLW, FAMO, IMTLG]


def shared_problem():
    """A fixed batch: three task losses that depend on one shared parameter vector, task c absent."""
    shared = torch.tensor([0.3, -1.2, 2.0], requires_grad=True)
    present = torch.tensor([True, False, True])
    losses = torch.stack([shared[0] ** 2 + 0.1, (shared[1] - 1) ** 2, 3 * (shared[2] + 0.5) ** 2]) * present
    return shared, present, losses


def test_si_is_the_sum_of_log_losses_with_inverse_loss_gradients():
    shared, present, losses = shared_problem()
    value = SI(TASKS, STATS).backward(losses, present)
    assert value.item() == pytest.approx(math.log(0.3 ** 2 + 0.1) + math.log(3 * 2.5 ** 2), rel=1e-6)
    # d/dx log L = L'/L: task b's 2x / (x^2 + 0.1), task r's 6 (x + 0.5) / (3 (x + 0.5)^2); absent c: nothing
    expected = [2 * 0.3 / (0.3 ** 2 + 0.1), 0.0, 2 / 2.5]
    torch.testing.assert_close(shared.grad, torch.tensor(expected))
    zero = torch.tensor([0.0, 1.0, 2.0], requires_grad=True)  # a zero loss is left out, not log 0 = -inf
    value = SI(TASKS, STATS).backward(zero * torch.tensor([1.0, 1.0, 1.0]), ALL)
    assert value.item() == pytest.approx(math.log(2.0)) and zero.grad.tolist() == pytest.approx([0.0, 1.0, 0.5])


def test_rlw_draws_softmax_normal_weights_over_the_present_tasks_and_resumes_its_stream():
    torch.manual_seed(7)
    weighting = RLW(TASKS, STATS)
    assert weighting.seed == 7  # the training seed the caller set
    normals = np.random.default_rng([7, 0]).standard_normal(3)
    expected = 3 * np.exp(normals) / np.exp(normals).sum()
    assert weighting.loss(LOSSES, ALL).item() == pytest.approx(float(expected @ [0.7, 1.3, 10.0 / 4.0]), rel=1e-6)
    present = torch.tensor([True, False, True])
    normals = np.random.default_rng([7, 1]).standard_normal(3)[[0, 2]]
    expected = 2 * np.exp(normals) / np.exp(normals).sum()  # the absent task gets 0, the others share
    assert weighting.loss(LOSSES * present, present).item() == pytest.approx(float(expected @ [0.7, 10.0 / 4.0]), rel=1e-6)

    resumed = RLW(TASKS, STATS)
    resumed.load_state_dict(weighting.state_dict())  # the checkpoint carries (seed, step)
    assert [resumed.draw(ALL).tolist() for _ in range(3)] == [weighting.draw(ALL).tolist() for _ in range(3)]
    draws = torch.stack([weighting.draw(ALL) for _ in range(4000)])
    assert draws.sum(1).tolist() == pytest.approx([3.0] * 4000, rel=1e-5)
    np.testing.assert_allclose(draws.mean(0), [1.0, 1.0, 1.0], atol=0.05)  # on average, pseudo-uniform
    assert draws.std(0).min() > 0.5  # and really random


def famo_reference(losses_per_step, tasks: int):
    """FAMO as its paper's Algorithm 1 reads (Liu et al. 2023), for tasks that are all present: logits w
    with torch's own Adam (lr 0.025, weight decay 0.01); each step the model's weights z/(c L) and, from
    the losses before and after the step, w's gradient d(softmax w)/dw^T (log L_before - log L_after)."""
    w = torch.zeros(tasks, requires_grad=True)
    optimiser = torch.optim.Adam([w], lr=0.025, weight_decay=0.01)
    model_weights = []
    for before, after in losses_per_step:
        z = torch.softmax(w, 0).detach()
        model_weights.append(z / (z / before).sum() / before)
        (d,) = torch.autograd.grad(torch.softmax(w, 0), w, grad_outputs=before.log() - after.log())
        optimiser.zero_grad()
        w.grad = d
        optimiser.step()
    return w.detach(), model_weights


def test_famo_weights_and_logit_updates_follow_the_paper():
    steps = [(torch.tensor([0.7, 1.3, 10.0]), torch.tensor([0.6, 1.25, 9.0])),
             (torch.tensor([0.65, 1.2, 9.5]), torch.tensor([0.62, 1.0, 9.4]))]
    logits, model_weights = famo_reference(steps, 3)
    weighting = FAMO(TASKS, STATS)
    for (before, after), expected in zip(steps, model_weights):
        losses = before.clone().requires_grad_()
        z = torch.softmax(weighting.logits, 0)
        value = weighting.backward(losses, ALL)
        assert value.item() == pytest.approx(float((z / (z / before).sum() * before.log()).sum()), rel=1e-6)
        torch.testing.assert_close(losses.grad, expected)  # gradient of the objective: z_k / (c L_k) per task
        weighting.after_step(before, ALL, lambda after=after: (after, ALL))
    torch.testing.assert_close(weighting.logits, logits)
    assert weighting.logits[2] > weighting.logits[0]  # r fell 1% in step 2, b 5%: r gains weight

    resumed = FAMO(TASKS, STATS)
    resumed.load_state_dict(weighting.state_dict())  # logits and their Adam state are checkpointed
    for w in (weighting, resumed):
        w.after_step(steps[0][0], ALL, lambda: (steps[0][1], ALL))
    torch.testing.assert_close(resumed.logits, weighting.logits, rtol=0, atol=0)


def test_famo_leaves_an_absent_task_and_a_zero_loss_out_without_moving_its_logit():
    """Task c absent: its weight is 0 and its logit and Adam state do not move, not even by momentum;
    b and r update as a two-task FAMO would. A task whose loss is 0 is left out the same way."""
    weighting = FAMO(TASKS, STATS)
    weighting.after_step(torch.tensor([0.7, 1.3, 10.0]), ALL, lambda: (torch.tensor([0.6, 1.0, 9.0]), ALL))
    moved = {k: v.clone() for k, v in weighting.state_dict().items()}
    present = torch.tensor([True, False, True])
    before, after = torch.tensor([0.5, 0.0, 8.0]), torch.tensor([0.45, 0.0, 7.9])
    losses = before.clone().requires_grad_()
    weighting.backward(losses, present)
    z = torch.softmax(moved["logits"][[0, 2]], 0)
    expected = z / (z / before[[0, 2]]).sum() / before[[0, 2]]
    torch.testing.assert_close(losses.grad, torch.tensor([expected[0], 0.0, expected[1]]))
    weighting.after_step(before, present, lambda: (after, present))
    for key in ("logits", "moment", "second_moment", "steps"):
        assert weighting.state_dict()[key][1] == moved[key][1], key
    assert weighting.steps.tolist() == [2, 1, 2] and (weighting.logits[[0, 2]] != moved["logits"][[0, 2]]).all()

    zero = before.clone().requires_grad_()  # b fitted exactly (loss 0), c labelled: b is left out
    weighting.backward(zero * torch.tensor([0.0, 1.0, 1.0]), ALL)
    assert zero.grad[0] == 0 and torch.isfinite(zero.grad).all()


class TinyModel(torch.nn.Module):
    """A shared linear encoder (the gallery representation z) and one linear head per task."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.encoder = torch.nn.Linear(4, 5)
        self.heads = torch.nn.Linear(5, 3)

    def forward(self, x, targets):
        z = self.encoder(x)
        out = self.heads(z)
        present = ~torch.isnan(targets)
        squared = torch.where(present, out - torch.nan_to_num(targets), 0.0) ** 2
        return squared.sum(0) / present.sum(0).clamp(min=1), present.any(0), z


def imtl_g_paper_weights(grads: np.ndarray) -> np.ndarray:
    """IMTL-G's closed form as the paper writes it: with D the rows g_1 - g_t and U the rows u_1 - u_t
    (u = g / |g|), alpha_2..K = g_1 U^T (D U^T)^-1 and alpha_1 = 1 - sum of the others."""
    units = grads / np.linalg.norm(grads, axis=1, keepdims=True)
    d, u = grads[0] - grads[1:], units[0] - units[1:]
    rest = grads[0] @ u.T @ np.linalg.inv(d @ u.T)
    return np.concatenate([[1 - rest.sum()], rest])


@pytest.mark.parametrize("absent", [None, 1])
def test_imtl_g_gives_the_encoder_the_papers_combination_and_the_heads_their_own_losses(absent):
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(6, 4)).astype(np.float32))
    targets = torch.from_numpy(rng.normal(size=(6, 3)).astype(np.float32))
    if absent is not None:
        targets[:, absent] = torch.nan
    model = TinyModel()
    losses, present, z = model(x, targets)
    task_grads = np.stack([torch.autograd.grad(losses[k], z, retain_graph=True)[0].flatten().numpy()
                           for k in range(3)])  # each task's gradient at z, one autograd call each
    keep = [k for k in range(3) if k != absent]
    expected = np.zeros(3)
    expected[keep] = imtl_g_paper_weights(task_grads[keep].astype(np.float64))
    weighting = IMTLG(TASKS, STATS)
    weighting.backward(losses, present, z)
    np.testing.assert_allclose(weighting.weights.numpy(), expected, rtol=1e-5, atol=1e-7)
    combined = expected @ task_grads
    units = task_grads[keep] / np.linalg.norm(task_grads[keep], axis=1, keepdims=True)
    assert np.ptp(units @ combined) < 1e-5 * abs(units @ combined).max()  # equal projections: impartial

    # the encoder got sum_k alpha_k dL_k/dz, the heads the gradient of their pseudo-uniform terms
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    losses, _, _ = model(x, targets)
    (torch.from_numpy(expected).float() * losses).sum().backward()
    for name in ("encoder.weight", "encoder.bias"):
        torch.testing.assert_close(ours[name], model.encoder.get_parameter(name.split(".")[1]).grad, rtol=1e-4, atol=1e-6)
    model.zero_grad()
    losses, _, _ = model(x, targets)
    (torch.tensor([1.0, 1.0, 0.25]) * losses).sum().backward()
    for name in ("heads.weight", "heads.bias"):
        torch.testing.assert_close(ours[name], model.heads.get_parameter(name.split(".")[1]).grad)


def test_imtl_g_weights_from_the_gram_matrix():
    """Two tasks: alpha = (|g_2|, |g_1|) / (|g_1| + |g_2|) whatever the angle. A task with no gradient
    gets 0. Where the paper's sum-to-one would reverse the direction (the weights' sum is negative),
    the combination still has the same positive projection on every task's unit gradient."""
    g = torch.tensor([[3.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    alpha = imtl_g_weights(g @ g.T, torch.tensor([True, True]))
    torch.testing.assert_close(alpha, torch.tensor([2 ** 0.5, 3.0], dtype=torch.float64) / (3 + 2 ** 0.5))
    g = torch.tensor([[3.0, 0.0], [0.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    alpha = imtl_g_weights(g @ g.T, torch.tensor([True, True, True]))
    torch.testing.assert_close(alpha, torch.tensor([2 ** 0.5, 0.0, 3.0], dtype=torch.float64) / (3 + 2 ** 0.5))
    g = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.03, 0.01, 0.01]], dtype=torch.float64)
    alpha = imtl_g_weights(g @ g.T, torch.tensor([True, True, True]))
    beta = torch.linalg.solve(g @ g.T, g.norm(dim=1))
    assert beta.sum() < 0  # the paper's normalisation would flip this one
    projections = (g / g.norm(dim=1, keepdim=True)) @ (alpha @ g)
    assert (projections > 0).all() and projections.max() - projections.min() < 1e-7 * projections.max()
