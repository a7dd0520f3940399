"""What each step of the flows does, as plain functions (flows/train_flow.py and embed_flow.py only wire them).

Everything large goes through the run-scoped store (gallery.storage): shards, the feature
cache, checkpoints and embeddings live under `<store root>/<run id>/`, so no step depends on
another step's local disk and the flow runs unchanged on a cluster.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import torch

import gallery.storage as storage
from gallery.config import Settings, SplitSettings, preset_models, primary_task, reference_model, trained_models
from gallery.data.images import DataQuality, load_galleries, quality_csv
from gallery.data.ingest import Catalogue, ingest
from gallery.data.readers import ShardIndex, ShardSource
from gallery.data.shards import Shard, ShardWriter
from gallery.errors import UserError
from gallery.faults import reached
from gallery.evaluation.holdout import vectors_as_galleries
from gallery.evaluation.arms import (ATTRIBUTES_ONLY, IMAGENET_ARM, MTL, SPECIALISED, EmbeddingArm, baseline_arm,
                                     mtl_arm)
from gallery.evaluation.retrieval_suite import RetrievalArm, RetrievalResult, retrieval_suite
from gallery.evaluation.seeds import seeds_of, task_optimal_folder, with_seed
from gallery.evaluation.task_optimal import TaskOptimalResult, train_task_optimal
from gallery.evaluation.transfer import TransferResult, transfer_suite
from gallery.model.backbones import WeightsUnavailable, build_backbone
from gallery.model.gallery_model import GalleryEncoder, GalleryModel, build_model
from gallery.model.identity import ModelIdentity
from gallery.model.metric import pair_keys
from gallery.model.weightings import build_weighting
from gallery.model.pooling import MeanPool
from gallery.progress import Progress
from gallery.retrieval.codes import BinaryCode, code_location, code_that_fits, fit_code, load_code, save_code
from gallery.retrieval.embeddings import (embed_galleries, embed_with_photo_weights, embedding_matrix, embeddings_code,
                                          embeddings_table, read_embeddings, write_embeddings)
from gallery.training.cache import trunk_features
from gallery.training.checkpoints import checkpoint_config, load_trained, save_config
from gallery.training.device import pick_device
from gallery.training.distributed import Ranks
from gallery.training.engine import FitConfig, FitHooks, FitOptions, TrainData, TrainResult, fit, score
from gallery.training.model_config import model_config

CHUNK_GALLERIES = 64  # preprocessing holds this many galleries' pixels at a time


# ---------------------------------------------------------------- start: the data source

# ---------------------------------------------------------------- ingest

def ingest_for_run(manifest: str, tasks: str, settings: Settings) -> Catalogue:
    """The checked catalogue, with a note (shown by `describe` and in the report) for every setting it is
    too small for, so that nothing the data already tells fails after training."""
    catalogue = ingest(manifest, tasks, settings.data.split.valid, settings.data.split.test)
    primary_task(settings, [t.name for t in catalogue.holdout])  # evaluation.primary_task names a held-out task
    _, why = code_that_fits(settings.retrieval.code, int((catalogue.frame["split"] == "train").sum()))
    catalogue.notes += [why] if why else []
    reached("ingest")
    return catalogue


def ingest_for_embedding(manifest: str, run_settings: Settings) -> Catalogue:
    """The manifest to embed (no task spec needed), its products without a `split` hashed as the training
    run hashed its own: runs trained before `data.split` existed hashed 8:1:1."""
    split = getattr(run_settings.data, "split", SplitSettings())
    return ingest(manifest, None, split.valid, split.test)


# ---------------------------------------------------------------- preprocess

def shard_rows(n_galleries: int, shards: int) -> list[np.ndarray]:
    """Round-robin rows per shard: balanced, deterministic."""
    return [np.arange(k, n_galleries, shards) for k in range(max(1, min(shards, n_galleries)))]


def preprocess_shard(catalogue: Catalogue, rows, settings: Settings, location: str, log=print) -> Shard:
    """Decode, EXIF-fix and resize one shard's galleries; store them encoded, with the frozen-trunk
    cache when the preset uses it (gallery.data.shards), a chunk of galleries at a time."""
    frame = catalogue.frame.iloc[np.asarray(rows)]
    m, d = settings.model, settings.data
    images = list(frame["images"])  # the first d.max_images of each are read, the rest listed as not used
    progress = Progress(sum(min(len(i), d.max_images) for i in images), f"preprocess {location}", "images", log)
    encoder, device, qualities = None, pick_device(), []
    with ShardWriter(location, m.image_size, d.image_format, d.image_quality) as writer:
        for start in range(0, len(frame), CHUNK_GALLERIES):
            chunk = frame.iloc[start:start + CHUNK_GALLERIES]
            ids, arrays, quality = load_galleries(chunk["gallery_id"], images[start:start + CHUNK_GALLERIES],
                                                  m.image_size, progress, d.max_images)
            qualities.append(quality)
            splits = chunk.set_index("gallery_id")["split"]
            stored = []
            for g, a in zip(ids, arrays):
                stored.append(writer.add(g, splits[g], a))
                reached("preprocess.gallery")
            if settings.train.use_cache and stored:
                encoder = encoder or build_backbone(m.backbone, m.weights, m.trainable_blocks, m.image_size)
                pixels = torch.from_numpy(np.concatenate(stored))
                writer.add_features(trunk_features(encoder, pixels, settings.train.cache_dtype, device=device,
                                                   precision=settings.train.precision))
        shard = writer.finish(DataQuality.merge(qualities))
    per_image = lambda n: f"{n / max(shard.images, 1) / 1024:.1f} KB per image"  # noqa: E731
    log(f"shard {location}: {len(shard.gallery_ids)} galleries, {shard.images} images; images "
        f"({d.image_format} at {m.image_size} px) {per_image(shard.image_bytes)}"
        + (f", feature cache {per_image(shard.feature_bytes)}" if shard.feature_bytes else "")
        + f"; {shard.quality.summary()}")
    return shard


def collect_quality(shards: list[Shard], location: str, skipped_pairs=()) -> DataQuality:
    """Merge the shards' data-quality problems (and the engagement pairs ingest dropped) and write them as
    CSV; stop if no gallery is left."""
    quality = DataQuality.merge([*(s.quality for s in shards), DataQuality([], [], list(skipped_pairs))])
    storage.write_bytes(location, quality_csv(quality).encode())
    print(quality.summary())
    if not any(s.gallery_ids for s in shards):
        raise UserError(f"no gallery has a readable image; see {location}")
    return quality


def shard_source(shards: list[Shard], settings: Settings) -> ShardSource:
    """Every preprocessed gallery, streamed: trunk features with the cache, pixels without."""
    return ShardSource(ShardIndex.read([s.location for s in shards if s.gallery_ids]), settings.train.use_cache)


# ---------------------------------------------------------------- train

@dataclass(frozen=True)
class Training:
    """One model a run trains: its identity (a weighting with a pooling, a study's cell, for one seed:
    gallery.model.identity), on every task (`role` mtl: the attribute tasks and the metric tasks, the unified
    model), or, to compare retrieval against it, on the attribute tasks alone (attributes_only) or on one
    metric task alone (specialised, `task`). Its role is the kind of arm it gives (gallery.evaluation.arms)."""

    model: ModelIdentity
    role: str = MTL
    task: str | None = None   # a specialised model's metric task

    def settings(self, settings: Settings) -> Settings:
        """The run's settings as this model trains with them."""
        return trained_settings(self.model, settings)

    def folder(self, settings: Settings) -> str:
        """Its checkpoints folder's name, made from its fields (never read back): the model's
        (ModelIdentity.folder) for an MTL model, its role (and task) for a comparison model."""
        if self.role == MTL:
            return self.model.folder(settings.train.seed)
        return self.role if self.task is None else f"{self.role}_{self.task}"

    def arm(self, reference: ModelIdentity) -> EmbeddingArm:
        """The arm its embeddings are in an evaluation; `reference`: the run's reference model."""
        return mtl_arm(self.model, reference) if self.role == MTL else EmbeddingArm(self.role, self.model, task=self.task)

    def tasks(self, catalogue: Catalogue) -> list:
        """The tasks this model learns."""
        if self.role == ATTRIBUTES_ONLY:
            return catalogue.tasks
        if self.role == SPECIALISED:
            return [t for t in catalogue.metric if t.name == self.task]
        return catalogue.trained


def trainings(settings: Settings, metric_tasks=()) -> list[Training]:
    """Every model the run trains: each weighting with model.pooling and each of train.poolings, per seed;
    with metric tasks and evaluation.retrieval_arms, also the reference weighting's model of the attribute
    tasks alone and one of each metric task alone (the first seed's), which retrieval compares with."""
    out = [Training(m) for seed in seeds_of(settings) for m in trained_models(settings, seed)]
    if metric_tasks and settings.evaluation.retrieval_arms:
        reference = reference_model(settings)
        out += [Training(reference, ATTRIBUTES_ONLY)]
        out += [Training(reference, SPECIALISED, t.name) for t in metric_tasks]
    return out


def assigned(trainings_: list[Training], node: int, nodes: int, workers: int) -> list[Training]:
    """The models node `node` of `nodes` trains: its group's one (data parallel), or every nodes-th."""
    return [trainings_[node // workers]] if workers > 1 or nodes == len(trainings_) * workers else trainings_[node::nodes]


def training_processes(settings: Settings, trainings_: list[Training]) -> int:
    """How many processes train side by side: train.workers per model, or train.processes sharing the
    models between them (one after another in each; only without data parallelism)."""
    models = len(trainings_)
    if settings.train.workers > 1 or settings.train.processes is None:
        return models * settings.train.workers
    return min(settings.train.processes, models)


def train_weighting(catalogue: Catalogue, shards: list[Shard], settings: Settings, weighting: str,
                    checkpoints: str, resume_from: str | None = None, log=print,
                    ranks: Ranks = Ranks(), device=None, tasks=None) -> TrainResult:
    """MTL training of the model with one loss weighting, on `tasks` (default: every task the catalogue
    trains); `valid` selects the best epoch, whose weights end in `checkpoints/best.pt` and are scored on `test`."""
    tasks = catalogue.trained if tasks is None else tasks
    source = shard_source(shards, settings)
    torch.manual_seed(settings.train.seed)
    model = build_model(settings.model, tasks, catalogue.stats)
    if ranks.is_main:  # the folder rebuilds its model alone (gallery.training.checkpoints)
        save_config(checkpoints, model_config(identity_of(weighting, settings), settings, tasks, catalogue.stats,
                                              model.encoder))
    for task in tasks:
        if task.kind == "pairs":
            model.set_pairs(task.name, *known_pairs(catalogue, task.name))
    data = TrainData.from_catalogue(catalogue.frame, tasks, source, settings.train.use_cache,
                                    settings.data.loader_workers, catalogue.pairs, settings.train.pairs_per_batch)
    if len(tasks) == 1 and tasks[0].kind == "identity":  # alone, it has nothing to learn from galleries of no group
        data = data.labelled(0)
    device = pick_device(device)
    log(f"training with {weighting} weighting on {len(tasks)} task(s): {len(data.train_rows)} train / "
        f"{len(data.valid_rows)} valid galleries "
        f"({len(data.test_rows)} test galleries kept for the report), {int(source.lengths.sum())} images, "
        f"{'from the feature cache' if settings.train.use_cache else 'from pixels'}, device {device}"
        + (f", data-parallel rank {ranks.rank} of {ranks.world}" if ranks.world > 1 else ""))
    config = FitConfig.of(settings.train)
    result = fit(model, build_weighting(weighting, tasks, catalogue.stats), data, config,
                 FitOptions(checkpoints=checkpoints, resume_from=resume_from, device=device, ranks=ranks, log=log,
                            hooks=FitHooks(on_step=lambda _: reached("train.step", ranks.rank),
                                           on_epoch_end=lambda _: reached("train.epoch", ranks.rank))))
    result.test = score(model, data, "test", config.batch_galleries, device, config.precision)
    return result


def identity_of(weighting: str, settings: Settings) -> ModelIdentity:
    """The identity of the model `settings` train with `weighting` (their pooling, seed and backbone)."""
    return ModelIdentity(weighting, settings.model.pooling, settings.train.seed, settings.model.backbone)


def known_pairs(catalogue: Catalogue, task: str) -> tuple[torch.Tensor, int]:
    """A pairs task's pairs within each split, as the pair loss looks them up (frame rows, the ids its
    column holds): train batches find the train pairs, validation batches the valid ones."""
    pairs, split = catalogue.pairs[task], catalogue.frame["split"].to_numpy()
    same = split[pairs.a] == split[pairs.b]
    return pair_keys(pairs.a[same], pairs.b[same], len(split)), len(split)


# ---------------------------------------------------------------- export

def export_embeddings(model: GalleryModel, frame: pd.DataFrame, shards: list[Shard], settings: Settings,
                      location: str, metadata: dict, code: BinaryCode | None = None) -> int:
    """Embeddings of every readable gallery -> Parquet per data_contracts/embeddings.schema.json.

    `metadata["run_id"]` names the training run whose model made them (searches check it). The bits are
    made by `code` (the embed flow passes its training run's); without one, settings.retrieval.code (or
    the largest code the train split can fit: codes.code_that_fits) is fitted on it and saved beside the embeddings."""
    source = shard_source(shards, settings)
    embedded = embed_with_photo_weights(model.encoder, source, settings.train.use_cache,
                                        workers=settings.data.loader_workers)
    embeddings = embedded.vectors
    splits = frame.set_index("gallery_id").loc[source.gallery_ids, "split"]
    if code is None:
        train = embeddings[splits.to_numpy() == "train"]
        code = save_code(fit_code(train, code_that_fits(settings.retrieval.code, len(train))[0]), code_location(location))
    meta = {"backbone": settings.model.backbone, "pooling": settings.model.pooling, **metadata}
    photos = None if embedded.photo_weights is None else embedded_photos(frame, source.gallery_ids, shards, settings)
    write_embeddings(location, embeddings_table(source.gallery_ids, splits, embeddings, meta, code, photos,
                                                embedded.photo_weights))
    return len(source)


def export_model_folder(model: GalleryModel, checkpoints: str, embeddings_location: str, out: str, run_id: str,
                        log=print) -> str:
    """The shipped form of the exported model (gallery.artifact), already loaded from `checkpoints` (whose
    config describes it): weights, ONNX graphs, its embeddings' binary code, card and config -> `out`."""
    from gallery.artifact.folder import write_model_folder

    config = replace(checkpoint_config(checkpoints), run_id=run_id)
    write_model_folder(model, config, load_code(code_location(embeddings_location)), out, log=log)
    return out


def card_evaluation(data) -> str:
    """The shipped model card's evaluation: the run report's transfer scorecard (and retrieval headline)
    from its ReportData (gallery.evaluation.report)."""
    from gallery.evaluation.render import retrieval_headline, scorecard_markdown  # matplotlib: only here

    text = (f"From the training run's report (run `{data.run_id}`): how the embedding transfers to held-out tasks it "
            "was never taught, against every other arm the run evaluated (ImageNet features, an end-to-end model, the "
            "other weightings' embeddings), paired on the same galleries, with 95% intervals.\n\n"
            + scorecard_markdown(data.scorecard, data.transfer))
    return text + ("\n\n" + retrieval_headline(data.relevance) if data.relevance else "")


def embedded_photos(frame: pd.DataFrame, gallery_ids: list[str], shards: list[Shard], settings: Settings) -> list[list[str]]:
    """Each gallery's photos in the order its shard stores them: the manifest's first data.max_images,
    less those preprocessing skipped as unreadable (the data-quality report lists them)."""
    skipped = {(s.gallery_id, s.image) for shard in shards for s in shard.quality.skipped}
    images = frame.set_index("gallery_id")["images"]
    return [[p for p in images[g][: settings.data.max_images] if (g, p) not in skipped] for g in gallery_ids]


# ---------------------------------------------------------------- evaluate

def pretrained_embeddings(source: ShardSource, settings: Settings, backbone: str, weights: str = "imagenet") -> np.ndarray:
    """A pretrained backbone's mean-pooled vectors of every gallery (no MTL training): the ImageNet-transfer
    arm (the preset's backbone, from the feature cache when it has one) or another baseline (from pixels)."""
    m = settings.model
    same = backbone == m.backbone
    images = build_backbone(backbone, m.weights if same else weights, m.trainable_blocks if same else 0, m.image_size)
    from_features = same and settings.train.use_cache
    source = source if from_features or not source.features else ShardSource(source.index, features=False)
    return embed_galleries(GalleryEncoder(images, MeanPool()), source, from_features,
                           workers=settings.data.loader_workers)


def transfer_evaluation(catalogue: Catalogue, shards: list[Shard], settings: Settings, embeddings_location: str,
                        imagenet_location: str, metadata: dict, checkpoints_by_seed: list[dict[ModelIdentity, str]],
                        reference: ModelIdentity, log=print) -> list[TransferResult]:
    """The transfer suite (gallery.evaluation.transfer) once per seed (evaluation.seeds): the seed's own
    models give the MTL arms (the first seed's reference model is the exported one), the seed initialises
    every head and orders its batches. Also writes the ImageNet-transfer embeddings for later comparisons.
    In a study, the 2-layer head probes the models of the preset's pooling; every model gets the linear
    and k-NN probes."""
    start = time.perf_counter()
    source = shard_source(shards, settings)
    ids, pixels = source.gallery_ids, ShardSource(source.index, features=False)
    table, _ = read_embeddings(embeddings_location)
    if table["gallery_id"].to_pylist() != ids:
        raise ValueError(f"{embeddings_location} does not list the preprocessed galleries in their order")
    imagenet = pretrained_embeddings(source, settings, settings.model.backbone)
    splits = catalogue.frame.set_index("gallery_id").loc[ids, "split"]
    write_embeddings(imagenet_location, embeddings_table(ids, splits, imagenet, {
        "backbone": settings.model.backbone, "pooling": "mean", "weighting": "none (ImageNet weights)", **metadata}))
    fixed, notes = baseline_arms(source, settings, log)
    fixed = {IMAGENET_ARM: vectors_as_galleries(ids, imagenet)} | fixed
    per_seed, embedding_seconds = [], time.perf_counter() - start
    for k, seed in enumerate(seeds_of(settings)):
        start, arms = time.perf_counter(), {}
        for trained, checkpoints in sorted(checkpoints_by_seed[k].items(),
                                           key=lambda mc: not mtl_arm(mc[0], reference).reference):  # the reference first
            if k == 0 and trained == reference:
                vectors = embedding_matrix(table)
            else:
                model = load_trained(checkpoints)
                vectors = embed_galleries(model.encoder, source, settings.train.use_cache,
                                          workers=settings.data.loader_workers)
            arms[mtl_arm(trained, reference)] = vectors_as_galleries(ids, vectors)
        embedding_seconds += time.perf_counter() - start
        head_arms = [mtl_arm(m.with_seed(seed), reference) for m in preset_models(settings)] + list(fixed)  # and baselines
        result = transfer_suite(catalogue, with_seed(settings, seed), arms | fixed, source, pixels, notes, log,
                                head_arms=head_arms)
        result.seconds["arm_embeddings"] = embedding_seconds
        per_seed.append(result)
    return per_seed


def retrieval_evaluation(catalogue: Catalogue, shards: list[Shard], settings: Settings, embeddings_location: str,
                         compared: dict[Training, str], log=print) -> RetrievalResult:
    """Retrieval against the metric tasks' relevance (gallery.evaluation.retrieval_suite): the exported
    embeddings (unified, with their saved code) against the comparison models' (`compared`: each trained
    model that is not unified, and its checkpoints), ImageNet's and the baselines', each with a code fitted
    on its train galleries as the export fits one."""
    source = shard_source(shards, settings)
    ids = source.gallery_ids
    table, _ = read_embeddings(embeddings_location)
    if table["gallery_id"].to_pylist() != ids:
        raise ValueError(f"{embeddings_location} does not list the preprocessed galleries in their order")
    train = catalogue.frame.set_index("gallery_id").loc[ids, "split"].to_numpy() == "train"
    code_name = code_that_fits(settings.retrieval.code, int(train.sum()))[0]

    def arm(which: EmbeddingArm, vectors: np.ndarray, code: BinaryCode | None = None) -> RetrievalArm:
        return RetrievalArm(which, vectors, code or fit_code(vectors[train], code_name))

    reference = reference_model(settings)
    arms = [arm(mtl_arm(reference, reference), embedding_matrix(table), embeddings_code(embeddings_location))]
    for t, checkpoints in compared.items():
        model = load_trained(checkpoints)
        vectors = embed_galleries(model.encoder, source, settings.train.use_cache, workers=settings.data.loader_workers)
        arms.append(arm(t.arm(reference), vectors))
    arms.append(arm(IMAGENET_ARM, pretrained_embeddings(source, settings, settings.model.backbone)))
    baselines, _ = baseline_arms(source, settings, log)
    arms += [arm(which, galleries.data.numpy()) for which, galleries in baselines.items()]
    result = retrieval_suite(catalogue, ids, arms, settings.retrieval.rerank, code_name, settings.train.seed,
                             max_queries=settings.evaluation.retrieval_queries)
    log(f"retrieval: {len(arms)} arms on {', '.join(f'{n} queries of {t}' for t, n in result.queries.items())} "
        f"in {result.seconds:.1f} s")
    return result


def baseline_arms(source: ShardSource, settings: Settings, log=print) -> tuple[dict, list[str]]:
    """The transfer arms of evaluation.baselines (other pretrained backbones, mean-pooled), and a note for
    each whose weights are not on this machine (the report says so instead of failing)."""
    arms, notes = {}, []
    for name in settings.evaluation.baselines:
        try:
            arms[baseline_arm(name)] = vectors_as_galleries(source.gallery_ids, pretrained_embeddings(source, settings, name))
        except WeightsUnavailable as e:
            notes.append(f"The baseline `{name}` was not run: its pretrained weights are not on this machine ({e})")
            log(notes[-1])
    return arms, notes


def task_optimal_models(catalogue: Catalogue, shards: list[Shard], settings: Settings, names: list[str],
                        checkpoints_of, recovery_of, log=print) -> list[dict[str, TaskOptimalResult]]:
    """Task-optimal models for the named tasks, trained together in this process, once per seed
    (evaluation.seeds). `checkpoints_of(folder)` and `recovery_of(folder)` take the model's folder name."""
    tasks = [t for t in catalogue.tasks if t.name in set(names)]
    source = shard_source(shards, settings)
    return [train_task_optimal(catalogue, tasks, source, with_seed(settings, seed),
                               lambda name, seed=seed: checkpoints_of(task_optimal_folder(name, seed, settings)),
                               lambda name, seed=seed: recovery_of(task_optimal_folder(name, seed, settings)), log)
            for seed in seeds_of(settings)]


def trained_settings(model: ModelIdentity, settings: Settings) -> Settings:
    """The run's settings as a trained model of that identity was trained with (its pooling and seed)."""
    return with_seed(replace(settings, model=replace(settings.model, pooling=model.pooling)), model.seed)
