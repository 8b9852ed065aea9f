"""RegionIndex on seeded synthetic region vectors: exactness, frame max-pooling, incremental adds, recall of the
approximate kinds against flat, the auto switch, and atomic, verified save/load."""

from __future__ import annotations

import json

import numpy as np
import pytest

from objret.errors import ObjretError
from objret.index.region_index import IVFPQ_MIN_TRAIN, RegionIndex

D = 128
REGIONS_PER_FRAME = 20


pytestmark = pytest.mark.usefixtures("one_faiss_thread")


def clustered(n: int, d: int = D, n_clusters: int = 200, seed: int = 0, spread: float = 0.6) -> np.ndarray:
    """Unit vectors around random unit centres (noise norm ~spread), i.e. objects of a few hundred kinds."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[rng.integers(0, n_clusters, n)] + rng.standard_normal((n, d)).astype(np.float32) * (spread / d**0.5)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def frame_ids_for(n: int, start: int = 0, per_frame: int = REGIONS_PER_FRAME) -> list[str]:
    return [f"frame-{(start + i) // per_frame:06d}" for i in range(n)]


@pytest.fixture(scope="module")
def lake():
    """20k regions (1000 frames) of one clustered population, and 50 queries drawn from the same clusters."""
    both = clustered(20_050, seed=0)
    return frame_ids_for(20_000), both[:20_000], both[20_000:]


@pytest.fixture(scope="module")
def built(lake):
    fids, x, _ = lake
    boxes = np.random.default_rng(1).uniform(0, 640, (len(x), 4)).astype(np.float32)
    out = {}
    for kind in ("flat", "ivfpq", "hnsw"):
        out[kind] = RegionIndex(D, kind=kind, use_gpu=False)
        out[kind].add(fids, x, region_boxes=boxes)
    return out


def recall_at(ids: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(ids, truth)]))


def test_flat_search_is_brute_force(lake, built):
    fids, x, queries = lake
    ids, sims = built["flat"].search(queries, 10)
    brute = queries @ x.T
    expected = np.argsort(-brute, axis=1)[:, :10]
    np.testing.assert_array_equal(ids, expected)
    np.testing.assert_allclose(sims, np.take_along_axis(brute, expected, 1), atol=1e-5)
    one_ids, one_sims = built["flat"].search(queries[0], 10)   # a single (d,) query gives 1-D results
    np.testing.assert_array_equal(one_ids, expected[0])


def test_best_frames_takes_each_frames_best_region():
    e = np.eye(4, dtype=np.float32)
    unit = lambda v: np.asarray(v, np.float32) / np.linalg.norm(v)   # noqa: E731
    vectors = np.stack([unit([0.6, 0.8, 0, 0]), e[3],          # frame a: best 0.6 (its first region)
                        e[2], unit([0.9, 0, 0.1, 0.2]),         # frame b: best ~0.97 (its second region)
                        unit([0.1, 0, 1, 0]), unit([-1, 1, 0, 0])])   # frame c: best ~0.10
    boxes = np.arange(24, dtype=np.float32).reshape(6, 4)
    index = RegionIndex(4, kind="flat", use_gpu=False)
    index.add(["a", "a", "b", "b", "c", "c"], vectors, region_boxes=boxes)
    hits = index.best_frames(e[0], k_frames=3)
    assert [h.frame_id for h in hits] == ["b", "a", "c"]
    assert [h.region_id for h in hits] == [3, 0, 4]
    np.testing.assert_allclose([h.score for h in hits], vectors[[3, 0, 4], 0], atol=1e-6)
    assert hits[0].box == tuple(boxes[3])
    # Even when only the 2 nearest regions are searched the per-frame max is right for the frames found.
    assert [h.frame_id for h in index.best_frames(e[0], k_frames=3, k_regions=2)] == ["b", "a"]
    np.testing.assert_allclose(index.frame_scores(e[0], ["c", "a", "nope"]),
                               [vectors[4, 0], vectors[0, 0], -np.inf], atol=1e-6)


def test_ivfpq_best_frames_scores_whole_frames_from_the_refine_vectors(lake, built):
    """IVF-PQ picks frames by PQ codes, then scores each by the best of all its regions' refine vectors: each
    hit is its frame's best region (as frame_scores sees it), hits come sorted, and with a margin of candidates
    (mining's: its shortlist is 6.7 times its re-ranked frames) the flat top 20 is in the first 30 (measured:
    0.999 of it at 5x on this data, where PQ codes alone find 0.41 of the 10 nearest regions)."""
    fids, x, queries = lake
    index, flat = built["ivfpq"], built["flat"]
    kept = []
    for q in queries[:10]:
        hits = index.best_frames(q, 100, candidates=100)
        frames = [h.frame_id for h in hits]
        scores = np.array([h.score for h in hits])
        np.testing.assert_allclose(scores, index.frame_scores(q, frames), atol=1e-6)
        assert np.all(np.diff(scores) <= 0) and len(set(frames)) == 100
        for h in hits[:5]:
            own = np.flatnonzero(index.owner == index.frame_ids.index(h.frame_id))
            assert h.region_id == own[np.argmax(index.vectors(own) @ q)]
            assert h.box == tuple(float(v) for v in index.boxes[h.region_id])
        truth = [h.frame_id for h in flat.best_frames(q, 20)]
        kept.append(len(set(truth) & set(frames[:30])) / 20)
    assert np.mean(kept) >= 0.95


def test_regions_of_groups_regions_by_frame_in_any_add_order():
    """Frames whose regions were added interleaved still get all their regions, frame by frame, in rows' order."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((9, 8)).astype(np.float32)
    index = RegionIndex(8, kind="flat", use_gpu=False)
    index.add(["a", "b", "a", "c", "b", "a"], x[:6])
    index.add(["d", "d", "e"], x[6:])
    region_ids, position = index.regions_of(index.rows_of(["b", "e", "a", "d"]))
    assert region_ids.tolist() == [1, 4, 8, 0, 2, 5, 6, 7] and position.tolist() == [0, 0, 1, 2, 2, 2, 3, 3]
    best, region = index.best_regions(x[5], index.rows_of(["c", "a"]))
    assert region.tolist() == [3, 5] and best[1] == pytest.approx(float(x[5] @ x[5]), rel=1e-5)


def test_adding_a_known_frame_is_a_no_op(lake):
    fids, x, queries = lake
    index = RegionIndex(D, kind="flat", use_gpu=False)
    index.add(fids[:100], x[:100], region_meta={"saliency": np.arange(100, dtype=np.float32)})
    # frame-000000..4 are known: only frame-000005's regions (call rows 100..119) go in.
    index.add(fids[:120], x[200:320], region_meta={"saliency": np.arange(120, dtype=np.float32)})
    assert (len(index), index.n_frames) == (120, 6)
    np.testing.assert_array_equal(index.search(x[300:320], 1)[0][:, 0], np.arange(100, 120))
    np.testing.assert_array_equal(index.meta["saliency"][100:], np.arange(100, 120))
    before = index.search(queries, 5)
    index.add(fids[:120], x[:120], region_meta={"saliency": np.zeros(120, np.float32)})
    assert (len(index), index.n_frames) == (120, 6)
    for got, want in zip(index.search(queries, 5), before):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(index.meta["saliency"], np.r_[np.arange(100), np.arange(100, 120)])
    with pytest.raises(ObjretError):
        index.add(["new"], x[:1])   # meta names are fixed by the first add


def test_region_meta_is_memory_mapped_where_the_index_is(tmp_path, lake):
    """A mining process opens the index mapped and reads the side arrays of its candidates' regions only: at 1M
    frames (~50M regions) each side array held whole would be ~200 MB of its memory."""
    fids, x, _ = lake
    index = RegionIndex(D, kind="flat", use_gpu=False)
    meta = {"class": np.arange(300, dtype=np.float32) % 91, "class_score": np.linspace(0, 1, 300, dtype=np.float32)}
    index.add(fids[:300], x[:300], region_meta=meta)
    index.save(tmp_path / "idx")
    mapped = RegionIndex.load(tmp_path / "idx", use_gpu=False, mapped=True)
    loaded = RegionIndex.load(tmp_path / "idx", use_gpu=False)
    for name, values in meta.items():
        assert isinstance(mapped.meta[name], np.memmap) and not isinstance(loaded.meta[name], np.memmap)
        np.testing.assert_array_equal(mapped.meta[name], values)
        np.testing.assert_array_equal(loaded.meta[name], values)


def test_incremental_add_keeps_old_results(lake):
    fids, x, queries = lake
    old, new = slice(0, 4000), slice(4000, 6000)
    index = RegionIndex(D, kind="flat", use_gpu=False)
    index.add(fids[old], x[old], region_boxes=np.tile(np.arange(4, dtype=np.float32), (4000, 1)))
    old_frames = sorted(set(fids[old]))
    scores_before = index.frame_scores(queries[0], old_frames)
    owner_before = index.owner.copy()
    index.add(fids[new], x[new])
    # Old regions keep their ids, owners, boxes and scores; the result equals a one-shot build.
    np.testing.assert_array_equal(index.owner[:4000], owner_before)
    np.testing.assert_array_equal(index.boxes[:4000, 3], np.full(4000, 3.0))
    assert np.isnan(index.boxes[4000:]).all()
    np.testing.assert_array_equal(index.frame_scores(queries[0], old_frames), scores_before)
    one_shot = RegionIndex(D, kind="flat", use_gpu=False)
    one_shot.add(fids[:6000], x[:6000])
    for got, want in zip(index.search(queries, 20), one_shot.search(queries, 20)):
        np.testing.assert_array_equal(got, want)
    key = lambda hits: [(h.frame_id, h.score, h.region_id) for h in hits]   # noqa: E731 (boxes differ)
    assert key(index.best_frames(queries[1], 10)) == key(one_shot.best_frames(queries[1], 10))


def test_approximate_kinds_recall_vs_flat(lake, built):
    """Measured on this data (1 thread): ivfpq (PQ 16 B + sq8 re-rank) 0.97, hnsw 1.00, PQ codes alone 0.41."""
    fids, x, queries = lake
    truth, _ = built["flat"].search(queries, 10)
    assert built["ivfpq"].active == "ivfpq"
    assert recall_at(built["ivfpq"].search(queries, 10)[0], truth) >= 0.9
    assert recall_at(built["hnsw"].search(queries, 10)[0], truth) >= 0.9
    frame_truth = [[h.frame_id for h in built["flat"].best_frames(q, 10)] for q in queries]
    for kind in ("ivfpq", "hnsw"):
        frames = [[h.frame_id for h in built[kind].best_frames(q, 10)] for q in queries]
        assert recall_at(frames, frame_truth) >= 0.9, kind
    # PQ codes alone order near neighbours poorly on this data: pin it so a regression (or a fix) shows.
    pq_only = RegionIndex(D, kind="ivfpq", refine=None, use_gpu=False)
    pq_only.add(fids, x)
    assert 0.25 <= recall_at(pq_only.search(queries, 10)[0], truth) < 0.9
    assert pq_only.bytes_per_region() < 80 < built["ivfpq"].bytes_per_region() < 200
    # Without raw vectors frame_scores gives the PQ score search ranks by (>= it: it sees every region).
    hits = pq_only.best_frames(queries[0], 10)
    scores = pq_only.frame_scores(queries[0], [h.frame_id for h in hits])
    assert np.all(scores >= np.array([h.score for h in hits]) - 1e-5)


def test_frame_scores(lake, built):
    fids, x, queries = lake
    frames = sorted(set(fids))[::7]
    owner = built["flat"].owner
    rows = np.array([built["flat"].frame_ids.index(f) for f in frames])
    sims = x @ queries[2]
    exact = np.array([sims[owner == r].max() for r in rows])
    np.testing.assert_allclose(built["flat"].frame_scores(queries[2], frames), exact, atol=1e-5)
    np.testing.assert_allclose(built["hnsw"].frame_scores(queries[2], frames), exact, atol=1e-5)
    np.testing.assert_allclose(built["ivfpq"].frame_scores(queries[2], frames), exact, atol=0.01)


def test_auto_switches_to_ivfpq_past_flat_max(lake):
    fids, x, queries = lake
    index = RegionIndex(D, kind="auto", flat_max=2000, use_gpu=False)
    index.add(fids[:2000], x[:2000])
    assert index.active == "flat"
    truth_ids = index.search(x[:50], 1)[0][:, 0]
    index.add(fids[2000:3000], x[2000:3000])
    assert index.active == "ivfpq" and len(index) == 3000 and index.n_frames == 150
    # Region ids survive the rebuild: a stored vector still finds itself.
    np.testing.assert_array_equal(index.search(x[:50], 1)[0][:, 0], truth_ids)
    np.testing.assert_array_equal(index.search(x[2900:2950], 1)[0][:, 0], np.arange(2900, 2950))
    # Explicit ivfpq stays exact (flat) until it has enough regions to train.
    small = RegionIndex(D, kind="ivfpq", use_gpu=False)
    small.add(fids[:3000], x[:3000])
    assert small.active == "flat" and IVFPQ_MIN_TRAIN > 3000


@pytest.mark.parametrize("kind", ["flat", "ivfpq", "hnsw"])
def test_save_load_round_trip(tmp_path, lake, built, kind):
    fids, x, queries = lake
    index = built[kind]
    index.save(tmp_path / "idx")
    index.save(tmp_path / "idx")   # a second save replaces the first whole
    assert len(list((tmp_path / "idx").glob("v-*"))) == 1
    loaded = RegionIndex.load(tmp_path / "idx", use_gpu=False)
    assert (loaded.active, len(loaded), loaded.n_frames) == (index.active, len(index), index.n_frames)
    for got, want in zip(loaded.search(queries, 20), index.search(queries, 20)):
        np.testing.assert_array_equal(got, want)
    assert loaded.best_frames(queries[3], 15) == index.best_frames(queries[3], 15)
    np.testing.assert_array_equal(loaded.owner, index.owner)
    # Memory-mapped (how mining opens it): the same answers, and it refuses to grow.
    mapped = RegionIndex.load(tmp_path / "idx", use_gpu=False, mapped=True)
    for got, want in zip(mapped.search(queries, 20), index.search(queries, 20)):
        np.testing.assert_array_equal(got, want)
    assert mapped.best_frames(queries[3], 15) == index.best_frames(queries[3], 15)
    np.testing.assert_array_equal(mapped.vectors(np.arange(0, 20_000, 997)), index.vectors(np.arange(0, 20_000, 997)))
    # IVF-PQ's refine codes are read from their own read-only mapping, without read-ahead (mapped_rows).
    assert (mapped._refine_codes is not None) == (kind == "ivfpq")
    scattered = np.random.default_rng(2).permutation(20_000)[:3000]
    np.testing.assert_array_equal(mapped.vectors(scattered), index.vectors(scattered))
    np.testing.assert_array_equal(mapped.boxes, index.boxes)
    with pytest.raises(ObjretError, match="read-only"):
        mapped.add(["new-frame"], x[:1])
    assert len(mapped) == len(index)


def test_load_rejects_damaged_index(tmp_path, lake):
    fids, x, _ = lake
    index = RegionIndex(D, kind="flat", use_gpu=False)
    index.add(fids[:500], x[:500], region_meta={"source": np.ones(500, np.int8)})
    with pytest.raises(ObjretError, match="missing"):
        RegionIndex.load(tmp_path / "missing")
    for damage in ("truncate", "delete", "meta"):
        directory = tmp_path / damage
        index.save(directory)
        version = directory / (directory / "CURRENT").read_text()
        if damage == "truncate":
            data = (version / "regions.faiss").read_bytes()
            (version / "regions.faiss").write_bytes(data[: len(data) // 2])
        elif damage == "delete":
            (version / "owner.npy").unlink()
        else:   # consistent sizes but counts that disagree
            manifest = json.loads((version / "manifest.json").read_text())
            manifest["ntotal"] += 1
            (version / "manifest.json").write_text(json.dumps(manifest))
        for mapped in (False, True):
            with pytest.raises(ObjretError, match=str(directory)):
                RegionIndex.load(directory, mapped=mapped)


def test_bytes_per_region(lake, built):
    # flat d=128: 512 B of float32 + 4 (owner) + 16 (box) + ~12/20 of frame id, plus a small header.
    assert 532 <= built["flat"].bytes_per_region() < 540
    assert built["hnsw"].bytes_per_region() > built["flat"].bytes_per_region()   # + graph links
    assert RegionIndex(D).bytes_per_region() == 0.0
