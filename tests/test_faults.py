"""gallery.faults: where a process kills itself, in every attempt or only the first. Each case runs in a
child process that really receives the SIGKILL; the whole flow's kill-and-resume matrix is
`gallery bench faults` (docs/benchmarks.md)."""
import os
import signal
import subprocess
import sys

import pytest

from gallery.faults import FAULT_POINTS, Kill

CHILD = """
import sys
from gallery.faults import reached
for k in range(5):
    reached("train.step", rank=int(sys.argv[1]))
    print(f"step {k + 1}", flush=True)
"""


def run_child(env: dict, rank: int = 0, attempt: str | None = None) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-c", CHILD, str(rank)] + (["--retry-count", attempt] if attempt else [])
    return subprocess.run(argv, env={**os.environ, **env}, capture_output=True, text=True, timeout=60)


def test_a_kill_fires_at_the_nth_arrival_and_nowhere_else():
    done = run_child({"GALLERY_KILL_AT": "train.step:3"})
    assert done.returncode == -signal.SIGKILL
    assert done.stdout.splitlines() == ["step 1", "step 2",
                                        "GALLERY_KILL_AT: killing this process at train.step (arrival 3, rank 0)"]
    assert run_child({"GALLERY_KILL_AT": "train.epoch:1"}).returncode == 0  # another point: nothing happens
    assert run_child({}).stdout.count("step") == 5


def test_a_rank_qualified_kill_spares_the_other_ranks():
    assert run_child({"GALLERY_KILL_AT": "train.step:2@1"}, rank=1).returncode == -signal.SIGKILL
    assert run_child({"GALLERY_KILL_AT": "train.step:2@1"}, rank=0).returncode == 0


def test_every_attempt_dies_unless_only_the_first_is_asked():
    for attempt in ("0", "1"):  # Metaflow's --retry-count
        assert run_child({"GALLERY_KILL_AT": "train.step:1"}, attempt=attempt).returncode == -signal.SIGKILL
    first = {"GALLERY_KILL_AT": "train.step:1", "GALLERY_KILL_FIRST_ATTEMPT": "1"}
    assert run_child(first, attempt="0").returncode == -signal.SIGKILL
    retried = run_child(first, attempt="1")  # the retry goes on, whatever it reaches
    assert retried.returncode == 0 and retried.stdout.count("step") == 5


def test_an_unknown_point_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown fault point 'train.stp'; the points are synth.generated, ingest"):
        Kill.parse("train.stp:3")
    assert Kill.parse(" export.write:2@1 ") == Kill("export.write", 2, 1) and Kill("end").spec == "end"
    assert Kill.parse(Kill("train.step", 15, 0).spec) == Kill("train.step", 15, 0)
    for malformed in ("train.step:x", "train.step:3@", "train.step 3"):
        with pytest.raises(ValueError, match=f"{malformed!r} is not point, point:n or point:n@rank"):
            Kill.parse(malformed)
    assert set(FAULT_POINTS) >= {"ingest", "train.step", "export.write", "transfer.task", "task_optimal.step", "end"}


def test_the_faults_bench_compares_metrics_without_times_and_names_what_differs():
    from gallery.bench.faults import Fingerprint, comparable_metrics

    a = {"run_id": "1", "transfer": {"seconds": {"head": 1.2}, "scores": [0.5, 0.7]},
         "study": {"cells": [{"time_ratio": 0.9, "estimate": 0.1}]}, "exported_galleries": 200}
    b = {"run_id": "2", "transfer": {"seconds": {"head": 3.4}, "scores": [0.5, 0.7]},
         "study": {"cells": [{"time_ratio": 1.1, "estimate": 0.1}]}, "exported_galleries": 200}
    assert comparable_metrics(a) == comparable_metrics(b) == {
        "transfer": {"scores": [0.5, 0.7]}, "study": {"cells": [{"estimate": 0.1}]}, "exported_galleries": 200}
    changed = {**b, "transfer": {"scores": [0.5, 0.71]}, "exported_galleries": 199}
    one, other = (Fingerprint("e", "m", comparable_metrics(a)), Fingerprint("f", "n", comparable_metrics(changed)))
    assert other.differences(one) == ["embeddings", "/exported_galleries", "/transfer/scores[1]"]


def test_the_faults_bench_reads_where_the_end_step_put_the_outputs_and_what_was_killed():
    from gallery.bench.faults import FlowRun

    log = ("2026-12-07 13:47:53.956 [17/train/7 (pid 2)] GALLERY_KILL_AT: killing this process at train.step "
           "(arrival 15, rank 0)\n"
           "2026-12-07 13:49:01.000 [18/end/16 (pid 3)] report: /s/reports/17/report.md\n"
           "2026-12-07 13:49:01.001 [18/end/16 (pid 3)] embeddings: /s/store/16/embeddings.parquet (200 galleries)\n")
    run = FlowRun("18", 0, 1.0, log)
    assert run.killed_at == ["train.step"]
    assert str(run.output("report")) == "/s/reports/17/report.md"  # a cloned report step's, under its run id
    assert str(run.output("embeddings")) == "/s/store/16/embeddings.parquet"
