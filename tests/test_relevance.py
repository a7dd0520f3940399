"""Retrieval against a ground truth of relevance: recall@k and reciprocal rank against a brute-force ranking
of each query (argsort of all other galleries), float and binary; relevant sets; paired comparisons."""
import numpy as np
import pytest

import gallery.evaluation.relevance as relevance
from gallery.evaluation.relevance import (compare_rankings, queries, ranking_scores, relevant_sets, sample_rows,
                                          summary)
from gallery.retrieval.codes import fit_code, sign_code

KS = (1, 10, 100)


def brute_force_ranking(vectors, query, code=None, rerank=0):
    """Every other row, best first: by cosine, or the `rerank` nearest by Hamming (bits unpacked) ordered by
    cosine then the rest by Hamming; ties to the lower row."""
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    others = np.delete(np.arange(len(vectors)), query)
    cosine = unit[others] @ unit[query]
    if code is None:
        return others[np.lexsort((others, -cosine))]
    bits = np.unpackbits(code.encode(vectors), axis=1)[:, :code.bits]
    hamming = (bits[others] != bits[query]).sum(axis=1)
    by_code = others[np.lexsort((others, hamming))]
    head = by_code[:rerank]
    head = head[np.lexsort((head, -(unit[head] @ unit[query])))]
    return np.concatenate([head, by_code[rerank:]])


def brute_force_scores(ranking, relevant):
    hits = np.isin(ranking, relevant)
    return {k: hits[:k].sum() / len(relevant) for k in KS}, 1 / (np.flatnonzero(hits)[0] + 1)


def random_case(n=400, dim=16, seed=0):
    """Vectors drawn near their group's centre (some galleries rank their own first), random pairs (some
    rank theirs far down)."""
    rng = np.random.default_rng(seed)
    groups = rng.integers(0, 80, n).astype(float)
    vectors = rng.standard_normal((80, dim))[groups.astype(int)] + rng.normal(0, 1.5, (n, dim))
    groups[rng.random(n) < 0.3] = np.nan
    pairs = rng.integers(0, n, (2, 150))
    return vectors, groups, (pairs[0], pairs[1]), rng.random(n) < 0.4  # the last: eligible queries


def assert_matches_brute_force(vectors, relevant, rows, code=None, rerank=0):
    scores = ranking_scores(vectors, rows, relevant, KS, code, rerank)
    expected = [brute_force_scores(brute_force_ranking(vectors, q, code, rerank), relevant[q]) for q in rows]
    np.testing.assert_array_equal(scores.query_rows, rows)
    for k in KS:
        np.testing.assert_allclose(scores.recall[k], [recall[k] for recall, _ in expected])
    np.testing.assert_allclose(scores.reciprocal_rank, [rr for _, rr in expected])
    return scores


def test_float_ranking_matches_brute_force_in_ragged_blocks(monkeypatch):
    monkeypatch.setattr(relevance, "BLOCK_CELLS", 400 * 7)  # 7 queries a block, the last one shorter
    vectors, groups, pairs, eligible = random_case()
    relevant = relevant_sets(len(vectors), groups, pairs)
    rows = queries(relevant, eligible)
    assert len(rows) % 7 and len(rows) > 50
    scores = assert_matches_brute_force(vectors, relevant, rows)
    assert (scores.reciprocal_rank < 1 / 100).any()  # a first relevant gallery beyond 100: the rank is not cut
    assert 0 < scores.recall[1].mean() < scores.recall[10].mean() < scores.recall[100].mean() < 1


@pytest.mark.parametrize("rerank", [0, 20, 399])
def test_code_ranking_matches_brute_force(monkeypatch, rerank):
    """8 bits: many Hamming ties, broken by row index; rerank 399 re-orders every other gallery by cosine."""
    monkeypatch.setattr(relevance, "BLOCK_CELLS", 400 * 16)
    vectors, groups, pairs, eligible = random_case(seed=1)
    code = fit_code(vectors[:300], "itq8")
    relevant = relevant_sets(len(vectors), groups, pairs)
    scores = assert_matches_brute_force(vectors, relevant, queries(relevant, eligible), code, rerank)
    if rerank == 399:
        float_scores = ranking_scores(vectors, scores.query_rows, relevant, KS)
        np.testing.assert_allclose(scores.reciprocal_rank, float_scores.reciprocal_rank)


CIRCLE = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])  # rows at 0, 90, 180 and 270 degrees


def test_four_galleries_on_a_circle():
    """Groups {0, 1} and {2, 3}. Query 2's neighbours 1 and 3 tie at cosine 0: the lower row, 1, ranks first,
    so its relevant 3 is second; query 0 ranks 1 (relevant), 3, then 2."""
    relevant = relevant_sets(4, ["x", "x", "y", "y"])
    scores = ranking_scores(CIRCLE, np.arange(4), relevant, ks=(1, 2, 3))
    assert scores.recall[1].tolist() == [1, 1, 0, 0] and scores.recall[2].tolist() == [1, 1, 1, 1]
    assert scores.reciprocal_rank.tolist() == [1, 1, 0.5, 0.5]
    assert summary(scores) == {"recall@1": 0.5, "recall@2": 1.0, "recall@3": 1.0, "mrr": 0.75}


@pytest.mark.parametrize("rerank,expected", [(0, 0.5), (1, 0.5), (2, 1.0), (3, 0.5)])
def test_code_ranking_on_the_circle(rerank, expected):
    """Sign bits: 0 -> 10, 1 -> 01, 2 and 3 -> 00. Query 0 is 1 bit from 2 and 3 (2 first, by row), 2 bits from
    1. Re-ranking the nearest 2 by cosine puts 3 (cosine 0) before 2 (cosine -1): relevant 3 moves to first.
    Re-ranking all 3: 1 and 3 tie at cosine 0 and the lower row goes first, not the nearer code: 1, 3, 2."""
    relevant = relevant_sets(4, pairs=(np.array([0]), np.array([3])))
    scores = ranking_scores(CIRCLE, np.array([0]), relevant, ks=(1,), code=sign_code(2), rerank=rerank)
    assert scores.reciprocal_rank.tolist() == [expected] and scores.recall[1].tolist() == [expected == 1.0]


def test_relevant_sets_from_groups_and_pairs():
    nan = float("nan")
    groups = ["a", None, "a", nan, "", "b", "c", "b", "a"]
    pairs = (np.array([0, 1, 3, 4, 1, 3]), np.array([1, 3, 1, 4, 3, 5]))  # 1-3 three times, 4-4 a self-pair
    relevant = relevant_sets(9, groups, pairs)
    assert [r.tolist() for r in relevant] == [[1, 2, 8], [0, 3], [0, 8], [1, 5], [], [3, 7], [], [5], [0, 2]]
    assert [r.tolist() for r in relevant_sets(9, groups)] == [[2, 8], [], [0, 8], [], [], [7], [], [5], [0, 2]]
    assert [r.tolist() for r in relevant_sets(9, pairs=pairs)][:6] == [[1], [0, 3], [], [1, 5], [], [3]]
    # the self-paired row 4, the ungrouped rows and the singleton group "c" have nothing: no query
    assert queries(relevant_sets(9, groups), np.ones(9, bool)).tolist() == [0, 2, 5, 7, 8]
    assert queries(relevant, np.arange(9) >= 4).tolist() == [5, 7, 8]


def test_relevant_sets_match_their_definition():
    vectors, groups, pairs, _ = random_case(n=120)
    relevant = relevant_sets(len(vectors), groups, pairs)
    linked = set(zip(*pairs)) | set(zip(pairs[1], pairs[0]))
    for i in range(len(vectors)):
        expected = [j for j in range(len(vectors)) if j != i and (groups[i] == groups[j] or (i, j) in linked)]
        assert relevant[i].tolist() == expected  # NaN == NaN is False: no group


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="outside"):
        relevant_sets(3, pairs=(np.array([0]), np.array([3])))
    with pytest.raises(ValueError, match="groups for"):
        relevant_sets(3, ["a", "a"])
    relevant = relevant_sets(3, ["a", "a", None])
    with pytest.raises(ValueError, match="cannot query"):
        ranking_scores(np.eye(3), np.array([2]), relevant)
    scores = ranking_scores(np.eye(3), np.array([0]), relevant)
    with pytest.raises(ValueError, match="no metric 'recall@5'"):
        scores.values("recall@5")


def test_compare_rankings():
    rng = np.random.default_rng(3)
    groups = rng.integers(0, 40, 300)
    centres = rng.standard_normal((40, 16))
    informative = centres[groups] + rng.normal(0, 0.8, (300, 16))
    relevant = relevant_sets(300, groups)
    rows = queries(relevant, np.ones(300, bool))
    good = ranking_scores(informative, rows, relevant)
    noise = ranking_scores(rng.standard_normal((300, 16)), rows, relevant)
    same = compare_rankings(good, good, "mrr")
    assert (same.estimate, same.low, same.high) == (0, 0, 0)
    better = compare_rankings(good, noise, "recall@10", seed=1)
    assert better.low > 0 and better.estimate == pytest.approx(summary(good)["recall@10"] - summary(noise)["recall@10"])
    with pytest.raises(ValueError, match="same query rows"):
        compare_rankings(good, ranking_scores(informative, rows[1:], relevant), "mrr")


def tied_case(n=300, seed=4):
    """Vectors of +-1 in 16 dimensions, a third of them copies of others: unit entries +-1/4, so every
    cosine is a multiple of 1/16 computed exactly in any order, and ties are ties in the brute force too
    (17 values: many ties; with a sign code, Hamming ties); groups of 2 to 60 rows, so some queries find
    their first relevant gallery deep, past max(k), where its rank is counted rather than sorted."""
    rng = np.random.default_rng(seed)
    vectors = rng.choice([-1.0, 1.0], (n, 16))
    copies = rng.random(n) < 0.33
    vectors[copies] = vectors[rng.integers(0, n, copies.sum())]
    groups = np.concatenate([np.full(60, 0), np.repeat(np.arange(1, 121), 2)])[:n].astype(float)
    groups[rng.random(n) < 0.2] = np.nan
    return vectors, relevant_sets(n, rng.permutation(groups))


@pytest.mark.parametrize("ks,rerank", [((1, 2, 5), 0), ((1, 10, 100), 0), ((1, 3), 7), ((1, 10), 40), ((1, 500), 299)])
@pytest.mark.parametrize("search", ["float", "code"])
def test_counted_ranks_equal_the_argsort_ranks_with_ties(monkeypatch, ks, rerank, search):
    """Each query ranks by counting the galleries ahead of its relevant ones, sorting only the first max(k)
    (or `rerank`) places: the same recall@k and reciprocal rank as the full argsort ranking (ties to the
    lower row), on data full of ties, in ragged blocks."""
    monkeypatch.setattr(relevance, "BLOCK_CELLS", 300 * 7)
    vectors, relevant = tied_case()
    code = fit_code(vectors, "sign") if search == "code" else None
    rows = queries(relevant, np.ones(len(vectors), bool))
    scores = ranking_scores(vectors, rows, relevant, ks, code, rerank)
    expected = []
    for q in rows:
        ranking = brute_force_ranking(vectors, q, code, rerank)
        hits = np.isin(ranking, relevant[q])
        expected.append(([hits[:k].sum() / len(relevant[q]) for k in ks], 1 / (np.flatnonzero(hits)[0] + 1)))
    for i, k in enumerate(ks):
        np.testing.assert_allclose(scores.recall[k], [recall[i] for recall, _ in expected])
    np.testing.assert_allclose(scores.reciprocal_rank, [rr for _, rr in expected])
    assert (scores.reciprocal_rank < 1 / max(ks)).any() or max(ks) > 100  # some first relevant ranks were counted


def test_the_query_cap_is_a_stable_sample_of_the_gallery_ids():
    ids = [f"listing-{i}" for i in range(1000)]
    rows = np.flatnonzero(np.arange(1000) % 3 == 0)
    np.testing.assert_array_equal(sample_rows(rows, ids, 400), rows)  # no more than the cap: all of them
    np.testing.assert_array_equal(sample_rows(rows, ids, None), rows)
    some = sample_rows(rows, ids, 50)
    assert len(some) == 50 and set(some) <= set(rows) and (np.diff(some) > 0).all()
    np.testing.assert_array_equal(sample_rows(rows, ids, 50), some)  # the same every time
    assert set(some) <= set(sample_rows(rows, ids, 80))  # a larger cap keeps them
    reordered = ids[::-1]  # the same galleries listed in another order: the same ids are sampled
    picked = sample_rows(np.array(sorted(999 - rows)), reordered, 50)
    assert {reordered[r] for r in picked} == {ids[r] for r in some}
    assert {ids[r] for r in sample_rows(rows, ids, 50, purpose="other")} != {ids[r] for r in some}
