"""objret.mining.methods's region-based methods over a small real lake: ``fused`` (region, whole-frame and template
evidence fused), ``regions`` and the ``rmac`` baseline, with LakeMaps built from stored regions (region_vectors),
on lite0 maps at 320 px of 12 bench frames, one of which holds a pasted object; and candidate selection
(objret.mining.shortlist: the region index's shortlist, the cell index's for a small box, ``mining.rerank`` of
them re-ranked) over a LakeSearch of the same lake with a real RegionIndex and cell index."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from objret.boxes import iou_xywh
from objret.config import load_params
from objret.errors import ObjretError
from objret.features.backbone import build_backbone
from objret.features.cache import extract_maps
from objret.index.region_index import RegionIndex
from objret.ingest.decode import load_image
from objret.mining.box_fit import colour_signature
from objret.mining.evidence import best_region_per_frame, query_region_vector
from objret.mining.feedback import Feedback, rocchio
from objret.mining.fusion import fuse_evidence, rank_fused
from objret.mining.lakemaps import LakeMaps
from objret.mining.methods import QueryObject, RankInputs, get_method, rank
from objret.mining.search import LakeSearch
from objret.index.cell_index import salient_cells, template_keys
from objret.index.frame_scoring import FrameHit
from objret.mining.shortlist import first_stage, rank_query, reference_rows, round_robin
from objret.mining.template_matching import MapStack
from objret.regions.encoding import region_vectors
from objret.regions.pooling import box_to_cells, gem
from objret.regions.sources import SOURCES, cells_to_pixels, frame_regions, pool_regions, rmac
from objret.regions.store import RegionStore

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MAX_SIDE = 320
PASTE_XY = (413, 261)  # where A's clock goes in the tud_stadtmitte frame (not on the cell grid)
OTHERS = {  # unrelated frames of every set; two more street frames of B's video are the hardest negatives
    "tud_100": "tud_stadtmitte/images/000100.jpg",
    "tud_150": "tud_stadtmitte/images/000150.jpg",
    "kitti_40": "kitti_0005/images/0000000040.jpg",
    "kitti_100": "kitti_0005/images/0000000100.jpg",
    "pets_101": "pets09_s2l1/images/000101.jpg",
    "pets_301": "pets09_s2l1/images/000301.jpg",
    "campus_30": "tud_campus/images/000030.jpg",
    "zebra": "coco_mini/images/000000000034.jpg",
    "coco_9": "coco_mini/images/000000000009.jpg",
}


@pytest.fixture(scope="module")
def scene(bench_dir, tmp_path_factory):
    """Query: coco_mini 000000000064.jpg (frame A, 480 x 640) and its "clock" box. B: tud_stadtmitte 000050 with
    A's box crop pasted at PASTE_XY; B's clean original and 9 other real frames complete a lake of 12 (A is in
    the lake too, as a query frame from the lake would be). ``search`` is a LakeSearch over the same maps with
    a flat RegionIndex holding every region vector of the lake."""
    coco = json.loads((bench_dir / "coco_mini" / "annotations.json").read_text())
    image = next(i for i in coco["images"] if i["file_name"] == "images/000000000064.jpg")
    clock = next(c["id"] for c in coco["categories"] if c["name"] == "clock")
    box = tuple(next(a["bbox"] for a in coco["annotations"]
                     if a["image_id"] == image["id"] and a["category_id"] == clock))
    a = load_image(str(bench_dir / "coco_mini" / image["file_name"]))
    x0, y0 = int(round(box[0])), int(round(box[1]))
    crop = a[y0:int(round(box[1] + box[3])), x0:int(round(box[0] + box[2]))]
    clean = load_image(str(bench_dir / "tud_stadtmitte" / "images" / "000050.jpg"))
    pasted = clean.copy()
    px, py = PASTE_XY
    pasted[py:py + crop.shape[0], px:px + crop.shape[1]] = crop
    paste_box = (px, py, crop.shape[1], crop.shape[0])
    images = {"A": a, "B": pasted, "B_clean": clean,
              **{k: load_image(str(bench_dir / rel)) for k, rel in OTHERS.items()}}
    assert len(images) == 12

    backbone = build_backbone("efficientnet_lite0", layers=("stride16", "stride32"), max_side=MAX_SIDE)
    maps = extract_maps(backbone, list(images.items()), device=torch.device("cpu"))
    ids = list(images)
    frames = [SimpleNamespace(frame_id=i, width=images[i].shape[1], height=images[i].shape[0]) for i in ids]

    # Regions as objret.steps.regions stores them: whole + uniform on the stride-32 map, average-pooled, raw.
    store = RegionStore(tmp_path_factory.mktemp("regions"))
    region_params = load_params(None, ["regions.sources=[whole, uniform]", "regions.uniform_levels=3"]).regions
    per_frame = {}
    for i in ids:
        fmap = maps[i]["stride32"]
        found = frame_regions(fmap, region_params)
        per_frame[i] = (found, pool_regions(fmap, found.boxes, "avg"), tuple(fmap.shape[-2:]))
    store.write(per_frame)
    regions = region_vectors(store.load(), frames, "stride32", "avg")

    stack = MapStack(ids, [maps[i]["stride16"] for i in ids], [(f.width, f.height) for f in frames])
    lake = LakeMaps(stack, np.stack([gem(maps[i]["stride32"]) for i in ids]), regions,
                    np.stack([rmac(maps[i]["stride32"]) for i in ids]))
    query = QueryObject(maps["A"], (a.shape[1], a.shape[0]), box, frame_id="A")
    params = load_params(None, ["mining.layer=stride16", "mining.scales=[0.5, 1.0, 2.0]", "index.gem_p=3.0"])

    # The region index as build-index fills it: every region of every frame, with its frame and box.
    index = RegionIndex(regions.vectors.shape[1], kind="flat", use_gpu=False)
    index.add([ids[o] for o in regions.owner], regions.vectors, regions.boxes)
    # The cell index as objret.steps.store fills it: each frame's most distinctive stride-16 cells.
    cells = RegionIndex(maps["A"]["stride16"].shape[0], kind="flat", use_gpu=False, recipe={"layer": "stride16"})
    for f in frames:
        fmap = maps[f.frame_id]["stride16"]
        vectors, boxes = salient_cells(fmap, 64)
        cells.add([f.frame_id] * len(vectors), vectors,
                  cells_to_pixels(boxes, fmap.shape[-2:], np.array([f.width, f.height], np.float32)))
    search = LakeSearch(index, {f.frame_id: f for f in frames},
                        lambda wanted: {i: maps[i]["stride16"] for i in wanted}, list(ids), lake.global_vectors,
                        regions, cells=cells, rmac_vectors=lake.rmac_vectors)
    return SimpleNamespace(ids=ids, lake=lake, query=query, params=params, paste_box=paste_box, box=box, images=images,
                           frames=frames, per_frame=per_frame, maps=maps, search=search, gem_p=params.index.gem_p)


def _inputs(scene, *assignments: str, keep_heatmaps: int = 0, diffusion=None) -> RankInputs:
    """The scene's mining parameters with ``section.key=value`` assignments, as a method reads them."""
    params = scene.params.replace(*assignments) if assignments else scene.params
    return RankInputs(params.mining, params.index.gem_p, keep_heatmaps, diffusion)


def _mining(scene, *assignments: str):
    return scene.params.replace(*assignments).mining


def _order_without(ranking, excluded=("A",)):
    return [ranking.frame_ids[i] for i in ranking.order() if ranking.frame_ids[i] not in excluded]


def _standardized(values, reference):
    return (values - values[reference].mean()) / (values[reference].std() + 1e-6)


def test_region_vectors_follow_the_lake(scene):
    regions, ids = scene.lake.regions, scene.ids
    assert regions.layer == "stride32" and regions.pooling == "avg" and regions.whitening is None
    assert len(regions.vectors) == len(regions.owner) == len(regions.boxes)
    assert len(regions.vectors) == sum(len(v[0]) for v in scene.per_frame.values())
    np.testing.assert_allclose(np.linalg.norm(regions.vectors, axis=1), 1.0, atol=1e-5)
    for row, fid in enumerate(ids):
        mine = regions.boxes[regions.owner == row]
        assert len(mine) == len(scene.per_frame[fid][0])
        width, height = scene.frames[row].width, scene.frames[row].height
        np.testing.assert_allclose(mine[0], [0, 0, width, height], rtol=1e-5)  # the whole region first
    # The index holds the same regions, owned by the same frames.
    index = scene.search.index
    assert len(index) == len(regions.vectors) and index.frame_ids == ids
    np.testing.assert_array_equal(index.owner, regions.owner)


def test_fused_puts_the_pasted_frame_first_with_its_box(scene):
    # Max fusion takes template boxes for every frame (adaptive fusion: see the tests below).
    ranking = rank("fused", scene.query, scene.lake, _inputs(scene, "mining.fusion=max", keep_heatmaps=5))
    order = _order_without(ranking)
    b = scene.ids.index("B")
    assert order[0] == "B", dict(zip(ranking.frame_ids, ranking.scores.round(2).tolist()))
    assert iou_xywh(ranking.boxes[b], scene.paste_box) >= 0.5, (ranking.boxes[b], scene.paste_box)
    # The clean copy of B differs only by the paste: it scores lower.
    assert ranking.scores[b] > ranking.scores[scene.ids.index("B_clean")]
    assert np.isfinite(ranking.scores).all() and ranking.scores.dtype == np.float32
    # Evidence and heat maps for the top frames: the three kinds of evidence, consistent with the parts.
    top = [ranking.frame_ids[i] for i in ranking.order()[:5]]
    assert set(ranking.evidence) == set(top) == set(ranking.heatmaps)
    region, _ = best_region_per_frame(scene.query, scene.lake)
    glob = scene.lake.global_vectors @ gem(scene.query.maps["stride32"], scene.gem_p)
    dtm = rank("dtm", scene.query, scene.lake, _inputs(scene))
    for fid in top:
        i = scene.ids.index(fid)
        evidence = ranking.evidence[fid]
        assert set(evidence) == {"region", "template", "global"}
        assert evidence["region"] == pytest.approx(float(region[i]), abs=1e-5)
        assert evidence["global"] == pytest.approx(float(glob[i]), abs=1e-5)
        assert evidence["template"] == pytest.approx(float(dtm.scores[i]), abs=1e-4)  # the same matching
        assert all(-1.0 - 1e-4 <= v <= 1.0 + 1e-4 for v in evidence.values())
        heat = ranking.heatmaps[fid]
        assert heat.shape == tuple(scene.lake.stack.map_sizes[i]) and 0 <= heat.min() and heat.max() <= 1
    # B's template evidence is the strongest of all frames but the query frame itself.
    assert dtm.scores[b] == max(dtm.scores[scene.ids.index(f)] for f in scene.ids if f != "A")


def _first_stage(scene, method: str, mining):
    vector = query_region_vector(scene.query, scene.lake.regions)
    stage, hits = first_stage(scene.search, get_method(method), scene.query, vector, mining)
    return stage, None if hits is None else [h.frame_id for h in hits]


def test_a_large_box_ranks_the_region_index_shortlist_only(scene):
    """A box over ``mining.small_box`` of its frame: the frames whose best region is nearest the query's region
    vector in the index are the shortlist (the query's own frame never); the first ``mining.rerank`` are
    re-ranked, fused evidence standardised over them alone, and the rest follow in the index's order."""
    k = 5
    mining = _mining(scene, f"mining.rerank={k}", "mining.small_box=0.0", "mining.fusion=sum", "mining.reference=0")
    assert not scene.query.is_small(mining.small_box)
    vector = query_region_vector(scene.query, scene.lake.regions)
    region, region_boxes = best_region_per_frame(scene.query, scene.lake)
    by_region = [scene.ids[i] for i in np.argsort(-region, kind="stable")]
    assert by_region[0] == "A"   # the query's own frame is the index's best hit: excluding it is real work
    expected = [f for f in by_region if f != "A"][:k]
    stage, shortlist = _first_stage(scene, "fused", mining)
    assert stage == "regions" and shortlist == [f for f in by_region if f != "A"]   # best region first

    result = rank_query(scene.search, scene.query, "fused", mining, gem_p=scene.gem_p, keep_heatmaps=k)
    ranking = result.ranking
    head = ranking.frame_ids[:k]
    assert result.candidates == k and result.stage == "regions" and "A" not in ranking.frame_ids
    assert sorted(head) == sorted(expected)
    assert ranking.frame_ids[k:] == shortlist[k:]   # the rest of the shortlist, in the index's order ...
    assert ranking.scores[k:].max() < ranking.scores[:k].min()   # ... below every re-ranked frame
    assert np.all(np.diff(ranking.scores[k:]) < 0)
    tail_rows = [scene.ids.index(f) for f in shortlist[k:]]
    np.testing.assert_allclose(ranking.boxes[k:], region_boxes[tail_rows], atol=1e-3)   # their best region's box
    np.testing.assert_allclose(result.vector, vector, atol=1e-6)
    assert set(ranking.heatmaps) == set(ranking.evidence) == set(expected)   # every candidate template-matched

    # The scores: the evidence of the whole lake at the candidates, standardised over the candidates alone.
    glob = scene.lake.global_vectors @ gem(scene.query.maps["stride32"], scene.gem_p)
    dtm = rank("dtm", scene.query, scene.lake, _inputs(scene))
    at = np.array([scene.ids.index(f) for f in head])
    scores, boxes, weight = fuse_evidence(region[at], glob[at], dtm.scores[at], region_boxes[at], dtm.boxes[at],
                                          np.arange(k), mining.weights, "sum", mining.gate)
    assert weight is None
    np.testing.assert_allclose(ranking.scores[:k], scores, atol=1e-4)
    np.testing.assert_allclose(ranking.boxes[:k], dtm.boxes[at], atol=1e-3)   # sum fusion: the template's boxes
    whole = rank("fused", scene.query, scene.lake, _inputs(scene, "mining.fusion=sum"))
    assert not np.allclose(ranking.scores[:k], whole.scores[at], atol=1e-2)   # not the whole lake's standardisation
    for fid in head:
        i = scene.ids.index(fid)
        assert ranking.evidence[fid]["region"] == pytest.approx(float(region[i]), abs=1e-5)
        assert ranking.evidence[fid]["template"] == pytest.approx(float(dtm.scores[i]), abs=1e-4)

    # With reference frames (spread over the lake, none a candidate nor the query's), the candidates' evidence is
    # standardised over them and the candidates together; they are scored, then dropped from the ranking.
    with_reference = _mining(scene, f"mining.rerank={k}", "mining.small_box=0.0", "mining.fusion=sum",
                             "mining.reference=3")
    reference = reference_rows(scene.search, at, 3, {"A"})
    assert len(reference) == 3 and not set(reference) & set(at) and scene.ids.index("A") not in reference
    referenced = rank_query(scene.search, scene.query, "fused", with_reference, gem_p=scene.gem_p)
    assert referenced.ranking.frame_ids[:k] == head and referenced.candidates == k
    both = np.concatenate([at, reference])
    scores, _, _ = fuse_evidence(region[both], glob[both], dtm.scores[both], region_boxes[both], dtm.boxes[both],
                                 np.arange(len(both)), mining.weights, "sum", mining.gate)
    np.testing.assert_allclose(referenced.ranking.scores[:k], scores[:k], atol=1e-4)

    # mining.shortlist cuts the list the first stage returns.
    short = rank_query(scene.search, scene.query, "fused", _mining(scene, f"mining.rerank={k}", "mining.shortlist=7",
                                                                    "mining.small_box=0.0"), gem_p=scene.gem_p)
    assert len(short.ranking.frame_ids) == 7 and short.ranking.frame_ids[k:] == shortlist[k:7]
    # The shortlist is the index's alone: the fusion weights do not change it.
    no_global = _mining(scene, f"mining.rerank={k}", "mining.small_box=0.0",
                        "mining.weights={region: 1.0, template: 1.0, global: 0.0, classes: 0.0}")
    assert _first_stage(scene, "fused", no_global)[1] == shortlist
    # A lake no larger than rerank is ranked whole, the query's frame in it.
    every = rank_query(scene.search, scene.query, "fused", _mining(scene, "mining.rerank=50", "mining.small_box=0.0",
                                                                  "mining.fusion=sum"), gem_p=scene.gem_p)
    assert every.candidates == len(scene.ids) - 1 and every.ranking.frame_ids == scene.ids and every.stage == "all"
    np.testing.assert_allclose(every.ranking.scores, whole.scores, atol=1e-6)


def test_round_robin_takes_each_lists_next_frame_in_turn():
    hit = lambda f: FrameHit(f, 0.0, 0, (0.0, 0.0, 1.0, 1.0))   # noqa: E731
    lists = [[hit("a"), hit("b"), hit("c")], [hit("b"), hit("d")], [], [hit("e")]]
    assert [h.frame_id for h in round_robin(lists, 10)] == ["a", "b", "e", "d", "c"]
    assert [h.frame_id for h in round_robin(lists, 2)] == ["a", "b"]
    assert round_robin([], 5) == [] and round_robin([[], []], 5) == []


def test_each_view_of_a_small_box_asks_the_indexes_on_its_own(scene, bench_dir):
    """Each view of a small box (here the zebra of another frame stands in for the query's zoomed view) votes in
    the cell index, and the zoomed view searches the region index too, each for its share of the shortlist; the
    lists are merged round-robin: the view's best frame is among the first three (after the query's cell list's
    best and the region list's best), where one vote of both views' cells pooled would leave it to whichever
    template dominates. A mirror view votes in the cell index only (its pooled region vector is nearly the
    query's)."""
    coco = json.loads((bench_dir / "coco_mini" / "annotations.json").read_text())
    image = next(i for i in coco["images"] if i["file_name"] == "images/000000000034.jpg")
    zebra_box = tuple(next(a["bbox"] for a in coco["annotations"] if a["image_id"] == image["id"]))
    other = QueryObject(scene.maps["zebra"], (image["width"], image["height"]), zebra_box)
    mining = _mining(scene, "mining.rerank=1", "mining.small_box=1.0")
    search, k, share = scene.search, mining.shortlist, -(-mining.shortlist // 2)

    def cells(v):
        return search.cell_shortlist(template_keys(v.maps["stride16"], v.box, v.image_size, 3), share, exclude={"A"})

    def regions(v, n):
        return search.region_shortlist(query_region_vector(v, scene.lake.regions), n, exclude={"A"})

    for role in ("zoomed", "mirror"):
        query = QueryObject(scene.query.maps, scene.query.image_size, scene.query.box, frame_id="A", **{role: other})
        stage, hits = first_stage(search, get_method("fused"), query, query_region_vector(query, scene.lake.regions),
                                  mining)
        by_cell = [cells(query), cells(other)]
        assert by_cell[0][0].frame_id == "B" and by_cell[1][0].frame_id == "zebra"   # each view's own best
        by_region = [regions(query, k)] + ([regions(other, share)] if role == "zoomed" else [])
        assert stage == "cells+regions"
        assert hits == round_robin([round_robin(by_cell, k), round_robin(by_region, k)], k), role
        assert hits[0].frame_id == "B" and "zebra" in [h.frame_id for h in hits[:3]]
        assert len({h.frame_id for h in hits}) == len(hits) and "A" not in {h.frame_id for h in hits}


def test_a_small_box_is_shortlisted_by_the_cell_index(scene):
    """A box under ``small_box`` of its frame, for a method that matches templates: the cell index's frames
    (voted for by the box's template cells) merged round-robin with the region index's: the pasted
    clock's frame B is the cell index's best, and the clean copy of B (the same street without it) is not near."""
    mining = _mining(scene, "mining.rerank=1", "mining.small_box=1.0")
    assert scene.query.is_small(mining.small_box)
    _, by_region = _first_stage(scene, "fused", _mining(scene, "mining.rerank=1", "mining.small_box=0.0"))
    keys = template_keys(scene.query.maps["stride16"], scene.query.box, scene.query.image_size, 3)
    assert keys.shape == (9, 112)   # the clock's 3 x 3 template cells vote (lite0 stride 16: 112 channels)
    by_cell = scene.search.cell_shortlist(keys, 20, exclude={"A"})
    assert by_cell[0].frame_id == "B" and "A" not in [h.frame_id for h in by_cell]
    assert by_cell[0].score > [h.score for h in by_cell if h.frame_id == "B_clean"][0] + 0.05
    assert iou_xywh(by_cell[0].box, scene.paste_box) > 0   # its best cell lies on the clock
    stage, shortlist = _first_stage(scene, "fused", mining)
    assert stage == "cells+regions" and shortlist[0] == "B" and "A" not in shortlist
    regions_hits = scene.search.region_shortlist(query_region_vector(scene.query, scene.lake.regions), 20,
                                                 exclude={"A"})
    assert shortlist == [h.frame_id for h in round_robin([by_cell, regions_hits], 20)]
    assert sorted(shortlist) == sorted(f for f in scene.ids if f != "A")   # each frame once
    result = rank_query(scene.search, scene.query, "fused", mining, gem_p=scene.gem_p, keep_heatmaps=1)
    assert result.candidates == 1 and result.ranking.frame_ids[0] == "B" and list(result.ranking.evidence) == ["B"]
    b = result.ranking
    assert iou_xywh(b.boxes[0], scene.paste_box) >= 0.3, (b.boxes[0], scene.paste_box)

    # The threshold is the box's share of its frame (0.077 for the clock), strictly below.
    width, height = scene.query.image_size
    share = scene.box[2] * scene.box[3] / (width * height)
    assert _first_stage(scene, "fused", _mining(scene, "mining.rerank=1", f"mining.small_box={share * 1.01}"))[0] \
        == "cells+regions"
    assert _first_stage(scene, "fused", _mining(scene, "mining.rerank=1", f"mining.small_box={share * 0.99}"))[0] \
        == "regions"
    # dtm matches templates too; regions keeps the region shortlist; the whole-frame baselines and discovery
    # score every frame (one cheap score a frame).
    assert _first_stage(scene, "dtm", mining)[0] == "cells+regions"
    assert _first_stage(scene, "regions", mining) == ("regions", by_region)
    for name in ("gem", "rmac", "discovery"):
        assert _first_stage(scene, name, mining) == ("all", None)
    # Without a cell index (a lake built before it existed) the region index shortlists alone.
    cells, scene.search.cells = scene.search.cells, None
    try:
        assert _first_stage(scene, "fused", mining) == ("regions", by_region)
    finally:
        scene.search.cells = cells


def test_regions_method_returns_region_boxes_in_pixels(scene):
    ranking = rank("regions", scene.query, scene.lake, _inputs(scene))
    lake = scene.lake
    region, _ = best_region_per_frame(scene.query, lake)
    glob = lake.global_vectors @ gem(scene.query.maps["stride32"], scene.gem_p)
    np.testing.assert_allclose(ranking.scores, region + scene.params.mining.weights.global_ * glob, atol=1e-5)
    assert scene.params.mining.weights.global_ > 0   # the global term is in play
    for row, fid in enumerate(scene.ids):
        own = lake.regions.boxes[lake.regions.owner == row]
        box = ranking.boxes[row]
        assert np.isclose(own, box, atol=1e-4).all(axis=1).any(), (fid, box)  # one of the frame's own regions
        x, y, w, h = box
        width, height = scene.frames[row].width, scene.frames[row].height
        assert x >= -1e-3 and y >= -1e-3 and w > 0 and h > 0
        assert x + w <= width + 1e-3 and y + h <= height + 1e-3
        # Region boxes are whole/uniform regions: source codes as stored.
        assert set(scene.per_frame[fid][0].sources.tolist()) == {SOURCES.index("whole"), SOURCES.index("uniform")}
    # Each frame's score is its best region's cosine (the global term aside), the best over its own regions.
    fmap = scene.query.maps["stride32"]
    cells = np.array([box_to_cells(scene.box, scene.query.image_size, fmap.shape[-2:])], np.float32)
    sims = lake.regions.vectors @ lake.regions.encode(pool_regions(fmap, cells, "avg"))[0]
    for row in range(len(scene.ids)):
        assert region[row] == pytest.approx(float(sims[lake.regions.owner == row].max()), abs=1e-5)


def test_rmac_baseline(scene):
    ranking = rank("rmac", scene.query, scene.lake, _inputs(scene))
    a = scene.ids.index("A")
    assert ranking.frame_ids[ranking.order()[0]] == "A"  # the query frame's own R-MAC
    assert ranking.scores[a] == pytest.approx(1.0, abs=1e-5)
    assert (ranking.scores <= 1 + 1e-5).all() and (ranking.scores >= -1 - 1e-5).all()
    for row, frame in enumerate(scene.frames):
        np.testing.assert_allclose(ranking.boxes[row], [0, 0, frame.width, frame.height])
    # B and its clean copy are nearly the same image; the pasted clock lifts B towards the query.
    b, clean = scene.ids.index("B"), scene.ids.index("B_clean")
    assert float(scene.lake.rmac_vectors[b] @ scene.lake.rmac_vectors[clean]) > 0.9
    assert ranking.scores[b] > ranking.scores[clean]
    # An unknown method is an error naming every known one, from rank and from the mining path alike.
    known = "fused, regions, dtm, gem, rmac, discovery"
    with pytest.raises(ObjretError, match=f"unknown mining method 'nope'; choose one of {known}$"):
        rank("nope", scene.query, scene.lake, _inputs(scene))
    with pytest.raises(ObjretError, match=f"unknown mining method 'nope'; choose one of {known}$"):
        rank_query(scene.search, scene.query, "nope", scene.params.mining, gem_p=scene.gem_p)


def test_rmac_is_unit_norm(scene):
    for fid in scene.ids:
        fmap = scene.maps[fid]["stride32"]
        vector = rmac(fmap)
        assert vector.shape == (fmap.shape[0],) and vector.dtype == np.float32
        assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)
        np.testing.assert_allclose(rmac(fmap.astype(np.float32) * 3.0), vector, atol=1e-5)  # scale-invariant
    assert not np.allclose(rmac(scene.maps["A"]["stride32"]), rmac(scene.maps["zebra"]["stride32"]))


def test_max_fusion_takes_the_better_evidence(scene):
    n = len(scene.ids)
    ranking = rank("fused", scene.query, scene.lake, _inputs(scene, "mining.fusion=max", keep_heatmaps=n))
    summed = rank("fused", scene.query, scene.lake, _inputs(scene, "mining.fusion=sum", keep_heatmaps=n))
    w = scene.params.mining.weights
    z = {}
    for kind in ("region", "template", "global"):   # standardised over the lake without the query frame A
        values = np.array([summed.evidence[f][kind] for f in scene.ids])
        z[kind] = (values - values[1:].mean()) / (values[1:].std() + 1e-6)
    context = w.region * z["region"] + w.global_ * z["global"]
    np.testing.assert_allclose(ranking.scores, np.maximum(context, w.template * z["template"]), atol=1e-4)
    np.testing.assert_allclose(summed.scores, context + w.template * z["template"], atol=1e-4)
    assert not np.allclose(ranking.scores, summed.scores, atol=1e-2)
    assert _order_without(ranking)[0] == "B"
    # An unknown fusion: refused by the parameters, and by the fusion itself.
    with pytest.raises(ObjretError, match="mining.fusion"):
        scene.params.replace("mining.fusion=product")
    m = scene.params.mining
    with pytest.raises(ValueError, match="unknown fusion 'product'"):
        rank_fused(scene.query, scene.lake, weights=m.weights, layer=m.layer, template_cells=m.template_cells,
                   scales=tuple(m.scales), scale_tolerance=m.scale_tolerance, gem_p=scene.gem_p, fusion="product",
                   gate=m.gate)


def test_a_subset_of_the_lake_ranks_its_frames_as_the_whole_lake_does(scene):
    rows = [scene.ids.index(k) for k in ("B", "kitti_40", "zebra", "B_clean")]
    sub = scene.lake.subset(rows)
    assert sub.frame_ids == sub.stack.frame_ids == ["B", "kitti_40", "zebra", "B_clean"]
    assert len(sub.regions.vectors) == sum(len(scene.per_frame[scene.ids[r]][0]) for r in rows)
    inputs = _inputs(scene)
    whole = rank("regions", scene.query, scene.lake, inputs)
    part = rank("regions", scene.query, sub, inputs)
    np.testing.assert_allclose(part.scores, whole.scores[rows], atol=1e-6)
    np.testing.assert_allclose(part.boxes, whole.boxes[rows], atol=1e-4)
    dtm_whole = rank("dtm", scene.query, scene.lake, inputs)
    np.testing.assert_allclose(rank("dtm", scene.query, sub, inputs).scores, dtm_whole.scores[rows], atol=1e-5)


def test_template_weight_follows_the_evidence_that_stands_out():
    from objret.mining.fusion import template_weight

    gate = load_params().mining.gate
    assert (gate.top, gate.offset, gate.slope) == (3, 1.0, 2.0)
    rng = np.random.default_rng(0)
    flat, peaked = rng.normal(size=500), rng.normal(size=500)
    peaked[:3] = 8.0   # three frames far above the rest of the lake
    assert template_weight(flat, peaked, gate.top, gate.offset, gate.slope) > 0.99
    assert template_weight(peaked, flat, gate.top, gate.offset, gate.slope) < 0.01
    # The logistic of (template peak - context peak - offset), peaks the mean of the top 3.
    peak = lambda x: np.sort(x)[-3:].mean()
    expected = 1 / (1 + np.exp(-2.0 * (peak(peaked) - peak(flat) - 1.0)))
    assert template_weight(flat, peaked, top=3, offset=1.0, slope=2.0) == pytest.approx(expected)
    assert template_weight(flat, flat, top=3, offset=0.0, slope=2.0) == pytest.approx(0.5)
    # The peak is over the top ``top`` scores: one outlier moves a top-1 gate, hardly a top-10 one.
    spike = flat.copy()
    spike[np.argmax(spike)] = 8.0
    assert (template_weight(flat, spike, top=1, offset=0.0, slope=2.0)
            > template_weight(flat, spike, top=10, offset=0.0, slope=2.0) + 0.2)


def test_adaptive_fusion_mixes_the_evidence_by_the_query_weight(scene):
    lake, ids = scene.lake, scene.ids
    adaptive = ("mining.fusion=adaptive",)
    ranking = rank("fused", scene.query, lake, _inputs(scene, *adaptive, keep_heatmaps=len(ids)))
    evidence = ranking.evidence
    weight = evidence["B"]["template_weight"]
    assert 0.0 < weight < 1.0 and {e["template_weight"] for e in evidence.values()} == {weight}
    # Standardised over the lake without the query's own frame A, context rescaled to unit spread.
    ref = [f for f in ids if f != "A"]
    z = {}
    for kind in ("region", "template", "global"):
        values = np.array([evidence[f][kind] for f in ids])
        ref_values = np.array([evidence[f][kind] for f in ref])
        z[kind] = (values - ref_values.mean()) / (ref_values.std() + 1e-6)
    w = scene.params.mining.weights
    context = w.region * z["region"] + w.global_ * z["global"]
    context = context / (context[1:].std() + 1e-6)
    template = w.template * z["template"]
    np.testing.assert_allclose(ranking.scores, (1 - weight) * context + weight * template, atol=1e-4)
    assert _order_without(ranking)[0] == "B"

    b = ids.index("B")
    as_instance = rank("fused", scene.query, lake, _inputs(scene, *adaptive, "mining.gate.offset=-100.0"))  # weight 1
    assert _order_without(as_instance)[0] == "B"
    np.testing.assert_allclose(as_instance.scores, template, atol=1e-4)
    assert iou_xywh(as_instance.boxes[b], scene.paste_box) >= 0.5   # the template's box
    as_class = rank("fused", scene.query, lake, _inputs(scene, *adaptive, "mining.gate.offset=100.0"))      # weight 0
    np.testing.assert_allclose(as_class.scores, context, atol=1e-4)
    regions = rank("regions", scene.query, lake, _inputs(scene))
    np.testing.assert_allclose(as_class.boxes, regions.boxes, atol=1e-4)   # the best regions' boxes


# ---- diffusion evidence (region graph, 003 / Iscen et al.) -------------------------------------------------

def test_diffusion_evidence_is_standardised_and_added_to_the_context_side(scene):
    ids = scene.ids
    n = len(ids)
    setting = ("mining.fusion=sum", "mining.diffusion.weight=0.7")
    without = rank("fused", scene.query, scene.lake, _inputs(scene, *setting, keep_heatmaps=n))
    unchanged = rank("fused", scene.query, scene.lake, _inputs(scene, *setting, keep_heatmaps=n, diffusion=None))
    np.testing.assert_array_equal(unchanged.scores, without.scores)          # None: bit-identical
    np.testing.assert_array_equal(unchanged.boxes, without.boxes)
    assert unchanged.evidence == without.evidence

    diffusion = np.linspace(0.0, 1.0, n) ** 2
    diffusion[ids.index("B_clean")] = 5.0
    ranking = rank("fused", scene.query, scene.lake, _inputs(scene, *setting, keep_heatmaps=n, diffusion=diffusion))
    ref = diffusion[1:]                                                       # the query's frame A left out
    z = (diffusion - ref.mean()) / (ref.std() + 1e-6)
    np.testing.assert_allclose(ranking.scores, without.scores + 0.7 * z, atol=1e-4)
    for i, fid in enumerate(ids):
        assert ranking.evidence[fid]["diffusion"] == pytest.approx(diffusion[i])
        assert {k: v for k, v in ranking.evidence[fid].items() if k != "diffusion"} == without.evidence[fid]
    lifted = _order_without(ranking).index("B_clean")
    assert lifted < _order_without(without).index("B_clean") and lifted <= 1
    # Max fusion: diffusion sits on the context side, with region and global evidence.
    maxed = rank("fused", scene.query, scene.lake, _inputs(scene, "mining.fusion=max", "mining.diffusion.weight=0.7",
                                                           keep_heatmaps=n, diffusion=diffusion))
    w = scene.params.mining.weights
    zs = {}
    for kind in ("region", "template", "global"):
        values = np.array([without.evidence[f][kind] for f in ids])
        zs[kind] = (values - values[1:].mean()) / (values[1:].std() + 1e-6)
    context = w.region * zs["region"] + w.global_ * zs["global"] + 0.7 * z
    np.testing.assert_allclose(maxed.scores, np.maximum(context, w.template * zs["template"]), atol=1e-4)


def test_diffusion_over_a_real_region_graph_ranks_with_the_fused_method(scene):
    from objret.graph.centrality import katz_centrality
    from objret.graph.diffusion import GraphDiffusion
    from objret.graph.knn import build_region_graph

    regions, ids = scene.lake.regions, scene.ids
    graph = build_region_graph(regions.vectors, k=10)
    assert graph.nodes == len(regions.vectors) and katz_centrality(graph.matrix).converged

    def search(q, k):
        sims = regions.vectors @ q
        top = np.argsort(-sims, kind="stable")[:k]
        return top, sims[top]

    diffusion = GraphDiffusion(graph.matrix, regions.owner, list(ids), search, k=10, max_iter=20)
    query = query_region_vector(scene.query, regions)
    rows = diffusion.rows_for(list(reversed(ids)) + ["not-in-the-graph"])
    scores, solve = diffusion.scores(query, rows)
    assert scores.shape == (len(ids) + 1,) and scores[-1] == 0.0 and solve.iterations <= 20
    # Per frame: its best region's diffused score; the seeds are the query's nearest regions.
    per_frame = np.array([solve.values[regions.owner == r].max() for r in range(len(ids))])
    np.testing.assert_allclose(scores[:-1], per_frame[::-1])
    nearest_frame = regions.owner[np.argmax(regions.vectors @ query)]
    assert per_frame[nearest_frame] == per_frame.max() > 0

    frame_scores = diffusion.scores(query, diffusion.rows_for(ids))[0]
    weighted = ("mining.diffusion.weight=0.5",)
    ranking = rank("fused", scene.query, scene.lake, _inputs(scene, *weighted, keep_heatmaps=3,
                                                             diffusion=frame_scores))
    assert _order_without(ranking)[0] == "B"      # the pasted clock still first (adaptive fusion)
    assert len(ranking.evidence) == 3 and all("diffusion" in e for e in ranking.evidence.values())
    with pytest.raises(ObjretError, match="fused method only"):
        rank("regions", scene.query, scene.lake, _inputs(scene, *weighted, diffusion=frame_scores))
    with pytest.raises(ValueError, match="one score per frame"):
        rank("fused", scene.query, scene.lake, _inputs(scene, *weighted, diffusion=frame_scores[:5]))

    # Through the mining path, with the index's own search: the candidates' diffusion scores are fused.
    by_index = GraphDiffusion(graph.matrix, regions.owner, list(ids), scene.search.index.search, k=10, max_iter=20)
    mining = _mining(scene, *weighted, "mining.rerank=4", "mining.shortlist=4", "mining.small_box=0.0",
                     "mining.reference=0")
    result = rank_query(scene.search, scene.query, "fused", mining, gem_p=scene.gem_p, keep_heatmaps=4,
                        diffusion=by_index)
    candidates = result.ranking.frame_ids
    assert result.candidates == 4 and "A" not in candidates and result.diffusion_solve.iterations <= 20
    expected = by_index.scores(query, by_index.rows_for(candidates))[0]
    np.testing.assert_allclose([result.ranking.evidence[f]["diffusion"] for f in candidates], expected, atol=1e-6)
    np.testing.assert_allclose(expected, frame_scores[[ids.index(f) for f in candidates]], atol=1e-5)
    with pytest.raises(ObjretError, match="fused method only"):
        rank_query(scene.search, scene.query, "regions", mining, gem_p=scene.gem_p, diffusion=by_index)


def test_rocchio_moves_the_query_towards_accepted_and_away_from_rejected_vectors():
    q, pos, neg = np.array([1.0, 0, 0]), np.array([[0, 1.0, 0], [0, 1.0, 0]]), np.array([[0, 0, 1.0]])
    moved = rocchio(q, pos, neg, 0.75, 0.15)
    expected = np.array([1.0, 0.75, -0.15])
    np.testing.assert_allclose(moved, expected / np.linalg.norm(expected), atol=1e-6)
    np.testing.assert_allclose(rocchio(2 * q, pos[:0], neg[:0], 0.75, 0.15), q)   # no verdicts: the query


def test_a_review_teaches_the_query_and_keeps_judged_frames_out(scene):
    """Relevance feedback (objret.mining.feedback) through candidate selection: the query is a box on a KITTI
    frame that has nothing to do with the clock; a review accepted the pasted clock in B and rejected B's clean
    copy. B's box becomes a template that finds the clock's original in A (first, boxed), judged frames are never
    ranked again, and Rocchio moves the region vector as its formula says."""
    kitti = scene.maps["kitti_40"]
    frame = next(f for f in scene.frames if f.frame_id == "kitti_40")
    query = QueryObject(kitti, (frame.width, frame.height), (600.0, 150.0, 120.0, 90.0), frame_id="kitti_40")
    mining = _mining(scene, "mining.rerank=50")
    plain = rank_query(scene.search, query, "dtm", mining, gem_p=scene.gem_p)
    assert _order_without(plain.ranking, ("kitti_40",))[0] != "A" and plain.feedback is None
    review = Feedback({"B": tuple(float(v) for v in scene.paste_box)}, frozenset({"B_clean"}))
    taught = rank_query(scene.search, query, "dtm", mining, gem_p=scene.gem_p, feedback=review)
    order = _order_without(taught.ranking, ("kitti_40",))
    assert order[0] == "A" and not {"B", "B_clean"} & set(taught.ranking.frame_ids)
    assert taught.candidates == len(scene.ids) - 3
    a = taught.ranking.frame_ids.index("A")
    assert iou_xywh(taught.ranking.boxes[a], scene.box) >= 0.5, (taught.ranking.boxes[a], scene.box)
    learned = taught.feedback
    assert (learned.accepted, learned.rejected, len(learned.templates)) == (1, 1, 1)
    # The region vector: + 0.75 x B's region that best covers the accepted box, - 0.15 x B_clean's region nearest
    # the query.
    regions, b, clean = scene.lake.regions, scene.ids.index("B"), scene.ids.index("B_clean")
    vector = query_region_vector(query, regions)
    of_b = np.flatnonzero(regions.owner == b)
    covering = of_b[np.argmax([iou_xywh(regions.boxes[r], scene.paste_box) for r in of_b])]
    of_clean = np.flatnonzero(regions.owner == clean)
    nearest = of_clean[np.argmax(regions.vectors[of_clean] @ vector)]
    np.testing.assert_allclose(learned.region_vector, rocchio(vector, regions.vectors[[covering]],
                                                              regions.vectors[[nearest]], 0.75, 0.15), atol=1e-5)
    np.testing.assert_allclose(taught.vector, learned.region_vector)
    # The fused method learns the same way; gem only keeps the judged frames out; feedback off changes nothing.
    fused = rank_query(scene.search, query, "fused", mining, gem_p=scene.gem_p, feedback=review)
    assert fused.feedback is not None and not {"B", "B_clean"} & set(fused.ranking.frame_ids)
    gem_ranked = rank_query(scene.search, query, "gem", mining, gem_p=scene.gem_p, feedback=review)
    assert gem_ranked.feedback is None and not {"B", "B_clean"} & set(gem_ranked.ranking.frame_ids)
    off = rank_query(scene.search, query, "dtm", _mining(scene, "mining.rerank=50", "mining.feedback.enabled=false"),
                     gem_p=scene.gem_p, feedback=review)
    assert off.feedback is None and "B" not in off.ranking.frame_ids
    np.testing.assert_allclose(off.ranking.scores, plain.ranking.scores[[plain.ranking.frame_ids.index(f)
                                                                         for f in off.ranking.frame_ids]])


def test_the_boxes_a_report_outputs_are_fitted_to_the_object(scene):
    """With the lake's pixels to read and the query box's colours, rank_query fits the boxes of its first
    ``mining.top_k`` frames (objret.mining.box_fit): each becomes its ranking's box, its template's box or one of
    its frame's region boxes; the ranking and the other boxes stay as they were. The pasted clock, which the fused
    ranking boxes with a grid region around it, gets the template's box on it back. Without a reader, or with
    ``mining.box_colour`` 0, no box moves."""
    mining = _mining(scene, "mining.rerank=11", "mining.small_box=0.0", "mining.top_k=4", "mining.reference=0")
    plain = rank_query(scene.search, scene.query, "fused", mining, gem_p=scene.gem_p).ranking
    query = dataclasses.replace(scene.query, colour=colour_signature(scene.images["A"], scene.box))
    search = dataclasses.replace(scene.search, read_image=scene.images.__getitem__)
    fitted = rank_query(search, query, "fused", mining, gem_p=scene.gem_p, keep_heatmaps=4).ranking
    assert fitted.frame_ids == plain.frame_ids and np.array_equal(fitted.scores, plain.scores)
    order = fitted.order()   # the lake is ranked whole, the query's own frame first
    b = order[1]
    assert [fitted.frame_ids[i] for i in order[:2]] == ["A", "B"]
    assert iou_xywh(plain.boxes[b], scene.paste_box) < 0.5 <= iou_xywh(fitted.boxes[b], scene.paste_box)
    np.testing.assert_array_equal(fitted.boxes[order[4:]], plain.boxes[order[4:]])   # past top_k
    index = scene.search.index
    for i in order[:4]:
        own = index.boxes[index.owner == index.rows_of([fitted.frame_ids[i]])[0]]
        offered = [plain.boxes[i], fitted.template_boxes[fitted.frame_ids[i]], *own]
        assert any(np.allclose(fitted.boxes[i], box) for box in offered)
    off = _mining(scene, "mining.rerank=11", "mining.small_box=0.0", "mining.top_k=4", "mining.reference=0",
                  "mining.box_colour=0")
    np.testing.assert_array_equal(rank_query(search, query, "fused", off, gem_p=scene.gem_p).ranking.boxes, plain.boxes)
    unread = rank_query(scene.search, query, "fused", mining, gem_p=scene.gem_p).ranking
    np.testing.assert_array_equal(unread.boxes, plain.boxes)
