"""Preprocessed shards and the streaming reader: the same galleries, images and features as the
in-memory path, in the seeded order, fetched gallery by gallery."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from gallery.config import DataSettings, ModelSettings, Settings, TrainSettings
from gallery.data.images import load_galleries
from gallery.data.ingest import ingest
from gallery.data.packed import PackedGalleries
from gallery.data.readers import ShardIndex, ShardSource, batches_of, stream
from gallery.data.shards import GALLERIES, IMAGES, ShardWriter
from gallery.model.backbones import build_backbone
from gallery.steps import preprocess_shard, shard_rows, shard_source
from gallery.training.cache import trunk_features

SIZE = 32


def settings(image_format="png"):
    return Settings(model=ModelSettings(image_size=SIZE, hidden=16), train=TrainSettings(seed=3),
                    data=DataSettings(shards=3, image_format=image_format))


@pytest.fixture(scope="module")
def catalogue(small_catalogue):
    return ingest(small_catalogue / "manifest.parquet", small_catalogue / "tasks.yaml")


def preprocessed(catalogue, folder, s):
    rows = shard_rows(len(catalogue.frame), s.data.shards)
    return [preprocess_shard(catalogue, r, s, str(folder / str(k)), log=lambda _: None) for k, r in enumerate(rows)]


@pytest.fixture(scope="module")
def lossless(catalogue, tmp_path_factory):
    """Shards stored losslessly (PNG), so the reader must give back exactly the decoded pixels."""
    return preprocessed(catalogue, tmp_path_factory.mktemp("png"), settings("png"))


@pytest.fixture(scope="module")
def in_memory(catalogue, lossless):
    """The old path: every image decoded into one in-memory tensor, in shard order."""
    order = [g for shard in lossless for g in shard.gallery_ids]
    frame = catalogue.frame.set_index("gallery_id").loc[order]
    ids, arrays, _ = load_galleries(order, list(frame["images"]), SIZE)
    return PackedGalleries.from_arrays(ids, arrays)


@pytest.mark.parametrize("workers", [0, 2])
def test_reader_yields_the_in_memory_galleries_in_the_seeded_order(lossless, in_memory, catalogue, workers):
    s = settings()
    pixels = shard_source(lossless, replace(s, train=replace(s.train, use_cache=False)))
    assert pixels.gallery_ids == in_memory.gallery_ids and len(pixels) == len(catalogue.frame)
    assert torch.equal(pixels.lengths, in_memory.lengths)
    order = np.random.default_rng([3, 0]).permutation(len(pixels))
    batches = batches_of(order, 7)
    streamed = list(stream(pixels, batches, workers=workers))
    assert [list(b.rows) for b in streamed] == [list(b) for b in batches]
    for batch in streamed:
        x, index = in_memory.gather(batch.rows)
        assert torch.equal(batch.x, x) and torch.equal(batch.index, index) and batch.n == len(batch.rows)

    features = shard_source(lossless, s)  # the feature cache: the trunk's output of those very pixels
    m = s.model
    trunk = build_backbone(m.backbone, m.weights, m.trainable_blocks, m.image_size)
    expected = in_memory.map_data(lambda d: trunk_features(trunk, d, s.train.cache_dtype, precision=s.train.precision))
    for batch in stream(features, batches[:3], workers=workers):
        x, _ = expected.gather(batch.rows)
        assert batch.x.dtype == torch.float16 and batch.x.shape == x.shape
        torch.testing.assert_close(batch.x.float(), x.float(), rtol=2e-3, atol=2e-3)


def test_targets_travel_with_their_galleries(lossless, in_memory):
    source = shard_source(lossless, settings())
    targets = torch.arange(len(source), dtype=torch.float32)[:, None] * torch.tensor([[1.0, -1.0]])
    for batch in stream(source, batches_of(np.arange(len(source))[::-1], 5), targets):
        assert torch.equal(batch.targets[:, 0], torch.as_tensor(batch.rows, dtype=torch.float32))


def test_jpeg_shards_are_small_and_close_to_the_decoded_images(catalogue, in_memory, tmp_path):
    shards = preprocessed(catalogue, tmp_path, settings("jpeg"))
    source = ShardSource(ShardIndex.read([s.location for s in shards]), features=False)
    x, _ = source.gather(np.arange(len(source)))
    original, _ = in_memory.gather(np.arange(len(in_memory)))
    assert x.shape == original.shape and x.dtype == torch.uint8
    assert (x.float() - original.float()).abs().mean() < 4  # JPEG at quality 90: a few levels of 255
    image_bytes = sum(s.image_bytes for s in shards)
    assert image_bytes == sum((tmp_path / str(k) / IMAGES).stat().st_size for k in range(len(shards)))
    assert image_bytes / len(x) < 0.5 * SIZE * SIZE * 3  # well under the decoded size
    # the cache is computed from the stored (decoded JPEG) pixels: cached and recomputed features agree
    feats = ShardSource(source.index, features=True)
    s = settings("jpeg")
    trunk = build_backbone(s.model.backbone, s.model.weights, s.model.trainable_blocks, SIZE)
    for rows in batches_of(np.arange(len(source)), 16)[:2]:
        torch.testing.assert_close(feats.gather(rows)[0].float(),
                                   trunk_features(trunk, source.gather(rows)[0], precision=s.train.precision).float(),
                                   rtol=2e-3, atol=2e-3)


def test_a_shard_is_published_whole_or_not_at_all(tmp_path):
    location = tmp_path / "shard"
    with pytest.raises(RuntimeError, match="killed"):
        with ShardWriter(str(location), SIZE) as writer:
            writer.add("g1", "train", np.zeros((2, SIZE, SIZE, 3), np.uint8))
            raise RuntimeError("killed while writing")
    assert list(location.iterdir()) == []  # no galleries.parquet, no staging folder left
    with ShardWriter(str(location), SIZE) as writer:
        writer.add("g1", "train", np.zeros((2, SIZE, SIZE, 3), np.uint8))
        writer.finish(quality=None)
    assert sorted(p.name for p in location.iterdir()) == sorted([GALLERIES, IMAGES])


def test_data_parallel_ranks_split_every_batch():
    order = np.arange(23)
    one = batches_of(order, 8)
    two = [batches_of(order, 8, rank, 2) for rank in (0, 1)]
    assert len(two[0]) == len(two[1]) == len(one) == 3  # every rank takes every step
    for k, batch in enumerate(one[:-1]):
        assert sorted(np.concatenate([two[0][k], two[1][k]])) == sorted(batch)
    three = [batches_of(np.arange(17), 8, rank, 3) for rank in range(3)]
    assert all(len(b[-1]) == 1 for b in three)  # the last batch (1 gallery) is topped up from the start
    assert sorted(int(b[-1][0]) for b in three) == [0, 1, 16]
