"""Masked per-task losses: the values and gradients of the per-task reference, no host synchronisation,
and an exact zero for a task without labels."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from gallery.data.labels import LabelStats
from gallery.data.tasks import Task
from gallery.model.heads import HeadLayout
from gallery.model.losses import TaskLosses
from gallery.model.weightings import DWA, Kendall, PseudoUniform

NAN = float("nan")


# ---------------------------------------------------------------- masked losses

LOSS_TASKS = [Task("b", "b", "binary"), Task("c", "c", "multiclass", classes=("x", "y", "z")),
              Task("r", "r", "regression"), Task("b2", "b2", "binary"), Task("c2", "c2", "multiclass", classes=("p", "q"))]


def reference_losses(outputs: dict, targets: dict) -> dict:
    """The losses as first written: per task, boolean indexing of the labelled rows (a host sync each)."""
    out = {}
    for t in LOSS_TASKS:
        target = targets[t.name]
        mask = target != -1 if t.kind == "multiclass" else ~torch.isnan(target)
        if not mask.any():
            out[t.name] = outputs[t.name].sum() * 0.0
            continue
        o, y = outputs[t.name][mask].float(), target[mask]
        out[t.name] = (F.binary_cross_entropy_with_logits(o, y.float()) if t.kind == "binary"
                       else F.cross_entropy(o, y.long()) if t.kind == "multiclass" else F.mse_loss(o, y.float()))
    return out


def loss_case(seed=0, n=7):
    g = torch.Generator().manual_seed(seed)
    layout = HeadLayout.of(LOSS_TASKS)
    outputs = torch.randn(n, layout.columns, generator=g, requires_grad=True)
    targets = torch.stack([
        torch.tensor([1, 0, NAN, 1, 0, NAN, 1]),            # b
        torch.tensor([2, NAN, 0, 1, NAN, NAN, 2]),          # c (class indices)
        torch.tensor([3.5, NAN, -1.0, NAN, 0.25, 2.0, NAN]),  # r
        torch.full((n,), NAN),                              # b2: no label in this batch
        torch.tensor([NAN, 1, NAN, NAN, NAN, NAN, 0]),      # c2
    ], 1)
    return layout, outputs, targets


def test_masked_losses_equal_the_per_task_reference_in_values_and_gradients():
    layout, outputs, targets = loss_case()
    sums = TaskLosses(layout)(outputs, targets)
    ours = sums.means()
    assert sums.count.tolist() == [5, 4, 4, 0, 2]
    by_task = layout.split(outputs)
    as_given = {t.name: torch.nan_to_num(targets[:, k], nan=-1.0).long() if t.kind == "multiclass" else targets[:, k]
                for k, t in enumerate(LOSS_TASKS)}
    reference = reference_losses(by_task, as_given)
    torch.testing.assert_close(ours, torch.stack([reference[t.name] for t in LOSS_TASKS]))
    weights = torch.tensor([0.3, 1.7, 0.2, 5.0, 0.9])  # any weighting: compare gradients of a weighted sum
    (grad_ours,) = torch.autograd.grad((weights * ours).sum(), outputs)
    (grad_ref,) = torch.autograd.grad(sum(w * reference[t.name] for w, t in zip(weights, LOSS_TASKS)), outputs)
    torch.testing.assert_close(grad_ours, grad_ref)
    assert (grad_ours[:, layout.scalar_tasks.index(3)] == 0).all()  # the label-free task gets no gradient
    labelled = ~torch.isnan(targets[:, 0])
    assert sums.correct[0].item() == ((by_task["b"][labelled] > 0).float() == targets[labelled, 0]).sum().item()


class HostSyncs(TorchDispatchMode):
    """Records the ops that make the host wait for the device: a tensor's value read on the host
    (.item(), `if tensor`), and ops whose result size depends on the data (nonzero, bincount, unique,
    indexing by a boolean mask...)."""

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        boolean_index = "index" in name and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool
            for a in args if isinstance(a, (list, tuple)) for i in a)
        data_sized = ("nonzero", "_local_scalar_dense", "masked_select", "bincount", "unique", "repeat_interleave")
        if boolean_index or any(s in name for s in data_sized):
            self.found.append(name)
        return func(*args, **(kwargs or {}))


def test_masked_losses_need_no_host_synchronisation():
    """No op that must wait for the device (nonzero from boolean indexing, .item(), `if tensor`) in the
    forward and backward of the losses and weightings; the first implementation had one per task."""
    layout, outputs, targets = loss_case()
    stats = {"r": LabelStats("regression", {"train": 5}, mean=0.0, variance=4.0)}
    with HostSyncs() as ours:
        sums = TaskLosses(layout)(outputs, targets)
        means, present = sums.means(), sums.count > 0
        for weighting in (PseudoUniform(LOSS_TASKS, stats), Kendall(LOSS_TASKS, stats), DWA(LOSS_TASKS, stats)):
            weighting.loss(means, present).backward(retain_graph=True)
    assert ours.found == []
    with HostSyncs() as old:  # the detector itself works: the boolean-indexing reference syncs per task
        as_given = {t.name: torch.nan_to_num(targets[:, k], nan=-1.0).long() if t.kind == "multiclass" else targets[:, k]
                    for k, t in enumerate(LOSS_TASKS)}
        reference_losses(layout.split(outputs), as_given)
    assert len(old.found) >= len(LOSS_TASKS)


@pytest.mark.parametrize("kind", ["binary", "multiclass", "regression"])
def test_batch_without_labels_contributes_zero_not_nan(kind):
    tasks = [Task("t", "t", kind, classes=("x", "y", "z") if kind == "multiclass" else None)]
    layout = HeadLayout.of(tasks)
    outputs = torch.randn(2, layout.columns, requires_grad=True)
    sums = TaskLosses(layout)(outputs, torch.full((2, 1), NAN))
    loss = sums.means().sum()
    assert loss.item() == 0.0 and sums.count.item() == 0
    loss.backward()
    assert torch.isfinite(outputs.grad).all() and (outputs.grad == 0).all()
