"""BoxProposer on real coco_mini photos: proposals cover large, clear objects, and the output conventions hold."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from objret.regions.detector import BoxProposer, Detection
from objret.errors import ObjretError

# Classes whose large instances are clear, whole objects (not e.g. a dining table under plates).
CLEAR = {"person", "bus", "dog", "cat", "train", "horse", "elephant", "giraffe", "zebra", "bear", "airplane",
         "truck", "car"}
N_IMAGES = 10


def _iou(a, b) -> float:
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


@pytest.fixture(scope="module")
def proposer():
    return BoxProposer(score_threshold=0.05, max_boxes=50)


@pytest.fixture(scope="module")
def large_objects(bench_dir):
    """The first N_IMAGES coco_mini images (by id) holding a large (> 5% of the image), non-crowd CLEAR
    object: [(RGB image, [gt boxes])]."""
    coco = bench_dir / "coco_mini"
    ann = json.loads((coco / "annotations.json").read_text())
    names = {c["id"]: c["name"] for c in ann["categories"]}
    by_image: dict[int, list] = {}
    for a in ann["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    chosen = []
    for im in sorted(ann["images"], key=lambda i: i["id"]):
        area = im["width"] * im["height"]
        boxes = [a["bbox"] for a in by_image.get(im["id"], [])
                 if not a["iscrowd"] and a["area"] > 0.05 * area and names[a["category_id"]] in CLEAR]
        if boxes:
            chosen.append((np.asarray(Image.open(coco / im["file_name"]).convert("RGB")), boxes))
        if len(chosen) == N_IMAGES:
            return chosen
    pytest.fail("coco_mini has fewer images with large clear objects than expected")


@pytest.fixture(scope="module")
def proposals(proposer, large_objects):
    return [proposer.propose(image) for image, _ in large_objects]


def test_proposals_cover_large_objects(large_objects, proposals):
    # Measured: 14/14 objects of these 10 images of the test bench (smallest best IoU 0.68); over all 320
    # coco_mini images of the full bench with such objects 554/565 = 98%, worst run of 10 consecutive images 0.89. 0.8 leaves room
    # for numeric drift across OpenCV builds while still failing on a wrong input convention (swapped
    # channels or 0..1 pixels lose most boxes).
    best = [max((_iou(gt, (d.x, d.y, d.w, d.h)) for d in dets), default=0.0)
            for (_, gts), dets in zip(large_objects, proposals) for gt in gts]
    assert len(best) >= 10
    recall = np.mean(np.asarray(best) >= 0.5)
    assert recall >= 0.8, f"recall {recall:.2f}, best IoUs {np.round(best, 2).tolist()}"


def test_boxes_inside_image_sorted_and_capped(proposer, large_objects, proposals):
    for (image, _), dets in zip(large_objects, proposals):
        height, width = image.shape[:2]
        assert 0 < len(dets) <= proposer.max_boxes
        for d in dets:
            assert isinstance(d, Detection)
            assert 0 <= d.x and 0 <= d.y and d.x + d.w <= width + 1e-3 and d.y + d.h <= height + 1e-3
            assert d.w >= 4 and d.h >= 4
            assert d.score >= proposer.score_threshold
            assert 1 <= d.label <= 90  # COCO category ids
        scores = [d.score for d in dets]
        assert scores == sorted(scores, reverse=True)


def test_higher_threshold_gives_fewer_boxes(large_objects, proposals):
    # the image with the most proposals at the default threshold (the zebra, first by id, has a single one)
    (image, _), loose = max(zip(large_objects, proposals), key=lambda pair: len(pair[1]))
    strict = BoxProposer(score_threshold=0.3, max_boxes=50).propose(image)
    assert 0 < len(strict) < len(loose)
    # Greedy NMS only lets higher-scored boxes suppress a box, so the strict set is the top of the loose one.
    assert strict == [d for d in loose if d.score >= 0.3]
    assert BoxProposer(score_threshold=0.05, max_boxes=3).propose(image) == loose[:3]


def test_batch_equals_single(proposer, large_objects, proposals):
    images = [image for image, _ in large_objects[:3]]
    assert len({image.shape for image in images}) > 1  # different sizes in one batch
    batch = proposer.propose_batch(images)
    for got, want in zip(batch, proposals[:3], strict=True):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g.label == w.label
            assert (g.x, g.y, g.w, g.h, g.score) == pytest.approx((w.x, w.y, w.w, w.h, w.score), abs=1e-3)
    assert proposer.propose_batch([]) == []


def test_degenerate_images(proposer):
    assert proposer.propose(np.zeros((1, 1, 3), np.uint8)) == []  # every box is under 4 px
    for gray in (np.full((120, 160, 3), 128, np.uint8), np.full((120, 160), 128, np.uint8)):
        for d in proposer.propose(gray):
            assert 0 <= d.x and d.x + d.w <= 160 + 1e-3 and 0 <= d.y and d.y + d.h <= 120 + 1e-3
    with pytest.raises(ObjretError):
        proposer.propose(np.zeros((10, 10, 2), np.uint8))
    with pytest.raises(ObjretError):
        proposer.propose(np.zeros((10, 10, 3), np.float32))


def test_missing_package_is_a_clear_error(monkeypatch):
    monkeypatch.setattr("objret.regions.detector._PACKAGE", "objret_no_such_detector_package")
    with pytest.raises(ObjretError, match="not installed"):
        BoxProposer(score_threshold=0.05, max_boxes=50)
