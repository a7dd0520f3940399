"""Loss weightings: how the per-task losses of a batch become one backward pass (see docs/design.md, "Model").

One class per method, behind one interface (LibMTL's `weighting/` is the model), so a new method is a
new class and a registry entry, never an edit to the training loop (gallery.training.engine). The loop
gives a weighting, at each step:
- `losses`: each task's mean loss over the galleries of the whole batch that carry its label (a
  task with no label in the batch has 0 there), and `present`: which tasks have a label in the batch.
  Data parallel, a rank's `losses` are its own galleries' share of those means (their loss sums over
  the whole batch's label counts, times the world size): DDP's average of the ranks' gradients is
  then the whole batch's, but the values differ between ranks. A weighting that reads the values
  (log L, L ratios) takes `batch_means(losses)`, the same on every rank; `present` already is;
- `representation`: the shared gallery embeddings the heads read (for methods that weigh tasks by
  their gradients there; `uses_representation` says whether it is needed);
and calls `backward` (the weighting backpropagates), then `after_step` once the optimiser stepped
(with a function that recomputes the batch's losses under the new weights) and `on_epoch_end` with
each task's mean training loss of the epoch. Every weighting must leave a task without labels in
the batch out (it contributes nothing, and no state of the weighting moves for it) and must hold the
same state on every data-parallel rank: what it computes from a batch comes from quantities the loop
has already made identical across ranks (`losses` are whole-batch means; `on_epoch_end` gets
all-reduced means), or it all-reduces them itself through `self.ranks`. docs/weightings.md lists the
methods, what each needs and costs.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from gallery.data.labels import LabelStats
from gallery.data.tasks import Task

EPSILON = 1e-8  # a whole-batch loss at or below this is zero to the log-loss methods (SI, FAMO)


class Weighting(nn.Module):
    """The interface; subclasses define `loss` (a scalar to backpropagate) and may override the hooks."""

    uses_representation = False  # True: `backward` needs the shared gallery representation

    def __init__(self, tasks: list[Task], stats: dict[str, LabelStats]):
        super().__init__()
        self.names = [t.name for t in tasks]
        self.ranks = None  # the data-parallel group (gallery.training.distributed.Ranks), set by the loop

    def bind(self, ranks) -> "Weighting":
        self.ranks = ranks
        return self

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the data-parallel ranks (in place); unchanged when training alone."""
        return tensor if self.ranks is None else self.ranks.all_reduce(tensor)

    @property
    def world(self) -> int:
        return 1 if self.ranks is None else self.ranks.world

    def batch_means(self, losses: torch.Tensor) -> torch.Tensor:
        """The whole batch's per-task mean losses (detached): the mean of the ranks' `losses` (each is its
        galleries' share times the world size), identical on every rank; `losses` itself alone."""
        return self.all_reduce(losses.detach().clone()) / self.world

    def loss(self, losses: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def backward(self, losses: torch.Tensor, present: torch.Tensor,
                 representation: torch.Tensor | None = None) -> torch.Tensor:
        """Backpropagate this batch; returns the objective's value (detached), for the log."""
        total = self.loss(losses, present)
        total.backward()
        return total.detach()

    def after_step(self, losses: torch.Tensor, present: torch.Tensor, recompute) -> None:
        """After the optimiser step. `recompute()` gives (losses, present) of the same batch under the
        updated model, without gradients (methods such as FAMO learn from that change)."""

    def on_epoch_end(self, epoch: int, train_losses: torch.Tensor) -> None:
        """After each epoch, with every task's mean training loss over the epoch (identical on all ranks)."""


def variance_scales(tasks: list[Task], stats: dict[str, LabelStats]) -> torch.Tensor:
    """1/σ²_k for regression tasks (σ²_k: train-split label variance), 1 otherwise: the paper's
    pseudo-uniform scaling, which puts a regression's squared error in units of its label's spread."""
    return torch.tensor([1.0 / _variance(stats, t) if t.kind == "regression" else 1.0 for t in tasks])


class PseudoUniform(Weighting):
    """The paper's: Σ_bin L + Σ_cat L + Σ_reg L / σ²_k."""

    def __init__(self, tasks: list[Task], stats: dict[str, LabelStats]):
        super().__init__(tasks, stats)
        self.register_buffer("scale", variance_scales(tasks, stats))

    def loss(self, losses, present):
        return (self.scale * losses).sum()


class Kendall(Weighting):
    """Kendall et al.: learned s_k = log σ²_k; regression ½·e^(−s)·L + ½·s, classification e^(−s)·L + ½·s.

    The ½·s term counts only for tasks that contribute a loss (`present`: labelled in the batch).
    Otherwise, on the batches where a sparsely labelled task has no label, ½·s alone would push its
    s down and its weight e^(−s) up, a drift that grows with the share of label-free batches.
    s_k starts at log σ²_k of the train split for regression (0 for classification), i.e. where
    the pseudo-uniform weighting starts; it is a parameter, optimised and checkpointed with the model.
    """

    def __init__(self, tasks: list[Task], stats: dict[str, LabelStats]):
        super().__init__(tasks, stats)
        self.log_vars = nn.Parameter(torch.tensor(
            [math.log(_variance(stats, t)) if t.kind == "regression" else 0.0 for t in tasks]))
        self.register_buffer("factor", torch.tensor([0.5 if t.kind == "regression" else 1.0 for t in tasks]))

    def loss(self, losses, present):
        s = self.log_vars
        return (self.factor * torch.exp(-s) * losses + 0.5 * s * present.to(s.dtype)).sum()


class DWA(Weighting):
    """Dynamic Weight Average (Liu et al. 2019, "End-to-End Multi-Task Learning with Attention"):
    w_k = K·exp(r_k / T) / Σ_j exp(r_j / T), r_k = L_k(e−1) / L_k(e−2) from the last two epochs' mean
    training losses; w = 1 for the first two epochs; T = 2. A task that learns slowly (r near or above
    1) gains weight. Applied to the pseudo-uniform terms (regression divided by its label variance), so
    that tasks of different units start from the paper's balance. A task with no label in a batch adds
    nothing; a task whose epoch losses are missing (no label in the epoch) keeps r = 1."""

    temperature = 2.0

    def __init__(self, tasks: list[Task], stats: dict[str, LabelStats]):
        super().__init__(tasks, stats)
        self.register_buffer("scale", variance_scales(tasks, stats))
        self.register_buffer("history", torch.full((2, len(tasks)), math.nan))  # epoch e-2, e-1
        self.register_buffer("weights", torch.ones(len(tasks)))

    def loss(self, losses, present):
        return (self.weights * self.scale * losses).sum()

    def on_epoch_end(self, epoch, train_losses):
        self.history = torch.stack([self.history[1], train_losses.to(self.history)])
        ratio = self.history[1] / self.history[0]
        if torch.isnan(self.history).all(1).any():  # fewer than two epochs seen
            return
        ratio = torch.where(torch.isfinite(ratio), ratio, torch.ones_like(ratio))
        self.weights = len(ratio) * torch.softmax(ratio / self.temperature, 0)


def usable_logs(losses: torch.Tensor, present: torch.Tensor, means: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For the log-loss methods: which tasks take part (labelled in the batch, whole-batch loss above
    EPSILON) and, for those, log L_k of the whole batch with the gradient of this rank's share,
    ∇L_k / L_k (0 for the others, with no gradient). Written as log m + (L − L.detach()) / m, m the
    whole-batch mean: the value is the batch's log loss on every rank, and DDP's average of the ranks'
    gradients is exactly ∇ log L_k of the whole batch. Alone, m = L and this is log L.

    A zero loss is left out like an absent task: log 0 = −∞ would give the task all the weight (SI,
    FAMO weigh each gradient by 1/L) while its gradient is zero (nothing left to fit on this batch)."""
    usable = present & (means > EPSILON)
    safe = torch.where(usable, means, torch.ones_like(means))
    logs = torch.where(usable, safe.log() + (losses - losses.detach()) / safe, torch.zeros_like(losses))
    return logs, usable


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the entries in `mask`; 0 elsewhere (all 0 when the mask is empty)."""
    return torch.softmax(logits.masked_fill(~mask, -math.inf), 0).nan_to_num(0.0)


class SI(Weighting):
    """Scale-invariant log-sum scalarisation: Σ_k log L_k over the tasks labelled in the batch. Its
    gradient is Σ_k ∇L_k / L_k: each task weighted by the inverse of its current loss, so multiplying a
    task's loss by a constant (its units) changes nothing. No state. A task with a zero loss (or none
    in the batch) is left out (`usable_logs`); data parallel, 1/L_k is the whole batch's."""

    def loss(self, losses, present):
        logs, _ = usable_logs(losses, present, self.batch_means(losses))
        return logs.sum()


class RLW(Weighting):
    """Random Loss Weighting (Lin et al. 2021, "Reasonable Effectiveness of Random Weighting"): each
    step, w = K_b · softmax(λ) over the K_b tasks labelled in the batch, λ_k ~ N(0, 1), applied to the
    pseudo-uniform terms (regression divided by its label variance); E[w_k] = 1, so on average it is
    the paper's pseudo-uniform weighting, perturbed. An absent task gets w = 0 and the others share the
    softmax. (The paper's weights sum to 1; K_b · keeps the pseudo-uniform scale.)

    The draws are a function of (seed, step): step s draws from numpy's generator seeded [seed, s], so
    every data-parallel rank draws the same weights with no communication, and a resumed run continues
    the stream. Seed and step are the module's extra state (in its state_dict, so checkpointed). The
    seed is torch's (the training seed the caller set) at construction, taken from rank 0 at `bind`."""

    def __init__(self, tasks: list[Task], stats: dict[str, LabelStats]):
        super().__init__(tasks, stats)
        self.register_buffer("scale", variance_scales(tasks, stats))
        self.seed, self.draws = torch.initial_seed() % 2 ** 63, 0

    def bind(self, ranks) -> "Weighting":
        super().bind(ranks)
        if self.world > 1:  # rank 0's seed, in case the ranks were seeded differently
            seed = torch.tensor([self.seed if ranks.is_main else 0], dtype=torch.int64, device=self.scale.device)
            self.seed = int(self.all_reduce(seed).item())
        return self

    def get_extra_state(self) -> torch.Tensor:
        return torch.tensor([self.seed, self.draws], dtype=torch.int64)

    def set_extra_state(self, state: torch.Tensor) -> None:
        self.seed, self.draws = (int(v) for v in state.tolist())

    def draw(self, present: torch.Tensor) -> torch.Tensor:
        """The next step's weights (advances the stream)."""
        normals = np.random.default_rng([self.seed, self.draws]).standard_normal(len(self.names))
        self.draws += 1
        lam = torch.from_numpy(normals).to(torch.float32)
        lam = (lam.pin_memory() if present.is_cuda else lam).to(present.device, non_blocking=True)
        return present.sum() * masked_softmax(lam, present)

    def loss(self, losses, present):
        """Each call is one step: it draws that step's weights."""
        return (self.draw(present) * self.scale * losses).sum()


class FAMO(Weighting):
    """Fast Adaptive Multitask Optimization (Liu et al. 2023): minimise Σ_k (z_k / c) log L_k with
    z = softmax(ξ) over the learned task logits ξ and c = Σ_k z_k / L_k (no gradient): the model's
    gradient is Σ_k w_k ∇L_k with w_k = z_k / (c L_k), weights that sum to one. After the optimiser step,
    with δ_k = log L_k(before) − log L_k(after) on the same batch, ξ takes one Adam step (lr 0.025,
    weight decay γ = 0.01, the official defaults) on Jᵀδ, J the softmax's Jacobian: a task whose loss
    fell less than the others' gains weight. O(1) in the tasks: one extra forward, no task gradients.

    Masking: only the tasks labelled in the batch with a positive loss before and after the step
    (`usable_logs`) take part: the softmax runs over them, and the Adam step (moments, step count and
    weight decay included) moves only their logits, so a task absent from a batch neither contributes
    nor moves, not even by momentum; each logit keeps its own Adam step count. Data parallel: log L is
    the whole batch's (`batch_means`, one all-reduce in backward and one of the before/after pair in
    after_step), so every rank makes the same update. ξ and its Adam state are buffers: checkpointed.
    Not done: the official code's gradient clipping of the shared parameters (max norm 1), which no other
    weighting here does; its loss offsets (min_losses) are 0, as in its default."""

    lr, decay, betas, eps = 0.025, 0.01, (0.9, 0.999), 1e-8

    def __init__(self, tasks: list[Task], stats: dict[str, LabelStats]):
        super().__init__(tasks, stats)
        for name in ("logits", "moment", "second_moment", "steps"):
            self.register_buffer(name, torch.zeros(len(tasks)))

    def loss(self, losses, present):
        means = self.batch_means(losses)
        logs, usable = usable_logs(losses, present, means)
        z = masked_softmax(self.logits, usable)  # 0 outside `usable`
        c = (z / torch.where(usable, means, torch.ones_like(means))).sum()
        return (z / c.clamp(min=torch.finfo(c.dtype).tiny) * logs).sum()

    def after_step(self, losses, present, recompute):
        again, _ = recompute()
        before, after = self.all_reduce(torch.stack([losses, again]).detach().clone()) / self.world
        usable = present & (before > EPSILON) & (after > EPSILON)
        before, after = (torch.where(usable, x, torch.ones_like(x)) for x in (before, after))
        delta = before.log() - after.log()  # 0 outside `usable`
        z = masked_softmax(self.logits, usable)
        grad = z * (delta - (z * delta).sum()) + self.decay * self.logits  # Jᵀδ, then Adam's L2 weight decay
        self.adam_step(grad, usable)

    def adam_step(self, grad: torch.Tensor, mask: torch.Tensor) -> None:
        """torch.optim.Adam's update of the logits in `mask`; the others and their state stay as they are."""
        b1, b2 = self.betas
        self.steps = self.steps + mask
        self.moment = torch.where(mask, b1 * self.moment + (1 - b1) * grad, self.moment)
        self.second_moment = torch.where(mask, b2 * self.second_moment + (1 - b2) * grad ** 2, self.second_moment)
        steps = self.steps.clamp(min=1)
        step = self.lr * (self.moment / (1 - b1 ** steps)) / ((self.second_moment / (1 - b2 ** steps)).sqrt() + self.eps)
        self.logits = torch.where(mask, self.logits - step, self.logits)


class IMTLG(Weighting):
    """IMTL-G, the gradient half of Impartial Multi-Task Learning (Liu et al. 2021): the encoder follows
    g = Σ_k α_k g_k, g_k = ∂L_k/∂z the task gradients at the shared gallery representation z (the
    heads' input), with α chosen so that g has the same projection on every task's unit gradient
    u_k = g_k / |g_k|: no task dominates by its gradient's size. In closed form α ∝ G⁻¹ n, G the Gram
    matrix of the g_k and n_k = |g_k| (the paper's D, U formula rewritten: G⁻¹n combines the g_k into
    a vector whose projection on every u_k is 1, so it descends every task to first order). The paper
    scales Σ α = 1; should G⁻¹n sum to a negative number (possible with three tasks or more) that would
    reverse g and raise every loss, so |Σ α| = 1 here.

    Cost: the K task gradients at z come from one batched backward through the heads only (cheap:
    no encoder), then a K×K Gram and solve; the model then gets one backward: the heads with their own
    tasks' pseudo-uniform terms (task-specific parameters follow their own loss, as in the paper), and
    z's gradient replaced by g, so the encoder sees g. The objective logged is the pseudo-uniform sum.
    Tasks without a label in the batch (their gradient is exactly 0), or with a zero gradient, get α = 0.

    Data parallel, each rank holds its galleries' rows of z. The whole batch's g_k is the ranks' g_k
    (each rank's gradient of its share of L_k) side by side, divided by the world size, so the whole
    batch's Gram is the sum of the ranks' Grams / world², exactly: the heads treat each gallery on its
    own, so a rank's rows get gradient only from its own galleries. One all-reduce of the K×K Gram
    gives every rank the same α; each rank sends Σ α_k g_k for its rows into the encoder, and DDP's
    average of the ranks' gradients is the whole batch's g. `weights` keeps the last step's α."""

    uses_representation = True

    def __init__(self, tasks: list[Task], stats: dict[str, LabelStats]):
        super().__init__(tasks, stats)
        self.register_buffer("scale", variance_scales(tasks, stats))
        self.register_buffer("weights", torch.zeros(len(tasks)))

    def loss(self, losses, present):
        return (self.scale * losses).sum()

    def backward(self, losses, present, representation=None):
        total = self.loss(losses, present)
        if representation is not None and representation.requires_grad:  # else nothing below z trains
            (grads,) = torch.autograd.grad(losses, representation, torch.eye(len(losses), device=losses.device),
                                           retain_graph=True, is_grads_batched=True)
            flat = grads.flatten(1).double()
            gram = self.all_reduce(flat @ flat.T) / self.world ** 2
            self.weights = imtl_g_weights(gram, present).to(self.weights)
            shared = torch.einsum("k,k...->...", self.weights.to(grads.dtype), grads)
            representation.register_hook(lambda _: shared)
        total.backward()
        return total.detach()


def imtl_g_weights(gram: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """IMTL-G's α from the Gram matrix of the task gradients: α ∝ G⁻¹ n over the tasks in `present`
    with a nonzero gradient, |Σ α| = 1, 0 for the others. (A ridge of 1e-9 |g_k|² on the diagonal, i.e.
    1e-9 on the cosines', keeps G invertible when two tasks' gradients coincide; solve_ex: no wait on
    the device.)"""
    gram = gram.double()
    norms = gram.diagonal().clamp(min=0).sqrt()
    usable = present & (norms > 0)
    both = usable[:, None] & usable[None, :]
    diagonal = torch.where(usable, 1e-9 * norms ** 2, 1.0)
    system = torch.where(both, gram, 0.0) + torch.diag(diagonal)
    beta, _ = torch.linalg.solve_ex(system, torch.where(usable, norms, 0.0))
    return beta / beta.sum().abs().clamp(min=torch.finfo(beta.dtype).tiny)


def _variance(stats: dict[str, LabelStats], task: Task) -> float:
    v = stats[task.name].variance if task.name in stats else None
    return v if v is not None and v > 0 else 1.0


WEIGHTINGS: dict[str, type[Weighting]] = {"pseudo_uniform": PseudoUniform, "kendall": Kendall, "dwa": DWA,
                                          "si": SI, "rlw": RLW, "famo": FAMO, "imtl_g": IMTLG}


def build_weighting(name: str, tasks: list[Task], stats: dict[str, LabelStats]) -> Weighting:
    if name not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {name!r}; known: {sorted(WEIGHTINGS)}")
    return WEIGHTINGS[name](tasks, stats)
