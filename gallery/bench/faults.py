"""`gallery bench faults`: the train flow killed anywhere recovers to the result of a run never killed.

Every case is a real SIGKILL (gallery.faults) of a real run of flows/train_flow.py (a subprocess, one
datastore for all, its own store and reports folders), compared with one uninterrupted run of the same
settings by two fingerprints: the embeddings (gallery ids, float vectors and bits, byte for byte; the
file's metadata names its run, so the file itself differs) and metrics.json (without the wall-clock
figures and run ids, which no two runs share: `comparable_metrics`).

- retried: one run with a kill in each retried step (a preprocess shard, a training mid-epoch, the export
  mid-write, the transfer suite, a task-optimal group), each in a task's first attempt only
  (GALLERY_KILL_FIRST_ATTEMPT): Metaflow's retry
  must reach the result;
- resumed: a chain on a fresh store: a run killed in `start`, then `resume` killed in the next step, and so
  on (the retried steps killed in every attempt, so their retries are exhausted; the two evaluate branches
  killed in the same run, as a branch that finished would be cloned by the next resume), then a last
  `resume` with nothing killed;
- the whole run killed: the flow and all its tasks (their process group) SIGKILLed during training, as a
  lost machine would, then `resume`.
"""
from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from gallery.bench.pipeline import preset_document
from gallery.faults import ENV, FIRST_ATTEMPT_ENV, Kill

FLOW = Path(__file__).resolve().parents[2] / "flows" / "train_flow.py"
WHOLE_RUN_DELAY = 0.5  # seconds: a smoke epoch takes 1-2 s, so the kill lands inside epoch 2
RUN_ID = re.compile(r"\(run-id (\d+)")
KILLED = re.compile(ENV + r": killing this process at (\S+) ")
# metrics.json keys that are wall-clock figures or name the run: they differ between any two runs
VOLATILE = re.compile(r"seconds|time_ratio|^run_id$")


@dataclass(frozen=True)
class Fault:
    """One case: the step killed, where (None: the whole run's process group), and how the run is meant to
    recover: "retry" (Metaflow's, within the run) or "resume"."""

    step: str
    kill: Kill | None
    recovery: str
    what: str


@dataclass(frozen=True)
class FlowRun:
    run_id: str
    returncode: int
    seconds: float
    log: str

    @property
    def killed_at(self) -> list[str]:
        return KILLED.findall(self.log)

    def output(self, name: str) -> Path:
        """Where the `end` step says an output is (a resume's may be a cloned step's, under its run id)."""
        said = re.findall(rf"\] {name}: (\S+)", self.log)
        if not said:
            raise FileNotFoundError(f"run {self.run_id}'s end step did not say where its {name} is")
        return Path(said[-1])


@dataclass(frozen=True)
class Fingerprint:
    embeddings: str   # SHA-256 of the gallery ids, vectors and bits
    metrics: str      # SHA-256 of metrics.json without its volatile entries
    values: dict = field(compare=False, repr=False)   # those entries, to name what differs

    def differences(self, other: "Fingerprint") -> list[str]:
        """What differs from `other`: "embeddings", and the metrics.json entries (paths) that differ."""
        flat_a, flat_b = _flat(self.values), _flat(other.values)
        return ((["embeddings"] if self.embeddings != other.embeddings else [])
                + sorted(k for k in flat_a.keys() | flat_b.keys() if flat_a.get(k) != flat_b.get(k)))


def _flat(value, path: str = "") -> dict:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flat(item, f"{path}/{key}").items()}
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in _flat(item, f"{path}[{i}]").items()}
    return {path: value}


@dataclass
class Outcome:
    fault: Fault
    fired: bool               # the kill happened (the killed process said so in the log)
    recovered_by: str         # "retry" or "resume": what reached the end
    identical: bool           # both fingerprints equal the uninterrupted run's
    seconds: float            # the recovering run's wall time (the failed run's not counted)
    notes: list[str] = field(default_factory=list)


RETRIED = [
    Fault("preprocess", Kill("preprocess.gallery", 5), "retry", "a shard part-written (5th gallery)"),
    Fault("train", Kill("train.step", 15), "retry", "training mid-epoch 2 (15th step; epoch 1's checkpoint written)"),
    Fault("export", Kill("export.write", 1), "retry", "the model folder part-written (1st file)"),
    Fault("evaluate", Kill("transfer.task", 1), "retry", "the transfer-suite branch after its 1st held-out task"),
    Fault("evaluate", Kill("task_optimal.step", 3), "retry", "a task-optimal group mid-training (3rd step)"),
]
RESUMED = [  # each inner list: the kills of one run of the chain
    [Fault("start", Kill("synth.generated"), "resume", "the synthetic catalogue written, its completion marker not")],
    [Fault("ingest", Kill("ingest"), "resume", "the catalogue validated, the step's artifacts not saved")],
    [Fault("preprocess", Kill("preprocess.gallery", 5), "resume", "a shard part-written, in every attempt")],
    [Fault("train", Kill("train.epoch", 1), "resume", "training after an epoch's checkpoint, in every attempt")],
    [Fault("export", Kill("export.write", 2), "resume", "the model folder part-written (2nd file), in every attempt")],
    [Fault("evaluate", Kill("transfer.task", 1), "resume", "the transfer-suite branch, in every attempt"),
     Fault("evaluate", Kill("task_optimal.step", 3), "resume", "a task-optimal group mid-training, in every attempt")],
    [Fault("report", Kill("report.write", 3), "resume", "the report part-written (3rd file)")],
    [Fault("end", Kill("end"), "resume", "the last step")],
]
WHOLE_RUN = Fault("train", None, "resume", "the whole run (the flow and its tasks: their process group) mid-epoch 2 "
                                          f"({WHOLE_RUN_DELAY:g} s after a training logged epoch 1)")


def _spec(faults: list[Fault]) -> str:
    return ",".join(f.kill.spec for f in faults)


def flow(folder: Path, args: list[str], env: dict, kill_group_when: str | None = None,
         kill_after: float = 0.0) -> FlowRun:
    """flows/train_flow.py with `args` (run ... or resume ...), its log in `folder`; with `kill_group_when`,
    the whole process group is SIGKILLed `kill_after` seconds after that text is logged."""
    config = ["--config", "settings", str(folder / "settings.json")] if args[0] == "run" else []  # resume: the origin's
    command = [sys.executable, str(FLOW), *config, *args]
    env = {**os.environ, "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(folder / "datastore"), **env}
    started, lines = time.perf_counter(), []
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                          start_new_session=True) as process:
        for line in process.stdout:
            lines.append(line)
            if kill_group_when and kill_group_when in line:
                threading.Timer(kill_after, os.killpg, (process.pid, signal.SIGKILL)).start()
                kill_group_when = None
        returncode = process.wait()
    log = "".join(lines)
    (folder / "logs").mkdir(exist_ok=True)
    run_id = (RUN_ID.findall(log) or ["?"])[0]
    (folder / "logs" / f"{run_id}-{len(list((folder / 'logs').iterdir()))}.log").write_text(log)
    return FlowRun(run_id, returncode, time.perf_counter() - started, log)


def comparable_metrics(metrics):
    """metrics.json without the entries that differ between any two runs (times, throughputs, run ids)."""
    if isinstance(metrics, dict):
        return {k: comparable_metrics(v) for k, v in metrics.items() if not VOLATILE.search(str(k))}
    if isinstance(metrics, list):
        return [comparable_metrics(v) for v in metrics]
    return metrics


def fingerprint(run: FlowRun, folder: Path) -> Fingerprint:
    """The run's embeddings and comparable metrics.json, with `folder` (where this case keeps its store, so
    the photo paths of retrieval's examples name it) taken out of the paths."""
    import numpy as np
    import pyarrow.parquet as pq

    table = pq.read_table(run.output("embeddings"))
    digest = hashlib.sha256("\n".join(table.column("gallery_id").to_pylist()).encode())
    digest.update(np.asarray(table.column("embedding").combine_chunks().flatten(), dtype=np.float32).tobytes())
    if "embedding_bits" in table.column_names:
        digest.update(json.dumps(table.column("embedding_bits").to_pylist(), default=list).encode())
    text = (run.output("report").parent / "metrics.json").read_text().replace(json.dumps(str(folder))[1:-1], "")
    metrics = comparable_metrics(json.loads(text))
    return Fingerprint(digest.hexdigest(), hashlib.sha256(json.dumps(metrics, sort_keys=True).encode()).hexdigest(),
                       metrics)


def compared(run: FlowRun, folder: Path, reference: Fingerprint) -> tuple[bool, list[str]]:
    """Whether a run ended with the reference's result, and what differs when it did not."""
    if run.returncode != 0:
        return False, [f"run {run.run_id} failed (exit {run.returncode})"]
    try:
        differences = fingerprint(run, folder).differences(reference)
    except FileNotFoundError as e:
        return False, [str(e)]
    return not differences, differences[:5]


def _setup(folder: Path, settings: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "settings.json").write_text(json.dumps(settings))
    return folder


def _store_args(folder: Path) -> list[str]:
    return ["--store", str(folder / "store"), "--reports", str(folder / "reports")]


def retried(folder: Path, reference: Fingerprint, log=print) -> list[Outcome]:
    """One run with every retried step's kill, each firing once: it must end successfully, and the same."""
    run = flow(folder, ["run", *_store_args(folder)], {ENV: _spec(RETRIED), FIRST_ATTEMPT_ENV: "1"})
    done = run.returncode == 0
    same, notes = compared(run, folder, reference)
    killed = collections.Counter(run.killed_at)
    log(f"retried: run {run.run_id} {'ended' if done else 'FAILED'} in {run.seconds:.0f} s; processes killed "
        f"{dict(killed)}")
    return [Outcome(f, killed[f.kill.point] > 0, "retry" if done else "", same, run.seconds, notes)
            for f in RETRIED]


def resumed(folder: Path, reference: Fingerprint, log=print) -> list[Outcome]:
    """A chain of runs, each killed at the next fault of RESUMED and resumed by the next; the last resume
    kills nothing and must end with the uninterrupted run's result."""
    outcomes, previous, origin = [], [], None
    for faults in [*RESUMED, None]:
        args = ["resume", "--origin-run-id", origin] if origin else ["run", *_store_args(folder)]
        run = flow(folder, args, {ENV: _spec(faults)} if faults else {})
        if faults is None:
            same, notes = compared(run, folder, reference)
            log(f"resumed: the last resume {run.run_id} {'ended' if run.returncode == 0 else 'FAILED'} "
                f"in {run.seconds:.0f} s; identical: {same}")
            for o in outcomes:
                o.identical, o.recovered_by, o.notes = same, "resume" if run.returncode == 0 else "", notes
        for o in previous:
            o.seconds = run.seconds  # this run resumed them
        if faults is None:
            return outcomes
        previous = []
        for fault in faults:
            stopped = run.returncode != 0 and fault.kill.point in run.killed_at
            log(f"resumed: {fault.step} ({fault.kill.spec}): run {run.run_id} "
                f"{'stopped by the kill' if stopped else 'did NOT stop there'} in {run.seconds:.0f} s")
            previous.append(Outcome(fault, stopped, "", False, 0.0))
        outcomes += previous
        origin = run.run_id
    return outcomes


def whole_run(folder: Path, reference: Fingerprint, log=print) -> Outcome:
    """The flow and its tasks killed together inside training's second epoch, then resumed."""
    killed = flow(folder, ["run", *_store_args(folder)], {}, kill_group_when="] epoch 1: ", kill_after=WHOLE_RUN_DELAY)
    run = flow(folder, ["resume", "--origin-run-id", killed.run_id], {})
    same, notes = compared(run, folder, reference)
    log(f"whole run killed: run {killed.run_id} (exit {killed.returncode}); resume {run.run_id} "
        f"{'ended' if run.returncode == 0 else 'FAILED'} in {run.seconds:.0f} s; identical: {same}")
    return Outcome(WHOLE_RUN, killed.returncode == -signal.SIGKILL, "resume" if run.returncode == 0 else "", same,
                   run.seconds, notes)


def table(outcomes: list[Outcome]) -> str:
    rows = ["| step | fault | killed | recovered by | embeddings and metrics.json | recovering run |",
            "| --- | --- | --- | --- | --- | --- |"]
    for o in outcomes:
        kill = f"`{o.fault.kill.spec}`: " if o.fault.kill else ""
        rows.append(f"| {o.fault.step} | {kill}{o.fault.what} | {'yes' if o.fired else 'NO'} | "
                    f"{o.recovered_by or 'FAILED'} | {'identical' if o.identical else 'DIFFERENT: ' + ', '.join(o.notes)} | "
                    f"{o.seconds:.0f} s |")
    return "\n".join(rows)


def bench_faults(preset: str = "smoke", out: str = "faults-bench", log=print) -> list[Outcome]:
    """Every case above against one uninterrupted run; writes faults.md and faults.json to `out`."""
    settings, root = preset_document(preset), Path(out).resolve()
    reference_folder = _setup(root / "reference", settings)
    first = flow(reference_folder, ["run", *_store_args(reference_folder)], {})
    if first.returncode != 0:
        raise RuntimeError(f"the uninterrupted run failed (log in {reference_folder / 'logs'}):\n{first.log[-3000:]}")
    reference = fingerprint(first, reference_folder)
    log(f"uninterrupted: run {first.run_id} in {first.seconds:.0f} s; embeddings {reference.embeddings[:12]}, "
        f"metrics {reference.metrics[:12]}")
    outcomes = [*retried(_setup(root / "retried", settings), reference, log),
                *resumed(_setup(root / "resumed", settings), reference, log),
                whole_run(_setup(root / "whole-run", settings), reference, log)]
    text = (f"# Faults: {len(outcomes)} kills of the `{preset}` preset's train flow\n\nUninterrupted run "
            f"{first.run_id}: {first.seconds:.0f} s; embeddings SHA-256 {reference.embeddings}, comparable "
            f"metrics.json SHA-256 {reference.metrics}.\n\n{table(outcomes)}\n")
    (root / "faults.md").write_text(text)
    (root / "faults.json").write_text(json.dumps([{"step": o.fault.step, "kill": o.fault.kill and o.fault.kill.spec, "recovery": o.fault.recovery,
                                                   "what": o.fault.what, "fired": o.fired, "recovered_by": o.recovered_by,
                                                   "identical": o.identical, "seconds": o.seconds, "notes": o.notes}
                                                  for o in outcomes],
                                                 indent=2))
    log(text)
    return outcomes
