"""Data-parallel training: two gloo processes train a model exactly as one process does, and every
weighting's state (Kendall's learned s, DWA's weights, FAMO's logits and their Adam state, RLW's random
stream, IMTL-G's last task weights) is the same on both ranks.

Equality with one process holds for the random and adaptive weightings too, at the same tolerance: RLW
draws from (seed, step), the seed being the training seed on every rank and in the lone process, so all
three draw the same weights; FAMO and IMTL-G compute from whole-batch quantities (all-reduced losses, the
summed Gram matrix), which equal the lone process's up to float rounding."""
import socket
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from gallery.config import TrainSettings
from gallery.data.labels import LabelStats
from gallery.data.tasks import Task
from gallery.evaluation.holdout import VectorInput, vectors_as_galleries
from gallery.data.readers import PairRows
from gallery.model.gallery_model import GalleryModel
from gallery.model.metric import CosineClassifier, InBatchSoftmax, pair_keys
from gallery.model.weightings import build_weighting
from gallery.training.distributed import Ranks, join, leave, master_port
from gallery.training.engine import FitConfig, FitOptions, TrainData, fit

TASKS = [Task("b", "b", "binary"), Task("c", "c", "multiclass", classes=("x", "y", "z")),
         Task("r", "r", "regression"), Task("sparse", "s", "binary")]
STATS = {"r": LabelStats("regression", {"train": 56}, mean=0.5, variance=2.0)}
SETTINGS = FitConfig.of(TrainSettings(lr=1e-2, batch_galleries=8, max_epochs=3, patience=10, precision="fp32"))
WEIGHTINGS = ("kendall", "dwa", "famo", "rlw", "imtl_g")


class LinearEncoder(VectorInput):
    """A trainable encoder of the vectors (no BatchNorm, so the ranks' halves combine exactly): the
    representation that IMTL-G takes its task gradients at."""

    def __init__(self, dim: int):
        super().__init__(dim)
        self.linear = torch.nn.Linear(dim, dim)

    def forward(self, x, index, n, from_features=False):
        return self.linear(x.float())


class NormalisedEncoder(LinearEncoder):
    """With BatchNorm: each rank normalises its own half batch and updates its own running statistics."""

    def __init__(self, dim: int):
        super().__init__(dim)
        self.norm = torch.nn.BatchNorm1d(dim)

    def forward(self, x, index, n, from_features=False):
        return self.norm(self.linear(x.float()))


def problem(encoder=LinearEncoder):
    """64 galleries as 16-d vectors and labels that depend on them (validation improves, so the last
    epoch is the one selected), the last task labelled on 1 gallery in 8: its few labels often all
    fall on one rank."""
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(64, 16)).astype(np.float32)
    targets = np.stack([vectors[:, 0] > 0, vectors[:, 1:4].argmax(1), vectors[:, 4] + 0.3 * rng.normal(size=64),
                        vectors[:, 5] > 0], 1).astype(np.float32)
    targets[rng.random((64, 4)) < 0.15] = np.nan
    targets[rng.random(64) < 0.875, 3] = np.nan
    source = vectors_as_galleries([f"g{i}" for i in range(64)], vectors)
    data = TrainData(source, torch.from_numpy(targets), np.arange(56), np.arange(56, 64), np.arange(0))
    torch.manual_seed(0)
    return GalleryModel(encoder(16), TASKS, 8, STATS), data


def train(folder, name, ranks=None, encoder=LinearEncoder):
    model, data = problem(encoder)
    weighting = build_weighting(name, TASKS, STATS)
    options = FitOptions(checkpoints=str(folder), log=lambda _: None, ranks=ranks if ranks is not None else Ranks())
    result = fit(model, weighting, data, SETTINGS, options)
    return result, {**model.state_dict(), **{f"weighting.{k}": v for k, v in weighting.state_dict().items()}}


METRIC_TASKS = [Task("same", "same", "identity", num_classes=20), Task("co_viewed", None, "pairs")]


def metric_problem():
    """The problem above with an identity task (galleries 2k and 2k+1 are one group) and a pairs task (pairs
    of galleries whose vectors are near), three pairs drawn into every batch: the losses gather the ranks'
    rows, so two processes must still make one process's updates."""
    model, data = problem()
    groups = np.repeat(np.arange(32), 2).astype(np.float32)
    groups[groups >= 20] = np.nan  # the last groups train nothing: distractors
    nodes = np.arange(64, dtype=np.float32)
    a = np.arange(0, 64, 4)
    b = a + 1 + (a % 3)
    keys = pair_keys(a, b, 64)
    targets = torch.cat([data.targets, torch.from_numpy(np.stack([groups, nodes], 1))], 1)
    within = lambda rows: PairRows(a[np.isin(a, rows) & np.isin(b, rows)], b[np.isin(a, rows) & np.isin(b, rows)],  # noqa: E731
                                   np.ones(int((np.isin(a, rows) & np.isin(b, rows)).sum())))
    pairs = {split: [within(rows)] for split, rows in (("train", data.train_rows), ("valid", data.valid_rows),
                                                       ("test", data.test_rows))}
    data = TrainData(data.source, targets, data.train_rows, data.valid_rows, data.test_rows, pairs=pairs,
                     pair_columns=torch.tensor([False] * len(TASKS) + [False, True]), pairs_per_batch=3)
    torch.manual_seed(0)
    model = GalleryModel(LinearEncoder(16), TASKS + METRIC_TASKS, 8, STATS,
                         [CosineClassifier(16, 20, 0.1, 4), InBatchSoftmax(0.1)])
    model.set_pairs("co_viewed", keys, 64)
    return model, data


def metric_only_problem():
    """A model of the pairs task alone (a specialised model): no head, so no parameter outside its loss."""
    model, data = metric_problem()
    torch.manual_seed(0)
    alone = GalleryModel(LinearEncoder(16), METRIC_TASKS[1:], 8, STATS, [InBatchSoftmax(0.1)])
    alone.set_pairs("co_viewed", model.losses.metric[1].keys, 64)
    columns = data.pair_columns[-1:]
    return alone, replace(data, targets=data.targets[:, -1:], pair_columns=columns)


def train_metric(folder, ranks=None, problem_of=None):
    model, data = (problem_of or metric_problem)()
    weighting = build_weighting("pseudo_uniform", model.tasks, STATS)
    options = FitOptions(checkpoints=str(folder), log=lambda _: None, ranks=ranks if ranks is not None else Ranks())
    result = fit(model, weighting, data, SETTINGS, options)
    return result, model.state_dict()


def rank_process(rank: int, port: int, folder: str) -> None:
    ranks = join(rank, 2, 2, "127.0.0.1", port, torch.device("cpu"))
    for name in WEIGHTINGS:
        result, weights = train(f"{folder}/{name}", name, ranks)
        torch.save({"history": [h.valid_criterion[0] for h in result.history],
                    "train": [h.train_loss for h in result.history],
                    "weights": weights, "digest": result.weights_digest}, f"{folder}/{name}-rank{rank}.pt")
    result, weights = train(f"{folder}/batchnorm", "pseudo_uniform", ranks, NormalisedEncoder)
    torch.save({"weights": weights, "digest": result.weights_digest}, f"{folder}/batchnorm-rank{rank}.pt")
    result, weights = train_metric(f"{folder}/metric", ranks)
    torch.save({"history": [h.valid_criterion[0] for h in result.history], "weights": weights,
                "digest": result.weights_digest,
                "losses": [[h.train_task_losses[t.name] for t in METRIC_TASKS] for h in result.history]},
               f"{folder}/metric-rank{rank}.pt")
    result, weights = train_metric(f"{folder}/metric_only", ranks, metric_only_problem)
    torch.save({"weights": weights, "digest": result.weights_digest}, f"{folder}/metric_only-rank{rank}.pt")
    leave()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    mp.spawn(rank_process, args=(free_port(), str(folder)), nprocs=2)
    return {name: [torch.load(folder / f"{name}-rank{r}.pt", weights_only=True) for r in (0, 1)]
            for name in (*WEIGHTINGS, "batchnorm", "metric", "metric_only")}


def test_ranks_end_with_rank_zeros_batchnorm_statistics(two_ranks):
    """Each rank updates BatchNorm's running statistics from its own half batch; after every epoch
    they take rank 0's, so validation, checkpoints and the kept weights are one model."""
    zero, first = two_ranks["batchnorm"]
    assert zero["digest"] == first["digest"]
    mean = zero["weights"]["encoder.norm.running_mean"]
    assert torch.equal(mean, first["weights"]["encoder.norm.running_mean"]) and mean.abs().sum() > 0


@pytest.mark.parametrize("name", WEIGHTINGS)
def test_two_ranks_train_exactly_like_one_process(two_ranks, tmp_path, name):
    one, weights = train(tmp_path, name)
    zero, first = two_ranks[name]
    assert zero["digest"] == first["digest"]  # both ranks hold identical weights
    for key in [k for k in weights if k.startswith("weighting.")]:  # and identical weighting state
        torch.testing.assert_close(zero["weights"][key], first["weights"][key], rtol=0, atol=0, equal_nan=True, msg=key)
    np.testing.assert_allclose(zero["history"], [h.valid_criterion[0] for h in one.history], rtol=1e-5)
    np.testing.assert_allclose(zero["train"], [h.train_loss for h in one.history], rtol=1e-5)
    for key, value in weights.items():
        torch.testing.assert_close(zero["weights"][key], value, rtol=1e-4, atol=1e-5)
    if name == "dwa":  # three epochs: the third trained with weights from the first two
        assert not torch.equal(weights["weighting.weights"], torch.ones(len(TASKS)))
    if name == "famo":  # the logits moved, each by its own number of steps (the sparse task's fewer)
        assert (weights["weighting.logits"] != 0).all() and weights["weighting.steps"][3] < weights["weighting.steps"][0]
    if name == "imtl_g":  # the task weights of the last step, from the gradients at the encoder's output
        assert weights["weighting.weights"].abs().sum() > 0
    if name == "rlw":  # (training seed, steps taken): 3 epochs of 7 batches
        assert weights["weighting._extra_state"].tolist() == [0, 21]


def test_two_ranks_train_metric_tasks_exactly_like_one_process(two_ranks, tmp_path):
    """Identity and pairs tasks draw their candidates from the whole batch (gathered across ranks, with
    gradients for the pairs' negatives): the ranks' update is still the lone process's."""
    one, weights = train_metric(tmp_path)
    zero, first = two_ranks["metric"]
    assert zero["digest"] == first["digest"]
    losses = [[h.train_task_losses[t.name] for t in METRIC_TASKS] for h in one.history]
    assert np.isfinite(losses).all() and min(min(row) for row in losses) > 0  # both metric tasks trained
    np.testing.assert_allclose(zero["losses"], losses, rtol=1e-5)
    np.testing.assert_allclose(zero["history"], [h.valid_criterion[0] for h in one.history], rtol=1e-5)
    for key, value in weights.items():
        torch.testing.assert_close(zero["weights"][key], value, rtol=1e-4, atol=1e-5)
    assert not torch.equal(weights["losses.metric.0.weight"], metric_problem()[0].state_dict()["losses.metric.0.weight"])


def test_two_ranks_train_a_model_of_a_metric_task_alone(two_ranks, tmp_path):
    """A specialised model (no attribute task, so no head) trains data-parallel, as one process would."""
    one, weights = train_metric(tmp_path, problem_of=metric_only_problem)
    zero, first = two_ranks["metric_only"]
    assert zero["digest"] == first["digest"] and len(one.history) == 3
    for key, value in weights.items():
        torch.testing.assert_close(zero["weights"][key], value, rtol=1e-4, atol=1e-5)


def test_the_main_nodes_port_is_never_an_ephemeral_one():
    """Linux gives every outgoing connection a port from 32768-60999: a rendezvous port drawn from there
    can be held by any other process (it was, by a test's client socket, and the run's worker waited
    for a main node that had failed to listen). Ports differ between runs, steps and attempts."""
    ports = [master_port(str(run), step, attempt) for run in range(2000) for step in ("train", "task_optimal")
             for attempt in range(2)]
    assert 1024 < min(ports) and max(ports) < 32768
    assert len(set(ports)) > 5500  # uniform draws of 8,000 among 12,000 ports: ~5,840 distinct
    assert master_port("1", "train", 0) != master_port("1", "train", 1)
