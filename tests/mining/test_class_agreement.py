"""objret.mining.class_agreement: the region detector's classes as the fused method's class evidence, on real
coco_mini photos through the real SSD detector, and in objret.mining.fusion.rank_fused."""

from __future__ import annotations

import json
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from objret.config import load_params
from objret.eval.metrics import average_precision
from objret.features.backbone import build_backbone
from objret.features.cache import extract_maps
from objret.ingest.decode import load_image
from objret.index.region_index import RegionIndex
from objret.mining.class_agreement import MIN_IOU, box_classes, class_agreement, seen_classes
from objret.mining.evidence import query_region_vector
from objret.mining.fusion import rank_fused
from objret.mining.feedback import Feedback
from objret.mining.lakemaps import LakeMaps
from objret.mining.methods import get_method
from objret.mining.query import QueryObject, zoom_window
from objret.mining.search import LakeSearch
from objret.mining.shortlist import classes_weighed_by_lake, first_stage, rank_query, rerank_candidates
from objret.mining.template_matching import MapStack
from objret.regions.detector import BoxProposer, Detection
from objret.regions.encoding import region_vectors
from objret.regions.pooling import gem
from objret.regions.sources import frame_regions, pool_regions
from objret.regions.store import RegionStore

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CLASS = "bus"


def test_box_classes_weights_the_detections_that_overlap_the_box():
    box = (100.0, 100.0, 50.0, 100.0)
    detections = [Detection(100, 100, 50, 100, 0.9, 6),     # the box itself: a bus, IoU 1
                  Detection(105, 110, 50, 100, 0.6, 3),     # mostly on it: a car
                  Detection(100, 100, 50, 90, 0.5, 6),      # the same bus, weaker: the best per class counts
                  Detection(300, 300, 50, 100, 0.99, 1),    # elsewhere: a person, left out
                  Detection(100, 100, 200, 200, 0.8, 7)]    # around it, IoU 0.125 < MIN_IOU: left out
    weights = box_classes(detections, box)
    assert set(weights) == {6, 3}
    assert sum(weights.values()) == pytest.approx(1.0)
    car_iou = (45 * 90) / (2 * 50 * 100 - 45 * 90)
    assert car_iou >= MIN_IOU
    assert weights[6] / weights[3] == pytest.approx(0.9 / (0.6 * car_iou))
    assert box_classes(detections[3:], box) == {}     # nothing on the box: no class, no evidence
    assert box_classes([], box) == {}


def test_class_agreement_takes_each_frames_most_confident_detection_of_each_class():
    classes = np.array([6, 6, 3, -1, 6, 1, -1])
    scores = np.array([0.4, 0.9, 0.5, 0.0, 0.3, 0.8, 0.0], np.float32)
    owner = np.array([0, 0, 0, 0, 1, 1, 2])
    agreement = class_agreement({6: 0.75, 3: 0.25}, classes, scores, owner, 4)
    np.testing.assert_allclose(agreement, [0.75 * 0.9 + 0.25 * 0.5, 0.75 * 0.3, 0.0, 0.0])
    assert not class_agreement({}, classes, scores, owner, 4).any()


@pytest.fixture(scope="module")
def lake(bench_dir, tmp_path_factory):
    """The test bench's 44 coco_mini photos, 7 of them holding a bus (the first is the query's), with their regions
    as objret.steps.regions stores them (whole + SSD detector boxes)."""
    coco = json.loads((bench_dir / "coco_mini" / "annotations.json").read_text())
    bus = next(c["id"] for c in coco["categories"] if c["name"] == CLASS)
    with_bus = {a["image_id"] for a in coco["annotations"] if a["category_id"] == bus}
    images = sorted(coco["images"], key=lambda i: i["id"])
    chosen = [i for i in images if i["id"] in with_bus] + [i for i in images if i["id"] not in with_bus]
    query_image = chosen[0]
    box = max((a["bbox"] for a in coco["annotations"] if a["image_id"] == query_image["id"]
               and a["category_id"] == bus), key=lambda b: b[2] * b[3])
    pixels = {str(i["id"]): load_image(str(bench_dir / "coco_mini" / i["file_name"])) for i in chosen}
    ids = list(pixels)

    backbone = build_backbone("efficientnet_lite0", layers=("stride16", "stride32"), max_side=256)
    maps = extract_maps(backbone, list(pixels.items()), device=torch.device("cpu"))
    detector = BoxProposer(score_threshold=0.05, max_boxes=30)
    detections = {i: detector.propose(pixels[i]) for i in ids}
    params = load_params(None, ["regions.sources=[whole, detector]", "mining.layer=stride16",
                                "mining.scales=[0.5, 1.0, 2.0]"])
    store = RegionStore(tmp_path_factory.mktemp("regions"))
    per_frame = {}
    for i in ids:
        fmap = maps[i]["stride32"]
        found = frame_regions(fmap, params.regions, image_size=(pixels[i].shape[1], pixels[i].shape[0]),
                              detections=detections[i])
        per_frame[i] = (found, pool_regions(fmap, found.boxes, "avg"), tuple(fmap.shape[-2:]))
    store.write(per_frame)
    frames = [SimpleNamespace(frame_id=i, width=pixels[i].shape[1], height=pixels[i].shape[0]) for i in ids]
    regions = region_vectors(store.load(), frames, "stride32", "avg")
    sizes = [(f.width, f.height) for f in frames]
    maps_lake = LakeMaps(MapStack(ids, [maps[i]["stride16"] for i in ids], sizes),
                         np.stack([gem(maps[i]["stride32"]) for i in ids]), regions)
    query = QueryObject(maps[ids[0]], sizes[0], tuple(box), frame_id=ids[0])
    query.classes = box_classes(detections[ids[0]], box)
    bus_boxes = {str(a["image_id"]): tuple(a["bbox"]) for a in sorted(coco["annotations"], key=lambda a: a["area"])
                 if a["category_id"] == bus}   # each photo's largest bus
    return SimpleNamespace(ids=ids, lake=maps_lake, query=query, params=params, detections=detections, label=bus,
                           positives={str(i["id"]) for i in chosen[1:len(with_bus)]}, bus_boxes=bus_boxes,
                           maps={i: maps[i]["stride16"] for i in ids})


@pytest.fixture(scope="module")
def search(lake):
    """The lake as objret mines it: its regions in a region index with their detector classes as meta."""
    regions = lake.lake.regions
    index = RegionIndex(regions.vectors.shape[1], kind="flat", use_gpu=False)
    index.add([lake.ids[o] for o in regions.owner], regions.vectors, regions.boxes,
              {"class": regions.classes.astype(np.float32), "class_score": regions.class_scores})
    frames = {f: SimpleNamespace(frame_id=f, width=int(w), height=int(h))
              for f, (w, h) in zip(lake.ids, lake.lake.stack.image_sizes)}
    return LakeSearch(index, frames, lambda wanted: {f: lake.maps[f] for f in wanted}, list(lake.ids),
                      lake.lake.global_vectors, regions)


def _ap(frame_ids, scores, positives, query_id):
    ranked = [frame_ids[i] for i in np.argsort(-np.asarray(scores), kind="stable") if frame_ids[i] != query_id]
    return average_precision(ranked, positives)


def test_stored_regions_keep_the_detectors_classes(lake):
    regions = lake.lake.regions
    assert len(regions.classes) == len(regions.owner) == len(regions.class_scores)
    from_detector = regions.classes >= 0
    assert from_detector.any() and (regions.class_scores[from_detector] >= 0.05).all()
    assert (regions.class_scores[~from_detector] == 0).all()
    # Frame by frame the stored classes are the detector's, in its order.
    for row, fid in enumerate(lake.ids):
        stored = regions.classes[(regions.owner == row) & from_detector]
        assert sorted(stored.tolist()) == sorted(d.label for d in lake.detections[fid])


def test_the_detectors_classes_find_the_bus_photos(lake):
    """The query's bus box is a bus to the SSD and the photos holding a bus agree with it far above chance (6 of
    43)."""
    assert max(lake.query.classes, key=lake.query.classes.get) == lake.label   # COCO's id is the SSD's
    regions = lake.lake.regions
    agreement = class_agreement(lake.query.classes, regions.classes, regions.class_scores, regions.owner,
                                len(lake.ids))
    ap = _ap(lake.ids, agreement, lake.positives, lake.ids[0])
    assert ap >= 0.8, ap


def _fused(lake, classes_weight: float, gate_offset: float | None = None):
    mining = lake.params.mining
    gate = mining.gate if gate_offset is None else mining.gate.model_copy(update={"offset": gate_offset})
    return rank_fused(lake.query, lake.lake, weights=mining.weights.model_copy(update={"classes": classes_weight}),
                      layer=mining.layer, template_cells=mining.template_cells, scales=tuple(mining.scales),
                      scale_tolerance=0.0, gem_p=3.0, fusion="adaptive", gate=gate, keep_heatmaps=len(lake.ids))


def test_fused_adds_the_class_agreement_to_the_region_sides_share(lake):
    default = lake.params.mining.weights.classes
    assert default > 0
    with_classes, without = _fused(lake, default), _fused(lake, 0.0)
    weight = with_classes.evidence[lake.ids[1]]["template_weight"]
    agreement = np.array([with_classes.evidence[f]["classes"] for f in lake.ids])
    assert "classes" not in without.evidence[lake.ids[1]]
    np.testing.assert_allclose(with_classes.scores, without.scores + (1 - weight) * default * agreement, atol=1e-5)
    # Ranked on the region side, as the gate ranks class queries (bench: template weight 0.06 on average), the
    # class lifts the bus photos (AP 0.45 -> 0.94 when written).
    before = _ap(lake.ids, _fused(lake, 0.0, gate_offset=100.0).scores, lake.positives, lake.ids[0])
    after = _ap(lake.ids, _fused(lake, default, gate_offset=100.0).scores, lake.positives, lake.ids[0])
    assert after > before + 0.1, (before, after)
    # A query box the detector sees nothing in ranks as without the evidence.
    lake.query.classes, kept = {}, lake.query.classes
    try:
        np.testing.assert_array_equal(_fused(lake, default).scores, without.scores)
    finally:
        lake.query.classes = kept


def test_the_frames_holding_the_query_boxs_classes_are_re_ranked_beside_the_shortlist(lake, search):
    """The fused method re-ranks, past ``mining.rerank``, the ``mining.class_frames`` frames of highest class
    agreement that the shortlist did not bring (objret.mining.shortlist.rerank_candidates): here the shortlist's
    first 3 frames, then the bus photos the detector finds, every one of them."""
    regions = lake.lake.regions
    mining = load_params(None, ["mining.rerank=3", "mining.class_frames=10", "mining.small_box=0.0"]).mining
    method = get_method("fused")
    vector = query_region_vector(lake.query, regions)
    stage, shortlist = first_stage(search, method, lake.query, vector, mining)
    assert stage == "regions" and lake.ids[0] not in {h.frame_id for h in shortlist}
    stage, rerank, tail = rerank_candidates(search, method, lake.query, vector, mining)
    head = [h.frame_id for h in shortlist[:3]]
    by_class = [h.frame_id for h in search.class_shortlist(lake.query.classes, 10, exclude={lake.ids[0]})]
    assert stage == "regions+classes"
    assert [h.frame_id for h in rerank] == head + [f for f in by_class if f not in head]
    assert lake.positives <= {h.frame_id for h in rerank}   # every bus photo is re-ranked
    assert [h.frame_id for h in tail] == [h.frame_id for h in shortlist[3:] if h.frame_id not in by_class]
    # The class list is the agreement's order over every frame holding a class (the query's own frame left out).
    agreement = class_agreement(lake.query.classes, regions.classes, regions.class_scores, regions.owner,
                                len(lake.ids))
    order = [lake.ids[i] for i in np.argsort(-agreement, kind="stable") if lake.ids[i] != lake.ids[0]
             and agreement[i] > 0]
    assert by_class == order[:10] and len(by_class) >= len(lake.positives)
    # Without detector classes in the query box, or with class_frames 0, the shortlist alone is re-ranked.
    none = load_params(None, ["mining.rerank=3", "mining.class_frames=0", "mining.small_box=0.0"]).mining
    assert [h.frame_id for h in rerank_candidates(search, method, lake.query, vector, none)[1]] == head
    lake.query.classes, kept = {}, lake.query.classes
    try:
        assert rerank_candidates(search, method, lake.query, vector, mining)[0] == "regions"
    finally:
        lake.query.classes = kept


def test_seen_classes_adds_the_zoomed_windows_detections_in_frame_coordinates():
    frame = np.zeros((400, 800, 3), np.uint8)
    box = (500.0, 100.0, 20.0, 20.0)
    seen = []

    def detect(pixels):   # the whole frame: a car on the box; the window: a bus on it, and the car half on it
        seen.append(pixels.shape[:2])
        if pixels.shape[:2] == frame.shape[:2]:
            return [Detection(500, 100, 20, 20, 0.8, 3)]
        x0, y0, _, _ = zoom_window(box, 800, 400, 2.0)
        return [Detection(500 - x0, 100 - y0, 20, 20, 0.6, 6), Detection(500 - x0, 100 - y0, 20, 10, 0.6, 3)]

    assert seen_classes(detect, frame, box) == {3: 1.0} and seen == [(400, 800)]
    classes = seen_classes(detect, frame, box, zoom=2.0)
    assert seen[1:] == [(400, 800), (200, 400)]   # the window: half the frame's sides, around the box
    window = {6: 0.6 / 0.9, 3: 0.3 / 0.9}          # its own weights (box_classes), summing to 1
    assert classes == pytest.approx({3: (1.0 + window[3]) / 2, 6: window[6] / 2})   # each view counts alike
    assert seen_classes(lambda pixels: [], frame, box, zoom=2.0) == {}


def test_the_detector_names_a_small_bus_in_its_zoomed_window(lake, bench_dir):
    """The query's bus photo shrunk to a third of its sides in a grey frame of its size (the bus 0.7% of it): the
    real SSD sees nothing in the box in the whole frame; in the window of half its sides around the box, a bus."""
    coco = json.loads((bench_dir / "coco_mini" / "annotations.json").read_text())
    image = next(i for i in coco["images"] if str(i["id"]) == lake.ids[0])
    photo = load_image(str(bench_dir / "coco_mini" / image["file_name"]))
    small = np.asarray(Image.fromarray(photo).resize((photo.shape[1] // 3, photo.shape[0] // 3), Image.LANCZOS))
    frame = np.full_like(photo, 128)
    y0, x0 = (frame.shape[0] - small.shape[0]) // 2, (frame.shape[1] - small.shape[1]) // 2
    frame[y0:y0 + small.shape[0], x0:x0 + small.shape[1]] = small
    x, y, w, h = lake.query.box
    box = (x0 + x / 3, y0 + y / 3, w / 3, h / 3)
    assert box[2] * box[3] < 0.01 * frame.shape[0] * frame.shape[1]
    detector = BoxProposer(score_threshold=0.05, max_boxes=30)
    whole = seen_classes(detector.propose, frame, box)
    zoomed = seen_classes(detector.propose, frame, box, zoom=2.0)
    assert lake.label not in whole and max(zoomed, key=zoomed.get) == lake.label, (whole, zoomed)


def test_a_review_teaches_a_query_box_the_detector_missed_the_accepted_boxes_classes(lake, search):
    """A query box the detector saw nothing in (no class evidence) learns, from two accepted bus boxes, that it is
    a bus (their stored detections); the next mine's class list then brings the other bus photos."""
    mining = load_params(None, ["mining.rerank=3", "mining.class_frames=10", "mining.small_box=0.0",
                                "mining.layer=stride16", "mining.scales=[1.0]"]).mining
    accepted = sorted(lake.positives)[:2]
    feedback = Feedback({f: lake.bus_boxes[f] for f in accepted}, frozenset(lake.ids[-3:]))
    blind = replace(lake.query, classes={})
    result = rank_query(search, blind, "fused", mining, gem_p=3.0, feedback=feedback)
    learned = result.feedback.classes
    assert max(learned, key=learned.get) == lake.label and sum(learned.values()) == pytest.approx(1.0)
    assert result.stage == "regions+classes"
    ranked = set(result.ranking.frame_ids[:result.candidates])
    assert lake.positives - set(accepted) <= ranked and not feedback.judged & set(result.ranking.frame_ids)
    # Without the review the blind query has no class to look for.
    assert rank_query(search, blind, "fused", mining, gem_p=3.0).stage == "regions"


def test_mining_weighs_each_class_by_the_share_of_the_lake_without_it(lake, search):
    """A class the detector finds in most of the lake tells its frames apart little: rank_query scores and lists
    frames by the query's classes discounted by how much of the lake holds each (objret.index.class_frames)."""
    mining = load_params(None, ["mining.rerank=100", "mining.small_box=0.0", "mining.layer=stride16",
                                "mining.scales=[1.0]"]).mining
    query = replace(lake.query, classes={lake.label: 0.6, 1: 0.4})   # a bus, and a person
    frames = search.class_frames()
    assert frames.share(1) > frames.share(lake.label) > 0   # more of these photos hold persons than buses
    weights = frames.discounted(query.classes)
    assert weights[1] / weights[lake.label] < 0.4 / 0.6
    assert classes_weighed_by_lake(search, query).classes == weights
    result = rank_query(search, query, "fused", mining, gem_p=3.0, keep_heatmaps=len(lake.ids))
    regions = lake.lake.regions
    expected = class_agreement(weights, regions.classes, regions.class_scores, regions.owner, len(lake.ids))
    scored = {f: e["classes"] for f, e in result.ranking.evidence.items()}
    assert len(scored) == len(lake.ids)   # the whole lake is ranked (the caller drops the query's own frame)
    np.testing.assert_allclose([scored[f] for f in lake.ids], expected, rtol=1e-5)
    # A query without classes is left as it is.
    assert classes_weighed_by_lake(search, replace(query, classes={})).classes == {}
