"""Data-parallel faults (docs/cluster.md, Retries and resume): a rank SIGKILLed mid-epoch makes its peer fail
at its next collective instead of waiting on it, and both ranks restarted from the checkpoints end with the
weights of an uninterrupted run of the same world size, as a Metaflow retry of the @parallel step does; a
local @parallel node does not outlive its control task (which would hold the failed attempt open)."""
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta

import torch
import torch.multiprocessing as mp
from test_distributed import SETTINGS, STATS, TASKS, free_port, problem

from gallery.faults import ENV, reached
from gallery.model.weightings import build_weighting
from gallery.training.distributed import join, leave
from gallery.training.engine import FitHooks, FitOptions, fit

COLLECTIVE_TIMEOUT = timedelta(seconds=20)  # a collective left waiting fails the rank well before HARNESS_S
HARNESS_S = 120  # a phase whose processes have not ended by then hangs: the test fails, its processes killed
KILL_AT = "train.step:10@1"  # SETTINGS: 7 steps an epoch, so rank 1 dies at the 3rd step of epoch 2


def train_kendall(ranks, folder: str, resume: bool):
    model, data = problem()
    weighting = build_weighting("kendall", TASKS, STATS)  # state of its own, restored on resume
    hooks = FitHooks(on_step=lambda _: reached("train.step", ranks.rank))  # as gallery.steps.train_weighting
    options = FitOptions(checkpoints=folder, resume_from=folder if resume else None, log=lambda _: None,
                         ranks=ranks, hooks=hooks)
    return fit(model, weighting, data, SETTINGS, options)


def rank_process(rank: int, port: int, folder: str, resume: bool) -> None:
    """First run: an uninterrupted training into `folder`/whole, then one into `folder`/killed with
    GALLERY_KILL_AT set (rank 1 dies). Resume: the killed one restarted from its checkpoints. Each rank
    saves its outcome, an error included (then re-raised: the process exits non-zero)."""
    ranks = join(rank, 2, 2, "127.0.0.1", port, torch.device("cpu"), timeout=COLLECTIVE_TIMEOUT)
    outcome = {}
    if not resume:
        outcome["whole"] = train_kendall(ranks, f"{folder}/whole", False).weights_digest
        os.environ[ENV] = KILL_AT
    try:
        result = train_kendall(ranks, f"{folder}/killed", resume)
        outcome.update(digest=result.weights_digest, resumed_at_epoch=result.resumed_at_epoch)
    except Exception as error:
        outcome["error"] = repr(error)
        raise
    finally:
        torch.save(outcome, f"{folder}/{'resumed' if resume else 'first'}-rank{rank}.pt")
    leave()


def two_ranks(folder, resume: bool) -> list[int]:
    """Both ranks' exit codes; a rank still running after HARNESS_S is killed and the test fails."""
    context, port = mp.get_context("spawn"), free_port()
    processes = [context.Process(target=rank_process, args=(rank, port, str(folder), resume)) for rank in (0, 1)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(HARNESS_S)
    hung = [rank for rank, p in enumerate(processes) if p.is_alive()]
    for p in processes:
        if p.is_alive():
            p.kill()
    assert not hung, f"rank(s) {hung} still running after {HARNESS_S} s: a collective waits on a dead peer"
    return [p.exitcode for p in processes]


def test_a_rank_killed_mid_epoch_fails_its_peer_and_a_restart_resumes_exactly(tmp_path):
    assert two_ranks(tmp_path, resume=False) == [1, -signal.SIGKILL]  # rank 0 failed instead of waiting
    survivor = torch.load(tmp_path / "first-rank0.pt", weights_only=True)
    assert "error" in survivor and "digest" not in survivor, survivor
    last = torch.load(tmp_path / "killed" / "last.pt", weights_only=False)
    assert last["epoch"] == 0  # the last checkpoint is epoch 1's (0-based 0): epoch 2 was cut short

    assert two_ranks(tmp_path, resume=True) == [0, 0]
    for rank in (0, 1):
        resumed = torch.load(tmp_path / f"resumed-rank{rank}.pt", weights_only=True)
        assert resumed["resumed_at_epoch"] == 1
        assert resumed["digest"] == survivor["whole"]  # the weights of the uninterrupted two-process run



WATCHED_NODE = ("from gallery.runs import end_with_the_control_task; end_with_the_control_task(); "
                "print('watching', flush=True); import time; time.sleep(300)")
CONTROL_TASK = (f"import subprocess, sys; node = subprocess.Popen([sys.executable, '-c', {WATCHED_NODE!r}], "
                "stdout=subprocess.PIPE); node.stdout.readline(); print(node.pid)")  # and exits, as a failed one does


def test_a_local_parallel_node_ends_with_its_control_task():
    """Metaflow's local runtime sees a failed @parallel attempt end only when the nodes its control task started
    have ended too: a node whose control task is gone ends within about a second (30 s allowed on a busy
    machine), not when its own work would have (here 300 s)."""
    control = subprocess.run([sys.executable, "-c", CONTROL_TASK], stdout=subprocess.PIPE, text=True, check=True)
    node = int(control.stdout)  # (the node shares the control's stderr: waiting on that would wait for it)
    deadline = time.monotonic() + 30
    while running(node) and time.monotonic() < deadline:
        time.sleep(0.1)
    if running(node):
        os.kill(node, signal.SIGKILL)
        raise AssertionError("the node outlived its control task by 30 s")


def running(pid: int) -> bool:
    """Neither gone nor a zombie (an orphan that exited, which a container's init may never reap)."""
    stat = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()
    return bool(stat) and not stat.startswith("Z")
