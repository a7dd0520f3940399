"""Binary codes: fitted on the train split, saved with the run, and binarizing identically everywhere."""
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import pytest
from conftest import REPO, run_flow

from gallery.retrieval.codes import CodeError, code_bits, fit_code, load_code, save_code, sign_code
from gallery.retrieval.embeddings import code_matrix, embedding_matrix, embeddings_code, read_embeddings
from gallery.retrieval.index import normalize, one_faiss_thread
from gallery.retrieval.search import FileIndex


def relu_embeddings(n=1500, dim=96, seed=0):
    """Non-negative, correlated vectors like a mean of ReLU6 outputs (many exact zeros)."""
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((n, 12)) @ rng.standard_normal((12, dim))
    return np.clip(latent + rng.normal(0, 0.5, (n, dim)), 0, 6).astype(np.float32)


def test_sign_code_is_the_old_sign_bits():
    bits = sign_code(9).encode(np.array([[0.5, -1.0, 0.0, 2.0, -0.1, 0.3, 0.3, -3.0, 1.0]]))
    assert bits.tolist() == [[0b10010110, 0b10000000]]  # bit = value > 0, most significant first


def test_itq_code_projects_as_faiss_itq():
    """Our float64 projection is faiss's ITQTransform (fitted the same way on the same rows), to rounding."""
    x = relu_embeddings()
    code = fit_code(x, "itq32")
    reference = faiss.ITQTransform(x.shape[1], 32, True)
    with one_faiss_thread():  # with more threads faiss fits another rotation (also a valid one)
        reference.train(normalize(x))
    np.testing.assert_allclose(code.project(x), reference.apply(normalize(x)), atol=2e-5)
    assert code.bits == 32 and code.bytes_per_gallery == 4


@pytest.mark.parametrize("name", ["median", "itq32"])
def test_thresholds_split_the_train_rows_in_half(name):
    x = relu_embeddings() + 0.01  # no ties at a median (a mostly-zero channel's bit is "fired", below half)
    ones = np.unpackbits(fit_code(x, name).encode(x), axis=1).sum(axis=0)
    assert np.all(np.abs(ones - len(x) / 2) <= 1)


def test_a_row_alone_gets_the_bits_it_gets_in_a_batch():
    """faiss's float32 projection of one row can differ in the last digit from the same row in a batch
    (measured: a flipped bit in 123 of 2,000 default-run galleries); the code's float64 projection and
    thresholds between train values must not flip any."""
    x = relu_embeddings(n=3000)
    code = fit_code(x[:2000], "itq64")
    batch = code.encode(x)
    alone = np.concatenate([code.encode(row) for row in x])
    assert (alone == batch).all()


def test_saved_code_loads_and_encodes_the_same(tmp_path):
    x = relu_embeddings()
    code = save_code(fit_code(x, "itq16"), str(tmp_path / "code.npz"))
    loaded = load_code(str(tmp_path / "code.npz"))
    assert loaded.name == "itq16" and loaded.location == str(tmp_path / "code.npz")
    assert (loaded.encode(x) == code.encode(x)).all()
    assert loaded.metadata() == {"code": "itq16", "code_bits": 16, "code_location": str(tmp_path / "code.npz")}


def test_bad_codes_say_what_to_use(tmp_path):
    for name in ("itq0", "itq97", "pq8", "ITQ256,LSHt"):
        with pytest.raises(CodeError, match="retrieval.code"):
            code_bits(name, 96)
    with pytest.raises(CodeError, match="needs at least 64 train galleries.*has 40"):
        fit_code(relu_embeddings(n=40), "itq64")
    with pytest.raises(CodeError, match="does not exist"):
        load_code(str(tmp_path / "missing.npz"))


@pytest.mark.flow
def test_the_run_code_reproduces_the_exported_bits(smoke_run):
    """The export fitted the preset's code on its train split, saved it, and named it in the metadata."""
    end = smoke_run["end"].task.data
    table, meta = read_embeddings(end.embeddings_location)
    floats, bits = embedding_matrix(table), code_matrix(table)
    assert meta["code"] == "itq64" and meta["code_bits"] == "64" and bits.shape == (200, 8)
    code = load_code(meta["code_location"])
    assert (code.encode(floats) == bits).all()
    train = np.array(table["split"].to_pylist()) == "train"
    refitted = fit_code(floats[train], "itq64")
    np.testing.assert_allclose(refitted.projection, code.projection)
    np.testing.assert_allclose(refitted.thresholds, code.thresholds)


@pytest.mark.flow
def test_search_binarizes_a_query_as_the_export_did(smoke_run):
    location = smoke_run["end"].task.data.embeddings_location
    table, _ = read_embeddings(location)
    index = FileIndex(location, binary=True, log=lambda _: None)
    stored = code_matrix(table)
    for row, vector in enumerate(embedding_matrix(table)):
        assert (index.encode_query(vector) == stored[row]).all(), row


def test_embed_flow_binarizes_with_the_training_runs_code(smoke_run, tmp_path):
    start = smoke_run["start"].task.data
    manifest = pd.read_parquet(start.manifest_location).iloc[:24]
    subset = tmp_path / "subset.parquet"
    folder = Path(start.manifest_location).parent
    manifest[["gallery_id", "images"]].assign(images=lambda d: d["images"].map(lambda imgs: [str(folder / i) for i in imgs])
                                              ).to_parquet(subset)
    status, run, stderr = run_flow(flow=str(REPO / "flows" / "embed_flow.py"), config=None, manifest=str(subset),
                                   train_run=smoke_run.id)
    assert status == "successful", stderr[-3000:]
    ours = run["end"].task.data.embeddings_location
    theirs = smoke_run["end"].task.data.embeddings_location
    assert embeddings_code(ours).location == embeddings_code(theirs).location  # the run's code, not a new fit
    table, _ = read_embeddings(ours)
    assert (embeddings_code(theirs).encode(embedding_matrix(table)) == code_matrix(table)).all()
