"""GalleryTrainFlow: one universal gallery embedding by multi-task learning (docs/design.md §4).

    python flows/train_flow.py run                                        # default preset, synthetic catalogue
    python flows/train_flow.py --config settings flows/configs/smoke.json run
    python flows/train_flow.py run --manifest data/listings.parquet --tasks data/tasks.yaml
    python flows/train_flow.py resume                                     # after a failure
    python flows/train_flow.py run --with kubernetes                      # on a cluster

Each step loads its inputs, calls one gallery/ function and saves its outputs; large things
(shards, feature cache, checkpoints, embeddings) go to the run-scoped store, and the report to
reports/<run id>/ (and the run's card).
"""
import time
from pathlib import Path

from metaflow import Config, FlowSpec, Parameter, card, current, parallel, resources, retry, step
from metaflow.cards import Image, Markdown

import gallery.storage as storage
from gallery.faults import reached
from gallery.config import PRESETS_DIR, settings_from_dict
from gallery.runs import (InputError, as_input_error, checkpoints_to_resume, data_parallel, default_store_root,
                          flow_settings, name_the_user, parallel_workers_use_this_python, share_machine,
                          use_metaflow_s3_settings)

# Steps import what they compute with inside, and this module imports neither torch, numpy, pandas, pyarrow nor
# matplotlib: the light steps (join_shards, end) start in about a second (docs/benchmarks.md).

name_the_user()
TRANSFER, RETRIEVAL, EXPLORER = "transfer", "retrieval", "explorer"  # the evaluations that are not task groups
parallel_workers_use_this_python()
use_metaflow_s3_settings()
REPORTS = Path(__file__).resolve().parents[1] / "reports"


class GalleryTrainFlow(FlowSpec):
    settings = Config("settings", default=str(PRESETS_DIR / "default.json"), parser=flow_settings,
                      help="settings JSON: flows/configs/smoke.json, default.json (the default), study.json or paper.json")
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
        """Resolve the settings and the data source (the user's files, or the synthetic catalogue); stop here
        on what would stop the run later (gallery.preflight: weights, a store or reports location not writable)."""
        from gallery.preflight import preflight

        if bool(self.manifest) != bool(self.tasks):
            raise InputError("--manifest and --tasks go together: give both, or neither for the synthetic catalogue")
        self.store_root = self.store or default_store_root()
        with as_input_error():
            preflight(self.cfg, self.store_root, self.reports)
        self.run_settings = self.cfg  # kept with the run, for the embed flow and `gallery search`
        if self.manifest:
            self.manifest_location, self.tasks_location = self.manifest, self.tasks
        else:
            from gallery.data.synth.stored import synthetic_source

            self.manifest_location, self.tasks_location = synthetic_source(self.store_root, self.cfg)
        print(f"preset {self.cfg.name}; data {self.manifest_location}; store {self.run_location()}")
        self.next(self.ingest)

    @step
    def ingest(self):
        """Validate the contract, split train/valid/test (8:1:1 unless the manifest or data.split says), label statistics."""
        from gallery.data.ingest import describe
        from gallery.steps import ingest_for_run, shard_rows

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
        from gallery.steps import preprocess_shard, shard_rows

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
        from gallery.steps import collect_quality, training_processes, trainings

        self.quality_location = self.run_location("data_quality.csv")
        with as_input_error():
            self.quality = collect_quality(self.shard_list, self.quality_location, self.catalogue.skipped_pairs)
        self.trainings = trainings(self.cfg, self.catalogue.metric)
        self.next(self.train, num_parallel=training_processes(self.cfg, self.trainings))

    @retry(times=settings.resources.retries)
    @resources(**settings.resources.train)
    @parallel
    @step
    def train(self):
        """MTL training of every loss weighting (with every pooling of a study, and every seed of
        evaluation.seeds) side by side, each by train.workers data-parallel processes (DDP), or several one
        after another per process (train.processes); a retry or a resume continues from the last checkpoint."""
        from gallery.steps import assigned, train_weighting

        p = current.parallel
        share_machine(p.num_nodes)
        ranks, device = data_parallel(self.cfg.train.workers)
        self.rank = ranks.rank
        self.trained = {}
        for t in assigned(self.trainings, p.node_index, p.num_nodes, self.cfg.train.workers):
            folder = t.folder(self.cfg)
            checkpoints = self.run_location("checkpoints", folder)
            result = train_weighting(self.catalogue, self.shard_list, t.settings(self.cfg), t.model.weighting, checkpoints,
                                     resume_from=checkpoints_to_resume(self.store_root, "checkpoints", folder),
                                     ranks=ranks, device=device,
                                     tasks=t.tasks(self.catalogue))
            self.trained[t] = (result, checkpoints)
        self.next(self.join_train)

    @step
    def join_train(self, inputs):
        """Keep every model's history, per seed; the reference model is the preset's (pseudo-uniform, as in
        the paper, with model.pooling) trained with the preset's seed: the one exported."""
        from gallery.config import reference_model
        from gallery.evaluation.arms import MTL
        from gallery.evaluation.seeds import seeds_of

        self.merge_artifacts(inputs, exclude=["trained", "rank"])
        trained = {t: done for i in inputs if i.rank == 0 for t, done in i.trained.items()}
        self.compared = {t: trained[t][1] for t in self.trainings if t.role != MTL}  # retrieval's other arms
        by_seed = [[t for t in self.trainings if t.model.seed == seed and t.role == MTL] for seed in seeds_of(self.cfg)]
        self.training_by_seed = [{t.model: trained[t][0] for t in seed} for seed in by_seed]   # by ModelIdentity
        self.checkpoints_by_seed = [{t.model: trained[t][1] for t in seed} for seed in by_seed]
        self.training, self.checkpoint_locations = self.training_by_seed[0], self.checkpoints_by_seed[0]
        self.reference = reference_model(self.cfg)  # a ModelIdentity: one of the trained (checked in the settings)
        self.next(self.export)

    @retry(times=settings.resources.retries)
    @resources(**settings.resources.export)
    @step
    def export(self):
        """Embeddings of every readable gallery with the reference model -> Parquet and its binary code, and
        the model as a folder to ship (weights, ONNX graphs, code, card: gallery.artifact); fan
        out the evaluations side by side: the transfer suite, and the task-optimal models by groups of tasks."""
        from gallery.evaluation.task_optimal import group_tasks
        from gallery.steps import export_embeddings, export_model_folder
        from gallery.training.checkpoints import load_trained

        self.embeddings_location = self.run_location("embeddings.parquet")
        model = load_trained(self.checkpoint_locations[self.reference])
        started = time.perf_counter()
        self.exported_galleries = export_embeddings(model, self.catalogue.frame, self.shard_list, self.cfg,
                                                    self.embeddings_location,
                                                    {"run_id": current.run_id, "weighting": self.reference.weighting,
                                                     "seed": self.reference.seed})
        self.embedding_seconds_per_gallery = (time.perf_counter() - started) / max(self.exported_galleries, 1)
        self.model_location = export_model_folder(model, self.checkpoint_locations[self.reference],
                                                  self.embeddings_location, self.run_location("model"), current.run_id)
        self.imagenet_location = self.run_location("imagenet_embeddings.parquet")
        self.evaluations = ([TRANSFER, EXPLORER] + ([RETRIEVAL] if self.catalogue.metric else [])
                            + (group_tasks(self.catalogue.tasks, self.cfg.evaluation.task_groups)
                               if self.cfg.evaluation.task_optimal else []))
        self.next(self.evaluate, foreach="evaluations")

    @retry(times=settings.resources.retries)
    @resources(**settings.resources.evaluate)
    @step
    def evaluate(self):
        """Side by side: the transfer suite (every held-out task x probe x embedding arm; Table 2 among
        them) and binary codes against float search; the explorer page of the exported embeddings; with
        metric tasks, retrieval against their relevance (unified against attribute-only and specialised
        models and pretrained features, float and binary); or the task-optimal models of a group of MTL
        tasks (the same architecture on each task alone, trained together in one pass over the data; one
        task per group on a cluster)."""
        from gallery.evaluation.task_optimal import RESULT
        from gallery.steps import retrieval_evaluation, task_optimal_models, transfer_evaluation

        share_machine(len(self.evaluations))
        if self.input == RETRIEVAL:
            self.retrieval = retrieval_evaluation(self.catalogue, self.shard_list, self.cfg, self.embeddings_location,
                                                  self.compared)
        elif self.input == TRANSFER:
            from gallery.evaluation.report import binary_codes

            self.transfer_by_seed = transfer_evaluation(
                self.catalogue, self.shard_list, self.cfg, self.embeddings_location, self.imagenet_location,
                {"run_id": current.run_id}, self.checkpoints_by_seed, self.reference)
            self.binary = binary_codes(self.catalogue, self.cfg, self.embeddings_location, self.imagenet_location)
        elif self.input == EXPLORER:
            from gallery.serve.explorer import export_catalogue_explorer

            self.explorer_location = export_catalogue_explorer(
                self.embeddings_location, self.catalogue.manifest_path, self.catalogue.spec_path,
                self.run_location("report", "explorer.html"), self.cfg)
        else:
            self.optimal = task_optimal_models(
                self.catalogue, self.shard_list, self.cfg, self.input,
                checkpoints_of=lambda folder: self.run_location("task_optimal", folder),
                recovery_of=lambda folder: checkpoints_to_resume(self.store_root, "task_optimal", folder,
                                                                 markers=(RESULT,)))
        self.next(self.report)

    @card(type="blank", id="run")
    @step
    def report(self, inputs):
        """Tables, figures and a reading of the results -> reports/<run id>/, the run's store and its card."""
        from gallery.evaluation.render import lay_out, write_report  # only here: matplotlib and the statistics
        from gallery.artifact.folder import add_evaluation
        from gallery.evaluation.report import build_report
        from gallery.steps import card_evaluation

        self.merge_artifacts(inputs, exclude=["transfer_by_seed", "binary", "explorer_location", "optimal", "retrieval"])
        transfer = next(i for i in inputs if i.input == TRANSFER)
        explorer = next(i for i in inputs if i.input == EXPLORER)
        retrieval = next((i.retrieval for i in inputs if i.input == RETRIEVAL), None)
        self.retrieval_result = retrieval  # what `gallery compare` pairs between runs
        self.transfer_by_seed = transfer.transfer_by_seed
        self.optimal_by_seed = [{name: result for i in inputs if i.input not in (TRANSFER, EXPLORER, RETRIEVAL)
                                 for name, result in i.optimal[k].items()}
                                for k in range(self.cfg.evaluation.seeds)]
        data = build_report(current.run_id, self.cfg, self.catalogue, self.quality, self.training_by_seed,
                            self.transfer_by_seed, self.optimal_by_seed, transfer.binary,
                            self.embeddings_location, self.checkpoint_locations[self.reference], retrieval)
        r = lay_out(data)
        self.card_evaluation = card_evaluation(data)  # the shipped model's card gets the run's evaluation
        add_evaluation(self.model_location, self.card_evaluation)
        self.report_location = storage.join(self.reports, current.run_id)
        for location in (self.report_location, self.run_location("report")):
            write_report(r, location)
        storage.write_bytes(storage.join(self.report_location, "explorer.html"),
                            storage.read_bytes(explorer.explorer_location))
        self.metrics = r.metrics
        for kind, content in r.blocks:
            current.card.append(Markdown(content) if kind == "md" else Image(r.files[content]))
        outputs = (f"- report: `{self.report_location}/report.md` (+ metrics.json, CSVs, PNGs, explorer.html)\n"
                   f"- embeddings ({self.exported_galleries} galleries, {self.reference.label()}): `{self.embeddings_location}`\n"
                   f"- model folder to ship (`gallery.load_model`): `{self.model_location}`\n"
                   f"- ImageNet-transfer embeddings: `{self.imagenet_location}`\n"
                   f"- data-quality list: `{self.quality_location}`\n"
                   + "".join(f"- checkpoints ({m.label()}): `{c}`\n" for m, c in self.checkpoint_locations.items()))
        current.card.append(Markdown("## Outputs\n" + outputs))
        self.next(self.end)

    @step
    def end(self):
        """Where the outputs are."""
        reached("end")
        print(f"report: {self.report_location}/report.md")
        print(f"embeddings: {self.embeddings_location} ({self.exported_galleries} galleries)")
        print(f"model folder: {self.model_location}")


if __name__ == "__main__":
    GalleryTrainFlow()
