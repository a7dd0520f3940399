"""Attention poolings (gated attention, PMA) over packed galleries: a softmax per gallery, invariant to
photo order, blind to the other galleries of the batch, with per-photo weights that are exported."""
from dataclasses import replace

import jsonschema
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from gallery.config import DataSettings, ModelSettings, RetrievalSettings, Settings
from gallery.data.contracts import load_schema
from gallery.data.ingest import ingest
from gallery.data.packed import PackedGalleries
from gallery.model.gallery_model import GalleryEncoder, build_model
from gallery.model.pooling import GatedAttentionPool, PMAPool, build_pooling, segment_softmax
from gallery.evaluation.retrieval_examples import retrieval_examples, retrieval_figure
from gallery.retrieval.embeddings import embedding_matrix, photo_weights_of, read_embeddings
from gallery.steps import export_embeddings, preprocess_shard, shard_rows, shard_source

ATTENTION = ["gated_attention", "pma"]
DIM = 24
LENGTHS = [3, 7, 1, 5, 2]  # galleries of different lengths, one of a single photo


def packed_vectors(lengths=LENGTHS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return PackedGalleries.from_arrays([f"g{i}" for i in range(len(lengths))],
                                       [torch.randn(n, DIM, generator=g) for n in lengths])


def pooling(name, seed=0):
    torch.manual_seed(seed)
    return build_pooling(name, DIM).eval()


def test_segment_softmax_is_a_softmax_per_gallery():
    scores = torch.tensor([[1.0, 0.0], [2.0, 5.0], [-1.0, 3.0], [0.5, 0.5]])
    index = torch.tensor([1, 0, 1, 1])
    got = segment_softmax(scores, index, 3)
    torch.testing.assert_close(got[1], torch.ones(2))  # alone in gallery 0
    torch.testing.assert_close(got[[0, 2, 3]], torch.softmax(scores[[0, 2, 3]], dim=0))
    big = segment_softmax(torch.tensor([1000.0, 999.0]), torch.tensor([0, 0]), 1)  # no overflow
    torch.testing.assert_close(big, torch.softmax(torch.tensor([1000.0, 999.0]), 0))


def test_gated_attention_matches_its_formula():
    """Ilse et al.'s gated attention, computed here gallery by gallery with plain tensor operations."""
    pool = pooling("gated_attention")
    store = packed_vectors()
    x, index = store.gather(range(len(LENGTHS)))
    with torch.no_grad():
        z, w = pool.pool_with_weights(x, index, len(LENGTHS))
        V, U = pool.gates.weight[:pool.hidden], pool.gates.weight[pool.hidden:]
        bV, bU = pool.gates.bias[:pool.hidden], pool.gates.bias[pool.hidden:]
        for i, n in enumerate(LENGTHS):
            h = store.data[store.offsets[i]:store.offsets[i + 1]]
            a = torch.softmax((torch.tanh(h @ V.T + bV) * torch.sigmoid(h @ U.T + bU)) @ pool.score.weight[0]
                              + pool.score.bias, dim=0)
            torch.testing.assert_close(w[index == i], a)
            torch.testing.assert_close(z[i], a @ h)


def test_pma_matches_multi_head_attention_of_its_seeds():
    """PMA = torch's own multi-head attention of the k seeds over one gallery's photos, then the MAB's
    norms and feed-forward and the final Linear: computed gallery by gallery, no segments."""
    pool = pooling("pma")
    k, h, width = pool.seeds, pool.heads, pool.width
    mha = torch.nn.MultiheadAttention(width, h, bias=True, batch_first=True, kdim=DIM, vdim=DIM)
    with torch.no_grad():  # the same projections, queries given already projected (identity in_proj for q)
        mha.q_proj_weight.copy_(torch.eye(width))
        mha.in_proj_bias.zero_()
        mha.k_proj_weight.copy_(pool.key_value.weight[:width])
        mha.v_proj_weight.copy_(pool.key_value.weight[width:])
        mha.in_proj_bias[width:2 * width].copy_(pool.key_value.bias[:width])
        mha.in_proj_bias[2 * width:].copy_(pool.key_value.bias[width:])
        mha.out_proj.weight.copy_(torch.eye(width))
        mha.out_proj.bias.zero_()
    store = packed_vectors()
    x, index = store.gather(range(len(LENGTHS)))
    with torch.no_grad():
        z, w = pool.pool_with_weights(x, index, len(LENGTHS))
        q = pool.query(pool.seed)
        for i in range(len(LENGTHS)):
            photos = store.data[store.offsets[i]:store.offsets[i + 1]][None]
            attended, per_head = mha(q[None], photos, photos, average_attn_weights=False)  # (1, h, k, n)
            hidden = pool.norm_attention(q + attended[0])
            hidden = pool.norm_output(hidden + torch.relu(pool.feed_forward(hidden)))
            torch.testing.assert_close(z[i], pool.out(hidden.reshape(k * width)), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(w[index == i], per_head[0].mean(dim=(0, 1)), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ATTENTION)
def test_permuting_photos_within_galleries_changes_nothing(name):
    pool, store = pooling(name), packed_vectors()
    x, index = store.gather(range(len(LENGTHS)))
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        z, w = pool.pool_with_weights(x, index, len(LENGTHS))
        z2, w2 = pool.pool_with_weights(x[perm], index[perm], len(LENGTHS))
        order = [3, 0, 4, 2, 1]  # the galleries in another order, too
        x3, index3 = store.gather(order)
        z3 = pool(x3, index3, len(order))
    torch.testing.assert_close(z2, z, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w2, w[perm], rtol=1e-5, atol=1e-7)  # each photo keeps its weight
    torch.testing.assert_close(z3, z[order], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ATTENTION)
def test_no_gallery_sees_another(name):
    """Changing one gallery's photos (values and count) leaves the other galleries' embeddings and
    weights unchanged; each packed result equals that gallery pooled alone."""
    pool, store = pooling(name), packed_vectors()
    changed = PackedGalleries.from_arrays(store.gallery_ids, [store.data[store.offsets[i]:store.offsets[i + 1]]
                                                              if i != 1 else 100 * torch.randn(9, DIM)
                                                              for i in range(len(LENGTHS))])
    with torch.no_grad():
        z, w = pool.pool_with_weights(*store.gather(range(5)), 5)
        z2, w2 = pool.pool_with_weights(*changed.gather(range(5)), 5)
        others = [0, 2, 3, 4]
        torch.testing.assert_close(z2[others], z[others], rtol=1e-5, atol=1e-6)
        _, index = store.gather(range(5))
        _, index2 = changed.gather(range(5))
        torch.testing.assert_close(w2[index2 != 1], w[index != 1], rtol=1e-5, atol=1e-7)
        assert not torch.allclose(z2[1], z[1])
        for i in range(5):
            alone = pool(*store.gather([i]), 1)[0]
            torch.testing.assert_close(alone, z[i], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ATTENTION)
def test_weights_sum_to_one_per_gallery_and_train(name):
    """The weights are a distribution over each gallery's photos, and the pooling's parameters get
    gradients (it learns), also under bf16 autocast."""
    pool, store = build_pooling(name, DIM), packed_vectors()
    x, index = store.gather(range(len(LENGTHS)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, w = pool.pool_with_weights(x, index, len(LENGTHS))
    assert w.dtype == torch.float32 and (w >= 0).all()
    torch.testing.assert_close(torch.zeros(5).index_add_(0, index, w.detach()), torch.ones(5))
    assert w[index == 2].item() == 1.0  # a gallery of one photo
    z.float().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in pool.parameters())


def test_attention_can_single_out_one_photo():
    """What mean pooling cannot: a gallery's embedding led by the one photo whose score is high."""
    pool = GatedAttentionPool(DIM, hidden=4)
    with torch.no_grad():
        for p in pool.parameters():
            p.zero_()
        pool.gates.weight[:4, 0] = 10.0   # V reads feature 0; U's gate stays open at sigmoid(0) = 1/2
        pool.score.weight[:] = 5.0
    x = torch.zeros(6, DIM)
    x[4, 0] = 1.0  # photo 4 of gallery 0 shows "the pool"
    z, w = pool.pool_with_weights(x, torch.zeros(6, dtype=torch.int64), 1)
    assert w.argmax().item() == 4 and w[4] > 0.99 and z[0, 0] > 0.99
    assert isinstance(build_pooling("pma", DIM), PMAPool)
    with pytest.raises(ValueError, match="unknown pooling 'attention'; known: .*gated_attention.*pma"):
        build_pooling("attention", DIM)


def export_settings(pooling="mean"):
    return Settings(model=ModelSettings(weights="random", image_size=32, hidden=8, pooling=pooling),
                    data=DataSettings(shards=2, max_images=4), retrieval=RetrievalSettings(code="sign"))


@pytest.fixture(scope="module")
def damaged_shards(small_catalogue, tmp_path_factory):
    """The small catalogue with an unreadable first photo in one gallery, preprocessed (at most 4 photos each)."""
    folder = tmp_path_factory.mktemp("attention-export")
    catalogue = ingest(small_catalogue / "manifest.parquet", small_catalogue / "tasks.yaml")
    split = catalogue.frame["split"]  # a few galleries, for speed, some of them test (retrieval examples' seeds)
    frame = pd.concat([catalogue.frame[split == "train"].iloc[:16], catalogue.frame[split == "test"].iloc[:8]])
    damaged = frame.index[0]
    frame.at[damaged, "images"] = [str(folder / "missing.jpg")] + list(frame.at[damaged, "images"])
    catalogue = replace(catalogue, frame=frame)
    s = export_settings()
    shards = [preprocess_shard(catalogue, rows, s, str(folder / f"shard{k}"), log=lambda _: None)
              for k, rows in enumerate(shard_rows(len(frame), s.data.shards))]
    unreadable = [q.image for sh in shards for q in sh.quality.skipped if not q.reason.startswith("beyond")]
    assert unreadable == [str(folder / "missing.jpg")]
    return catalogue, shards


@pytest.mark.parametrize("name", ATTENTION)
def test_export_writes_each_photos_weight(damaged_shards, tmp_path, name):
    """embeddings.parquet gets `images` (the embedded photos: first data.max_images, less unreadable
    ones) and `photo_weights` aligned with them, equal to the pooling's weights for that gallery."""
    catalogue, shards = damaged_shards
    s, frame = export_settings(name), catalogue.frame
    torch.manual_seed(0)
    model = build_model(s.model, catalogue.tasks, catalogue.stats)
    location = str(tmp_path / "embeddings.parquet")
    assert export_embeddings(model, frame, shards, s, location, {"run_id": "r1", "weighting": "pseudo_uniform"}) == len(frame)
    table = pq.read_table(location)
    ids, images, weights = (table[c].to_pylist() for c in ("gallery_id", "images", "photo_weights"))
    by_id = frame.set_index("gallery_id")["images"]
    for g, photos in zip(ids, images):
        assert photos == [p for p in by_id[g][:4] if not p.endswith("missing.jpg")]
    assert len(images[ids.index(frame.at[frame.index[0], "gallery_id"])]) == 3  # 4 kept, less the unreadable one
    source = shard_source(shards, s)
    encoder = model.encoder.eval()
    for row in [0, 5, len(source) - 1]:
        x, index = source.gather([row])
        with torch.no_grad():
            _, expected = encoder.forward_with_weights(x, index, 1, from_features=True)
        np.testing.assert_allclose(weights[row], expected.numpy(), rtol=1e-5, atol=1e-6)
        assert len(weights[row]) == len(images[row]) and abs(sum(weights[row]) - 1) < 1e-5
    schema = load_schema("embeddings")
    for row in table.slice(0, 3).to_pylist():
        row["embedding_bits"] = "AA=="
        jsonschema.validate(row, schema)
    if name != "gated_attention":
        return
    # the report's retrieval examples show each result by its top-weighted photo, with that weight
    table, _ = read_embeddings(location)
    examples = retrieval_examples(model.encoder, frame, ids, embedding_matrix(table), 32, 2, 0,
                                  photo_weights=photo_weights_of(table))
    assert len(examples) == 2
    for result in (r for e in examples for r in e.results):
        row = ids.index(result.gallery_id)
        heaviest = int(np.argmax(weights[row]))
        assert result.images[0] == images[row][heaviest]
        assert result.top_photo_weight == pytest.approx(weights[row][heaviest])
    figure = retrieval_figure(examples)
    assert any(" · w 0." in ax.get_title() for ax in figure.axes)


def test_export_without_attention_writes_no_photo_columns(damaged_shards, tmp_path):
    catalogue, shards = damaged_shards
    s = export_settings("mean")
    location = str(tmp_path / "embeddings.parquet")
    export_embeddings(build_model(s.model, catalogue.tasks, catalogue.stats), catalogue.frame, shards, s, location,
                      {"run_id": "r1", "weighting": "pseudo_uniform"})
    assert pq.read_schema(location).names == ["gallery_id", "split", "embedding", "embedding_bits"]


def test_encoder_without_attention_has_no_photo_weights():
    encoder = GalleryEncoder(torch.nn.Identity(), build_pooling("mean", DIM))
    x, index = packed_vectors().gather(range(len(LENGTHS)))
    z, w = encoder.forward_with_weights(x, index, len(LENGTHS), from_features=False)
    assert w is None and not encoder.has_photo_weights and z.shape == (len(LENGTHS), DIM)
