"""Fault injection, to prove recovery works: a real kill (SIGKILL), not a simulated one.

The code calls `reached(point)` where a kill is worth surviving (FAULT_POINTS lists them). A process
SIGKILLs itself there when GALLERY_KILL_AT asks for it: a comma-separated list of `point`, `point:n`
(the n-th arrival at the point in this process) or `point:n@rank` (only in that data-parallel rank),
e.g. `GALLERY_KILL_AT=train.step:15` (mid-way through the smoke preset's second epoch).

With GALLERY_KILL_FIRST_ATTEMPT=1 a kill fires only in a task's first attempt (Metaflow's --retry-count
0), so Metaflow's retry must reach the result, whether or not the retried process reaches the point
again (a data-parallel node its control task's failure ended never got there). Without it a kill fires in
every attempt: the step's retries are exhausted, the run fails, and `resume` (without GALLERY_KILL_AT) must.
`gallery bench faults` drives both over every step of the train flow (docs/bad-input.md, Faults).
"""
from __future__ import annotations

import collections
import os
import re
import signal
import sys
from dataclasses import dataclass

ENV = "GALLERY_KILL_AT"
FIRST_ATTEMPT_ENV = "GALLERY_KILL_FIRST_ATTEMPT"

# where each point is reached (the step of the train flow, and what has been written when it fires)
FAULT_POINTS = {
    "synth.generated": "start: the synthetic catalogue written, its completion marker not",
    "ingest": "ingest: the catalogue validated and split, before the step's artifacts are saved",
    "preprocess.gallery": "preprocess: a shard part-written (each gallery stored)",
    "train.step": "train: after an optimiser step (mid-epoch; the last checkpoint is the previous epoch's)",
    "train.epoch": "train: after an epoch's checkpoint is written",
    "export.write": "export: the embeddings written, the model folder part-written (each of its files)",
    "transfer.task": "evaluate (transfer suite): after each held-out task's probes",
    "task_optimal.step": "evaluate (a task-optimal group): after an optimiser step of its models",
    "report.write": "report: the report part-written (each of its files)",
    "end": "end: before the outputs are printed",
}


@dataclass(frozen=True)
class Kill:
    """One asked-for kill: at the `nth` arrival at `point`, in `rank` (None: every rank)."""

    point: str
    nth: int = 1
    rank: int | None = None

    @classmethod
    def parse(cls, text: str) -> "Kill":
        m = SPEC.fullmatch(text.strip())
        if m is None:
            raise ValueError(f"{ENV}: {text.strip()!r} is not point, point:n or point:n@rank (n and rank whole numbers)")
        if m["point"] not in FAULT_POINTS:
            raise ValueError(f"{ENV}: unknown fault point {m['point']!r}; the points are {', '.join(FAULT_POINTS)}")
        return cls(m["point"], int(m["nth"] or 1), None if m["rank"] is None else int(m["rank"]))

    @property
    def spec(self) -> str:
        """As GALLERY_KILL_AT writes it."""
        if self.rank is None:
            return self.point if self.nth == 1 else f"{self.point}:{self.nth}"
        return f"{self.point}:{self.nth}@{self.rank}"


SPEC = re.compile(r"(?P<point>[a-z_.]+)(?::(?P<nth>\d+))?(?:@(?P<rank>\d+))?")
_arrivals: collections.Counter = collections.Counter()


def asked() -> list[Kill]:
    return [Kill.parse(part) for part in os.environ.get(ENV, "").split(",") if part.strip()]


def reached(point: str, rank: int = 0) -> None:
    """A place a kill is worth surviving: SIGKILL this process here if GALLERY_KILL_AT asks (else nothing)."""
    kills = [k for k in asked() if k.point == point]
    if not kills or (os.environ.get(FIRST_ATTEMPT_ENV) == "1" and _attempt() > 0):
        return
    _arrivals[point] += 1
    for kill in kills:
        if kill.nth == _arrivals[point] and kill.rank in (None, rank):
            print(f"{ENV}: killing this process at {point} (arrival {kill.nth}, rank {rank})", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


def _attempt() -> int:
    """The Metaflow attempt this process runs (its command line's --retry-count), 0 outside a flow."""
    argv = sys.argv
    return next((int(argv[i + 1]) for i, a in enumerate(argv[:-1]) if a == "--retry-count"), 0)
