"""Retrieval against relevance (gallery.evaluation.retrieval_suite): arms on the metric tasks' queries, by
float and binary search, and Pinterest's claims read from paired intervals; the report's section and numbers."""
import numpy as np
import pandas as pd
import pytest
import yaml

from gallery.config import Settings
from gallery.data.ingest import ingest
from gallery.evaluation.render import retrieval_frames, retrieval_headline, retrieval_markdown
from gallery.evaluation.report import relevance_metrics
from gallery.evaluation.arms import ATTRIBUTES_ONLY, IMAGENET_ARM, SPECIALISED, EmbeddingArm, mtl_arm
from gallery.evaluation.retrieval_suite import (BINARY, FLOAT, RetrievalArm, ground_truth, no_loss_reading,
                                               retrieval_suite)
from gallery.model.identity import ModelIdentity
from gallery.evaluation.statistics import CONSISTENT, NOISE, OPPOSITE, Effect
from gallery.retrieval.codes import fit_code

N = 300
PU = ModelIdentity("pseudo_uniform", "mean", 0, "efficientnet_lite0")
UNIFIED, ATTRIBUTES = mtl_arm(PU, PU), EmbeddingArm(ATTRIBUTES_ONLY, PU)
SAME, CO = (EmbeddingArm(SPECIALISED, PU, task=t) for t in ("same", "co"))


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    """300 galleries in 150 properties of two listings; pairs join property k with property k+1."""
    folder = tmp_path_factory.mktemp("retrieval")
    ids = [f"g{i:03d}" for i in range(N)]
    split = np.where(np.arange(N) % 5 == 0, "valid", np.where(np.arange(N) % 5 == 1, "test", "train"))
    pd.DataFrame({"gallery_id": ids, "split": split, "images": [[f"{i}.jpg"] for i in range(N)],
                  "pool": np.arange(N) % 2, "property": [f"p{i // 2}" for i in range(N)]}).to_parquet(folder / "m.parquet")
    a = np.arange(0, N - 2, 2)
    pd.DataFrame({"gallery_a": [ids[i] for i in a], "gallery_b": [ids[i + 2] for i in a]}).to_parquet(folder / "p.parquet")
    (folder / "t.yaml").write_text(yaml.safe_dump({"tasks": [
        {"name": "pool", "column": "pool", "kind": "binary"},
        {"name": "same", "column": "property", "kind": "identity"},
        {"name": "co", "kind": "pairs", "file": "p.parquet"}]}))
    return ingest(folder / "m.parquet", folder / "t.yaml")


def vectors(noise: float, seed: int) -> np.ndarray:
    """Listings of one property near their property's point, consecutive properties near each other."""
    rng = np.random.default_rng(seed)
    walk = np.cumsum(rng.normal(size=(N // 2, 32)), 0) * 0.3 + rng.normal(size=(N // 2, 32))
    return (np.repeat(walk, 2, 0) + noise * rng.normal(size=(N, 32))).astype(np.float32)


def arm(which, values, train):
    return RetrievalArm(which, values, fit_code(values[train], "itq16"))


def test_ground_truth_and_the_claims_on_known_embeddings(catalogue):
    ids = catalogue.frame["gallery_id"].tolist()
    truth = ground_truth(catalogue, ids)
    assert truth["same"][0].tolist() == [1] and truth["same"][7].tolist() == [6]
    assert truth["co"][2].tolist() == [0, 4]  # g002 co-viewed with g000 and g004, whatever their split
    train = catalogue.frame["split"].to_numpy() == "train"
    good, poor = vectors(0.05, 0), vectors(3.0, 0)
    arms = [arm(UNIFIED, good, train), arm(SAME, poor, train), arm(CO, poor, train), arm(IMAGENET_ARM, poor, train)]
    result = retrieval_suite(catalogue, ids, arms, rerank=N, code="itq16")
    assert result.queries == {"same": 120, "co": 60}  # valid and test galleries with something relevant (pairs join even rows only)
    unified = result.row(UNIFIED, "same", FLOAT).means
    assert unified["recall@1"] > 0.9 and result.row(IMAGENET_ARM, "same", FLOAT).means["recall@1"] < 0.5
    # re-ranking every candidate by cosine: the binary search is the float one
    assert result.row(UNIFIED, "co", BINARY).means == result.row(UNIFIED, "co", FLOAT).means
    claims = {(c.claim, c.task, c.metric, c.baseline): c for c in result.claims}
    beats = claims[("unified_beats_specialised", "same", "recall@10", SAME)]
    assert beats.effect.reading == CONSISTENT and beats.effect.low > 0 and beats.arm == UNIFIED
    assert ("unified_beats_specialised", "same", "recall@10", CO) not in claims  # its own task only
    assert ("unified_beats_imagenet", "same", "recall@10", IMAGENET_ARM) in claims
    assert claims[("binary_loses_nothing", "co", "mrr", UNIFIED)].effect.estimate == 0
    assert claims[("binary_loses_nothing", "co", "mrr", UNIFIED)].effect.reading == CONSISTENT
    # with the arms swapped, the reading turns
    swapped = [arm(UNIFIED, poor, train), arm(SAME, good, train)]
    turned = retrieval_suite(catalogue, ids, swapped, rerank=10, code="itq16")
    assert next(c for c in turned.claims if c.claim == "unified_beats_specialised").effect.reading == OPPOSITE


def test_no_loss_is_read_against_its_margin():
    assert no_loss_reading(Effect(-0.005, -0.015, 0.004)) == CONSISTENT
    assert no_loss_reading(Effect(-0.05, -0.08, -0.03)) == OPPOSITE
    assert no_loss_reading(Effect(-0.02, -0.05, 0.01)) == NOISE


def test_the_report_shows_every_arm_and_claim_and_keeps_per_query_values_out_of_metrics(catalogue):
    ids = catalogue.frame["gallery_id"].tolist()
    train = catalogue.frame["split"].to_numpy() == "train"
    arms = [arm(UNIFIED, vectors(0.5, 1), train), arm(ATTRIBUTES, vectors(1.0, 1), train)]
    result = retrieval_suite(catalogue, ids, arms, rerank=20, code="itq16")
    text = retrieval_markdown(result)
    assert "| attribute tasks only |" in text and "recall@100 binary" in text and "unified beats attributes only" in text
    assert "(MTL embeddings - attribute tasks only)" in text
    headline = retrieval_headline(result)  # no specialised arm here: the binarised claims only
    assert headline.startswith("**Retrieval** (recall@10") and headline.count("binarised loses nothing") == 2
    assert "specialised" not in headline
    means, claims = retrieval_frames(result)
    assert set(means["search"]) == {FLOAT, BINARY} and len(means) == 2 * 2 * 2 * 4  # arms x tasks x searches x metrics
    row = means[(means.arm == "MTL embeddings") & (means.task == "same") & (means.search == FLOAT) & (means.metric == "mrr")]
    assert row["mean"].item() == pytest.approx(result.row(UNIFIED, "same", FLOAT).scores.reciprocal_rank.mean())
    numbers = relevance_metrics(result)
    assert numbers["queries"] == {"same": 120, "co": 60} and len(numbers["rows"]) == 8
    assert all(set(r) == {"arm", "task", "search", "recall@1", "recall@10", "recall@100", "mrr"} for r in numbers["rows"])
    assert [EmbeddingArm.from_dict(a) for a in numbers["arms"]] == [UNIFIED, ATTRIBUTES]  # fields, with their labels
    assert [a["label"] for a in numbers["arms"]] == ["MTL embeddings", "attribute tasks only"]
    assert Settings().evaluation.retrieval_arms


def test_the_queries_are_capped_by_a_stable_sample_of_the_same_galleries_for_every_arm(catalogue):
    """evaluation.retrieval_queries caps each task's queries (the cost is then linear in the catalogue): a
    stable sample of the eligible ones by a hash of the id, the same for every arm and search, so the claims
    still pair; the default cap keeps every query of a catalogue this size."""
    from gallery.evaluation.relevance import QUERIES, queries, sample_rows

    ids = catalogue.frame["gallery_id"].tolist()
    train = catalogue.frame["split"].to_numpy() == "train"
    arms = [arm(UNIFIED, vectors(0.5, 2), train), arm(ATTRIBUTES, vectors(1.0, 2), train)]
    assert QUERIES == Settings().evaluation.retrieval_queries >= 2000
    capped = retrieval_suite(catalogue, ids, arms, rerank=20, code="itq16", max_queries=50)
    assert capped.queries == {"same": 50, "co": 50}
    eligible = queries(ground_truth(catalogue, ids)["same"], ~train)
    asked = capped.row(UNIFIED, "same", FLOAT).scores.query_rows
    np.testing.assert_array_equal(asked, sample_rows(eligible, ids, 50))
    assert all(np.array_equal(r.scores.query_rows, asked) for r in capped.rows if r.task == "same")
    assert {c.effect.n for c in capped.claims} == {50}
    again = retrieval_suite(catalogue, ids, arms[::-1], rerank=20, code="itq16", max_queries=50)
    np.testing.assert_array_equal(again.row(UNIFIED, "same", FLOAT).scores.query_rows, asked)
    assert retrieval_suite(catalogue, ids, arms, rerank=20, code="itq16").queries == {"same": 120, "co": 60}
