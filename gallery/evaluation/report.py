"""What the run report says, computed (see docs/design.md, "Evaluation protocol"): every comparison,
the binary codes against float search, the 2-D projection and the retrieval examples, gathered in
one typed `ReportData`. Laying it out as markdown, figures and metrics.json is
gallery.evaluation.render's job, so each side is tested on its own with constructed inputs.

`train` fits, `valid` selects (each model's best epoch), `test` reports: every number here is
measured on the test galleries, which no model was selected on.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, is_dataclass

import numpy as np
import pandas as pd

from gallery.config import Settings, preset_models, reference_model
from gallery.data.images import DataQuality
from gallery.data.ingest import Catalogue, describe
from gallery.data.tasks import Task
from gallery.evaluation import gallery_scores
from gallery.evaluation.arms import arm_label
from gallery.evaluation.comparisons import (ClassBalance, Finding, HeadlineNumber, Table2Comparison, TaskRow,
                                            VersusBaseline, VersusOptimal, WeightingWins, class_balance, findings,
                                            headline_numbers, mtl_vs_baseline, mtl_vs_optimal, paper_pair, per_task,
                                            table2_comparisons, weighting_wins)
from gallery.evaluation.holdout import HoldoutResult
from gallery.evaluation.neighbours import BinaryVsFloat, binary_vs_float
from gallery.evaluation.projection import gallery_map, projection_attributes
from gallery.evaluation.retrieval_examples import RetrievalExample, retrieval_examples
from gallery.evaluation.retrieval_suite import RetrievalResult
from gallery.evaluation.scorecard import Scorecard, scorecard
from gallery.evaluation.seeds import mean_optimal, mean_training, mean_transfer, seeds_of
from gallery.evaluation.statistics import Spread, spread
from gallery.evaluation.study import CellRanking, rank_cells
from gallery.evaluation.task_optimal import TaskOptimalResult
from gallery.evaluation.transfer import TransferResult
from gallery.model.identity import ModelIdentity
from gallery.retrieval.embeddings import embedding_matrix, embeddings_code, photo_weights_of, read_embeddings
from gallery.training.checkpoints import load_trained
from gallery.training.engine import TrainResult

PROTOCOL = {"train": "fits every model and every probe",
            "valid": "selects each model's best epoch (early stopping) through the MTL labels",
            "test": "reports every comparison with the task-optimal models, the binary codes and retrieval",
            "valid+test": "the transfer suite scores the held-out tasks on both: no model trained on them, no "
                          "probe saw their held-out labels (hyperparameters chosen out of fold)"}


@dataclass
class Projection:
    rows: np.ndarray                              # which exported galleries
    coords: np.ndarray                            # their 2-D UMAP coordinates
    colourings: list[tuple[Task, np.ndarray]]     # attribute, each gallery's class (-1: missing)


@dataclass
class SeedSpread:
    """A headline number (as the first seed measured it) and its spread across the seeds."""

    number: HeadlineNumber
    spread: Spread


@dataclass
class ReportData:
    """Everything the report shows, computed: what render.lay_out turns into report.md, figures, CSVs
    and metrics.json."""

    run_id: str
    settings: Settings
    seeds: list[int]
    splits: dict[str, int]                 # galleries per split
    catalogue_text: str
    quality: DataQuality
    training: dict[ModelIdentity, TrainResult]   # per trained model, named by its first seed's identity (test
    #                                              scores averaged over the seeds)
    transfer: TransferResult               # every held-out task x probe x arm (scores averaged over seeds)
    scorecard: Scorecard
    table2: list[tuple[HoldoutResult, list[Table2Comparison]]]   # the paper's view: its arms, per row
    per_task: list[TaskRow]
    optimal: dict[str, TaskOptimalResult]
    vs_optimal: dict[ModelIdentity, VersusOptimal]
    wins: WeightingWins | None
    vs_baseline: dict[ModelIdentity, VersusBaseline]
    balance: dict[ModelIdentity, ClassBalance]
    findings: list[Finding]
    spread: list[SeedSpread] = field(default_factory=list)
    study: list[CellRanking] = field(default_factory=list)   # every other trained model against the paper's
    binary: BinaryVsFloat | None = None
    projection: Projection | None = None
    retrieval: list[RetrievalExample] = field(default_factory=list)
    exported_galleries: int = 0
    relevance: RetrievalResult | None = None   # retrieval against the metric tasks' relevance

    @property
    def models(self) -> list[ModelIdentity]:
        """The trained models of the preset's pooling (a study's other poolings are in `study`)."""
        return preset_models(self.settings)

    @property
    def reference(self) -> ModelIdentity:
        """The exported model."""
        return reference_model(self.settings)

    @property
    def primary_task(self) -> str | None:
        """Table 2's held-out task and the primary comparison's (gallery.config.primary_task)."""
        return self.transfer.primary_task

    @property
    def holdouts(self) -> list[HoldoutResult]:
        return self.transfer.holdouts

    @property
    def optimal_capped_at(self) -> int | None:
        """The train galleries the task-optimal models trained on where evaluation.task_optimal_galleries bit
        (fewer than the train split's), else None."""
        trained = max((o.train_galleries for o in self.optimal.values()), default=0)
        return trained if 0 < trained < self.splits["train"] else None

    @property
    def skipped(self) -> list[str]:
        """What the settings left out or capped, each with the setting that did it: the report says so, so a
        reader of a fast run on a large catalogue does not take a missing comparison for a measured one."""
        ev = self.settings.evaluation
        out = [] if ev.task_optimal else ["the task-optimal models, and with them Figures 5 and 6 "
                                          "(`evaluation.task_optimal` is false)"]
        if self.optimal_capped_at:
            out.append(f"the task-optimal models trained on {self.optimal_capped_at:,} of the "
                       f"{self.splits['train']:,} train galleries (`evaluation.task_optimal_galleries`)")
        if not ev.end_to_end:
            out.append("the end-to-end arm of the held-out tasks (`evaluation.end_to_end` is false)")
        if len(self.seeds) == 1:
            out.append("repetitions with other seeds: no spread across seeds (`evaluation.seeds` is 1)")
        if not self.settings.train.poolings:
            out.append("the study of other poolings (`train.poolings` is empty)")
        if self.relevance is not None and ev.retrieval_queries in self.relevance.queries.values():
            out.append(f"retrieval's queries beyond {ev.retrieval_queries:,} per task: a stable sample of that many "
                       "(`evaluation.retrieval_queries`)")
        if self.relevance is not None and not ev.retrieval_arms:
            out.append("retrieval's attribute-only and specialised models (`evaluation.retrieval_arms` is false)")
        return out


def paper_view(transfer: TransferResult) -> list[HoldoutResult]:
    """The held-out task Table 2 shows: the primary one (gallery.config.primary_task)."""
    return [h for h in transfer.holdouts if h.task == transfer.primary_task]


def compare(run_id: str, settings: Settings, catalogue: Catalogue, quality: DataQuality,
            training_by_seed: list[dict[ModelIdentity, TrainResult]], transfer_by_seed: list[TransferResult],
            optimal_by_seed: list[dict[str, TaskOptimalResult]]) -> ReportData:
    """Every comparison with the paper as an effect, its interval and the reading its test allows
    (gallery.evaluation.comparisons), and the transfer scorecard (gallery.evaluation.scorecard). With
    several seeds each scored gallery's score is averaged over them before the paired statistics, and
    each headline number's spread is kept."""
    seed = settings.train.seed
    training, optimal, transfer = (mean_training(training_by_seed), mean_optimal(optimal_by_seed),
                                   mean_transfer(transfer_by_seed))
    test_ids = set(catalogue.frame.loc[catalogue.frame["split"] == "test", "gallery_id"])
    card = scorecard(transfer, test_ids, seed)
    models = preset_models(settings)
    table = per_task(catalogue, training, optimal, seed)
    table2 = [(h, table2_comparisons(h, transfer.primary_task, seed)) for h in paper_view(transfer)]
    vs_optimal = {m: mtl_vs_optimal(table, m) for m in models} if optimal else {}  # evaluation.task_optimal off
    vs_baseline = {m: mtl_vs_baseline(table, m) for m in models}
    pair = paper_pair(models)
    wins = weighting_wins(table, *pair) if pair else None
    balance = class_balance(table, models, seed) if optimal else {}
    found = findings(card, table2, vs_optimal, wins, vs_baseline, balance)
    spreads = []
    if len(training_by_seed) > 1:
        per_seed = [headline_numbers(catalogue, t, h, o, settings.model.pooling, seed)
                    for t, h, o in zip(training_by_seed, transfer_by_seed, optimal_by_seed)]
        values = [{n.identity: n.value for n in numbers} for numbers in per_seed]
        spreads = [SeedSpread(n, spread([v.get(n.identity) for v in values])) for n in per_seed[0]]
    splits = {s: int((catalogue.frame["split"] == s).sum()) for s in ("train", "valid", "test")}
    study = rank_cells(catalogue, training, transfer, reference_model(settings), seed)
    return ReportData(run_id, settings, seeds_of(settings), splits, describe(catalogue), quality, training, transfer,
                      card, table2, table, optimal, vs_optimal, wins, vs_baseline, balance, found, spreads, study)


def binary_codes(catalogue: Catalogue, settings: Settings, embeddings_location: str,
                 imagenet_location: str) -> BinaryVsFloat | None:
    """The exported embeddings' binary code against float search (gallery.evaluation.neighbours): fits
    codes of several sizes, so a flow computes it beside the transfer suite, not in its report step."""
    table, _ = read_embeddings(embeddings_location)
    return binary_vs_float(catalogue, table["gallery_id"].to_pylist(), embedding_matrix(table), imagenet_location,
                           embeddings_code(embeddings_location), settings.retrieval,
                           max_queries=settings.evaluation.retrieval_queries)


def build_report(run_id: str, settings: Settings, catalogue: Catalogue, quality: DataQuality,
                 training_by_seed: list[dict[ModelIdentity, TrainResult]], transfer_by_seed: list[TransferResult],
                 optimal_by_seed: list[dict[str, TaskOptimalResult]], binary: BinaryVsFloat | None,
                 embeddings_location: str, reference_checkpoints: str, relevance: RetrievalResult | None = None,
                 log=print) -> ReportData:
    """The comparisons (`compare`), the binary codes' comparison (`binary_codes`), then what the exported
    embeddings give: the UMAP projection and retrieval examples from test galleries' photos."""
    data = compare(run_id, settings, catalogue, quality, training_by_seed, transfer_by_seed, optimal_by_seed)
    table, _ = read_embeddings(embeddings_location)
    ids = table["gallery_id"].to_pylist()
    embeddings = embedding_matrix(table)
    data.exported_galleries = len(ids)
    data.binary, data.relevance = binary, relevance
    attributes = projection_attributes(catalogue)
    if attributes and len(ids) >= 5:  # the map the explorer page shows too (saved beside the embeddings)
        found = gallery_map(embeddings_location, settings.evaluation.projection_points, settings.train.seed, log)
        frame = catalogue.frame.set_index("gallery_id").loc[[ids[i] for i in found.rows]]
        data.projection = Projection(found.rows, found.xy, [(t, frame[t.name].to_numpy()) for t in attributes])
    model = load_trained(reference_checkpoints)
    data.retrieval = retrieval_examples(model.encoder, catalogue.frame, ids, embeddings, settings.model.image_size,
                                        settings.evaluation.retrieval_examples, settings.train.seed,
                                        photo_weights=photo_weights_of(table))
    log(f"report data: {len(data.findings)} findings, {len(data.transfer.tasks)} held-out task(s), "
        f"{len(data.scorecard.entries)} scorecard entries")
    return data


def jsonable(value):
    """Dataclasses, arrays, tables and NaN as JSON (NaN and infinities become null). An identity (a model's,
    an arm's) is written as its fields, never as a name: a dict keyed by one is refused (results keep such
    things in lists, each item naming its own)."""
    if isinstance(value, Task):
        return value.name
    if is_dataclass(value) and not isinstance(value, type):
        return jsonable(asdict(value))
    if isinstance(value, dict):
        if not all(isinstance(k, (str, int, float, bool)) for k in value):
            raise TypeError(f"a dict keyed by {type(next(iter(value))).__name__} is no JSON object; list its items")
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, pd.DataFrame):
        return jsonable(value.to_dict("records"))
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def labelled(arms) -> list[dict]:
    """Arms as metrics.json lists them: each one's fields, and its label in the report's tables."""
    return [{**arm.as_dict(), "label": arm_label(arm)} for arm in arms]


def metrics(data: ReportData) -> dict:
    """Every number of the report, each block saying the split it was measured on and what selected it.
    Models and arms are their fields (gallery.model.identity, gallery.evaluation.arms), never names."""
    test = {"measured_on": "test", "selected_on": "valid"}
    return jsonable({
        "run_id": data.run_id, "preset": data.settings.name, "seeds": data.seeds,
        "reference_model": data.reference.as_dict(), "primary_task": data.primary_task,
        "protocol": PROTOCOL, "galleries_per_split": data.splits, "exported_galleries": data.exported_galleries,
        "data_quality": {"skipped_images": len(data.quality.skipped), "excluded_galleries": len(data.quality.excluded),
                         "reasons": [{"reason": r, "images": n} for r, n in data.quality.reasons().items()]},
        "training": [{"model": m.as_dict(), "epochs": len(t.history), "best_epoch": t.best_epoch,
                      "stopped_early": t.stopped_early[0], "best_valid_relative_loss": t.best_criterion,
                      "selected_on": "valid"} for m, t in data.training.items()],
        "transfer": {"measured_on": "valid+test (galleries no model trained on)",
                     "selected_on": "train (probes fitted), other folds (linear and k-NN hyperparameters)",
                     "tasks": data.transfer.tasks, "primary_task": data.transfer.primary_task,
                     "arms": labelled(data.transfer.arms), "notes": data.transfer.notes,
                     "seconds": data.transfer.seconds, "per_gallery": gallery_scores.TRANSFER,
                     "scores": [{"task": s.task, "probe": s.probe, "arm": s.arm, "value": s.value,
                                 "galleries": len(s.gallery_ids), "chosen": s.chosen} for s in data.transfer.scores]},
        "scorecard": data.scorecard,
        "study": {"per_task_measured_on": "test", "transfer_measured_on": "valid+test", "selected_on": "valid",
                  "against": "pseudo_uniform with mean pooling (the paper's)",
                  "cells": [{**jsonable(c), "reading": c.reading} for c in data.study]},
        "holdout": {"per_gallery": gallery_scores.HOLDOUT, "tasks": [holdout_summary(h) for h in data.holdouts]},
        "per_task": {**test, "rows": data.per_task},
        "task_optimal": {**test, "per_gallery": gallery_scores.TASK_OPTIMAL if data.optimal else None,
                         "models": {name: {**{k: v for k, v in jsonable(o).items() if k not in ("test_ids", "test_scores")},
                                           "test_labelled": o.test_labelled} for name, o in data.optimal.items()}},
        "not_measured": data.skipped,
        "comparisons": {
            "table2": {h.task: {"measured_on": h.split, "selected_on": h.selected_on, "rows": rows}
                       for h, rows in data.table2},
            "mtl_vs_task_optimal": {**test, "models": list(data.vs_optimal.values())},
            "mtl_vs_baseline": {**test, "models": list(data.vs_baseline.values())},
            "pseudo_uniform_wins": {**test, "wins": data.wins},
            "class_balance": {**test, "models": list(data.balance.values())},
            "findings": {**test, "findings": data.findings}, "seeds": data.spread},
        "binary_vs_float": {"measured_on": "test (queries)", "selected_on": "train (codes fitted)",
                            "result": data.binary},
        "retrieval": {"measured_on": "test (seed photos)", "examples": data.retrieval},
        "retrieval_against_relevance": None if data.relevance is None else relevance_metrics(data.relevance),
    })


def holdout_summary(h: HoldoutResult) -> dict:
    """A held-out task's 2-layer head as metrics.json holds it: every row's value, its scores in the Parquet
    file beside it (gallery.evaluation.gallery_scores)."""
    return {"task": h.task, "kind": h.kind, "metric": h.metric, "train_galleries": h.train_galleries,
            "scored_galleries": h.scored_galleries, "baseline": h.baseline, "grid": h.grid, "split": h.split,
            "selected_on": h.selected_on,
            "arms": [{"arm": a.arm, "train_seconds": a.train_seconds, "seconds_per_instance": a.seconds_per_instance,
                      "instances": a.instances, "seconds_per_instance_from_pixels": a.seconds_per_instance_from_pixels,
                      "chosen": a.chosen,
                      "rows": [{"label": r.label, "fraction": r.fraction, "epochs": r.epochs,
                                "galleries_seen": r.galleries_seen, "value": r.value, "ci_low": r.ci_low,
                                "ci_high": r.ci_high} for r in a.rows]} for a in h.arms]}


def relevance_metrics(result: RetrievalResult) -> dict:
    """The retrieval section's numbers: every arm's mean per task, search and metric, and the claims (the
    per-query values stay out: they are as many as the queries)."""
    return {"measured_on": "valid+test (queries: galleries no model trained on, nor on their pairs)",
            "candidates": "every other gallery of the catalogue", "code": result.code, "rerank": result.rerank,
            "queries": result.queries, "arms": labelled(result.arms),
            "rows": [{"arm": r.arm, "task": r.task, "search": r.search, **r.means} for r in result.rows],
            "claims": result.claims, "seconds": result.seconds}
