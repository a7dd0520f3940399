"""Run settings: the presets in flows/configs/*.json, read into typed settings checked before anything runs.

Every mistake is caught when the settings are read (for a flow: when Metaflow parses its `settings`
Config, before the first step): an unknown or misspelt key, a value of the wrong type, out of range,
or not a known name. Each is reported with its dotted path, the value, what is allowed and the
closest known name. The names of backbones, poolings and weightings are the model registries' own
(gallery.model), looked up when a name is checked, so a new method needs no edit here.

The settings are frozen pydantic dataclasses: attribute access, `dataclasses.replace` and `asdict`
work as on plain dataclasses, and `replace` checks the new values too. The presets are package data
(`gallery/presets` is flows/configs), so an installed package finds them too.
"""
from __future__ import annotations

import difflib
import json
import re
import typing
from dataclasses import asdict, field, fields, is_dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Callable, Iterable

from pydantic import (AfterValidator, ConfigDict, Field, Strict, TypeAdapter, ValidationError, ValidationInfo,
                      field_validator)
from pydantic.dataclasses import dataclass
from pydantic_core import PydanticCustomError

from gallery.data.split import TEST_FRACTION, VALID_FRACTION, Share
from gallery.data.documents import parse_document
from gallery.data.inputs import MissingInput, read_text
from gallery.data.synth_settings import SynthSettings
from gallery.errors import ContractError, UserError
from gallery.model.identity import ModelIdentity

PRESETS_DIR = resources.files("gallery") / "presets"
PRECISIONS = ("auto", "fp32", "bf16")  # auto: bf16 autocast on CUDA and on CPUs with native bf16
CACHE_DTYPES = ("float16", "bfloat16", "float32")  # torch dtypes the frozen-trunk feature cache may be stored in
CODE_FORMS = ("itq<bits>", "median", "sign")  # binary codes (gallery.retrieval.codes)
CODE_PATTERN = re.compile(r"itq[1-9][0-9]*|median|sign")
PAPER_TASK = "star_rating"  # the paper's held-out task (Table 2): the primary one by default
CHECKED = ConfigDict(extra="forbid")  # an unknown key is an error, never silently ignored


class SettingsError(UserError, ValueError):
    """Settings that cannot run: the message lists every problem with its dotted path and the fix."""


# ---------------------------------------------------------------- value types

Int = Annotated[int, Strict()]        # 2.0, "2" and true are not whole numbers here
Number = Annotated[float, Strict()]   # a whole number is a number too; "0.1" is not
Flag = Annotated[bool, Strict()]
Count = Annotated[Int, Field(ge=1)]
NonNegative = Annotated[Int, Field(ge=0)]
Positive = Annotated[Number, Field(gt=0)]
NonNegativeNumber = Annotated[Number, Field(ge=0)]


def one_of(kind: str, names: Callable[[], Iterable[str]]) -> AfterValidator:
    """A check that a value is one of `names()` (looked up when checked: registries may grow)."""

    def check(value: str) -> str:
        allowed = sorted(names())
        if value not in allowed:
            raise PydanticCustomError("unknown_name", "not a known {kind}", {"kind": kind, "allowed": allowed})
        return value

    return AfterValidator(check)


def _backbone(value: str) -> str:
    """A built-in backbone, or `<library>:<model>` of a model the library has (gallery.model.backbones)."""
    from gallery.model.backbones import BACKBONES, LIBRARIES, known_backbone  # imported late: it loads torch

    if not known_backbone(value):
        raise PydanticCustomError("unknown_name", "not a known {kind}", {
            "kind": "backbone", "allowed": sorted(BACKBONES) + [f"{library}:<model>" for library in sorted(LIBRARIES)]})
    return value


def _poolings():
    from gallery.model.pooling import POOLINGS

    return POOLINGS


def _image_formats():
    from gallery.data.shards import FORMATS  # imported late: it loads the imaging libraries

    return FORMATS


def _weightings():
    from gallery.model.weightings import WEIGHTINGS

    return WEIGHTINGS


def _code(value: str) -> str:
    if not CODE_PATTERN.fullmatch(value):
        raise PydanticCustomError("unknown_name", "not a known {kind}", {"kind": "binary code", "allowed": CODE_FORMS})
    return value


Backbone = Annotated[str, AfterValidator(_backbone)]
Pooling = Annotated[str, one_of("pooling", _poolings)]
Weighting = Annotated[str, one_of("weighting", _weightings)]
Precision = Annotated[str, one_of("precision", lambda: PRECISIONS)]
CacheDtype = Annotated[str, one_of("cache dtype", lambda: CACHE_DTYPES)]
ImageFormat = Annotated[str, one_of("image format", _image_formats)]
Code = Annotated[str, AfterValidator(_code)]


# ---------------------------------------------------------------- the settings

@dataclass(frozen=True, config=CHECKED)
class ModelSettings:
    backbone: Backbone = "efficientnet_lite0"
    weights: str = "imagenet"          # "imagenet", "random" (tests), or a path to a state-dict file
    trainable_blocks: NonNegative = 1  # backbone blocks (from the top) that train; the rest is the frozen trunk
    image_size: Annotated[Int, Field(ge=8)] = 96
    pooling: Pooling = "mean"
    hidden: Count = 256                # width of each task head's hidden layer
    # metric tasks (gallery.model.metric): softmax temperatures on cosines, and the random other groups an
    # identity task's classifier scores beside the batch's own each step (its cost does not grow with groups)
    identity_temperature: Positive = 0.05
    pairs_temperature: Positive = 0.1
    sampled_classes: NonNegative = 1024


@dataclass(frozen=True, config=CHECKED)
class TrainSettings:
    lr: Positive = 1e-3
    betas: tuple[Annotated[Number, Field(ge=0, lt=1)], Annotated[Number, Field(ge=0, lt=1)]] = (0.9, 0.999)
    batch_galleries: Count = 32
    max_epochs: Count = 12
    patience: Count = 2                # epochs without a lower validation total loss before stopping
    weightings: Annotated[tuple[Weighting, ...], Field(min_length=1)] = ("pseudo_uniform", "kendall")
    reference_weighting: Annotated[Weighting, Field(validate_default=True)] = "pseudo_uniform"  # exported; trained
    seed: NonNegative = 0
    cache_dtype: CacheDtype = "float16"  # frozen-trunk feature cache precision
    precision: Precision = "auto"
    use_cache: Flag = True             # train the top from the frozen-trunk feature cache (else from pixels)
    workers: Count = 1                 # data-parallel processes per weighting (DDP: gloo on CPU, NCCL on GPUs)
    poolings: tuple[Pooling, ...] = () # a study: every weighting is trained with each of these poolings too
    processes: Count | None = None     # processes training the models side by side (None: one per model and worker)
    pairs_per_batch: NonNegative = 16  # engagement pairs drawn into every batch (both ends) for each pairs task

    @field_validator("weightings")
    @classmethod
    def _each_once(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(value)) != len(value):
            raise PydanticCustomError("repeated", "a weighting is listed twice; list each once")
        return value

    @field_validator("reference_weighting")
    @classmethod
    def _is_trained(cls, value: str, info: ValidationInfo) -> str:
        trained = info.data.get("weightings")  # absent when the weightings themselves were wrong
        if trained is not None and value not in trained:
            raise PydanticCustomError("not_trained", "not one of train.weightings, so never trained",
                                      {"allowed": sorted(trained)})
        return value


def reference_model(settings: "Settings") -> ModelIdentity:
    """The run's reference model: train.reference_weighting with model.pooling and train.seed, the one exported."""
    return ModelIdentity(settings.train.reference_weighting, settings.model.pooling, settings.train.seed,
                         settings.model.backbone)


def trained_models(settings: "Settings", seed: int | None = None) -> list[ModelIdentity]:
    """Every weighting-and-pooling model the settings train with `seed` (default train.seed): each weighting
    with model.pooling first, then with each of train.poolings (a study's cells)."""
    seed = settings.train.seed if seed is None else seed
    poolings = dict.fromkeys([settings.model.pooling, *settings.train.poolings])
    return [ModelIdentity(w, p, seed, settings.model.backbone) for p in poolings for w in settings.train.weightings]


def preset_models(settings: "Settings") -> list[ModelIdentity]:
    """The models of the preset's pooling with train.seed (a study's other poolings left out)."""
    return [m for m in trained_models(settings) if m.pooling == settings.model.pooling]


Fraction = Annotated[Number, Field(gt=0, le=1)]


@dataclass(frozen=True, config=CHECKED)
class SplitSettings:
    """The hashed split's shares, for products whose manifest gives no `split` (gallery.data.split).
    More held-out products buy evaluation power (narrower intervals, more galleries to test transfer
    on) at the cost of training galleries: worth it for small catalogues. (The synthetic catalogue
    writes its own `split` column: data.synth.valid_share and test_share.)"""
    valid: Share = VALID_FRACTION
    test: Share = TEST_FRACTION


@dataclass(frozen=True, config=CHECKED)
class DataSettings:
    synth: SynthSettings = field(default_factory=SynthSettings)
    split: SplitSettings = field(default_factory=SplitSettings)
    shards: Count = 4                  # preprocessing fan-out
    max_images: Count = 44             # per gallery, the first ones kept (the paper's maximum)
    image_format: ImageFormat = "jpeg"  # how shards store the resized images; png is lossless
    image_quality: Annotated[Int, Field(ge=1, le=100)] = 90  # jpeg/webp quality
    loader_workers: NonNegative = 0    # DataLoader processes decoding shards for each training process (0: itself)


@dataclass(frozen=True, config=CHECKED)
class EvalSettings:
    holdout_fractions: Annotated[tuple[Fraction, ...], Field(min_length=1)] = (0.2, 0.4, 0.6, 0.8, 1.0)  # of one epoch
    holdout_epochs: Count = 4
    # every held-out arm (the 2-layer head on each embedding, and end-to-end) trains once per learning rate x
    # weight decay and is scored, out of fold, with the one that did best (gallery.evaluation.holdout)
    head_lrs: Annotated[tuple[Positive, ...], Field(min_length=1)] = (2.5e-4, 1e-3, 4e-3)  # x4 apart
    head_weight_decays: Annotated[tuple[NonNegativeNumber, ...], Field(min_length=1)] = (0.0,)
    batch_galleries: Count = 32
    task_groups: Count = 2             # fan-out branches; a local run groups tasks to save start-up
    projection_points: Annotated[Int, Field(ge=2)] = 3000  # UMAP on at most this many galleries
    retrieval_examples: NonNegative = 3
    seeds: Count = 1                   # training and evaluation repeated with train.seed, +1, ...: mean and spread
    # the costly yardsticks, each switchable (the report says what a run skipped): the end-to-end arm of the
    # held-out tasks, and the task-optimal models (one per MTL task and seed) on at most this many train galleries
    end_to_end: Flag = True
    task_optimal: Flag = True
    task_optimal_galleries: Count = 2000  # the default catalogue's size: a larger catalogue's are a stable sample
    baselines: tuple[Backbone, ...] = ()  # other pretrained backbones whose mean-pooled features are transfer arms
    # with metric tasks: also train the attribute tasks alone and each metric task alone, for retrieval to
    # compare the unified model with (gallery.evaluation.retrieval_suite)
    retrieval_arms: Flag = True
    # the held-out task of Table 2 and of the scorecard's primary comparison (None: star_rating where the
    # catalogue holds it out, else its first held-out task: gallery.config.primary_task)
    primary_task: str | None = None
    retrieval_queries: Count = 2000  # queries per exact search of the whole catalogue: a stable sample beyond


@dataclass(frozen=True, config=CHECKED)
class RetrievalSettings:
    """Binary codes and search indexes (docs/design.md §10); the defaults are what the bench and the
    default run measured (docs/benchmarks.md)."""
    code: Code = "itq256"              # fitted at export on the train split: itq<bits> (ITQ rotation), median, sign
    rerank: NonNegative = 100          # code candidates re-ranked by exact cosine; 0: pure Hamming order
    approximate_above: NonNegative = 100_000  # galleries; up to this many, indexes are exact (flat)
    hnsw_links: Annotated[Int, Field(ge=2)] = 16  # float HNSW: links per node (memory, build time and recall grow)
    hnsw_build_breadth: Count = 40     # float HNSW efConstruction
    hnsw_search_breadth: Count = 64    # float HNSW efSearch: recall against query time
    ivf_lists: Count = 4096            # binary IVF: lists (fewer when the catalogue is small)
    ivf_probes: Count = 128            # binary IVF: lists visited per query: recall against query time
    curve_codes: tuple[Code, ...] = ("sign", "median", "itq64", "itq128", "itq256")  # the report's recall/size curve


@dataclass(frozen=True, config=CHECKED)
class StepResources:
    """What each task of a step asks of a cluster (Metaflow's @resources; a local run ignores it):
    cores; GPUs (None: none); memory, local disk and /dev/shm in MB (staged shards go through the
    disk, DataLoader workers pass batches through shared memory; None: Metaflow's default)."""
    cpu: Count = 2
    memory: Count = 4096
    gpu: NonNegative | None = None
    disk: Count | None = None
    shared_memory: Count | None = None


@dataclass(frozen=True, config=CHECKED)
class ResourceSettings:
    """The heavy steps' requests, sized per preset (each preset says which steps get a GPU), and how
    often Metaflow retries a failed task of them (a retried training continues from its checkpoint)."""
    retries: NonNegative = 2
    preprocess: StepResources = field(default_factory=StepResources)
    train: StepResources = field(default_factory=StepResources)
    export: StepResources = field(default_factory=StepResources)
    evaluate: StepResources = field(default_factory=StepResources)  # the transfer suite, or task-optimal models


@dataclass(frozen=True, config=CHECKED)
class Settings:
    name: str = "default"
    model: ModelSettings = field(default_factory=ModelSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    data: DataSettings = field(default_factory=DataSettings)
    evaluation: EvalSettings = field(default_factory=EvalSettings)
    retrieval: RetrievalSettings = field(default_factory=RetrievalSettings)
    resources: ResourceSettings = field(default_factory=ResourceSettings)


_SETTINGS = TypeAdapter(Settings)


def primary_task(settings: Settings, held_out: list[str]) -> str | None:
    """The primary held-out task, resolved here only: evaluation.primary_task, else `star_rating` (the paper's)
    where the catalogue holds it out, else the first held-out task (None without any). A primary task the
    catalogue does not hold out is a settings error."""
    chosen = settings.evaluation.primary_task
    if chosen is not None:
        if chosen not in held_out:
            raise SettingsError(_sentence(f"settings evaluation.primary_task = {_shown(chosen)}: not a held-out task "
                                          "of this catalogue", held_out, chosen))
        return chosen
    return PAPER_TASK if PAPER_TASK in held_out else held_out[0] if held_out else None


# ---------------------------------------------------------------- reading them

def settings_from_dict(values: dict, source: str = "settings") -> Settings:
    """Checked settings; keys left out take their defaults. Raises SettingsError listing every problem
    of `source` (what the values came from, for the message)."""
    try:
        return _SETTINGS.validate_python(values)
    except ValidationError as e:
        raise SettingsError(problems_text(e, Settings, source)) from None


def settings_json(text: str) -> dict:
    """Metaflow's parser of the flows' `settings` Config: checked like any settings, and returned
    complete (defaults filled in), so decorators can read any value (`settings.resources.train`)."""
    return asdict(settings_from_dict(_document(text, "settings")))


def _document(text: str, name: str) -> dict:
    """JSON settings text, parsed strictly (gallery.data.documents: a key given twice is an error too)."""
    try:
        return parse_document(text, name, "json", "flows/configs/default.json")
    except ContractError as e:
        raise SettingsError(f"{name}: {e.violations[0].problem}; {e.violations[0].fix}") from None


def load_settings(path_or_name) -> Settings:
    """A preset by name (smoke, default, study, paper) or a JSON file path."""
    given = str(path_or_name)
    path = Path(given) if Path(given).suffix or "/" in given else PRESETS_DIR / f"{given}.json"
    try:  # through the bounded input layer (a preset of a zipped install is package data: read directly)
        text = read_text(path, "settings") if isinstance(path, Path) else path.read_text()
    except (MissingInput, FileNotFoundError):
        presets = sorted(p.name.removesuffix(".json") for p in PRESETS_DIR.iterdir() if p.name.endswith(".json"))
        raise SettingsError(f"settings {path_or_name!r}: no such file; give a preset name ({', '.join(presets)}) "
                            "or the path of a settings JSON file") from None
    return settings_from_dict(_document(text, f"settings {path}"), f"settings {path}")


# ---------------------------------------------------------------- what a mistake says

def problems_text(error: ValidationError, root: type, name: str) -> str:
    """Every problem of a failed check, one per line: the dotted path, the value, what is allowed and
    the closest allowed name."""
    problems = [_problem(e, root) for e in error.errors(include_url=False)]
    head = f"{name}: {len(problems)} problem{'s' if len(problems) != 1 else ''}"
    return "\n".join([head] + [f"- {p}" for p in problems])


def _problem(e: dict, root: type) -> str:
    loc, kind, ctx, value = e["loc"], e["type"], e.get("ctx") or {}, e["input"]
    path = _dotted(loc) or "(top level)"
    if kind == "unexpected_keyword_argument":
        allowed = _keys(root, loc[:-1])
        return _sentence(f"{path}: unknown key", allowed, str(loc[-1]))
    if kind in ("dataclass_type", "dataclass_args_type"):
        return f"{path} = {_shown(value)}: expected an object with keys {', '.join(_keys(root, loc))}"
    if kind in ("unknown_name", "not_trained"):
        what = f"not a known {ctx['kind']}" if kind == "unknown_name" else e["msg"]
        return _sentence(f"{path} = {_shown(value)}: {what}", ctx["allowed"], value)
    allowed = _ALLOWED.get(kind)
    if allowed:
        return f"{path} = {_shown(value)}: {allowed.format(**ctx)}"
    return f"{path} = {_shown(value)}: {e['msg'].removeprefix('Value error, ')}"


_ALLOWED = {  # pydantic's error types -> what is allowed, in the settings' words
    "int_type": "expected a whole number",
    "float_type": "expected a number", "bool_type": "expected true or false", "string_type": "expected a string",
    "tuple_type": "expected a list", "list_type": "expected a list",
    "greater_than": "out of range; allowed: a value > {gt}", "greater_than_equal": "out of range; allowed: a value >= {ge}",
    "less_than": "out of range; allowed: a value < {lt}", "less_than_equal": "out of range; allowed: a value <= {le}",
    "too_short": "expected at least {min_length} item(s)", "too_long": "expected at most {max_length} item(s)",
    "missing": "too few items",
}


def _sentence(start: str, allowed, given) -> str:
    allowed = [str(a) for a in allowed]
    text = f"{start}; allowed: {', '.join(allowed)}"
    close = difflib.get_close_matches(str(given), allowed, n=1, cutoff=0.5)
    return text + (f" (did you mean `{close[0]}`?)" if close else "")


def _dotted(loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _shown(value) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _keys(root: type, loc) -> list[str]:
    """The keys allowed at `loc` (a path of section names) in the dataclass `root`."""
    cls = root
    for part in loc:
        if isinstance(part, int) or not is_dataclass(cls):
            return []
        cls = typing.get_type_hints(cls).get(part)
    return [f.name for f in fields(cls)] if is_dataclass(cls) else []
