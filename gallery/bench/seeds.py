"""`gallery bench seeds`: do the report's readings survive a change of seed?

Runs the train flow of a preset several times, changing only `train.seed` (the catalogue, its split and
every setting stay), and reads each run's metrics.json: the primary comparison, each aggregate of the
transfer scorecard (per probe and over all, against every baseline), retrieval's *unified beats
specialised* where the metric tasks exist, and every held-out score (task x probe x arm, for the
calibration's seed-to-seed spread). Writes, beside the runs, `seeds.md` and `seeds.json`: per reading,
each seed's estimate with its interval and reading, and how many seeds agree with the majority's sign.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from gallery.config import PRESETS_DIR
from gallery.evaluation.arms import EmbeddingArm, arm_label


@dataclass(frozen=True)
class ReadingId:
    """Which reading: the comparison's kind and what it compares (fields, never a name to split)."""

    kind: str                      # primary | aggregate | retrieval
    task: str | None = None
    probe: str | None = None
    arm: EmbeddingArm | None = None
    baseline: EmbeddingArm | None = None
    metric: str | None = None

    def of_any_seed(self) -> "ReadingId":
        """The same reading of a run with another train.seed: its arms' models' seeds left out (as 0)."""
        return replace(self, arm=_unseeded(self.arm), baseline=_unseeded(self.baseline))


def _unseeded(arm: EmbeddingArm | None) -> EmbeddingArm | None:
    return None if arm is None else arm.with_seed(0)


def _arm(d: dict | None) -> EmbeddingArm | None:
    """An arm as metrics.json holds it (its fields: gallery.evaluation.report.metrics)."""
    return None if d is None else EmbeddingArm.from_dict(d)


@dataclass
class Measured:
    """One reading of one run."""

    of: ReadingId
    seed: int
    estimate: float
    low: float | None
    high: float | None
    reading: str


@dataclass
class Agreement:
    """One reading across the runs: how many share the majority's sign, and each run's reading."""

    of: ReadingId
    estimates: list[float]
    readings: list[str]
    same_sign: int
    runs: int


@dataclass
class Spread:
    """A held-out score across the runs (task x probe x arm), for the calibration."""

    task: str
    probe: str
    arm: EmbeddingArm
    values: list[float]


def readings_of(metrics: dict, seed: int) -> list[Measured]:
    """The readings a run's metrics.json holds (gallery.evaluation.render.metrics writes them)."""
    out = []

    def add(of: ReadingId, effect: dict):
        out.append(Measured(of, seed, _number(effect["estimate"]), effect.get("low"), effect.get("high"),
                            effect.get("reading", "")))

    card = metrics["scorecard"]
    if card.get("primary"):
        p = card["primary"]
        add(ReadingId("primary", p["task"], p["probe"], _arm(p["arm"]), _arm(p["baseline"]), p["metric"]),
            p["difference"])
    for a in card["aggregates"]:
        add(ReadingId("aggregate", None, a["probe"], _arm(a["arm"]), _arm(a["baseline"]), "error_change"), a["effect"])
    relevance = metrics.get("retrieval_against_relevance") or {}
    for c in relevance.get("claims", []):
        if c["claim"] == "unified_beats_specialised":
            add(ReadingId("retrieval", c["task"], c["search"], _arm(c["arm"]), _arm(c["baseline"]), c["metric"]),
                c["effect"])
    return out


def _number(value) -> float:
    return math.nan if value is None else float(value)


def agreement(per_run: list[list[Measured]]) -> list[Agreement]:
    """Per reading (in the first run's order), each run's estimate and reading and the count of runs whose
    estimate has the majority's sign (0 counts as its own sign)."""
    out = []
    for first in per_run[0]:
        found = [next((m for m in run if m.of.of_any_seed() == first.of.of_any_seed()), None) for run in per_run]
        estimates = [m.estimate if m else math.nan for m in found]
        signs = [(e > 0) - (e < 0) for e in estimates if not math.isnan(e)]
        same = Counter(signs).most_common(1)[0][1] if signs else 0
        out.append(Agreement(first.of, estimates, [m.reading if m else "missing" for m in found], same, len(per_run)))
    return out


def score_spread(metrics_per_run: list[dict]) -> list[Spread]:
    """Every held-out score (task x probe x arm) across the runs (an arm of a trained model: that model's
    repetition in each run, whatever its seed)."""
    def key(score: dict) -> tuple:
        return score["task"], score["probe"], _unseeded(_arm(score["arm"]))

    keyed = [{key(s): _number(s["value"]) for s in m["transfer"]["scores"]} for m in metrics_per_run]
    first = metrics_per_run[0]["transfer"]["scores"]
    return [Spread(s["task"], s["probe"], _arm(s["arm"]), [k.get(key(s), math.nan) for k in keyed]) for s in first]


def label(of: ReadingId) -> str:
    """A reading as a reader reads it."""
    arm, baseline = (arm_label(a) if a is not None else "-" for a in (of.arm, of.baseline))
    if of.kind == "primary":
        return f"primary: `{of.task}` {of.probe}, {arm} - {baseline} ({of.metric})"
    if of.kind == "aggregate":
        return f"aggregate ({of.probe} probe{'s' if of.probe == 'all' else ''}): {arm} vs {baseline}, change of errors"
    return f"retrieval `{of.task}` ({of.probe}): {arm} - {baseline}, {of.metric}"


def markdown(table: list[Agreement], spread: list[Spread], seeds: list[int]) -> str:
    heads = " | ".join(f"seed {s}" for s in seeds)
    lines = [f"| reading | {heads} | same sign |", "|" + " --- |" * (len(seeds) + 2)]
    for a in table:
        change = a.of.kind == "aggregate"
        cells = [(f"{e:+.1%}" if change else f"{e:+.3f}") + f" ({r})" for e, r in zip(a.estimates, a.readings)]
        lines.append(f"| {label(a.of)} | " + " | ".join(cells) + f" | {a.same_sign} of {a.runs} |")
    lines += ["", f"| held-out task | probe | arm | {heads} | range |", "|" + " --- |" * (len(seeds) + 4)]
    for s in spread:
        lines.append(f"| `{s.task}` | {s.probe} | {arm_label(s.arm)} | " + " | ".join(f"{v:.3f}" for v in s.values)
                     + f" | {max(s.values) - min(s.values):.3f} |")
    return "\n".join(lines)


def run_seed(preset: Path, seed: int, folder: Path) -> dict:
    """The flow with `train.seed` = seed, in its own store and reports folder: its metrics.json."""
    from gallery.runs import run_train_flow

    settings = json.loads(preset.read_text())
    settings.setdefault("train", {})["seed"] = seed
    config = folder / f"settings-seed{seed}.json"
    config.write_text(json.dumps(settings))
    reports = folder / f"reports-seed{seed}"
    run_train_flow(str(config), str(folder), store=str(folder / "store"), reports=str(reports))
    (found,) = reports.glob("*/metrics.json")  # the one run this reports folder holds
    return json.loads(found.read_text())


def bench_seeds(runs: int = 3, preset: str = "default", out: str = "seeds-bench") -> list[Agreement]:
    """The preset's flow `runs` times, train.seed 0, 1, ...; the agreement table into `out`."""
    path = Path(preset) if Path(preset).suffix == ".json" else Path(str(PRESETS_DIR / f"{preset}.json"))
    folder = Path(out).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    seeds = list(range(runs))
    metrics = [run_seed(path, seed, folder) for seed in seeds]
    table = agreement([readings_of(m, s) for m, s in zip(metrics, seeds)])
    spread = score_spread(metrics)
    text = markdown(table, spread, seeds)
    (folder / "seeds.md").write_text(text + "\n")
    (folder / "seeds.json").write_text(json.dumps({"preset": str(path), "seeds": seeds,
                                                   "readings": [asdict(a) for a in table],
                                                   "scores": [asdict(s) for s in spread]}, indent=2))
    print(text)
    print(f"\nwritten: {folder / 'seeds.md'}, {folder / 'seeds.json'}")
    return table
