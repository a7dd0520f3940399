"""Run settings: the presets in flows/configs/*.json, read into typed, checked dataclasses.

Unknown or misspelt keys are errors (a typo must not silently fall back to a default). The presets
are package data (`gallery/presets` is flows/configs), so an installed package finds them too.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, is_dataclass
from importlib import resources
from pathlib import Path

from gallery.data.documents import parse_document
from gallery.data.inputs import MissingInput, read_text
from gallery.data.synth import SynthSettings
from gallery.errors import ContractError, UserError, excerpt

PRESETS_DIR = resources.files("gallery") / "presets"


@dataclass(frozen=True)
class ModelSettings:
    backbone: str = "efficientnet_lite0"
    weights: str = "imagenet"          # "imagenet", "random" (tests), or a path to a state-dict file
    trainable_blocks: int = 1          # backbone blocks (from the top) that train; the rest is the frozen trunk
    image_size: int = 96
    pooling: str = "mean"              # mean | max | gem
    hidden: int = 256                  # width of each task head's hidden layer


@dataclass(frozen=True)
class TrainSettings:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    batch_galleries: int = 32
    max_epochs: int = 12
    patience: int = 2                  # epochs without a lower validation total loss before stopping
    weightings: tuple[str, ...] = ("pseudo_uniform", "kendall")
    reference_weighting: str = "pseudo_uniform"
    seed: int = 0
    cache_dtype: str = "float16"       # frozen-trunk feature cache precision
    precision: str = "auto"            # auto: bf16 autocast on CUDA and on CPUs with native bf16; fp32; bf16
    use_cache: bool = True             # train the top from the frozen-trunk feature cache (else from pixels)
    workers: int = 1                   # data-parallel processes per weighting (DDP: gloo on CPU, NCCL on GPUs)


@dataclass(frozen=True)
class DataSettings:
    synth: SynthSettings = field(default_factory=SynthSettings)
    shards: int = 4                    # preprocessing fan-out
    max_images: int = 44               # per gallery, the first ones kept (the paper's maximum)
    image_format: str = "jpeg"         # how shards store the resized images: jpeg | webp | png (lossless)
    image_quality: int = 90            # jpeg/webp quality
    loader_workers: int = 0            # DataLoader processes decoding shards for each training process (0: itself)


@dataclass(frozen=True)
class EvalSettings:
    holdout_fractions: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8, 1.0)  # of one epoch (Table 2's rows)
    holdout_epochs: int = 4
    head_lr: float = 1e-3              # the 2-layer head on frozen embeddings (arms a and b)
    batch_galleries: int = 32
    task_groups: int = 2               # fan-out branches; a local run groups tasks to save start-up
    projection_points: int = 3000      # UMAP on at most this many galleries
    retrieval_examples: int = 3
    seeds: int = 1                     # training and evaluation repeated with train.seed, +1, ...: mean and spread


@dataclass(frozen=True)
class RetrievalSettings:
    """Binary codes and search indexes (DESIGN §10); the defaults are what the bench and the
    default run measured (README, "Using the embeddings")."""
    code: str = "itq256"               # fitted at export on the train split: itq<bits> (ITQ rotation), median, sign
    rerank: int = 100                  # code candidates re-ranked by exact cosine; 0: pure Hamming order
    approximate_above: int = 100_000   # galleries; up to this many, indexes are exact (flat)
    hnsw_links: int = 16               # float HNSW: links per node (memory, build time and recall grow with it)
    hnsw_build_breadth: int = 40       # float HNSW efConstruction
    hnsw_search_breadth: int = 64      # float HNSW efSearch: recall against query time
    ivf_lists: int = 4096              # binary IVF: lists (fewer when the catalogue is small)
    ivf_probes: int = 128              # binary IVF: lists visited per query: recall against query time
    curve_codes: tuple[str, ...] = ("sign", "median", "itq64", "itq128", "itq256")  # the report's recall/size curve


@dataclass(frozen=True)
class StepResources:
    """What each task of a step asks of a cluster (Metaflow's @resources; a local run ignores it):
    cores; GPUs (None: none); memory, local disk and /dev/shm in MB (staged shards go through the
    disk, DataLoader workers pass batches through shared memory; None: Metaflow's default)."""
    cpu: int = 2
    memory: int = 4096
    gpu: int | None = None
    disk: int | None = None
    shared_memory: int | None = None


@dataclass(frozen=True)
class ResourceSettings:
    """The heavy steps' requests, sized per preset (each preset says which steps get a GPU), and how
    often Metaflow retries a failed task of them (a retried training continues from its checkpoint)."""
    retries: int = 2
    preprocess: StepResources = field(default_factory=StepResources)
    train: StepResources = field(default_factory=StepResources)
    export: StepResources = field(default_factory=StepResources)
    holdout: StepResources = field(default_factory=StepResources)
    task_optimal: StepResources = field(default_factory=StepResources)


@dataclass(frozen=True)
class Settings:
    name: str = "default"
    model: ModelSettings = field(default_factory=ModelSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    data: DataSettings = field(default_factory=DataSettings)
    evaluation: EvalSettings = field(default_factory=EvalSettings)
    retrieval: RetrievalSettings = field(default_factory=RetrievalSettings)
    resources: ResourceSettings = field(default_factory=ResourceSettings)


def _build(cls, values: dict, where: str):
    if not isinstance(values, dict):
        raise ValueError(f"settings {where}: expected an object, got {values!r}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"settings {where}: unknown key(s) {unknown}; known: {sorted(known)}")
    kwargs = {}
    for name, value in values.items():
        default = getattr(cls(), name)
        if is_dataclass(default):
            kwargs[name] = _build(type(default), value, f"{where}.{name}")
        elif isinstance(default, tuple):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


def settings_from_dict(values: dict) -> Settings:
    return _build(Settings, dict(values), "")


def settings_json(text: str) -> dict:
    """Metaflow's parser of the flows' `settings` Config: checked like any settings, and returned
    complete (defaults filled in), so decorators can read any value (`settings.resources.train`)."""
    return asdict(parse_settings(text, "the --config settings file"))


def parse_settings(text: str, name: str) -> Settings:
    """Settings from JSON text (strict: a key given twice is an error); a UserError starting with `name`
    (which file) for anything wrong in it."""
    try:
        return settings_from_dict(parse_document(text, name, "json", "flows/configs/default.json"))
    except ContractError as e:
        raise UserError(f"{name}: {e.violations[0].problem}; {e.violations[0].fix}") from None
    except (ValueError, TypeError) as e:
        raise UserError(f"{name}: {excerpt(str(e), 300, quote=False)}; see flows/configs/default.json "
                        "for every key and its type") from None


def load_settings(path_or_name) -> Settings:
    """A preset by name (smoke, default, paper) or a JSON file path (read through gallery.data.inputs)."""
    given = str(path_or_name)
    path = Path(given) if Path(given).suffix or "/" in given else PRESETS_DIR / f"{given}.json"
    try:
        text = read_text(path, "settings") if isinstance(path, Path) else path.read_text()  # a zipped install's preset
    except (MissingInput, FileNotFoundError):
        presets = sorted(p.name.removesuffix(".json") for p in PRESETS_DIR.iterdir() if p.name.endswith(".json"))
        raise UserError(f"settings {path_or_name!r}: no such file; give a preset name ({', '.join(presets)}) "
                        "or the path of a settings JSON file") from None
    return parse_settings(text, f"settings file {path}")
