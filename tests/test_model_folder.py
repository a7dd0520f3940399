"""The exported model folder (gallery.artifact): it rebuilds the model alone, embeds like the model it came
from, its ONNX graphs agree with PyTorch under onnxruntime, and a damaged folder or photo says what is wrong."""
import json
import subprocess
import sys

import numpy as np
import onnxruntime
import pytest
import torch
from conftest import REPO
from PIL import Image

import gallery.storage as storage
from gallery.training.model_config import ModelFolderError, model_config
from gallery.artifact.folder import WEIGHTS_FILE, export_checkpoint
from gallery.artifact.loaded import PhotoError, load_model
from gallery.config import ModelSettings, Settings
from gallery.data.packed import PackedGalleries
from gallery.data.shards import as_stored
from gallery.data.tasks import Task
from gallery.model.gallery_model import build_model
from gallery.model.identity import ModelIdentity
from gallery.model.pooling import POOLINGS
from gallery.retrieval.codes import fit_code
from gallery.retrieval.embeddings import embed_with_photo_weights
from gallery.training.checkpoints import save_config

SIZE = 32
TASKS = [Task("style", "style", "multiclass", classes=("a", "b", "c")), Task("price", "price", "regression")]


def galleries(seed: int, count: int = 6) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (int(rng.integers(1, 5)), SIZE, SIZE, 3), dtype=np.uint8) for _ in range(count)]


def stored(gallery: np.ndarray) -> np.ndarray:
    """The photos as the shards hold them (JPEG at quality 90, read back): what training saw."""
    return np.stack([as_stored(p) for p in gallery])


def exported(tmp_path, pooling: str):
    """A freshly built model (random weights, perturbed so nothing is at its initial value) written as a
    checkpoints folder, as training leaves it, then exported."""
    torch.manual_seed(0)
    settings = Settings(model=ModelSettings(backbone="efficientnet_lite0", weights="random", trainable_blocks=1,
                                            image_size=SIZE, pooling=pooling, hidden=16))
    model = build_model(settings.model, TASKS).eval()
    with torch.no_grad():
        for p in model.encoder.pooling.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    checkpoints = str(tmp_path / "checkpoints")
    save_config(checkpoints, model_config(ModelIdentity("kendall", pooling, 3, "efficientnet_lite0"), settings, TASKS,
                                          {}, model.encoder))
    storage.save_torch(f"{checkpoints}/best.pt", {"model": model.state_dict()})
    as_trained = PackedGalleries.from_arrays(list("abcdef"), [stored(g) for g in galleries(0)])
    vectors = embed_with_photo_weights(model.encoder, as_trained, False)
    code = fit_code(np.random.default_rng(1).normal(size=(300, model.encoder.dim)).astype(np.float32), "itq16")
    folder = tmp_path / "model"
    export_checkpoint(checkpoints, code, str(folder), "run-7", log=lambda line: None)
    return model, vectors, code, folder


@pytest.mark.parametrize("pooling", sorted(POOLINGS))  # each exports its own graph
def test_a_loaded_folder_embeds_as_the_model_did_and_its_onnx_graphs_agree(tmp_path, pooling):
    model, expected, code, folder = exported(tmp_path, pooling)
    loaded = load_model(folder)
    assert loaded.identity == ModelIdentity("kendall", pooling, 3, "efficientnet_lite0")
    assert loaded.config.run_id == "run-7" and [t.name for t in loaded.config.tasks] == ["style", "price"]
    vectors, weights = loaded.embed(galleries(0), batch_galleries=4, with_photo_weights=True)  # two batches
    np.testing.assert_allclose(vectors, expected.vectors, atol=1e-6)
    np.testing.assert_array_equal(loaded.binarize(vectors), code.encode(expected.vectors))
    if pooling not in ("gated_attention", "pma"):
        assert weights is None
    else:
        for got, want in zip(weights, expected.photo_weights):
            np.testing.assert_allclose(got, want, atol=1e-6)
    # the same galleries through onnxruntime: the encoder per photo, then the pooling per gallery
    encoder = onnxruntime.InferenceSession(str(folder / "model.onnx"))
    pooling_graph = onnxruntime.InferenceSession(str(folder / "pooling.onnx"))
    for photos, want in zip(map(stored, galleries(0)), expected.vectors):
        features = encoder.run(None, {"photos": photos})[0]
        with torch.no_grad():
            np.testing.assert_allclose(features, model.encoder.images(torch.from_numpy(photos)).numpy(), atol=1e-4)
        outputs = pooling_graph.run(None, {"features": features})
        np.testing.assert_allclose(outputs[0][0], want, atol=1e-4)
        assert len(outputs) == (2 if weights is not None else 1)
    config = json.loads((folder / "config.json").read_text())
    assert set(config["files"]) == {"model.safetensors", "model.onnx", "pooling.onnx", "binary_code.npz", "MODEL_CARD.md"}
    assert config["preprocessing"]["image_size"] == SIZE and config["embedding_dim"] == model.encoder.dim
    assert "## How to load" in (folder / "MODEL_CARD.md").read_text()


def test_photos_as_paths_pil_images_and_arrays_of_any_size_embed_alike(tmp_path):
    _, _, _, folder = exported(tmp_path, "mean")
    loaded = load_model(folder)
    big = np.random.default_rng(5).integers(0, 256, (80, 60, 3), dtype=np.uint8)
    Image.fromarray(big).save(tmp_path / "photo.png")
    from_path, from_pil, from_array = (loaded.embed([[p]]) for p in
                                       (tmp_path / "photo.png", Image.fromarray(big), big))
    np.testing.assert_array_equal(from_path, from_pil)
    np.testing.assert_array_equal(from_path, from_array)


def test_a_fresh_process_loads_the_folder_without_metaflow(tmp_path):
    _, expected, _, folder = exported(tmp_path, "mean")
    np.save(tmp_path / "photos.npy", np.concatenate(galleries(0)))
    lengths = [len(g) for g in galleries(0)]
    script = f"""
import sys, numpy as np, gallery
photos = np.load({str(tmp_path / 'photos.npy')!r}); cut = np.cumsum({lengths})[:-1]
vectors = gallery.load_model({str(folder)!r}).embed(np.split(photos, cut))
np.save({str(tmp_path / 'vectors.npy')!r}, vectors)
assert "metaflow" not in sys.modules, "load_model imported metaflow"
"""
    subprocess.run([sys.executable, "-c", script], check=True, cwd=REPO)
    np.testing.assert_allclose(np.load(tmp_path / "vectors.npy"), expected.vectors, atol=1e-6)


def test_a_changed_missing_or_newer_folder_and_an_unreadable_photo_are_named(tmp_path):
    _, _, _, folder = exported(tmp_path, "mean")
    onnx = folder / "model.onnx"
    graph = onnx.read_bytes()
    onnx.write_bytes(graph[:-1] + b"x")
    with pytest.raises(ModelFolderError, match=r"model\.onnx was changed or damaged after export"):
        load_model(folder)
    onnx.write_bytes(graph)
    (folder / WEIGHTS_FILE).unlink()
    with pytest.raises(ModelFolderError, match=r"model\.safetensors.*does not exist"):
        load_model(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"format": 99, "gallery_version": "9.0"}))
    with pytest.raises(ModelFolderError, match=r"format 99, written by gallery 9\.0.*upgrade gallery"):
        load_model(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelFolderError, match=r"config\.json is not a model config"):
        load_model(folder)

    _, _, _, folder = exported(tmp_path / "again", "mean")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(PhotoError, match=r"photo 1 of gallery 0 \(.*broken\.jpg\) cannot be used: .*damaged|not an image"):
        load_model(folder).embed([[galleries(0)[0][0], tmp_path / "broken.jpg"]])
    with pytest.raises(PhotoError, match="gallery 0 is one photo"):
        load_model(folder).embed(["a.jpg"])


def test_a_model_folder_serves_its_embeddings_without_a_run_store(tmp_path):
    from gallery.retrieval.embeddings import embeddings_table, write_embeddings
    from gallery.serve.service import service_from_model

    _, expected, _, folder = exported(tmp_path, "mean")
    code = load_model(folder).code  # the folder's copy: the embeddings file names where it is
    location = str(tmp_path / "embeddings.parquet")
    write_embeddings(location, embeddings_table(list("abcdef"), ["train"] * 6, expected.vectors, {"run_id": "run-7"}, code))
    service = service_from_model(str(folder), location, log=lambda line: None)
    photos = list(galleries(0)[2])  # the service stores and reads them back as training's shards did
    np.testing.assert_allclose(service.embed(photos), expected.vectors[2], atol=1e-6)
    top = service.search_vector(service.embed(photos), 1, ["float"])[0].hits[0]
    assert top.gallery_id == "c" and top.score == pytest.approx(1.0, abs=1e-5)
    other = str(tmp_path / "other.parquet")
    write_embeddings(other, embeddings_table(list("abcdef"), ["train"] * 6, expected.vectors, {"run_id": "run-8"}, code))
    with pytest.raises(ModelFolderError, match=r"other\.parquet was not made by the model in .*its run_id is 'run-8', "
                                               r"the model's 'run-7'.*two models, two spaces"):
        service_from_model(str(folder), other)
    kendall_file = str(tmp_path / "pseudo_uniform.parquet")  # the same run's other model: another space
    write_embeddings(kendall_file, embeddings_table(list("abcdef"), ["train"] * 6, expected.vectors,
                                                    {"run_id": "run-7", "weighting": "pseudo_uniform", "seed": 3}, code))
    with pytest.raises(ModelFolderError, match="its weighting is 'pseudo_uniform', the model's 'kendall'"):
        service_from_model(str(folder), kendall_file)
