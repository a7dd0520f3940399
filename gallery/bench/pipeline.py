"""`gallery bench pipeline`: the whole train flow at 1x, 10x (and 50x) the default catalogue's galleries.

Each size is one run of flows/train_flow.py in a subprocess, on a synthetic catalogue at a small image
size and a fixed epoch budget (so a size takes minutes, not hours), with the preset's evaluations
otherwise as they are. While it runs, its process tree is sampled (psutil, every `SAMPLE_SECONDS`): each
Metaflow task with its children (DataLoader workers, data-parallel workers) is one tree, and a step's peak
RSS is its largest tree's largest sampled sum. A step's time is from its first task's start to its last
task's end, read from Metaflow's log (wall-clock timestamps: a machine whose clock is stepped meanwhile, a
paused VM's, shows it there; the whole run is timed with a monotonic clock). Then the size of every output. The table puts each figure of a
larger size beside the first size's as a ratio, against the ratio of galleries (linear growth).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

from gallery.config import PRESETS_DIR

SAMPLE_SECONDS = 0.25
TASK_LOG = re.compile(r"^(\S+ \S+) \[(\d+)/(\w+)/(\d+) \(pid \d+\)\] (Task is starting|Task finished successfully)")
STEPS = ("start", "ingest", "preprocess", "join_shards", "data_quality", "train", "join_train", "export", "evaluate",
         "report", "end")
# what a run writes, by where it lies: under its store folder (<store>/<run id>/) or its reports folder
OUTPUTS = {"metrics.json": ("reports", "metrics.json"), "per-gallery scores (Parquet)": ("reports", "*_scores.parquet"),
           "report folder": ("reports", ""), "explorer": ("reports", "explorer.html"),
           "shards (images + feature cache)": ("store", "shards"), "checkpoints": ("store", "checkpoints"),
           "task-optimal results": ("store", "task_optimal"), "embeddings": ("store", "embeddings.parquet"),
           "model folder": ("store", "model"), "run store": ("store", "")}


@dataclass
class StepCost:
    step: str
    seconds: float
    peak_rss: int    # bytes: the step's largest task tree (the task and its children) at its largest sample
    tasks: int


@dataclass
class SizeRun:
    """One size's run: its galleries, wall time, each step's cost and each output's bytes."""

    galleries: int
    run_id: str
    seconds: float
    steps: list[StepCost]
    outputs: dict[str, int] = field(default_factory=dict)

    def step(self, name: str) -> StepCost | None:
        return next((s for s in self.steps if s.step == name), None)

    @property
    def peak_rss(self) -> int:
        return max((s.peak_rss for s in self.steps), default=0)


def preset_document(preset: str) -> dict:
    """A preset's settings JSON by name (default, smoke, ...) or path, as a dict to change."""
    path = Path(preset) if preset.endswith(".json") else PRESETS_DIR / f"{preset}.json"
    return json.loads(Path(path).read_text())


def bench_settings(preset: str, galleries: int, image_size: int, epochs: int) -> dict:
    """The preset with `galleries` synthetic galleries at `image_size` px, `epochs` epochs for every model
    (no early stop: each size trains the same number of epochs), one epoch for the held-out heads."""
    settings = preset_document(preset)
    settings.setdefault("data", {}).setdefault("synth", {}).update(galleries=galleries, image_size=image_size)
    settings.setdefault("model", {})["image_size"] = image_size
    settings.setdefault("train", {}).update(max_epochs=epochs, patience=epochs)
    settings.setdefault("evaluation", {})["holdout_epochs"] = 1
    return settings


class TreeSampler(threading.Thread):
    """Samples the RSS of every Metaflow task tree under `pid` until stopped: the peak per step."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peaks, self._finished = pid, {}, threading.Event()

    def run(self):
        import psutil

        root = psutil.Process(self.pid)
        while not self._finished.is_set():
            try:
                processes = root.children(recursive=True)
            except psutil.NoSuchProcess:
                return
            step_of, parent, rss = {}, {}, {}
            for p in processes:
                try:
                    argv, parent[p.pid], rss[p.pid] = p.cmdline(), p.ppid(), p.memory_info().rss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                if "step" in argv[:-1] and "--run-id" in argv:
                    step_of[p.pid] = argv[argv.index("step") + 1]
            trees: dict[int, int] = {}
            for pid, size in rss.items():
                task = pid
                while task not in step_of and task in parent:
                    task = parent[task]
                if task in step_of:
                    trees[task] = trees.get(task, 0) + size
            for task, size in trees.items():
                self.peaks[step_of[task]] = max(self.peaks.get(step_of[task], 0), size)
            self._finished.wait(SAMPLE_SECONDS)

    def stop(self) -> dict[str, int]:
        self._finished.set()
        self.join()
        return self.peaks


def step_times(log: str) -> tuple[str, dict[str, tuple[float, int]]]:
    """The run id and, per step, (seconds from its first task's start to its last task's end, tasks)."""
    started, ended, run_id = {}, {}, ""
    for line in log.splitlines():
        m = TASK_LOG.match(line)
        if m:
            when = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f").timestamp()
            run_id, task = m.group(2), (m.group(3), m.group(4))
            (started if m.group(5) == "Task is starting" else ended)[task] = when
    out = {}
    for step in dict.fromkeys(s for s, _ in started):
        tasks = [t for t in started if t[0] == step and t in ended]
        if tasks:
            out[step] = (max(ended[t] for t in tasks) - min(started[t] for t in tasks), len(tasks))
    return run_id, out


def folder_bytes(path: Path, pattern: str = "") -> int:
    """Bytes of a file, of the files a glob pattern matches, or of a folder's files."""
    if pattern and any(c in pattern for c in "*?["):
        return sum(p.stat().st_size for p in path.glob(pattern) if p.is_file())
    target = path / pattern if pattern else path
    if target.is_file():
        return target.stat().st_size
    return sum(p.stat().st_size for p in target.rglob("*") if p.is_file()) if target.exists() else 0


def run_size(settings: dict, folder: Path, log=print) -> SizeRun:
    """One run of the train flow with `settings` in `folder` (its own datastore, store and reports)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "settings.json"
    config.write_text(json.dumps(settings))
    flow = Path(__file__).resolve().parents[2] / "flows" / "train_flow.py"
    env = {**os.environ, "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(folder / "datastore")}
    command = [sys.executable, str(flow), "--config", "settings", str(config), "run",
               "--store", str(folder / "store"), "--reports", str(folder / "reports")]
    started = time.perf_counter()
    with open(folder / "flow.log", "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        sampler = TreeSampler(process.pid)
        sampler.start()
        status = process.wait()
        peaks = sampler.stop()
    seconds = time.perf_counter() - started
    text = (folder / "flow.log").read_text()
    if status != 0:
        raise RuntimeError(f"the train flow failed at {settings['data']['synth']['galleries']} galleries "
                           f"(log: {folder / 'flow.log'}):\n{text[-3000:]}")
    run_id, times = step_times(text)
    steps = [StepCost(s, times[s][0], peaks.get(s, 0), times[s][1]) for s in STEPS if s in times]
    where = {"store": folder / "store" / run_id, "reports": folder / "reports" / run_id}
    outputs = {name: folder_bytes(where[root], pattern) for name, (root, pattern) in OUTPUTS.items()}
    run = SizeRun(settings["data"]["synth"]["galleries"], run_id, seconds, steps, outputs)
    log(f"{run.galleries:,} galleries: {seconds:.0f} s, peak RSS {run.peak_rss / 2**20:,.0f} MiB")
    return run


def _ratio(big: float, small: float) -> str:
    return f"{big / small:.2f}x" if small else "-"


def table(runs: list[SizeRun]) -> str:
    """Markdown: each step's time and peak RSS per size, and each output's size, with ratios to the first size."""
    first = runs[0]
    factors = [r.galleries / first.galleries for r in runs[1:]]
    sizes = " | ".join(f"{r.galleries:,}" for r in runs)
    ratios = "".join(f" {r.galleries:,} / {first.galleries:,} (linear: {f:g}x) |" for r, f in zip(runs[1:], factors))
    head = f"| | {sizes} |{ratios}"
    rule = "|" + " --- |" * (1 + 2 * len(runs) - 1)
    lines = ["Step wall time (s), first task's start to last task's end:", "", head.replace("| |", "| step |", 1), rule]
    for name in STEPS:
        costs = [r.step(name) for r in runs]
        if costs[0] is None or any(c is None for c in costs):
            continue
        lines.append(f"| {name} | " + " | ".join(f"{c.seconds:.1f}" for c in costs) + " | "
                     + " | ".join(_ratio(c.seconds, costs[0].seconds) for c in costs[1:]) + " |")
    lines.append("| whole run | " + " | ".join(f"{r.seconds:.0f}" for r in runs) + " | "
                 + " | ".join(_ratio(r.seconds, first.seconds) for r in runs[1:]) + " |")
    lines += ["", "Peak RSS (MiB) of each step's largest task with its children:", "",
              head.replace("| |", "| step |", 1), rule]
    for name in STEPS:
        costs = [r.step(name) for r in runs]
        if costs[0] is None or any(c is None for c in costs) or not costs[0].peak_rss:
            continue
        lines.append(f"| {name} | " + " | ".join(f"{c.peak_rss / 2**20:,.0f}" for c in costs) + " | "
                     + " | ".join(_ratio(c.peak_rss, costs[0].peak_rss) for c in costs[1:]) + " |")
    lines.append("| largest step | " + " | ".join(f"{r.peak_rss / 2**20:,.0f}" for r in runs) + " | "
                 + " | ".join(_ratio(r.peak_rss, first.peak_rss) for r in runs[1:]) + " |")
    lines += ["", "Outputs (MiB):", "", head.replace("| |", "| output |", 1), rule]
    for name in OUTPUTS:
        values = [r.outputs.get(name, 0) for r in runs]
        lines.append(f"| {name} | " + " | ".join(f"{v / 2**20:,.2f}" for v in values) + " | "
                     + " | ".join(_ratio(v, values[0]) for v in values[1:]) + " |")
    return "\n".join(lines)


def bench_pipeline(factors=(1, 10), preset: str = "default", image_size: int = 32, epochs: int = 2,
                   base_galleries: int | None = None, out: str | None = None, log=print) -> list[SizeRun]:
    """The flow at each factor x the preset's galleries (or `base_galleries`); the table printed and, with
    `out`, written there as pipeline.md and pipeline.json beside the runs (else the runs are deleted)."""
    from gallery.data.synth import SynthSettings

    base = base_galleries or preset_document(preset).get("data", {}).get("synth", {}).get("galleries",
                                                                                          SynthSettings().galleries)
    with tempfile.TemporaryDirectory(prefix="gallery-bench-pipeline-") as scratch:
        folder = Path(out).resolve() if out else Path(scratch)
        runs = []
        for factor in factors:
            settings = bench_settings(preset, int(base * factor), image_size, epochs)
            log(f"running the train flow on {int(base * factor):,} galleries ({image_size} px, {epochs} epochs)...")
            runs.append(run_size(settings, folder / f"x{factor:g}", log))
        text = table(runs)
        log(text)
        if out:
            (folder / "pipeline.md").write_text(text + "\n")
            (folder / "pipeline.json").write_text(json.dumps([asdict(r) for r in runs], indent=2))
    return runs
