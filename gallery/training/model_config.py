"""What a trained model is, in one JSON file: enough to rebuild it and to feed it photos, with no run
settings, no Metaflow and no Python pickle.

The same `ModelConfig` is written beside every checkpoint during training (`config.json` in the
checkpoints folder) and into an exported model folder, where it also lists each file's SHA-256.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from importlib.metadata import PackageNotFoundError, version

from gallery.config import ModelSettings, Settings
from gallery.data.labels import LabelStats
from gallery.data.tasks import Task
from gallery.errors import UserError
from gallery.model.identity import ModelIdentity

FORMAT = 1            # of config.json: a reader refuses a newer one, whose meaning it cannot know
CONFIG_FILE = "config.json"


class ModelFolderError(UserError):
    """An exported model folder or checkpoint that cannot be used: the message names the file and the fix."""


def project_version() -> str:
    try:
        return version("gallery")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


@dataclass(frozen=True)
class Preprocessing:
    """How a photo becomes the encoder's input, as training saw it: decoded (first frame, EXIF orientation),
    converted to RGB, resized bilinearly to size x size, then encoded as the shards store it (`stored_as`
    at `stored_quality`: data.image_format and data.image_quality) and decoded again, as uint8 NHWC; the
    encoder itself subtracts `mean` and divides by `std` (per channel, on the 0-255 scale)."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    stored_as: str = "jpeg"
    stored_quality: int = 90
    resize: str = "bilinear"
    layout: str = "uint8 (photos, height, width, 3), RGB"


@dataclass(frozen=True)
class OnnxGraphs:
    """An exported folder's ONNX graphs (gallery.artifact.onnx_graphs) and how closely onnxruntime matched
    PyTorch on random photos at export (largest absolute difference per output)."""

    encoder: str
    pooling: str
    opset: int
    photo_weights: bool          # the pooling graph's second output (attention poolings)
    max_abs_difference: dict[str, float]


@dataclass(frozen=True)
class ModelConfig:
    """A trained gallery model: who it is, how to rebuild it (`model` settings, tasks, label statistics)
    and how to preprocess its photos."""

    identity: ModelIdentity
    model: ModelSettings           # `weights` says where the backbone's pretrained weights came from
    tasks: tuple[Task, ...]
    stats: dict[str, LabelStats]
    preprocessing: Preprocessing
    embedding_dim: int
    trainable: str                 # which backbone blocks trained ("last 1 of 7 stages")
    run_id: str | None = None
    gallery_version: str = field(default_factory=project_version)
    format: int = FORMAT
    code_file: str | None = None   # an exported folder's binary code (numpy .npz)
    onnx: OnnxGraphs | None = None  # an exported folder's graphs
    files: dict[str, str] = field(default_factory=dict)  # an exported folder's files -> SHA-256

    def as_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=list) + "\n"

    @staticmethod
    def from_json(text: str, where: str) -> "ModelConfig":
        """Parsed and checked; `where` names the file in errors."""
        try:
            d = json.loads(text)
            fmt = int(d.get("format", 0))
        except (ValueError, TypeError, AttributeError) as e:
            raise ModelFolderError(f"{where} is not a model config ({e}); export the model again "
                                   "(`gallery export-model`)") from None
        if fmt > FORMAT:
            raise ModelFolderError(
                f"{where} is format {fmt}, written by gallery {d.get('gallery_version', '?')}; this gallery "
                f"({project_version()}) reads format {FORMAT} or older: upgrade gallery to load it")
        try:
            return ModelConfig(
                identity=ModelIdentity.from_dict(d["identity"]),
                model=ModelSettings(**d["model"]),
                tasks=tuple(Task(**{**t, "classes": None if t.get("classes") is None else tuple(t["classes"])})
                            for t in d["tasks"]),
                stats={name: LabelStats(**s) for name, s in d["stats"].items()},
                preprocessing=Preprocessing(**{**d["preprocessing"], "mean": tuple(d["preprocessing"]["mean"]),
                                               "std": tuple(d["preprocessing"]["std"])}),
                onnx=OnnxGraphs(**d["onnx"]) if d.get("onnx") else None,
                **{f.name: d[f.name] for f in fields(ModelConfig)
                   if f.name not in ("identity", "model", "tasks", "stats", "preprocessing", "onnx") and f.name in d})
        except (KeyError, TypeError, ValueError) as e:
            raise ModelFolderError(f"{where} is incomplete or damaged ({type(e).__name__}: {e}); export the model "
                                   "again (`gallery export-model`)") from None

    def building(self) -> ModelSettings:
        """The model settings that rebuild it from its own weights (no pretrained download or file)."""
        return replace(self.model, weights="random")


def model_config(identity: ModelIdentity, settings: Settings, tasks, stats, encoder,
                 run_id: str | None = None) -> ModelConfig:
    """The config of a model built with `settings` (its model and data sections) for `tasks` (its
    GalleryEncoder: `encoder`)."""
    images, m = encoder.images, settings.model
    return ModelConfig(identity, m, tuple(tasks), {t.name: stats[t.name] for t in tasks if t.name in stats},
                       Preprocessing(m.image_size, _channels(images.mean), _channels(images.std),
                                     settings.data.image_format, settings.data.image_quality),
                       encoder.dim, images.split, run_id)


def _channels(buffer) -> tuple[float, float, float]:
    return tuple(round(float(v), 6) for v in buffer.flatten())
