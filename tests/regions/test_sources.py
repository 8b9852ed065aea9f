"""objret.regions.sources: the R-MAC grid, region pooling (integral images), box conversions and frame_regions on real
stride-32 maps of bench frames."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from objret.config import load_params
from objret.features.backbone import build_backbone
from objret.regions.detector import Detection
from objret.regions.egm import egm_regions
from objret.features.cache import extract_maps
from objret.ingest.decode import load_image
from objret.regions.pooling import box_to_cells
from objret.regions.sources import (SOURCES, FrameRegions, cells_to_pixels, frame_regions, mean_inside, pool_regions,
                            uniform_regions, whole_region)
from objret.regions.saliency import feature_saliency

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PETS_FRAME = 101  # MOT frame number of pets09_s2l1 image 000101.jpg (768 x 576)


@pytest.fixture(scope="module")
def real_maps(bench_dir):
    """Stride-16 and stride-32 maps (lite0, 320 px) of a PETS frame (8 x 10 at stride 32) and a KITTI frame
    (1242 x 375: a very wide 4 x 10 map)."""
    images = {
        "pets": load_image(str(bench_dir / "pets09_s2l1" / "images" / f"{PETS_FRAME:06d}.jpg")),
        "kitti": load_image(str(bench_dir / "kitti_0005" / "images" / "0000000040.jpg")),
    }
    backbone = build_backbone("efficientnet_lite0", layers=("stride16", "stride32"), max_side=320)
    maps = extract_maps(backbone, list(images.items()), device=torch.device("cpu"))
    return {k: {"image": images[k], **maps[k]} for k in images}


def regions_params(*assignments: str):
    """params.yaml's ``regions`` section with ``key=value`` assignments (validated as --set is)."""
    return load_params(None, [f"regions.{a}" for a in assignments]).regions


def _cells(box) -> tuple[int, int, int, int]:
    """Cells a box touches, written out independently of the module: floor of the start, ceil of the end."""
    x, y, w, h = (float(v) for v in box)
    return int(np.floor(x)), int(np.floor(y)), int(np.ceil(x + w)), int(np.ceil(y + h))


# ---- uniform_regions -----------------------------------------------------------------------------------


def test_uniform_regions_of_a_30_by_40_map_follow_rmac():
    # h = 30, w = 40, min side 30. Level l: square side 2*30/(l+1); positions per axis such that neighbours
    # overlap at least 40% (step <= 0.6 side): 1 + ceil((extent - side) / (0.6 side)), 1 where extent == side.
    #   l=1: side 30: x: 1 + ceil(10/18) = 2, y: 1          -> 2 regions, x at 0, 10
    #   l=2: side 20: x: 1 + ceil(20/12) = 3, y: 1 + ceil(10/12) = 2 -> 6, x at 0, 10, 20; y at 0, 10
    #   l=3: side 15: x: 1 + ceil(25/9) = 4, y: 1 + ceil(15/9) = 3   -> 12, x at 0, 25/3, 50/3, 25; y at 0, 7.5, 15
    # Tolias et al.'s R-MAC code gives the same: 2 positions on the long side at l=1 (overlap 67% is the closest
    # to 40% it can reach), then l + 1 x l positions: 2 + 6 + 12 = 20.
    regions = uniform_regions((30, 40), levels=3)
    assert len(regions) == 20
    assert (regions.sources == SOURCES.index("uniform")).all()
    boxes = regions.boxes
    sides = boxes[:, 2]
    np.testing.assert_array_equal(boxes[:, 2], boxes[:, 3])  # squares
    np.testing.assert_allclose(sides, [30] * 2 + [20] * 6 + [15] * 12)
    np.testing.assert_allclose(boxes[:2, :2], [[0, 0], [10, 0]])
    level2 = {(float(x), float(y)) for x, y in boxes[2:8, :2]}
    assert level2 == {(x, y) for x in (0.0, 10.0, 20.0) for y in (0.0, 10.0)}
    np.testing.assert_allclose(sorted(set(np.round(boxes[8:, 0], 4))), [0, 25 / 3, 50 / 3, 25], atol=1e-4)
    np.testing.assert_allclose(sorted(set(boxes[8:, 1].tolist())), [0, 7.5, 15])

    # Every box lies inside the map.
    assert (boxes[:, :2] >= 0).all()
    assert (boxes[:, 0] + boxes[:, 2] <= 40 + 1e-4).all() and (boxes[:, 1] + boxes[:, 3] <= 30 + 1e-4).all()

    # Each level alone covers the whole map (the union of the boxes), checked on a grid of 1/8 cell.
    ys, xs = np.meshgrid(np.arange(0, 30, 0.125) + 1 / 16, np.arange(0, 40, 0.125) + 1 / 16, indexing="ij")
    for level in (slice(0, 2), slice(2, 8), slice(8, 20)):
        covered = np.zeros(xs.shape, bool)
        for x, y, w, h in boxes[level]:
            covered |= (xs >= x) & (xs <= x + w) & (ys >= y) & (ys <= y + h)
        assert covered.all()

    # Neighbours along an axis overlap by at least 40% of the side.
    for level in (slice(2, 8), slice(8, 20)):
        side = boxes[level][0, 2]
        for axis in (0, 1):
            steps = np.diff(sorted(set(boxes[level][:, axis].tolist())))
            assert ((side - steps) / side >= 0.4 - 1e-6).all()


def test_uniform_regions_of_small_and_degenerate_maps(real_maps):
    # The real 4 x 10 KITTI map: l=1 side 4 -> 1 + ceil(6/2.4) = 4 positions; l=2 side 8/3 -> x: 1 + ceil(7.33/1.6)
    # = 6, y: 1 + ceil(1.33/1.6) = 2 -> 12; l=3 side 2 -> x: 1 + ceil(8/1.2) = 8, y: 1 + ceil(2/1.2) = 3 -> 24.
    h, w = real_maps["kitti"]["stride32"].shape[-2:]
    assert (h, w) == (4, 10)
    regions = uniform_regions((h, w))
    assert len(regions) == 4 + 12 + 24
    boxes = regions.boxes
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 0] + boxes[:, 2] <= w + 1e-4).all()
    assert (boxes[:, 1] + boxes[:, 3] <= h + 1e-4).all()
    # A 1 x 1 map: every level is the single cell.
    tiny = uniform_regions((1, 1), levels=2)
    np.testing.assert_allclose(tiny.boxes, [[0, 0, 1, 1], [0, 0, 1, 1]])
    np.testing.assert_allclose(whole_region((8, 10)).boxes, [[0, 0, 10, 8]])
    assert whole_region((8, 10)).sources.tolist() == [SOURCES.index("whole")]


# ---- pool_regions --------------------------------------------------------------------------------------


@pytest.mark.parametrize("layer", ["stride32", "stride16"])
def test_pool_regions_equals_direct_pooling_of_a_real_map(real_maps, layer):
    fmap = real_maps["pets"][layer]
    assert fmap.dtype == np.float16
    h, w = fmap.shape[-2:]
    channels = fmap.shape[0]
    boxes = np.concatenate([
        whole_region((h, w)).boxes,
        uniform_regions((h, w)).boxes,                           # fractional corners (5.33 cells ...)
        np.array([[0, 0, 1, 1], [w - 1, h - 1, 1, 1],            # single corner cells
                  [2.5, 1.2, 0.3, 0.3],                          # inside one cell: that cell
                  [1.9, 0.1, 2.2, 3.0],                          # touches cells x 1..4, y 0..3
                  [-3, -2, 4.5, 3.5],                            # sticks out top-left: clipped
                  [w - 2, h - 2, 9, 9]], np.float32),            # sticks out bottom-right: clipped
    ])
    full = fmap.astype(np.float64)
    avg = pool_regions(fmap, boxes, "avg")
    mx = pool_regions(fmap, boxes, "max")
    both = pool_regions(fmap, boxes, "avgmax")
    assert avg.shape == mx.shape == (len(boxes), channels) and both.shape == (len(boxes), 2 * channels)
    assert avg.dtype == np.float32
    for i, box in enumerate(boxes):
        x0, y0, x1, y1 = _cells(box)
        x0, y0 = min(max(x0, 0), w - 1), min(max(y0, 0), h - 1)
        x1, y1 = min(max(x1, x0 + 1), w), min(max(y1, y0 + 1), h)
        inside = full[:, y0:y1, x0:x1].reshape(channels, -1)
        a = inside.mean(axis=1)
        m = inside.max(axis=1)
        np.testing.assert_allclose(avg[i], a / np.linalg.norm(a), atol=1e-6)
        np.testing.assert_allclose(mx[i], m / np.linalg.norm(m), atol=1e-6)
        np.testing.assert_allclose(both[i], np.concatenate([avg[i], mx[i]]), atol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(avg, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(mx, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(both[:, :channels], axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(both[:, channels:], axis=1), 1.0, atol=1e-5)
    # The whole map's average is the frame's mean activation.
    mean = full.mean(axis=(1, 2))
    np.testing.assert_allclose(avg[0], mean / np.linalg.norm(mean), atol=1e-6)
    # Different regions of a real frame give different descriptors.
    assert np.abs(avg[1] - avg[2]).max() > 1e-3


def test_pool_regions_rejects_unknown_pooling_and_handles_no_box(real_maps):
    fmap = real_maps["pets"]["stride32"]
    with pytest.raises(ValueError, match="pooling"):
        pool_regions(fmap, np.array([[0, 0, 2, 2]], np.float32), "gem")
    assert pool_regions(fmap, np.zeros((0, 4), np.float32), "avg").shape == (0, fmap.shape[0])


# ---- box conversions and mean_inside -------------------------------------------------------------------


def test_cells_to_pixels_inverts_box_to_cells():
    cases = [((640, 480), (15, 20)), ((768, 576), (8, 10)), ((1242, 375), (4, 10)), ((480, 640), (20, 15))]
    rng = np.random.default_rng(0)
    for (width, height), map_hw in cases:
        pixels = np.column_stack([rng.uniform(0, width / 2, 20), rng.uniform(0, height / 2, 20),
                                  rng.uniform(1, width / 2, 20), rng.uniform(1, height / 2, 20)]).astype(np.float32)
        cells = np.array([box_to_cells(b, (width, height), map_hw) for b in pixels], np.float32)
        np.testing.assert_allclose(cells_to_pixels(cells, map_hw, (width, height)), pixels, rtol=1e-5, atol=1e-3)
        np.testing.assert_allclose([box_to_cells(b, (width, height), map_hw)
                                    for b in cells_to_pixels(cells, map_hw, (width, height))], cells, rtol=1e-5,
                                   atol=1e-5)
    # By hand: a 640 x 480 frame on a 15 x 20 map is 32 px a cell on both axes; 1242 x 375 on 4 x 10 is not.
    np.testing.assert_allclose(cells_to_pixels(np.array([[2, 1.5, 4, 3]]), (15, 20), (640, 480)),
                               [[64, 48, 128, 96]])
    np.testing.assert_allclose(cells_to_pixels(np.array([[10, 4, 1, 1]]), (4, 10), (1242, 375)),
                               [[1242, 375, 124.2, 93.75]], rtol=1e-6)
    # The whole map is the whole frame.
    np.testing.assert_allclose(cells_to_pixels(whole_region((4, 10)).boxes, (4, 10), (1242, 375)),
                               [[0, 0, 1242, 375]], rtol=1e-6)


def test_mean_inside_by_hand():
    saliency = np.array([[0.0, 0.1, 0.2, 0.3],
                         [0.4, 0.5, 0.6, 0.7],
                         [0.8, 0.9, 1.0, 0.0]], np.float32)
    boxes = np.array([
        [0, 0, 4, 3],        # everything: 5.5 / 12
        [1, 1, 2, 2],        # 0.5 0.6 / 0.9 1.0 -> 0.75
        [2.2, 0.5, 0.5, 1],  # touches x 2, y 0..1: (0.2 + 0.6) / 2
        [3, 2, 1, 1],        # the corner cell: 0
        [3.5, 2.5, 5, 5],    # runs off the map: clipped to the corner cell
        [0, 0, 0, 0],        # empty: still the one cell it starts in
    ], np.float32)
    np.testing.assert_allclose(mean_inside(saliency, boxes), [5.5 / 12, 0.75, 0.4, 0.0, 0.0, 0.0], atol=1e-6)


# ---- frame_regions -------------------------------------------------------------------------------------


def test_frame_regions_whole_uniform_egm_on_a_real_map(real_maps):
    fmap = real_maps["pets"]["stride32"]
    h, w = fmap.shape[-2:]
    params = regions_params("sources=[whole, uniform, egm]", "uniform_levels=3",
                            "egm={sigma: 2.5, tau: 0.4, rho: 5.0, purge: 0.5}")
    regions = frame_regions(fmap, params)
    saliency = feature_saliency(fmap)
    expected_egm = egm_regions(saliency, sigma=2.5, tau=0.4, rho=5.0, purge=0.5)
    n_uniform = len(uniform_regions((h, w)))
    assert len(expected_egm) >= 1
    assert len(regions) == 1 + n_uniform + len(expected_egm)
    codes = regions.sources.tolist()
    assert codes == ([SOURCES.index("whole")] + [SOURCES.index("uniform")] * n_uniform
                     + [SOURCES.index("egm")] * len(expected_egm))
    np.testing.assert_allclose(regions.boxes[0], [0, 0, w, h])
    np.testing.assert_allclose(regions.boxes[1:1 + n_uniform], uniform_regions((h, w)).boxes)
    np.testing.assert_allclose(regions.boxes[1 + n_uniform:], [[r.x, r.y, r.w, r.h] for r in expected_egm],
                               atol=1e-5)
    # Scores: each region's mean feature saliency (003 eq. 9), in [0, 1]; EGM's own region scores agree.
    assert regions.scores.dtype == np.float32
    assert ((regions.scores >= 0) & (regions.scores <= 1)).all()
    np.testing.assert_allclose(regions.scores, mean_inside(saliency, regions.boxes), atol=1e-6)
    np.testing.assert_allclose(regions.scores[1 + n_uniform:], [r.score for r in expected_egm], atol=1e-5)
    assert regions.scores[0] == pytest.approx(float(saliency.mean()), abs=1e-6)
    # Every box lies inside the map.
    b = regions.boxes
    assert (b[:, :2] >= -1e-5).all() and (b[:, 0] + b[:, 2] <= w + 1e-4).all() and (b[:, 1] + b[:, 3] <= h + 1e-4).all()
    # The sources are params.yaml's alone (no default in the code): whole + uniform only.
    plain = frame_regions(fmap, regions_params("sources=[whole, uniform]"))
    assert len(plain) == 1 + n_uniform and set(plain.sources.tolist()) == {0, 1}


def test_frame_regions_convert_detections_from_pixels_to_cells(real_maps, bench_dir):
    """Detector boxes (here the frame's real pedestrian boxes as detections) become regions in map cells."""
    fmap = real_maps["pets"]["stride32"]
    map_hw = fmap.shape[-2:]
    image = real_maps["pets"]["image"]
    size = (image.shape[1], image.shape[0])
    assert size == (768, 576)
    ann = json.loads((bench_dir / "pets09_s2l1" / "annotations.json").read_text())
    gt = [a["bbox"] for a in ann["annotations"] if a["image_id"] == PETS_FRAME]
    assert len(gt) >= 3
    detections = [Detection(*box, score=0.9, label=1) for box in gt]

    params = regions_params("sources=[whole, detector]")
    regions = frame_regions(fmap, params, image_size=size, detections=detections)
    assert len(regions) == 1 + len(gt)
    assert regions.sources.tolist() == [SOURCES.index("whole")] + [SOURCES.index("detector")] * len(gt)
    cells = regions.boxes[1:]
    # 768 x 576 px on an 8 x 10 map: x by 10/768, y by 8/576.
    np.testing.assert_allclose(cells, np.array(gt) * np.array([10 / 768, 8 / 576, 10 / 768, 8 / 576]), rtol=1e-5)
    np.testing.assert_allclose(cells_to_pixels(cells, map_hw, size), gt, rtol=1e-4, atol=1e-2)
    # Scores are the mean feature saliency inside (not the detector's 0.9).
    np.testing.assert_allclose(regions.scores, mean_inside(feature_saliency(fmap), regions.boxes), atol=1e-6)
    assert ((regions.scores >= 0) & (regions.scores <= 1)).all()
    # Named as a source but no detections passed: no detector regions; passed but not named: ignored.
    assert len(frame_regions(fmap, params, image_size=size)) == 1
    assert len(frame_regions(fmap, regions_params("sources=[whole]"), image_size=size, detections=detections)) == 1
    # DASR boxes (pixels) go the same way.
    dasr = frame_regions(fmap, regions_params("sources=[dasr]"), image_size=size, dasr_boxes=gt[:2])
    assert dasr.sources.tolist() == [SOURCES.index("dasr")] * 2
    np.testing.assert_allclose(dasr.boxes, cells[:2], rtol=1e-6)


def test_frame_regions_concat_skips_empty_parts():
    empty = FrameRegions.concat([])
    assert len(empty) == 0 and empty.boxes.shape == (0, 4)
    joined = FrameRegions.concat([whole_region((3, 4)), FrameRegions.concat([]), uniform_regions((3, 4), 1)])
    assert joined.sources.tolist()[0] == SOURCES.index("whole") and len(joined) == 1 + len(uniform_regions((3, 4), 1))


def test_regions_step_with_dasr_boxes_in_frame_pixels(bench_dir, tmp_path):
    """The pipeline's regions step runs DASR* on the frame and stores its boxes as regions of the map."""
    from objret.steps import features as features_step, ingest as ingest_step, regions as regions_step
    from objret.config import load_params
    from objret.regions.sources import SOURCES
    from objret.steps.workspace import Workspace

    folder = tmp_path / "frames"
    folder.mkdir()
    for name in ("000000000078.jpg", "000000005529.jpg"):  # a clock and a person, large and clear
        (folder / name).write_bytes((bench_dir / "coco_mini" / "images" / name).read_bytes())
    ws = Workspace(load_params(None, ["features.backbone=efficientnet_lite0", "features.max_side=256",
                                      "regions.sources=[whole,dasr]", "regions.dasr={to_layer: stride16, max_peaks: 8}"]),
                   tmp_path / "work")
    ingest_step.ingest(ws, [str(folder)], progress=False)
    features_step.features(ws, progress=False)
    result = regions_step.regions(ws, progress=False)
    table = ws.region_store.load()
    dasr = table.sources == SOURCES.index("dasr")
    assert result.extracted == 2 and dasr.sum() >= 2
    for i in np.flatnonzero(dasr):
        h, w = table.map_hw[table.owner[i]]
        x, y, bw, bh = table.boxes[i]
        assert 0 <= x and 0 <= y and bw > 0 and bh > 0 and x + bw <= w + 1e-3 and y + bh <= h + 1e-3
