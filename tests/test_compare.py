"""`gallery compare`'s computations on hand-made sides: neighbour overlap against a brute-force count, label
agreement against known labels, the intersection of galleries, the decision rule, and its files."""
import json

import numpy as np
import pytest

from gallery.compare.comparison import KEEP, NO_CLEAR_DIFFERENCE, REPLACE, Paired, RetrievalRow, compare, verdict
from gallery.compare.render import write_comparison
from gallery.compare.sides import CompareError, Side
from gallery.data.tasks import Task
from gallery.evaluation.statistics import Effect


def brute_top_k(x: np.ndarray, k: int) -> list[set]:
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    return [set(np.argsort(-row, kind="stable")[:k]) for row in similarity]


def make_side(ids, vectors, labels=None, splits=None, **measured) -> Side:
    tasks = [Task("colour", "colour", "multiclass", classes=("a", "b", "c"))] if labels is not None else []
    ids = list(ids)
    return Side("here", None, None, "file.parquet", ids, splits or ["test"] * len(ids), np.asarray(vectors, np.float32),
                8, labels={"colour": labels} if labels is not None else {}, label_tasks=tasks, **measured)


def test_a_side_against_itself_keeps_every_neighbour_and_changes_nothing():
    x = np.random.default_rng(0).normal(size=(60, 16))
    c = compare(make_side(range(60), x), make_side(range(60), x))
    assert c.common == 60 and c.only_a == c.only_b == 0
    assert c.notes == ["No transfer scores to pair: a side is a model folder (its run's report holds them)"]
    assert c.stability.mean_overlap.estimate == 1.0 and c.stability.unchanged == 1.0
    assert c.stability.histogram == [0] * 10 + [60] and c.stability.most_changed == []
    assert c.verdict == NO_CLEAR_DIFFERENCE


def test_overlap_matches_a_brute_force_count_and_names_the_most_changed_galleries():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(80, 12))
    b = a.copy()
    moved = [3, 17, 42]
    b[moved] = rng.normal(size=(3, 12)) * 5
    ids = [f"g{i}" for i in range(80)]
    c = compare(make_side(ids, a), make_side(ids, b), k=5)
    top_a, top_b = brute_top_k(a, 5), brute_top_k(b, 5)
    expected = np.array([len(x & y) / 5 for x, y in zip(top_a, top_b)])
    np.testing.assert_allclose(c.overlap, expected)
    assert c.stability.mean_overlap.estimate == pytest.approx(expected.mean())
    assert sum(c.stability.histogram) == 80
    assert {f"g{i}" for i in moved} <= {g for g, _ in c.stability.most_changed}


def test_only_the_common_galleries_are_compared_and_none_in_common_is_an_error():
    x = np.random.default_rng(2).normal(size=(30, 8))
    c = compare(make_side(range(30), x), make_side(range(10, 40), np.vstack([x[10:], x[:10]])))
    assert (c.common, c.only_a, c.only_b) == (20, 10, 10)
    assert "compared on the 20 both hold (10 only in A, 10 only in B)" in c.notes[0]
    assert c.stability.mean_overlap.estimate == 1.0  # the same vectors for the 20 common galleries
    with pytest.raises(CompareError, match="share 0 galleries"):
        compare(make_side(["a", "b"], x[:2]), make_side(["c", "d"], x[:2]))


def test_label_agreement_is_the_share_of_neighbours_with_the_gallerys_label():
    rng = np.random.default_rng(3)
    labels = np.repeat([0.0, 1.0, 2.0], 20)
    clustered = np.eye(3)[labels.astype(int)] * 10 + rng.normal(size=(60, 3)) * 0.01  # neighbours share the label
    noise = rng.normal(size=(60, 3))
    c = compare(make_side(range(60), noise, labels), make_side(range(60), clustered, labels), k=5)
    row = c.agreement[0].shares
    top_a = brute_top_k(noise, 5)
    expected_a = np.mean([np.mean(labels[list(n)] == labels[i]) for i, n in enumerate(top_a)])
    assert row.value_b == 1.0 and row.value_a == pytest.approx(expected_a)
    assert row.reading == "B better"


def effect(estimate, low, high):
    return Effect(estimate, low, high)


def recall(low, high):
    return RetrievalRow("same_item", "float", "recall@10", Paired(50, 0.5, 0.5, effect((low + high) / 2, low, high), ""))


def test_the_decision_rule():
    assert verdict(effect(-0.10, -0.15, -0.05), [])[0] == REPLACE                         # fewer errors
    assert verdict(effect(-0.10, -0.15, -0.05), [recall(-0.05, 0.01)])[0] == KEEP          # but recall may drop 0.05
    assert verdict(effect(0.0, -0.01, 0.015), [recall(-0.01, 0.01)])[0] == NO_CLEAR_DIFFERENCE
    assert verdict(effect(0.05, 0.01, 0.09), [recall(0.01, 0.05)])[0] == KEEP             # more transfer errors
    assert verdict(effect(0.0, -0.01, 0.01), [recall(0.01, 0.05)])[0] == REPLACE          # better retrieval
    assert verdict(None, [])[0] == NO_CLEAR_DIFFERENCE


def test_the_files_hold_every_number_and_each_gallerys_overlap(tmp_path):
    x = np.random.default_rng(4).normal(size=(40, 8))
    c = compare(make_side(range(40), x), make_side(range(40), x[::-1].copy()))
    written = write_comparison(c, str(tmp_path))
    assert set(written) == {"compare.md", "compare.json", "neighbour_overlap.csv", "neighbour_overlap.png"}
    data = json.loads((tmp_path / "compare.json").read_text())
    assert data["verdict"] == c.verdict and data["stability"]["histogram"] == c.stability.histogram
    text = (tmp_path / "compare.md").read_text()
    assert f"## Verdict: **{c.verdict}**" in text and "No transfer scores to pair" in text
    assert len((tmp_path / "neighbour_overlap.csv").read_text().splitlines()) == 41


def test_scores_pair_by_gallery_whatever_order_each_run_lists_them_in():
    """Transfer and test scores of two runs listed in different orders, with known changes: every row's
    values and differences against a computation by hand, and a gallery scored in one run only left out."""
    from gallery.evaluation.arms import IMAGENET_ARM, mtl_arm
    from gallery.evaluation.transfer import HeldOutTask, ProbeScores, TransferResult
    from gallery.model.identity import ModelIdentity
    from gallery.training.engine import GalleryScores

    rng = np.random.default_rng(5)
    ids = [f"g{i}" for i in range(50)]
    right_a = rng.integers(0, 2, 50).astype(float)
    right_b = right_a.copy()
    right_b[:10] = 1 - right_b[:10]                    # ten galleries change, in both directions
    sq_a, sq_b = rng.random(50) * 4, rng.random(50) * 4
    order = rng.permutation(50)                         # B lists its galleries in another order

    def transfer(seed, right, sq, listed):
        arm = mtl_arm(ModelIdentity("kendall", "mean", seed, "lite0"), ModelIdentity("kendall", "mean", seed, "lite0"))
        kept = [i for i in listed if i != 49] if seed else list(listed)   # B did not score g49
        scores = [ProbeScores("stars", "linear", arm, [ids[i] for i in kept], right[kept]),
                  ProbeScores("age", "knn", arm, [ids[i] for i in kept], sq[kept])]
        tasks = [HeldOutTask("stars", "multiclass", "accuracy", 100, 50), HeldOutTask("age", "regression", "MSE", 100, 50)]
        return TransferResult(tasks, [arm, IMAGENET_ARM], scores, [])

    def test(right, sq, listed):
        return GalleryScores("test", [ids[i] for i in listed], ["colour", "price"], np.stack([right, sq], 1)[listed])

    a = make_side(ids, rng.normal(size=(50, 4)), transfer=transfer(0, right_a, sq_a, range(50)),
                  test=test(right_a, sq_a, range(50)), task_kinds={"colour": "multiclass", "price": "regression"})
    b = make_side([ids[i] for i in order], rng.normal(size=(50, 4)), transfer=transfer(1, right_b, sq_b, order),
                  test=test(right_b, sq_b, order), task_kinds={"colour": "multiclass", "price": "regression"})
    c = compare(a, b)
    stars, age = c.transfer
    common = np.arange(49)                              # g49: scored by A only
    assert (stars.task, stars.scores.n, age.scores.n) == ("stars", 49, 49)
    assert stars.scores.value_a == pytest.approx(right_a[common].mean())
    assert stars.scores.value_b == pytest.approx(right_b[common].mean())
    assert stars.scores.difference.estimate == pytest.approx(right_b[common].mean() - right_a[common].mean())
    assert age.scores.difference.estimate == pytest.approx(sq_b[common].mean() - sq_a[common].mean())
    errors = {r.task: r.errors for r in c.task_errors}
    assert errors["colour"].value_a == pytest.approx(1 - right_a.mean())
    assert errors["colour"].difference.estimate == pytest.approx(right_a.mean() - right_b.mean())
    assert errors["price"].difference.estimate == pytest.approx(sq_b.mean() - sq_a.mean())
    expected = np.exp(np.mean([np.log((1 - right_b[common].mean()) / (1 - right_a[common].mean())),
                               np.log(sq_b[common].mean() / sq_a[common].mean())])) - 1
    assert c.transfer_error_change.estimate == pytest.approx(expected)


def test_galleries_in_other_splits_are_said():
    x = np.random.default_rng(6).normal(size=(20, 4))
    c = compare(make_side(range(20), x), make_side(range(20), x, splits=["train"] * 5 + ["test"] * 15))
    assert any(n.startswith("5 common galleries are in different splits in A and B") for n in c.notes)


def test_sampled_queries_get_the_neighbours_and_overlap_that_every_query_gets(monkeypatch):
    """neighbour_change on a sample of query rows (the stable sample that caps its cost, linear in the
    catalogue) gives those rows' lines of the full computation, in blocks of queries too."""
    import gallery.compare.neighbours as neighbours
    from gallery.evaluation.relevance import sample_rows

    rng = np.random.default_rng(3)
    a = rng.normal(size=(200, 12))
    b = a + rng.normal(scale=0.5, size=a.shape)
    full = neighbours.neighbour_change(a, b, k=5)
    np.testing.assert_array_equal(full.queries, np.arange(200))
    monkeypatch.setattr(neighbours, "QUERY_BLOCK", 7)
    rows = sample_rows(np.arange(200), [f"g{i}" for i in range(200)], 30)
    some = neighbours.neighbour_change(a, b, k=5, queries=rows)
    assert len(rows) == 30 and some.k == 5
    np.testing.assert_array_equal(some.queries, rows)
    np.testing.assert_array_equal(some.a, full.a[rows])
    np.testing.assert_array_equal(some.b, full.b[rows])
    np.testing.assert_array_equal(some.overlap, full.overlap[rows])
    top_a = brute_top_k(a, 5)
    assert [set(r) for r in some.a] == [top_a[r] for r in rows]
