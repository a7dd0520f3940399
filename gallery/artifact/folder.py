"""An exported model folder: written whole (config.json last, listing every other file's SHA-256), and
read back only when every file is there and unchanged.

    model.safetensors   the GalleryModel's weights (encoder, pooling, task heads)
    model.onnx          per-photo encoder          pooling.onnx   one gallery's pooling (onnx_graphs)
    binary_code.npz     the binary code the run fitted (gallery.retrieval.codes)
    MODEL_CARD.md       intended use, data, evaluation, limitations, how to load
    config.json         gallery.training.model_config.ModelConfig
"""
from __future__ import annotations

import hashlib
from dataclasses import replace

import gallery.storage as storage
from gallery.artifact.card import CARD_FILE, model_card
from gallery.training.model_config import CONFIG_FILE, ModelConfig, ModelFolderError, OnnxGraphs
from gallery.artifact.onnx_graphs import ENCODER_FILE, OPSET, POOLING_FILE, onnx_difference, onnx_graphs
from gallery.data.inputs import InputProblem, read_bounded
from gallery.faults import reached
from gallery.retrieval.codes import CODE_FILE, BinaryCode, save_code

WEIGHTS_FILE = "model.safetensors"
ONNX_TOLERANCE = 1e-4  # onnxruntime against PyTorch at export: largest difference, of the output's scale (at least 1)


class OnnxMismatch(RuntimeError):
    """onnxruntime does not compute what PyTorch does: a gap in the exporter for this architecture."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_model_folder(model, config: ModelConfig, code: BinaryCode, out: str, evaluation: str | None = None,
                       log=print) -> ModelConfig:
    """Write `model` (a GalleryModel in eval mode) and everything to use it into the folder or prefix `out`;
    returns the config written. Fails if the ONNX graphs do not match PyTorch within ONNX_TOLERANCE."""
    from safetensors.torch import save

    files = {WEIGHTS_FILE: save({k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()})}
    files |= onnx_graphs(model.encoder, config.preprocessing.image_size)
    measured = onnx_difference({k: files[k] for k in (ENCODER_FILE, POOLING_FILE)}, model.encoder,
                               config.preprocessing.image_size)
    off = {name: d for name, (d, scale) in measured.items() if not d <= ONNX_TOLERANCE * max(1.0, scale)}  # NaN: off
    if off:
        raise OnnxMismatch(f"the ONNX graphs of {config.identity} differ from PyTorch on random photos ({off}: more "
                           f"than {ONNX_TOLERANCE} of the output's scale); the model cannot be shipped as ONNX: "
                           "report it with the model's backbone and pooling")
    difference = {name: d for name, (d, _) in measured.items()}
    config = replace(config, code_file=CODE_FILE, onnx=OnnxGraphs(ENCODER_FILE, POOLING_FILE, OPSET,
                                                                  model.encoder.has_photo_weights, difference))
    files[CARD_FILE] = model_card(config, evaluation).encode()
    for name, data in files.items():
        storage.write_bytes(storage.join(out, name), data)
        reached("export.write")
    save_code(code, storage.join(out, CODE_FILE))
    files[CODE_FILE] = storage.read_bytes(storage.join(out, CODE_FILE))
    config = replace(config, files={name: sha256(data) for name, data in sorted(files.items())})
    storage.write_bytes(storage.join(out, CONFIG_FILE), config.as_json().encode())  # last: the folder is complete
    log(f"model folder {out}: {', '.join(sorted(files))}, {CONFIG_FILE} "
        f"(ONNX within {max(difference.values()):.1e} of PyTorch)")
    return config


def export_checkpoint(checkpoints: str, code: BinaryCode, out: str, run_id: str | None,
                      evaluation: str | None = None, log=print) -> ModelConfig:
    """A model folder from a training's checkpoints folder (its best epoch) and the code its run fitted."""
    from gallery.training.checkpoints import load_checkpoint

    model, config = load_checkpoint(checkpoints)
    return write_model_folder(model, replace(config, run_id=run_id), code, out, evaluation, log)


def read_model_file(folder: str, name: str, config: ModelConfig | None = None) -> bytes:
    """A file of the folder, bounded by the input limits, checked against the config's SHA-256."""
    location = storage.join(folder, name)
    try:
        data = read_bounded(location, "model")
    except InputProblem as e:
        raise ModelFolderError(f"model folder {folder}: {e}; export the model again (`gallery export-model`)") from None
    if config is not None and config.files.get(name) != sha256(data):
        raise ModelFolderError(f"{location} was changed or damaged after export (its SHA-256 is not the one "
                               f"{CONFIG_FILE} lists); export the model again (`gallery export-model`)")
    return data


def read_config(folder: str) -> ModelConfig:
    location = storage.join(folder, CONFIG_FILE)
    config = ModelConfig.from_json(read_model_file(folder, CONFIG_FILE).decode("utf-8", "replace"), location)
    if not config.files:
        raise ModelFolderError(f"{location} lists no files: it is a checkpoint's config, not an exported model "
                               "folder; export one with `gallery export-model`")
    return config


def check_made_by(config: ModelConfig, folder: str, embeddings_location: str, metadata: dict) -> None:
    """An embeddings file pairs with a model folder only if that model made it: the same run, weighting,
    pooling, seed, backbone and width, as the export's metadata names them (a field a file lacks is not
    checked). Two models of one run are two spaces: seeds embedded by one never search the other's file."""
    i = config.identity
    expected = {"run_id": config.run_id, "weighting": i.weighting, "pooling": i.pooling, "seed": i.seed,
                "backbone": i.backbone, "dimension": config.embedding_dim}
    wrong = [f"its {key} is {metadata[key]!r}, the model's {value!r}" for key, value in expected.items()
             if value is not None and metadata.get(key) not in (None, str(value))]
    if wrong:
        raise ModelFolderError(f"{embeddings_location} was not made by the model in {folder} ({'; '.join(wrong)}): two "
                               "models, two spaces. Give the embeddings file this model made (its run's "
                               "embeddings.parquet for the run's exported model; flows/embed_flow.py makes one)")


def add_evaluation(folder: str, evaluation: str) -> None:
    """Rewrite the folder's card with the run's evaluation (known only after the export), and its hash."""
    config = read_config(folder)
    card = model_card(config, evaluation).encode()
    storage.write_bytes(storage.join(folder, CARD_FILE), card)
    config = replace(config, files={**config.files, CARD_FILE: sha256(card)})
    storage.write_bytes(storage.join(folder, CONFIG_FILE), config.as_json().encode())
