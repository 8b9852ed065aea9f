"""objret.mining.methods: near-duplicate collapsing, and the method dispatch of ``rank`` over real bench maps."""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch

from objret.features.backbone import build_backbone
from objret.features.cache import extract_maps
from objret.ingest.decode import load_image
from objret.mining.template_matching import MapStack
from objret.boxes import iou_xywh
from objret.mining.lakemaps import LakeMaps
from objret.config import load_params
from objret.errors import ObjretError
from objret.mining.methods import RankInputs, rank
from objret.mining.query import QueryObject
from objret.mining.dedup import collapse_near_duplicates
from objret.regions.pooling import gem

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BOX = [100.0, 100.0, 50.0, 80.0]


def item(frame_id, source="cam1.avi", frame_index=None, box=BOX, score=0.0):
    return {"frame_id": frame_id, "source": source, "frame_index": frame_index, "box": list(box), "score": score}


# ---- collapse_near_duplicates ---------------------------------------------------------------------------


def test_neighbouring_frames_at_the_same_place_collapse_into_the_best():
    ranked = [
        item("f10", frame_index=10, score=0.9),
        item("f12", frame_index=12, box=[104, 103, 50, 80], score=0.8),   # 2 frames on, IoU 0.84
        item("f5", frame_index=5, box=[96, 98, 52, 80], score=0.7),       # 5 frames before
        item("f20", frame_index=20, score=0.6),                           # gap 10 = max_frame_gap: still a twin
    ]
    before = copy.deepcopy(ranked)
    kept = collapse_near_duplicates(ranked, max_frame_gap=10, min_iou=0.3)
    assert [k["frame_id"] for k in kept] == ["f10"]
    assert kept[0]["duplicates"] == ["f12", "f5", "f20"]
    assert kept[0]["score"] == 0.9 and kept[0]["box"] == BOX  # the best one is kept as it was
    assert ranked == before  # the input is not modified


def test_frame_zero_is_a_video_frame():
    for first, second in (("f0", "f3"), ("f3", "f0")):
        ranked = [item(first, frame_index=int(first[1:])), item(second, frame_index=int(second[1:]))]
        kept = collapse_near_duplicates(ranked, 10, 0.3)
        assert [k["frame_id"] for k in kept] == [first] and kept[0]["duplicates"] == [second]


def test_far_frames_other_sources_stills_and_other_places_do_not_collapse():
    ranked = [
        item("f10", frame_index=10),
        item("f21", frame_index=21),                              # 11 frames away: beyond max_frame_gap
        item("other_source", source="cam2.avi", frame_index=10),  # same index and box, other video
        item("still_a", source="photos", frame_index=None),       # still images never collapse ...
        item("still_b", source="photos", frame_index=None),       # ... not even with each other
        item("f11_elsewhere", frame_index=11, box=[400, 300, 50, 80]),  # next frame, no overlap
        item("f12_low_iou", frame_index=12, box=[135, 100, 50, 80]),    # IoU 15/85 = 0.18 < 0.3
    ]
    assert iou_xywh(BOX, ranked[-1]["box"]) == pytest.approx(15 / 85)
    kept = collapse_near_duplicates(ranked, max_frame_gap=10, min_iou=0.3)
    assert [k["frame_id"] for k in kept] == [r["frame_id"] for r in ranked]
    assert all(k["duplicates"] == [] for k in kept)


def test_a_still_image_next_to_video_frames_of_its_source_does_not_collapse():
    ranked = [item("v10", frame_index=10), item("still", frame_index=None), item("v11", frame_index=11)]
    kept = collapse_near_duplicates(ranked, max_frame_gap=10, min_iou=0.3)
    assert [k["frame_id"] for k in kept] == ["v10", "still"]
    assert kept[0]["duplicates"] == ["v11"] and kept[1]["duplicates"] == []


def test_groups_form_per_place_and_time():
    ranked = [
        item("a0", frame_index=0),
        item("b50", frame_index=50),
        item("a4", frame_index=4, box=[102, 101, 50, 80]),
        item("b55", frame_index=55, box=[98, 99, 50, 80]),
        item("c30", frame_index=30),   # 20 frames from both kept frames
        item("b58", frame_index=58),   # near b50 (8) -> b50, even though c30 came later
    ]
    kept = collapse_near_duplicates(ranked, max_frame_gap=10, min_iou=0.5)
    assert {k["frame_id"]: k["duplicates"] for k in kept} == {"a0": ["a4"], "b50": ["b55", "b58"], "c30": []}
    assert [k["frame_id"] for k in kept] == ["a0", "b50", "c30"]  # rank order kept


def test_min_iou_threshold_is_inclusive():
    half = [100, 100, 50, 80]
    shifted = [100 + 50 / 3, 100, 50, 80]  # intersection 2/3 of each -> IoU exactly 0.5
    assert iou_xywh(half, shifted) == pytest.approx(0.5)
    assert len(collapse_near_duplicates([item("x", frame_index=1, box=half), item("y", frame_index=2, box=shifted)],
                                        10, 0.49)) == 1
    assert len(collapse_near_duplicates([item("x", frame_index=1, box=half), item("y", frame_index=2, box=shifted)],
                                        10, 0.51)) == 2


# ---- rank over real maps ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lake_maps(bench_dir):
    """Five real frames: tud_campus 14 (the query frame) and 16, kitti, pets09 and a coco zebra photo."""
    files = {
        "tud14": "tud_campus/images/000014.jpg",
        "tud16": "tud_campus/images/000016.jpg",
        "kitti": "kitti_0005/images/0000000020.jpg",
        "pets": "pets09_s2l1/images/000301.jpg",
        "zebra": "coco_mini/images/000000000034.jpg",
    }
    images = {fid: load_image(str(bench_dir / path)) for fid, path in files.items()}
    backbone = build_backbone("efficientnet_lite0", layers=("stride16", "stride32"), max_side=256)
    maps = extract_maps(backbone, list(images.items()), device=torch.device("cpu"))
    ids = list(files)
    sizes = [(img.shape[1], img.shape[0]) for img in images.values()]
    stack = MapStack(ids, [maps[i]["stride16"] for i in ids], sizes)
    vectors = np.stack([gem(maps[i]["stride32"]) for i in ids])
    annotations = json.loads((bench_dir / "tud_campus" / "annotations.json").read_text())
    # tud_campus frame 14, track 1: a pedestrian of 108 x 241 px, fully inside the frame.
    person = next(a for a in annotations["annotations"] if a["image_id"] == 14 and a["track_id"] == 1)
    query = QueryObject(maps["tud14"], (640, 480), tuple(person["bbox"]))
    same_person_later = next(a["bbox"] for a in annotations["annotations"]
                             if a["image_id"] == 16 and a["track_id"] == 1)
    return query, LakeMaps(stack, vectors), sizes, same_person_later


PARAMS = RankInputs(load_params(overrides=["mining.layer=stride16", "mining.template_cells=3",
                                           "mining.scales=[0.5, 1.0, 2.0]"]).mining, gem_p=3.0)


def test_an_unknown_method_is_refused_with_the_known_ones(lake_maps):
    query, lake, _, _ = lake_maps
    with pytest.raises(ObjretError, match="unknown mining method 'sift'; choose one of fused, regions, dtm, gem, rmac"):
        rank("sift", query, lake, PARAMS)


def test_rank_gem_returns_whole_frame_boxes_and_cosine_scores(lake_maps):
    query, lake, sizes, _ = lake_maps
    ranking = rank("gem", query, lake, PARAMS)
    assert ranking.frame_ids == lake.stack.frame_ids
    expected = np.array([[0, 0, w, h] for w, h in sizes], np.float32)
    np.testing.assert_array_equal(ranking.boxes, expected)
    assert ranking.boxes[lake.stack.frame_ids.index("kitti")].tolist() == [0, 0, 1242, 375]
    assert ranking.scores.dtype == np.float32
    assert ranking.scores[0] == pytest.approx(1.0, abs=1e-4)  # the query frame itself
    assert np.all(ranking.scores <= 1.0 + 1e-4)
    order = [ranking.frame_ids[i] for i in ranking.order()]
    assert order[:2] == ["tud14", "tud16"]  # the same scene two frames later comes next
    assert ranking.heatmaps == {} and ranking.evidence == {}


def test_rank_dtm_finds_the_pedestrian_scene_and_keeps_heatmaps(lake_maps):
    query, lake, _, later = lake_maps
    ranking = rank("dtm", query, lake, dataclasses.replace(PARAMS, keep_heatmaps=2))
    order = [ranking.frame_ids[i] for i in ranking.order()]
    assert order[:2] == ["tud14", "tud16"]
    assert ranking.scores[1] > ranking.scores[2:].max() + 0.2
    # On the query frame the box lands on the pedestrian, and two frames later on the same pedestrian.
    assert iou_xywh(ranking.boxes[0], query.box) >= 0.5, ranking.boxes[0]
    assert iou_xywh(ranking.boxes[1], later) >= 0.5, (ranking.boxes[1], later)
    assert set(ranking.heatmaps) == set(order[:2]) == set(ranking.evidence)
    for fid, heat in ranking.heatmaps.items():
        i = ranking.frame_ids.index(fid)
        assert heat.shape == tuple(lake.stack.map_sizes[i])
        assert heat.min() >= 0 and heat.max() <= 1
        assert ranking.evidence[fid]["template"] == pytest.approx(float(ranking.scores[i]))
