"""Float, code and two-stage nearest-gallery search; indexes chosen by size and saved beside the embeddings."""
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from gallery.config import RetrievalSettings
from gallery.evaluation.neighbours import attribute_agreement, recall_at_k
from gallery.retrieval.codes import code_location, fit_code, save_code
from gallery.retrieval.embeddings import embeddings_table, write_embeddings
from gallery.retrieval.index import CodeIndex, FloatIndex, normalize
from gallery.retrieval.search import SearchError, search_embeddings

APPROXIMATE = RetrievalSettings(approximate_above=10)  # HNSW and IVF even for a few hundred galleries


def clustered(n_clusters=8, per=30, dim=64, seed=0, spread=0.15):
    """Clusters around random sign patterns: well separated at a small spread."""
    rng = np.random.default_rng(seed)
    centres = rng.choice([-1.0, 1.0], size=(n_clusters, dim))
    x = np.repeat(centres, per, axis=0) + rng.normal(0, spread, (n_clusters * per, dim))
    return x.astype(np.float32), np.repeat(np.arange(n_clusters), per)


def exact_cosine_top(x, queries, k):
    """Independent of faiss: numpy cosine similarities, best first."""
    similarity = normalize(queries) @ normalize(x).T
    return np.argsort(-similarity, axis=1, kind="stable")[:, :k], -np.sort(-similarity, axis=1)[:, :k]


def test_code_and_float_search_find_the_cluster():
    x, labels = clustered()
    code = fit_code(x, "itq32")
    queries = np.arange(0, len(x), 7)
    found = {"float": FloatIndex(x).search(x[queries], 30).rows,
             "hamming": CodeIndex(code.encode(x)).search(code.encode(x[queries]), 30).rows}
    for rows in found.values():
        assert all(set(labels[r]) == {labels[q]} for q, r in zip(queries, rows))
        assert attribute_agreement(rows, labels, queries) == 1.0


def test_two_stage_search_orders_candidates_by_exact_cosine():
    x, _ = clustered(spread=1.0)
    code = fit_code(x, "itq16")
    codes, queries = code.encode(x), np.arange(0, len(x), 11)
    everything = CodeIndex(codes, RetrievalSettings(rerank=len(x)), vectors=normalize(x))
    hits = everything.search(codes[queries], 10, x[queries])
    rows, scores = exact_cosine_top(x, x[queries], 10)
    assert (hits.rows == rows).all()
    np.testing.assert_allclose(hits.scores, scores, atol=1e-5)
    hamming = CodeIndex(codes, RetrievalSettings(rerank=0), vectors=normalize(x)).search(codes[queries], 10, x[queries])
    popcount = np.unpackbits(codes[queries][:, None] ^ codes[None], axis=2).sum(axis=2)
    assert (np.take_along_axis(popcount, hamming.rows, 1) == hamming.scores).all()
    assert (np.diff(hamming.scores, axis=1) >= 0).all() and (hamming.scores[:, -1] <= np.sort(popcount)[:, 10]).all()


def test_approximate_indexes_keep_the_exact_neighbours():
    x, _ = clustered(n_clusters=20, per=100, spread=0.6)
    queries = np.arange(0, len(x), 13)
    exact, _ = exact_cosine_top(x, x[queries], 10)
    hnsw = FloatIndex(x, APPROXIMATE)
    assert type(hnsw.index).__name__ == "IndexHNSWFlat" and type(FloatIndex(x).index).__name__ == "IndexFlatIP"
    assert recall_at_k(exact, hnsw.search(x[queries], 10).rows) > 0.95
    codes = fit_code(x, "itq64").encode(x)
    ivf = CodeIndex(codes, APPROXIMATE)
    assert type(ivf.index).__name__ == "IndexBinaryIVF" and ivf.index.nlist == len(x) // 64
    flat = CodeIndex(codes).search(codes[queries], 10)
    found = ivf.search(codes[queries], 10)
    assert np.mean([np.isin(a, b).mean() for a, b in zip(flat.scores, found.scores)]) > 0.9  # distances, ties aside


def test_attribute_agreement_by_hand():
    labels = np.array([0, 0, 1, -1, 1])
    found = np.array([[1, 2, 3], [0, 3, 4]])  # query 0: one of two labelled neighbours agrees; query 2: one of two
    assert attribute_agreement(found, labels, np.array([0, 2])) == pytest.approx(0.5)
    assert np.isnan(attribute_agreement(found, labels, np.array([3, 3])))  # unlabelled queries only


def write_file(location, x, run_id="123"):
    ids = [f"g{i}" for i in range(len(x))]
    code = save_code(fit_code(x, "itq32"), code_location(location))
    write_embeddings(location, embeddings_table(ids, ["train"] * len(ids), x, {"run_id": run_id, "backbone": "b",
                                                                                "pooling": "mean", "weighting": "w"}, code))


@pytest.fixture
def embeddings_file(tmp_path):
    location = str(tmp_path / "e.parquet")
    write_file(location, clustered()[0])
    return location


@pytest.mark.parametrize("settings", [RetrievalSettings(), APPROXIMATE], ids=["exact", "approximate"])
@pytest.mark.parametrize("binary", [False, True])
def test_search_by_existing_gallery_returns_itself_first(embeddings_file, binary, settings):
    hits = search_embeddings(embeddings_file, k=30, binary=binary, gallery_id="g37", settings=settings, log=lambda _: None)
    assert len(hits) == 30 and hits[0][0] == "g37" and hits[0][1] == pytest.approx(1.0, abs=1e-3)
    assert {int(g[1:]) // 30 for g, _ in hits} == {1}  # the rest come from its own cluster


def test_saved_index_is_reused_and_rebuilt_when_the_embeddings_change(tmp_path):
    location = str(tmp_path / "e.parquet")
    first, labels = clustered()
    write_file(location, first)
    saved = [f"{location}.{name}" for name in ("float-hnsw.faiss", "codes-ivf.faiss", "rerank-float16.npy")]

    def search(binary):  # the 30 nearest of g3: its cluster
        built = []
        hits = search_embeddings(location, k=30, binary=binary, gallery_id="g3", settings=APPROXIMATE, log=built.append)
        return {g for g, _ in hits}, built

    assert all(len(search(binary)[1]) for binary in (False, True))  # built and saved on first use
    stamps = {path: os.stat(path).st_mtime_ns for path in saved}
    for binary in (False, True):
        again, built = search(binary)
        assert built == [] and again == {f"g{r}" for r in np.flatnonzero(labels == labels[3])}
    assert stamps == {path: os.stat(path).st_mtime_ns for path in saved}  # reused, not rewritten

    order = np.random.default_rng(1).permutation(len(first))  # the same vectors under other ids
    write_file(location, first[order])
    for binary in (False, True):
        found, built = search(binary)
        assert len(built) and found == {f"g{r}" for r in np.flatnonzero(labels[order] == labels[order][3])}
    assert all(os.stat(path).st_mtime_ns != stamps[path] for path in saved)


def test_search_errors(embeddings_file, tmp_path):
    with pytest.raises(SearchError, match="does not exist"):
        search_embeddings(str(tmp_path / "none.parquet"), gallery_id="g1")
    with pytest.raises(SearchError, match="gallery 'nope' is not in"):
        search_embeddings(embeddings_file, gallery_id="nope")
    with pytest.raises(SearchError, match="not both"):
        search_embeddings(embeddings_file, gallery_id="g1", images=["a.jpg"])


def test_unknown_run():
    from gallery.runs import RunNotFound, trained_run

    with pytest.raises(RunNotFound, match="no GalleryTrainFlow run '999' in this Metaflow datastore"):
        trained_run("999")


def test_fingerprint_sees_a_change_the_parquet_footer_does_not(tmp_path):
    """Same ids, bits, sizes and min/max statistics; one float differs: only the sampled data blocks tell."""
    from gallery.retrieval.saved import fingerprint

    x, _ = clustered()
    y = x.copy()
    y[100, 5] = np.nextafter(y[100, 5], np.float32(0))  # one last-digit change, not an extreme
    ids = [f"g{i}" for i in range(len(x))]
    for name, vectors in (("a", x), ("b", y)):
        write_embeddings(str(tmp_path / f"{name}.parquet"), embeddings_table(ids, ["train"] * len(ids), vectors, {}))
    footers = [pq.read_metadata(tmp_path / f"{name}.parquet").to_dict() for name in "ab"]
    assert footers[0] == footers[1]
    assert fingerprint(str(tmp_path / "a.parquet")) != fingerprint(str(tmp_path / "b.parquet"))
