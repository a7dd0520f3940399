"""GalleryTrainFlow: one universal gallery embedding by multi-task learning (DESIGN §4).

    python flows/train_flow.py run                                        # default preset, synthetic catalogue
    python flows/train_flow.py --config settings flows/configs/smoke.json run
    python flows/train_flow.py run --manifest data/listings.parquet --tasks data/tasks.yaml
    python flows/train_flow.py resume                                     # after a failure
    python flows/train_flow.py run --with kubernetes                      # on a cluster

Each step loads its inputs, calls one gallery/ function and saves its outputs; large things
(shards, feature cache, checkpoints, embeddings) go to the run-scoped store, and the report to
reports/<run id>/ (and the run's card).
"""
from pathlib import Path

from metaflow import Config, FlowSpec, Parameter, card, current, parallel, resources, retry, step
from metaflow.cards import Image, Markdown

import gallery.storage as storage
from gallery.config import PRESETS_DIR, settings_from_dict
from gallery.data.ingest import describe
from gallery.evaluation.report import build_report, write_report
from gallery.evaluation.seeds import seeded, seeds_of, with_seed
from gallery.evaluation.task_optimal import RESULT, group_tasks
from gallery.runs import (InputError, as_input_error, checkpoints_to_resume, data_parallel, default_store_root,
                          parallel_workers_use_this_python, settings_config, share_machine, use_metaflow_s3_settings)
from gallery.steps import (
    collect_quality,
    export_embeddings,
    holdout_evaluation,
    ingest_for_run,
    preprocess_shard,
    shard_rows,
    synthetic_source,
    task_optimal_models,
    train_weighting,
)
from gallery.training.checkpoints import load_trained
from gallery.training.faults import kill_after_epoch

parallel_workers_use_this_python()
use_metaflow_s3_settings()
REPORTS = Path(__file__).resolve().parents[1] / "reports"


class GalleryTrainFlow(FlowSpec):
    settings = Config("settings", default=str(PRESETS_DIR / "default.json"), parser=settings_config,
                      help="settings JSON: flows/configs/smoke.json, default.json (the default) or paper.json")
    manifest = Parameter("manifest", default="", help="your manifest (Parquet, CSV or JSON Lines); "
                                                      "default: the preset's synthetic catalogue")
    tasks = Parameter("tasks", default="", help="your task spec (YAML or JSON), with --manifest")
    store = Parameter("store", default="", help="root of the run-scoped store, a folder or s3://... prefix; "
                                                "default: beside Metaflow's datastore")
    reports = Parameter("reports", default=str(REPORTS), help="folder (or s3://... prefix) for reports/<run id>/")

    @property
    def cfg(self):
        return settings_from_dict(self.settings)

    def run_location(self, *parts: str) -> str:
        """Where this run writes (a resumed run writes under its own run id)."""
        return storage.join(self.store_root, current.run_id, *parts)

    @step
    def start(self):
        """Resolve the settings and the data source (the user's files, or the synthetic catalogue)."""
        if bool(self.manifest) != bool(self.tasks):
            raise InputError("--manifest and --tasks go together: give both, or neither for the synthetic catalogue")
        self.store_root = self.store or default_store_root()
        self.run_settings = self.cfg  # kept with the run, for the embed flow and `gallery search`
        if self.manifest:
            self.manifest_location, self.tasks_location = self.manifest, self.tasks
        else:
            self.manifest_location, self.tasks_location = synthetic_source(self.store_root, self.cfg)
        print(f"preset {self.cfg.name}; data {self.manifest_location}; store {self.run_location()}")
        self.next(self.ingest)

    @step
    def ingest(self):
        """Validate the contract, split 9:1, compute train-split label statistics."""
        with as_input_error():
            self.catalogue = ingest_for_run(self.manifest_location, self.tasks_location, self.cfg)
        print(describe(self.catalogue))
        self.shards = list(range(len(shard_rows(len(self.catalogue.frame), self.cfg.data.shards))))
        self.next(self.preprocess, foreach="shards")

    @retry(times=settings.resources.retries)
    @resources(**settings.resources.preprocess)
    @step
    def preprocess(self):
        """Decode and resize one shard's images; write the frozen-trunk feature cache."""
        share_machine(len(self.shards))
        rows = shard_rows(len(self.catalogue.frame), self.cfg.data.shards)[self.input]
        self.shard = preprocess_shard(self.catalogue, rows, self.cfg, self.run_location("shards", str(self.input)))
        self.next(self.join_shards)

    @step
    def join_shards(self, inputs):
        """Collect the shards."""
        self.merge_artifacts(inputs, exclude=["shard"])
        self.shard_list = [i.shard for i in inputs]
        self.next(self.data_quality)

    @step
    def data_quality(self):
        """List every image skipped while decoding; fan out one training per loss weighting."""
        self.quality_location = self.run_location("data_quality.csv")
        with as_input_error():
            self.quality = collect_quality(self.shard_list, self.quality_location)
        self.trainings = [(w, seed) for seed in seeds_of(self.cfg) for w in self.cfg.train.weightings]
        self.next(self.train, num_parallel=len(self.trainings) * self.cfg.train.workers)

    @retry(times=settings.resources.retries)
    @resources(**settings.resources.train)
    @parallel
    @step
    def train(self):
        """MTL training of every loss weighting (and seed, evaluation.seeds) side by side, each by
        train.workers data-parallel processes (DDP); a retry or a resume continues from the last checkpoint."""
        share_machine(current.parallel.num_nodes)
        self.weighting, self.seed = self.trainings[current.parallel.node_index // self.cfg.train.workers]
        folder = seeded(self.weighting, self.seed, self.cfg)
        self.checkpoints = self.run_location("checkpoints", folder)
        ranks, device = data_parallel(self.cfg.train.workers)
        self.rank = ranks.rank
        recovering = current.origin_run_id is not None or current.retry_count > 0
        self.train_result = train_weighting(
            self.catalogue, self.shard_list, with_seed(self.cfg, self.seed), self.weighting, self.checkpoints,
            resume_from=checkpoints_to_resume(self.store_root, "checkpoints", folder),
            on_epoch_end=kill_after_epoch(recovering), ranks=ranks, device=device).as_dict()
        self.next(self.join_train)

    @step
    def join_train(self, inputs):
        """Keep every weighting's history, per seed; the reference model is the preset's (pseudo-uniform, as
        in the paper) trained with the preset's seed: the one exported."""
        self.merge_artifacts(inputs, exclude=["weighting", "seed", "checkpoints", "train_result", "rank"])
        seeds = seeds_of(self.cfg)
        self.training_by_seed = [{i.weighting: i.train_result for i in inputs if i.rank == 0 and i.seed == s} for s in seeds]
        self.checkpoints_by_seed = [{i.weighting: i.checkpoints for i in inputs if i.seed == s} for s in seeds]
        self.training, self.checkpoint_locations = self.training_by_seed[0], self.checkpoints_by_seed[0]
        self.reference = self.cfg.train.reference_weighting
        if self.reference not in self.training:
            raise InputError(f"reference weighting {self.reference!r} was not trained; weightings: {list(self.training)}")
        self.next(self.export)

    @retry(times=settings.resources.retries)
    @resources(**settings.resources.export)
    @step
    def export(self):
        """Embeddings of every readable gallery with the reference model -> Parquet (+ packed sign bits)."""
        self.embeddings_location = self.run_location("embeddings.parquet")
        model = load_trained(self.catalogue.tasks, self.catalogue.stats, self.cfg, self.checkpoint_locations[self.reference])
        self.exported_galleries = export_embeddings(model, self.catalogue.frame, self.shard_list, self.cfg,
                                                    self.embeddings_location,
                                                    {"run_id": current.run_id, "weighting": self.reference})
        self.task_groups = group_tasks(self.catalogue.tasks, self.cfg.evaluation.task_groups)
        self.next(self.holdout, self.task_optimal_fanout)

    @retry(times=settings.resources.retries)
    @resources(**settings.resources.holdout)
    @step
    def holdout(self):
        """Table 2: MTL embeddings vs ImageNet transfer vs end-to-end on the held-out task(s)."""
        share_machine(1 + len(self.task_groups))
        self.imagenet_location = self.run_location("imagenet_embeddings.parquet")
        self.holdout_results = holdout_evaluation(self.catalogue, self.shard_list, self.cfg, self.embeddings_location,
                                                  self.imagenet_location, {"run_id": current.run_id},
                                                  [c[self.reference] for c in self.checkpoints_by_seed])
        self.next(self.join_evaluation)

    @step
    def task_optimal_fanout(self):
        """One branch per group of MTL tasks (one task per group on a cluster: task_groups = #tasks)."""
        self.next(self.task_optimal, foreach="task_groups")

    @retry(times=settings.resources.retries)
    @resources(**settings.resources.task_optimal)
    @step
    def task_optimal(self):
        """The same architecture trained on each task alone (this branch's tasks together, one pass over the data)."""
        share_machine(1 + len(self.task_groups))
        self.optimal = task_optimal_models(
            self.catalogue, self.shard_list, self.cfg, self.input,
            checkpoints_of=lambda folder: self.run_location("task_optimal", folder),
            recovery_of=lambda folder: checkpoints_to_resume(self.store_root, "task_optimal", folder, markers=(RESULT,)))
        self.next(self.join_task_optimal)

    @step
    def join_task_optimal(self, inputs):
        """Every task's task-optimal results, per seed."""
        self.merge_artifacts(inputs, exclude=["optimal"])
        self.optimal_by_seed = [{name: result for i in inputs for name, result in i.optimal[k].items()}
                                for k in range(self.cfg.evaluation.seeds)]
        self.next(self.join_evaluation)

    @step
    def join_evaluation(self, inputs):
        self.merge_artifacts(inputs)
        self.next(self.report)

    @step
    def report(self):
        """Tables, figures and a reading of the results -> reports/<run id>/ and the run's store."""
        r = build_report(current.run_id, self.cfg, self.catalogue, self.quality, self.training_by_seed,
                         self.holdout_results, self.optimal_by_seed, self.embeddings_location, self.imagenet_location,
                         self.checkpoint_locations[self.reference])
        self.report_location = storage.join(self.reports, current.run_id)
        for location in (self.report_location, self.run_location("report")):
            write_report(r, location)
        self.report_blocks, self.report_figures, self.metrics = r.blocks, r.files, r.metrics
        self.next(self.end)

    @card(type="blank", id="run")
    @step
    def end(self):
        """The run's page: the report, and where the outputs are."""
        for kind, content in self.report_blocks:
            current.card.append(Markdown(content) if kind == "md" else Image(self.report_figures[content]))
        outputs = (f"- report: `{self.report_location}/report.md` (+ metrics.json, CSVs, PNGs)\n"
                   f"- embeddings ({self.exported_galleries} galleries, {self.reference}): `{self.embeddings_location}`\n"
                   f"- ImageNet-transfer embeddings: `{self.imagenet_location}`\n"
                   f"- data-quality list: `{self.quality_location}`\n"
                   + "".join(f"- checkpoints ({w}): `{c}`\n" for w, c in self.checkpoint_locations.items()))
        current.card.append(Markdown("## Outputs\n" + outputs))
        print(f"report: {self.report_location}/report.md")
        print(f"embeddings: {self.embeddings_location} ({self.exported_galleries} galleries)")


if __name__ == "__main__":
    GalleryTrainFlow()
