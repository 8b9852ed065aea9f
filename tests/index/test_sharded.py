"""ShardedIndex: flat shards over disjoint frames, searched shard by shard and merged, answer exactly as one flat
index over every frame (search, best frames, the cell vote, stored vectors); bad shard sets are refused."""

from __future__ import annotations

import numpy as np
import pytest

from objret.errors import ObjretError
from objret.index.cell_index import vote
from objret.index.region_index import RegionIndex
from objret.index.sharded import ShardedIndex, load_shards

D = 32
PER_FRAME = 8

pytestmark = pytest.mark.usefixtures("one_faiss_thread")


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def regions():
    rng = np.random.default_rng(3)
    centres = unit(rng.standard_normal((40, D)))
    x = unit(centres[rng.integers(0, 40, 4000)] + 0.3 * rng.standard_normal((4000, D)) / D ** 0.5)
    frames = [f"frame-{i // PER_FRAME:04d}" for i in range(len(x))]
    boxes = rng.uniform(0, 100, (len(x), 4)).astype(np.float32)
    queries = unit(centres[:12] + 0.3 * rng.standard_normal((12, D)) / D ** 0.5)
    return frames, x, boxes, queries


def flat(frames, x, boxes) -> RegionIndex:
    index = RegionIndex(D, kind="flat", use_gpu=False, recipe={"layer": "stride16"})
    # Per-region side arrays as build-index stores them (a detector class and its confidence per region).
    rows = np.array([int(f.split("-")[1]) for f in frames], np.float32)
    index.add(frames, x, boxes, {"class": rows % 7, "class_score": rows / 1000})
    return index


@pytest.fixture(scope="module")
def one_and_sharded(regions, tmp_path_factory):
    frames, x, boxes, _ = regions
    cuts = [0, 1200, 1208, 3000, 4000]   # unequal shards, one of a single frame
    folder = tmp_path_factory.mktemp("shards")
    for s, (a, b) in enumerate(zip(cuts, cuts[1:])):
        flat(frames[a:b], x[a:b], boxes[a:b]).save(folder / f"shard-{s}")
    sharded = load_shards([folder / f"shard-{s}" for s in range(len(cuts) - 1)], recipe={"layer": "stride16"})
    return flat(frames, x, boxes), sharded


def test_sharded_meta_is_the_shards_in_order(one_and_sharded):
    """What mining reads per region beside its box (objret.mining.search: the detector's classes) is the one
    index's, region for region."""
    one, sharded = one_and_sharded
    assert set(sharded.meta) == set(one.meta) == {"class", "class_score"}
    for name in one.meta:
        np.testing.assert_array_equal(sharded.meta[name], one.meta[name])


def test_sharded_search_equals_one_index(regions, one_and_sharded):
    _, _, _, queries = regions
    one, sharded = one_and_sharded
    assert (len(sharded), sharded.n_frames, sharded.frame_ids) == (len(one), one.n_frames, one.frame_ids)
    for k in (1, 10, 300):
        (ids_a, sims_a), (ids_b, sims_b) = one.search(queries, k), sharded.search(queries, k)
        np.testing.assert_array_equal(ids_a, ids_b)
        np.testing.assert_allclose(sims_a, sims_b, rtol=0, atol=1e-6)
    single_ids, _ = sharded.search(queries[0], 5)   # a single query keeps its 1-D shape
    assert single_ids.shape == (5,)
    np.testing.assert_array_equal(sharded.owner, one.owner)
    np.testing.assert_array_equal(sharded.boxes, one.boxes)
    picked = np.array([0, 1207, 1208, 2999, 3999, 17])
    np.testing.assert_array_equal(sharded.vectors(picked), one.vectors(picked))


def test_sharded_shortlists_equal_one_index(regions, one_and_sharded):
    _, _, _, queries = regions
    one, sharded = one_and_sharded
    for q in queries:
        assert sharded.best_frames(q, 40) == one.best_frames(q, 40)
    assert vote(sharded, queries[:9], 30) == vote(one, queries[:9], 30)
    frames = ["frame-0151", "frame-0000", "frame-0400"]
    np.testing.assert_array_equal(sharded.frame_scores(queries[1], frames), one.frame_scores(queries[1], frames))


def test_bad_shard_sets_are_refused(regions, one_and_sharded, tmp_path):
    frames, x, boxes, _ = regions
    _, sharded = one_and_sharded
    with pytest.raises(ObjretError, match="read-only"):
        sharded.add(frames[:1], x[:1])
    with pytest.raises(ObjretError, match="at least one shard"):
        ShardedIndex([])
    with pytest.raises(ObjretError, match="share frames"):
        ShardedIndex([flat(frames[:16], x[:16], boxes[:16]), flat(frames[8:24], x[8:24], boxes[8:24])])
    other = RegionIndex(D, kind="flat", use_gpu=False, recipe={"layer": "stride8"})
    other.add(frames[16:24], x[16:24])
    with pytest.raises(ObjretError, match="recipe"):
        ShardedIndex([flat(frames[:16], x[:16], boxes[:16]), other])
    no_meta = RegionIndex(D, kind="flat", use_gpu=False, recipe={"layer": "stride16"})
    no_meta.add(frames[16:24], x[16:24], boxes[16:24])   # a shard built before regions carried classes
    with pytest.raises(ObjretError, match="per-region arrays"):
        ShardedIndex([flat(frames[:16], x[:16], boxes[:16]), no_meta])
    flat(frames[:16], x[:16], boxes[:16]).save(tmp_path / "a")
    with pytest.raises(ObjretError, match="another descriptor recipe"):
        load_shards([tmp_path / "a"], recipe={"layer": "stride8"})
