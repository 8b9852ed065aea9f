"""objret.regions.saliency and objret.regions.egm (paper 003 sec. 3.3-3.4) on real stride-16 maps of bench images."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from objret.features.backbone import build_backbone
from objret.regions.egm import Region, egm_regions, purge_components
from objret.features.cache import extract_maps
from objret.regions.pooling import box_to_cells
from objret.regions.saliency import feature_saliency

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PER_SET = 4


def _pick(bench_dir, name, keep):
    """The first PER_SET images (by id) of a set that ``keep(image, boxes)`` accepts, with their boxes."""
    data = json.loads((bench_dir / name / "annotations.json").read_text())
    boxes = {}
    for ann in data["annotations"]:
        boxes.setdefault(ann["image_id"], []).append(ann)
    picked = []
    for image in sorted(data["images"], key=lambda im: im["id"]):
        if keep(image, boxes.get(image["id"], [])):
            picked.append((image, [a["bbox"] for a in boxes[image["id"]]]))
        if len(picked) == PER_SET:
            break
    return picked


def _one_large_object(image, anns):
    # a single non-crowd object covering 40-85% of the image: large, but not the whole frame
    area = image["width"] * image["height"]
    return len(anns) == 1 and not anns[0]["iscrowd"] and 0.40 <= anns[0]["area"] / area <= 0.85


@pytest.fixture(scope="module")
def frames(bench_dir):
    """{set: [(stride-16 map, boxes in map cells)]}: coco_mini images with one large object and
    paste_visible images with 4 small pasted objects each."""
    chosen = {"coco_mini": _pick(bench_dir, "coco_mini", _one_large_object),
              "paste_visible": _pick(bench_dir, "paste_visible", lambda image, anns: len(anns) == 4)}
    backbone = build_backbone("efficientnet_lite2", layers=("stride16",), max_side=640)
    out = {}
    for name, picked in chosen.items():
        assert len(picked) == PER_SET
        images = [(f"{name}/{image['id']}",
                   np.asarray(Image.open(bench_dir / name / image["file_name"]).convert("RGB")))
                  for image, _ in picked]
        maps = extract_maps(backbone, images, batch_size=1)
        out[name] = []
        for (fid, _), (image, boxes) in zip(images, picked):
            fmap = maps[fid]["stride16"]
            cells = [box_to_cells(b, (image["width"], image["height"]), fmap.shape[-2:]) for b in boxes]
            out[name].append((fmap, cells))
    return out


def _all(frames):
    return [item for items in frames.values() for item in items]


def _cell_mask(shape, boxes):
    mask = np.zeros(shape, bool)
    for x, y, w, h in boxes:
        mask[int(y):int(np.ceil(y + h)), int(x):int(np.ceil(x + w))] = True
    return mask


def _iou(a, b):
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    inter = max(0.0, min(ax + aw, bx + bw) - max(ax, bx)) * max(0.0, min(ay + ah, by + bh) - max(ay, by))
    return inter / (aw * ah + bw * bh - inter)


# --- feature saliency (eq. 1-2) ---

def test_saliency_is_a_finite_map_in_unit_range(frames):
    for fmap, _ in _all(frames):
        saliency = feature_saliency(fmap)
        assert saliency.shape == fmap.shape[-2:]
        assert saliency.dtype == np.float32
        assert np.isfinite(saliency).all()
        assert saliency.min() >= 0.0 and saliency.max() == pytest.approx(1.0)
        assert saliency.std() > 0.01  # not a constant map


def test_saliency_is_higher_on_objects(frames):
    for name, items in frames.items():
        inside, outside = [], []
        for fmap, boxes in items:
            saliency = feature_saliency(fmap)
            mask = _cell_mask(saliency.shape, boxes)
            inside.append(saliency[mask].mean())
            outside.append(saliency[~mask].mean())
        assert np.mean(inside) > np.mean(outside) + 0.02, name
    # the small pasted objects stand out on most frames, one by one
    pasted = [(feature_saliency(f), _cell_mask(f.shape[-2:], b)) for f, b in frames["paste_visible"]]
    assert sum(s[m].mean() > s[~m].mean() for s, m in pasted) >= PER_SET - 1


def test_saliency_ignores_negative_activations(frames):
    fmap = frames["coco_mini"][0][0]
    assert (fmap < 0).any()  # EfficientNet's stride-16 map is a linear projection: many negatives
    np.testing.assert_allclose(feature_saliency(fmap), feature_saliency(np.maximum(fmap, 0)), atol=1e-6)
    assert not feature_saliency(-np.abs(fmap)).any()  # nothing positive: an all-zero map, not NaN


# --- EGM region detection (sec. 3.4) ---

def test_egm_regions_on_real_maps(frames):
    for fmap, _ in _all(frames):
        saliency = feature_saliency(fmap)
        h, w = saliency.shape
        regions = egm_regions(saliency)
        assert 1 <= len(regions) <= 30
        for r in regions:
            assert isinstance(r, Region)
            assert r.w > 0 and r.h > 0
            assert r.x >= 0 and r.y >= 0 and r.x + r.w <= w + 1e-9 and r.y + r.h <= h + 1e-9
            assert 0 < r.score <= 1
        assert [r.score for r in regions] == sorted((r.score for r in regions), reverse=True)


def _inside(a, b):
    """The fraction of box a that lies inside box b."""
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    return max(0.0, min(ax + aw, bx + bw) - max(ax, bx)) * max(0.0, min(ay + ah, by + bh) - max(ay, by)) / (aw * ah)


def test_egm_finds_the_large_object(frames):
    # The objects cover 40-85% of their frame, so a whole-frame box already has IoU 0.4-0.85 with them: IoU alone
    # proves nothing. A region must overlap the object (IoU >= 0.3) and lie on it: more of its area inside the
    # object's box than the whole frame has (the object's share of the frame) by 0.1. Measured: 0.92, 0.89, 0.94,
    # 0.76 inside against 0.62, 0.68, 0.56, 0.46 for the whole frame.
    for fmap, boxes in frames["coco_mini"]:
        h, w = fmap.shape[-2:]
        whole = _inside((0, 0, w, h), boxes[0])
        regions = [(r.x, r.y, r.w, r.h) for r in egm_regions(feature_saliency(fmap))]
        on_object = [_inside(r, boxes[0]) for r in regions if _iou(r, boxes[0]) >= 0.3]
        assert on_object and max(on_object) >= whole + 0.1, (whole, on_object)


@pytest.mark.xfail(strict=True, reason="EGM (default parameters) places its regions no better than chance on these "
                   "large objects: the best region's IoU is 0.68, 0.53, 0.55, 0.51 against 0.78, 0.64, 0.79, 0.65 "
                   "for the 95th percentile of the same boxes at random positions (and 0.62, 0.68, 0.56, 0.46 for "
                   "the whole frame): the saliency maps are flat (saliency.py)")
def test_egm_localises_the_large_object_better_than_chance(frames):
    rng = np.random.default_rng(0)
    for fmap, boxes in frames["coco_mini"]:
        h, w = fmap.shape[-2:]
        regions = [(r.x, r.y, r.w, r.h) for r in egm_regions(feature_saliency(fmap))]
        best = max(_iou(r, boxes[0]) for r in regions)
        chance = [max(_iou((rng.uniform(0, w - rw), rng.uniform(0, h - rh), rw, rh), boxes[0])
                      for *_, rw, rh in regions) for _ in range(200)]
        assert best > max(_iou((0, 0, w, h), boxes[0]), np.quantile(chance, 0.95)), (best, np.quantile(chance, 0.95))


def test_egm_parameter_directions(frames):
    for fmap, _ in _all(frames):
        saliency = feature_saliency(fmap)
        # a stricter purge (smaller overlap threshold) keeps fewer components
        counts = [len(egm_regions(saliency, purge=p)) for p in (0.2, 0.5, 0.7)]
        assert counts[0] <= counts[1] <= counts[2], counts
        # a higher mask threshold tau leaves less of the map to cover (003 sec. 4.1)
        covered = [_cell_mask(saliency.shape, [(r.x, r.y, r.w, r.h) for r in egm_regions(saliency, tau=t, rho=1)])
                   .sum() for t in (0.4, 0.8)]
        assert covered[1] < covered[0], covered


def test_egm_two_gaussian_blobs():
    ys, xs = np.mgrid[0:30, 0:40] + 0.5  # cell centres
    centres = [(10.5, 8.5), (29.5, 21.5)]
    saliency = sum(np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * 2.0 ** 2)) for cx, cy in centres)
    for kwargs in ({}, {"rho": 1.0}, {"tau": 0.0, "rho": 1.0}):
        regions = egm_regions(saliency, **kwargs)
        assert len(regions) == 2, kwargs
        found = sorted((r.x + r.w / 2, r.y + r.h / 2) for r in regions)
        np.testing.assert_allclose(found, centres, atol=0.05)
        assert regions[0].w == pytest.approx(regions[1].w) and regions[0].w == pytest.approx(regions[0].h)
        assert 3 < regions[0].w < 12  # about the blob's size (std 2 cells), not a cell, not the map
        assert _iou(*[(r.x, r.y, r.w, r.h) for r in regions]) == 0


def test_egm_single_cell_and_empty_map():
    saliency = np.zeros((30, 40))
    assert egm_regions(saliency) == []
    saliency[5, 7] = 1.0
    (region,) = egm_regions(saliency)
    assert (region.x, region.y, region.w, region.h) == pytest.approx((7, 5, 1, 1))
    assert region.score == pytest.approx(1.0)


def test_purge_drops_a_duplicate_component():
    var = np.full((3, 2), 4.0)
    pi = np.array([0.3, 0.4, 0.3])
    mu = np.array([[10.0, 10.0], [30.0, 10.0], [10.0, 10.0]])  # 0 and 2 coincide
    kept = purge_components(pi, mu, var, sigma=2.5)
    assert sorted(kept.tolist()) == [0, 1]  # the later of the two equal ones goes; the distant one stays
    assert kept[0] == 1  # kept in descending order of pi
    # two components far apart do not overlap: both stay, even with a strict threshold
    assert sorted(purge_components(pi[:2], mu[:2], var[:2], sigma=2.5, threshold=0.05).tolist()) == [0, 1]
