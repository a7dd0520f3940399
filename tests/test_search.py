"""Float and binary nearest-gallery search, recall and attribute agreement."""
import numpy as np
import pytest

from gallery.evaluation.neighbours import attribute_agreement, recall_at_k
from gallery.retrieval.embeddings import embeddings_table, write_embeddings
from gallery.retrieval.index import BinaryIndex, FloatIndex
from gallery.retrieval.search import SearchError, search_embeddings


def clustered(n_clusters=8, per=30, dim=64, seed=0):
    """Well-separated clusters around random sign patterns: an easy case for both searches."""
    rng = np.random.default_rng(seed)
    centres = rng.choice([-1.0, 1.0], size=(n_clusters, dim))
    x = np.repeat(centres, per, axis=0) + rng.normal(0, 0.15, (n_clusters * per, dim))
    return x.astype(np.float32), np.repeat(np.arange(n_clusters), per)


def test_binary_and_float_agree_on_an_easy_case():
    x, labels = clustered()
    queries = np.arange(0, len(x), 7)
    f = FloatIndex(x).search(x[queries], 30)
    b = BinaryIndex(x).search(x[queries], 30)
    for q, frow, brow, bdist in zip(queries, f.rows, b.rows, b.scores):
        assert set(labels[frow]) == {labels[q]} and set(labels[brow]) == {labels[q]}
        assert frow[0] == q and bdist[0] == 0 and q in brow[bdist == 0]  # Hamming ties within a cluster
    assert recall_at_k(x, queries, k=10) > 0.3  # within a tight cluster, both pick cluster members
    assert attribute_agreement(f.rows[:, 1:11], labels, queries) == 1.0


def test_attribute_agreement_by_hand():
    labels = np.array([0, 0, 1, -1, 1])
    found = np.array([[1, 2, 3], [0, 3, 4]])  # query 0: one of two labelled neighbours agrees; query 2: one of two
    assert attribute_agreement(found, labels, np.array([0, 2])) == pytest.approx(0.5)
    assert np.isnan(attribute_agreement(found, labels, np.array([3, 3])))  # unlabelled queries only


@pytest.fixture
def embeddings_file(tmp_path):
    x, _ = clustered()
    ids = [f"g{i}" for i in range(len(x))]
    location = str(tmp_path / "e.parquet")
    write_embeddings(location, embeddings_table(ids, ["train"] * len(ids), x, {"run_id": "123", "backbone": "b",
                                                                                "pooling": "mean", "weighting": "w"}))
    return location


@pytest.mark.parametrize("binary", [False, True])
def test_search_by_existing_gallery_returns_itself_first(embeddings_file, binary):
    hits = search_embeddings(embeddings_file, k=30, binary=binary, gallery_id="g37")
    assert len(hits) == 30 and hits[0][1] == (0.0 if binary else pytest.approx(1.0))
    best = [g for g, score in hits if score == hits[0][1]]
    assert hits[0][0] == "g37" if not binary else "g37" in best  # binary: a cluster's sign bits tie at distance 0
    assert {int(g[1:]) // 30 for g, _ in hits} == {1}  # the rest come from its own cluster


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
