"""objret.mining.template_matching + objret.regions.pooling: deep template matching finds a real object pasted into another real frame."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from objret.features.backbone import build_backbone
from objret.features.cache import extract_maps
from objret.ingest.decode import load_image
from objret.mining.template_matching import MapStack, heatmap_for, match_template
from objret.boxes import iou_xywh
from objret.regions.pooling import box_template, box_to_cells, gem

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MAX_SIDE = 320
LAYER = "stride16"
SCALES = (0.5, 1.0, 2.0)
# Where the clock is pasted into the tud_stadtmitte frame: not on the 32 px cell grid of a 640 px frame.
PASTE_XY = (413, 261)


@pytest.fixture(scope="module")
def scene(bench_dir):
    """Query frame A: coco_mini 000000000064.jpg (480 x 640), a street clock (the COCO "clock" box, 154 x 152 px,
    medium size, fully inside the image). B: a tud_stadtmitte street frame (640 x 480) with A's box crop pasted
    at PASTE_XY; its clean original is kept as a hard negative. Unrelated frames: kitti, pets09, tud_campus
    and a coco zebra photo (four other sizes, so the stack is padded in both directions)."""
    coco = json.loads((bench_dir / "coco_mini" / "annotations.json").read_text())
    image = next(i for i in coco["images"] if i["file_name"] == "images/000000000064.jpg")
    clock_id = next(c["id"] for c in coco["categories"] if c["name"] == "clock")
    ann = next(a for a in coco["annotations"] if a["image_id"] == image["id"] and a["category_id"] == clock_id)
    box = tuple(ann["bbox"])

    a = load_image(str(bench_dir / "coco_mini" / image["file_name"]))
    assert a.shape[:2] == (image["height"], image["width"]) == (640, 480)
    x0, y0 = int(round(box[0])), int(round(box[1]))
    x1, y1 = int(round(box[0] + box[2])), int(round(box[1] + box[3]))
    crop = a[y0:y1, x0:x1]
    clean = load_image(str(bench_dir / "tud_stadtmitte" / "images" / "000050.jpg"))
    assert clean.shape[:2] == (480, 640)
    pasted = clean.copy()
    px, py = PASTE_XY
    pasted[py:py + crop.shape[0], px:px + crop.shape[1]] = crop
    paste_box = (px, py, crop.shape[1], crop.shape[0])

    images = {
        "A": a,
        "B": pasted,
        "B_clean": clean,
        "kitti": load_image(str(bench_dir / "kitti_0005" / "images" / "0000000040.jpg")),
        "pets": load_image(str(bench_dir / "pets09_s2l1" / "images" / "000101.jpg")),
        "tud_campus": load_image(str(bench_dir / "tud_campus" / "images" / "000030.jpg")),
        "zebra": load_image(str(bench_dir / "coco_mini" / "images" / "000000000034.jpg")),
    }
    backbone = build_backbone("efficientnet_lite0", layers=(LAYER,), max_side=MAX_SIDE)
    maps = extract_maps(backbone, list(images.items()), device=torch.device("cpu"))
    ids = list(images)
    sizes = [(img.shape[1], img.shape[0]) for img in images.values()]
    stack = MapStack(ids, [maps[i][LAYER] for i in ids], sizes)
    return {"box": box, "paste_box": paste_box, "images": images, "maps": maps, "stack": stack, "ids": ids}


@pytest.fixture(scope="module")
def matched(scene):
    a_map = scene["maps"]["A"][LAYER]
    image_size = (480, 640)
    template = box_template(a_map, scene["box"], image_size, max_cells=3)
    _, _, w_cells, h_cells = box_to_cells(scene["box"], image_size, a_map.shape[-2:])
    result = match_template(template, (h_cells, w_cells), scene["stack"], SCALES)
    return template, result


def test_template_ranks_the_pasted_frame_and_the_query_above_unrelated_frames(scene, matched):
    _, result = matched
    scores = dict(zip(scene["ids"], result.scores.tolist()))
    unrelated = [scores[k] for k in ("B_clean", "kitti", "pets", "tud_campus", "zebra")]
    order = [scene["ids"][i] for i in np.argsort(-result.scores)]
    assert set(order[:2]) == {"A", "B"}, scores
    assert min(scores["A"], scores["B"]) > max(unrelated) + 0.15, scores
    # The paste is the only difference between B and its clean original: it alone lifts B's score.
    assert scores["B"] - scores["B_clean"] > 0.25, scores
    assert all(-1.0 <= s <= 1.0 for s in scores.values())


def test_returned_boxes_localise_the_object(scene, matched):
    _, result = matched
    ids = scene["ids"]
    b_box = result.boxes[ids.index("B")]
    assert iou_xywh(b_box, scene["paste_box"]) >= 0.5, (b_box, scene["paste_box"])
    # Pasted at the query's own size, so scale 1 wins: the box has the query box's size (in B's 640 x 480
    # pixels, which have the same scale as A's), and its centre is within a cell (32 px) of the paste's.
    px, py, pw, ph = scene["paste_box"]
    assert b_box[2:] == pytest.approx(scene["box"][2:], abs=1.0)
    assert abs(b_box[0] + b_box[2] / 2 - (px + pw / 2)) <= 32
    assert abs(b_box[1] + b_box[3] / 2 - (py + ph / 2)) <= 32
    a_box = result.boxes[ids.index("A")]
    assert iou_xywh(a_box, scene["box"]) >= 0.5, (a_box, scene["box"])
    # Every box lies inside its own frame.
    for box, (width, height) in zip(result.boxes, scene["stack"].image_sizes):
        x, y, w, h = box
        assert x >= 0 and y >= 0 and w > 0 and h > 0
        assert x + w <= width + 1e-3 and y + h <= height + 1e-3


def test_heatmaps_are_finite_padded_and_peak_at_the_paste(scene, matched):
    _, result = matched
    stack, ids = scene["stack"], scene["ids"]
    assert result.heatmaps.shape == (len(ids), 20, 20)  # A is 20 x 15 cells, B 15 x 20, kitti 7 x 20
    assert np.isfinite(result.heatmaps).all()
    for i in range(len(ids)):
        h, w = stack.map_sizes[i]
        inside = result.heatmaps[i, :h, :w]
        assert inside.max() == pytest.approx(result.scores[i])
        padding = np.ones(result.heatmaps.shape[1:], bool)
        padding[:h, :w] = False
        assert (result.heatmaps[i][padding] == -1.0).all()

    b = ids.index("B")
    heat = heatmap_for(result, b, stack)
    row, col = np.unravel_index(np.argmax(heat), heat.shape)
    cell = 640 / stack.map_sizes[b][1]  # 32 px per cell
    px, py, pw, ph = scene["paste_box"]
    assert px - cell <= (col + 0.5) * cell <= px + pw + cell
    assert py - cell <= (row + 0.5) * cell <= py + ph + cell
    # Away from the paste, the pasted frame's heat equals its clean original's (same pixels there).
    clean = heatmap_for(result, ids.index("B_clean"), stack)
    far = np.zeros_like(heat, bool)
    far[:, :5] = True  # cells 0-4: x < 160 px, more than 250 px left of the paste
    np.testing.assert_allclose(heat[far], clean[far], atol=0.05)
    assert heat[row, col] - clean[row, col] > 0.25


def test_heatmap_for_is_in_unit_range_and_cropped(scene, matched):
    _, result = matched
    stack = scene["stack"]
    for i, fid in enumerate(scene["ids"]):
        heat = heatmap_for(result, i, stack)
        assert heat.shape == tuple(stack.map_sizes[i])
        assert heat.min() >= 0.0 and heat.max() <= 1.0
        h, w = heat.shape
        np.testing.assert_array_equal(heat, np.clip(result.heatmaps[i, :h, :w], 0, 1))
    assert heatmap_for(result, scene["ids"].index("kitti"), stack).shape == (7, 20)  # 1242 x 375 -> 320 x 97
    assert heatmap_for(result, scene["ids"].index("A"), stack).shape == (20, 15)


def test_map_stack_normalises_and_masks(scene):
    stack = scene["stack"]
    assert len(stack) == len(scene["ids"])
    norms = stack.maps.norm(dim=1)  # N x H x W
    assert torch.allclose(norms[stack.valid], torch.ones(()), atol=1e-3)
    assert (norms[~stack.valid] == 0).all()
    assert stack.valid.sum().item() == int(np.prod(stack.map_sizes, axis=1).sum())
    sub = stack.subset([1, 3])
    assert sub.frame_ids == ["B", "kitti"]
    assert torch.equal(sub.maps[1], stack.maps[3])
    np.testing.assert_array_equal(sub.map_sizes, stack.map_sizes[[1, 3]])
    with pytest.raises(ValueError):
        MapStack([], [], [])


def test_box_template_shape_follows_the_box(scene, matched):
    template, _ = matched
    # The 154 x 152 px clock spans 4.8 x 4.8 cells of A's 15 x 20 map: capped to 3 x 3.
    assert template.shape == (3, 3, 112)
    np.testing.assert_allclose(np.linalg.norm(template, axis=-1), 1.0, atol=1e-4)
    a_map = scene["maps"]["A"][LAYER]
    tall = box_template(a_map, (300, 100, 40, 300), (480, 640), max_cells=3)   # 1.25 x 9.4 cells
    assert tall.shape[:2] == (3, 1)
    tiny = box_template(a_map, (200, 200, 10, 12), (480, 640), max_cells=3)     # under half a cell
    assert tiny.shape[:2] == (1, 1)
    wide = box_template(a_map, (10, 300, 400, 70), (480, 640), max_cells=5)     # 12.5 x 2.2 cells
    assert wide.shape[:2] == (2, 5)


def test_gem_vectors_are_unit_norm_and_pool_like_gem(scene):
    for fid, maps in scene["maps"].items():
        fmap = maps[LAYER].astype(np.float32)
        vector = gem(fmap)
        assert vector.shape == (fmap.shape[0],)
        assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-4)
        expected = np.mean(np.clip(fmap, 1e-6, None) ** 3, axis=(1, 2)) ** (1 / 3)
        np.testing.assert_allclose(vector, expected / np.linalg.norm(expected), rtol=1e-3, atol=1e-5)
        np.testing.assert_allclose(gem(2.5 * fmap), vector, atol=1e-5)  # scale-invariant
    # p = 1 is average pooling (of the positive part); a larger p moves towards max pooling (p = 10 stays
    # within float32 range for these activations, which reach about 40).
    fmap = scene["maps"]["B"][LAYER].astype(np.float32)
    avg = np.clip(fmap, 1e-6, None).mean(axis=(1, 2))
    np.testing.assert_allclose(gem(fmap, p=1.0), avg / np.linalg.norm(avg), atol=1e-5)
    mx = fmap.max(axis=(1, 2)).clip(1e-6)
    mx /= np.linalg.norm(mx)
    assert np.dot(gem(fmap, p=10.0), mx) > 0.995
    assert np.dot(gem(fmap, p=10.0), mx) > np.dot(gem(fmap, p=3.0), mx) > np.dot(gem(fmap, p=1.0), mx)


def test_box_to_cells_scales_each_axis():
    # 640 x 480 image, 15 x 20 map: 32 px per cell on both axes.
    assert box_to_cells((64, 48, 128, 96), (640, 480), (15, 20)) == pytest.approx((2.0, 1.5, 4.0, 3.0))
    # Very wide 1242 x 375 image on a 7 x 20 map: x by 20/1242, y by 7/375 (no axis swap).
    x, y, w, h = box_to_cells((621, 75, 62.1, 150), (1242, 375), (7, 20))
    assert (x, y, w, h) == pytest.approx((10.0, 1.4, 1.0, 2.8))
    # Portrait 480 x 640 on a 20 x 15 map.
    assert box_to_cells((480, 640, 0, 0), (480, 640), (20, 15)) == pytest.approx((15.0, 20.0, 0.0, 0.0))


def _grid_sample_layout_mean(sims: torch.Tensor, th: int, tw: int, fh: float, fw: float) -> torch.Tensor:
    """Reference for the layout sum: every template cell's similarity read with grid_sample at its offset."""
    import torch.nn.functional as F

    k, n, height, width = sims.shape
    ys, xs = torch.arange(height) + 0.5, torch.arange(width) + 0.5
    total = torch.zeros(n, height, width)
    for cell in range(k):
        i, j = divmod(cell, tw)
        dy, dx = ((i + 0.5) / th - 0.5) * fh, ((j + 0.5) / tw - 0.5) * fw
        grid = torch.stack(torch.meshgrid((ys + dy) / height * 2 - 1, (xs + dx) / width * 2 - 1,
                                          indexing="ij")[::-1], dim=-1)
        total += F.grid_sample(sims[cell][:, None], grid.expand(n, -1, -1, -1), mode="bilinear",
                               padding_mode="zeros", align_corners=False)[:, 0]
    return total / k


@pytest.mark.parametrize("th, tw, fh, fw", [(3, 3, 4.4, 2.6), (1, 1, 0.4, 0.7), (3, 1, 9.5, 1.2), (2, 3, 1.1, 13.0)])
def test_layout_mean_equals_bilinear_sampling(th, tw, fh, fw):
    from objret.mining.template_matching import _layout_mean

    sims = torch.randn(th * tw, 4, 9, 11, generator=torch.Generator().manual_seed(th * 7 + tw))
    expected = _grid_sample_layout_mean(sims, th, tw, fh, fw)
    # _layout_mean takes frames first (n x cells x H x W), as match_template's batched matmul makes them.
    torch.testing.assert_close(_layout_mean(sims.transpose(0, 1), th, tw, fh, fw), expected, atol=1e-5, rtol=1e-5)


def test_mirror_variant_finds_a_mirrored_paste(scene):
    """B's paste flipped left-right: the query's mirror view matches it better than the query itself does,
    and a frame scores as its best variant."""
    from objret.mining.query import mirrored_view

    backbone = build_backbone("efficientnet_lite0", layers=(LAYER,), max_side=MAX_SIDE)
    a, clean = scene["images"]["A"], scene["images"]["B_clean"]
    x, y, w, h = (int(round(v)) for v in scene["box"])
    px, py = PASTE_XY
    mirrored = clean.copy()
    mirrored[py:py + h, px:px + w] = a[y:y + h, x:x + w][:, ::-1]
    maps = extract_maps(backbone, [("B_mirror", mirrored)], device=torch.device("cpu"))
    stack = MapStack(["B_mirror", "B_clean"], [maps["B_mirror"][LAYER], scene["maps"]["B_clean"][LAYER]],
                     [(640, 480), (640, 480)])
    image_size = (480, 640)
    view = mirrored_view(backbone, a, scene["box"])
    assert view.image_size == image_size
    assert view.box == pytest.approx((480 - scene["box"][0] - scene["box"][2], *scene["box"][1:]))
    _, _, w_cells, h_cells = box_to_cells(scene["box"], image_size, scene["maps"]["A"][LAYER].shape[-2:])
    grid = (3, 3)
    plain = box_template(scene["maps"]["A"][LAYER], scene["box"], image_size, grid=grid)
    flipped = box_template(view.maps[LAYER], view.box, view.image_size, grid=grid)
    alone = match_template(plain, (h_cells, w_cells), stack, SCALES)
    both = match_template([plain, flipped], (h_cells, w_cells), stack, SCALES)
    mirror_only = match_template(flipped, (h_cells, w_cells), stack, SCALES)
    assert mirror_only.scores[0] > alone.scores[0] + 0.05, (mirror_only.scores, alone.scores)
    np.testing.assert_allclose(both.scores, np.maximum(alone.scores, mirror_only.scores), atol=1e-5)
    assert both.scores[0] - both.scores[1] > 0.25
    assert iou_xywh(both.boxes[0], (px, py, w, h)) >= 0.5


def test_boxes_are_placed_between_cells(scene):
    """A paste centred on a cell corner (cells are 32 px here): cell centres are all 16 px off on both axes,
    the refined box centre is closer."""
    backbone = build_backbone("efficientnet_lite0", layers=(LAYER,), max_side=MAX_SIDE)
    a, clean = scene["images"]["A"], scene["images"]["B_clean"]
    x, y, w, h = (int(round(v)) for v in scene["box"])
    cx, cy = 16 * 32, 10 * 32   # a cell corner
    px, py = cx - w // 2, cy - h // 2
    pasted = clean.copy()
    pasted[py:py + h, px:px + w] = a[y:y + h, x:x + w]
    maps = extract_maps(backbone, [("corner", pasted)], device=torch.device("cpu"))
    stack = MapStack(["corner"], [maps["corner"][LAYER]], [(640, 480)])
    _, _, w_cells, h_cells = box_to_cells(scene["box"], (480, 640), scene["maps"]["A"][LAYER].shape[-2:])
    template = box_template(scene["maps"]["A"][LAYER], scene["box"], (480, 640), max_cells=3)
    box = match_template(template, (h_cells, w_cells), stack, (1.0,)).boxes[0]
    assert abs(box[0] + box[2] / 2 - (px + w / 2)) <= 11, box
    assert abs(box[1] + box[3] / 2 - (py + h / 2)) <= 11, box


def test_box_scale_is_the_largest_scale_near_the_best_score():
    from objret.mining.template_matching import _box_scale

    peaks = torch.tensor([[0.70, 0.80, 0.78, 0.60],    # 2.0 (index 2) is within 0.05 of the best (0.80 at 1.0)
                          [0.70, 0.80, 0.70, 0.79],    # 1.5 (index 3) is, 2.0 is not
                          [0.90, 0.80, 0.70, 0.60]])   # nothing near the best: the best, 0.5
    scales = (0.5, 1.0, 2.0, 1.5)                      # in no order
    assert _box_scale(peaks, scales, 0.05).tolist() == [2, 3, 0]
    assert _box_scale(peaks, scales, 0.0).tolist() == [1, 1, 0]


def test_a_scale_tolerance_sizes_boxes_to_resized_pastes_and_leaves_the_scores(scene):
    """The clock pasted at 0.7x to 1.8x its size: every tolerance scores a frame alike (its best scale and place);
    the best-scoring scale undersizes the box (at 0.7x and 0.8x it takes 0.5, at 1.8x 1.5: measured), and a
    tolerance of 0.05 takes the larger scale that scores nearly as well, boxing the objects better."""
    import cv2

    backbone = build_backbone("efficientnet_lite0", layers=(LAYER,), max_side=MAX_SIDE)
    a, clean = scene["images"]["A"], scene["images"]["B_clean"]
    x, y, w, h = (int(round(v)) for v in scene["box"])
    _, _, w_cells, h_cells = box_to_cells(scene["box"], (480, 640), scene["maps"]["A"][LAYER].shape[-2:])
    template = box_template(scene["maps"]["A"][LAYER], scene["box"], (480, 640), max_cells=3)
    scales = (0.5, 0.75, 1.0, 1.5, 2.0)
    ious = {"strict": [], "tolerant": []}
    for factor in (0.7, 0.8, 1.2, 1.8):
        big = cv2.resize(np.ascontiguousarray(a[y:y + h, x:x + w]), None, fx=factor, fy=factor,
                         interpolation=cv2.INTER_LINEAR)
        px, py = 300 - int(big.shape[1] * 0.3), 100
        pasted = clean.copy()
        pasted[py:py + big.shape[0], px:px + big.shape[1]] = big
        truth = (px, py, big.shape[1], big.shape[0])
        maps = extract_maps(backbone, [("pasted", pasted)], device=torch.device("cpu"))
        stack = MapStack(["pasted"], [maps["pasted"][LAYER]], [(640, 480)])
        strict = match_template(template, (h_cells, w_cells), stack, scales)
        tolerant = match_template(template, (h_cells, w_cells), stack, scales, scale_tolerance=0.05)
        assert tolerant.scores[0] == pytest.approx(strict.scores[0])
        np.testing.assert_array_equal(tolerant.heatmaps, strict.heatmaps)
        assert tolerant.boxes[0][2] >= strict.boxes[0][2] - 1e-3, factor
        ious["strict"].append(iou_xywh(strict.boxes[0], truth))
        ious["tolerant"].append(iou_xywh(tolerant.boxes[0], truth))
    assert min(ious["tolerant"]) >= 0.5 > min(ious["strict"]), ious
    assert np.mean(ious["tolerant"]) >= np.mean(ious["strict"]) + 0.1, ious
