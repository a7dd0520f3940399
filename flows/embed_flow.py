"""GalleryEmbedFlow: embed a catalogue with the model of a finished GalleryTrainFlow run.

    python flows/embed_flow.py run --manifest data/new_listings.parquet                 # latest training run
    python flows/embed_flow.py run --manifest data/new_listings.parquet --train-run 1795...

Labels are optional. The images go through exactly the training run's preprocessing (size,
frozen trunk, cache precision) and its reference model; the output follows
data_contracts/embeddings.schema.json, so `gallery search` reads it like the training export.
"""
from metaflow import Config, FlowSpec, Parameter, current, resources, retry, step

import gallery.storage as storage
from gallery.config import PRESETS_DIR
from gallery.runs import (as_input_error, default_store_root, flow_settings, name_the_user, share_machine, trained_run,
                          use_metaflow_s3_settings)

# Steps import what they compute with inside (torch and the rest load only where a step computes): docs/design.md §2.
name_the_user()
use_metaflow_s3_settings()


class GalleryEmbedFlow(FlowSpec):
    settings = Config("settings", default=str(PRESETS_DIR / "default.json"), parser=flow_settings,
                      help="a preset (flows/configs/*.json) whose `resources` size this flow's steps on a cluster; "
                           "images are read and embedded as the training run did")
    manifest = Parameter("manifest", required=True, help="the catalogue to embed (Parquet, CSV or JSON Lines)")
    train_run = Parameter("train-run", default="latest", help="GalleryTrainFlow run id whose model to use, or latest")
    store = Parameter("store", default="", help="root of the run-scoped store; default: beside Metaflow's datastore")

    def run_location(self, *parts: str) -> str:
        return storage.join(self.store_root, current.run_id, *parts)

    @step
    def start(self):
        """Find the training run: its settings and model decide how images are read and embedded."""
        with as_input_error():
            model_run = trained_run(self.train_run)
        self.model_run_id, self.run_settings = model_run.run_id, model_run.settings
        self.checkpoints = model_run.checkpoints  # the folder rebuilds the model alone (its config.json)
        self.model_embeddings_location = model_run.embeddings_location  # names the binary code the run fitted
        self.store_root = self.store or default_store_root()
        print(f"embedding {self.manifest} with the model of {model_run.run_id}")
        self.next(self.ingest)

    @step
    def ingest(self):
        """Validate the manifest (no task spec needed); products without a `split` are hashed as the
        training run hashed its own."""
        from gallery.steps import ingest_for_embedding, shard_rows

        with as_input_error():
            self.catalogue = ingest_for_embedding(self.manifest, self.run_settings)
        self.shards = list(range(len(shard_rows(len(self.catalogue.frame), self.run_settings.data.shards))))
        self.next(self.preprocess, foreach="shards")

    @retry(times=settings.resources.retries)
    @resources(**settings.resources.preprocess)
    @step
    def preprocess(self):
        """The training run's decoding, resizing and frozen-trunk cache, for one shard."""
        from gallery.steps import preprocess_shard, shard_rows

        share_machine(len(self.shards))
        rows = shard_rows(len(self.catalogue.frame), self.run_settings.data.shards)[self.input]
        self.shard = preprocess_shard(self.catalogue, rows, self.run_settings, self.run_location("shards", str(self.input)))
        self.next(self.join_shards)

    @step
    def join_shards(self, inputs):
        """Collect the shards; list every image skipped while decoding."""
        from gallery.steps import collect_quality

        self.merge_artifacts(inputs, exclude=["shard"])
        self.shard_list = [i.shard for i in inputs]
        self.quality_location = self.run_location("data_quality.csv")
        with as_input_error():
            self.quality = collect_quality(self.shard_list, self.quality_location)
        self.next(self.embed)

    @retry(times=settings.resources.retries)
    @resources(**settings.resources.export)
    @step
    def embed(self):
        """Every readable gallery through the training run's reference model -> embeddings Parquet."""
        from gallery.retrieval.embeddings import embeddings_code
        from gallery.steps import export_embeddings
        from gallery.training.checkpoints import load_trained

        self.embeddings_location = self.run_location("embeddings.parquet")
        model = load_trained(self.checkpoints)
        self.embedded_galleries = export_embeddings(
            model, self.catalogue.frame, self.shard_list, self.run_settings, self.embeddings_location,
            {"run_id": self.model_run_id, "weighting": self.run_settings.train.reference_weighting,
             "embed_run_id": current.run_id}, code=embeddings_code(self.model_embeddings_location))
        self.next(self.end)

    @step
    def end(self):
        print(f"data quality: {self.quality.summary()} ({self.quality_location})")
        print(f"embeddings: {self.embeddings_location} ({self.embedded_galleries} galleries, "
              f"model of GalleryTrainFlow/{self.model_run_id})")


if __name__ == "__main__":
    GalleryEmbedFlow()
