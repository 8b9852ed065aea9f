"""objret.index.cell_index: the most distinctive cells of real stride-16 maps (Lite0, 320 px, bench frames), and the
template cells' vote over a RegionIndex of them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from objret.features.backbone import build_backbone
from objret.features.cache import extract_maps
from objret.index.cell_index import CELLS_PER_KEY, salient_cells, template_keys, vote
from objret.index.region_index import RegionIndex
from objret.ingest.decode import load_image

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def frames(bench_dir):
    """A street frame, the same frame with a COCO clock pasted in, and three unrelated frames."""
    clean = load_image(str(bench_dir / "tud_stadtmitte/images/000040.jpg"))
    coco = load_image(str(bench_dir / "coco_mini/images/000000000064.jpg"))
    clock = coco[42:194, 112:266]   # the clock's box in that COCO image
    pasted = clean.copy()
    pasted[260:260 + clock.shape[0], 400:400 + clock.shape[1]] = clock
    images = {"coco": coco, "pasted": pasted, "clean": clean,
              "kitti": load_image(str(bench_dir / "kitti_0005/images/0000000040.jpg")),
              "pets": load_image(str(bench_dir / "pets09_s2l1/images/000101.jpg"))}
    backbone = build_backbone("efficientnet_lite0", layers=("stride16",), max_side=320)
    maps = {k: v["stride16"] for k, v in extract_maps(backbone, list(images.items()), device=torch.device("cpu")).items()}
    return images, maps


def test_salient_cells_are_the_frame_s_most_distinctive_unit_cells(frames):
    images, maps = frames
    fmap = maps["pasted"]
    c, h, w = fmap.shape
    vectors, boxes = salient_cells(fmap, 32)
    assert vectors.shape == (32, c) and boxes.shape == (32, 4)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    assert (boxes[:, 2:] == 1).all() and (boxes[:, 0] < w).all() and (boxes[:, 1] < h).all()
    # Each vector is its cell, L2-normalised; they come most distinctive first (farthest from the mean cell).
    unit = fmap.astype(np.float32) / (np.linalg.norm(fmap.astype(np.float32), axis=0, keepdims=True) + 1e-6)
    x, y = boxes[:, 0].astype(int), boxes[:, 1].astype(int)
    np.testing.assert_allclose(vectors, unit[:, y, x].T, atol=1e-3)
    mean = unit.reshape(c, -1).mean(axis=1)
    distinct = 1 - vectors @ (mean / np.linalg.norm(mean))
    assert np.all(np.diff(distinct) <= 1e-5)
    # The pasted clock is among the most distinctive parts of the street: some selected cell lies on it.
    sy, sx = h / images["pasted"].shape[0], w / images["pasted"].shape[1]
    on_clock = (x >= int(400 * sx)) & (x <= int(554 * sx)) & (y >= int(260 * sy)) & (y <= int(412 * sy))
    assert on_clock[:8].any()
    # A frame with fewer cells than asked gives them all.
    assert len(salient_cells(fmap[:, :3, :4], 100)[0]) == 12


def test_the_clock_s_template_cells_vote_for_the_frame_it_was_pasted_in(frames):
    images, maps = frames
    index = RegionIndex(maps["coco"].shape[0], kind="flat", use_gpu=False)
    for name, fmap in maps.items():
        if name != "coco":
            vectors, boxes = salient_cells(fmap, 48)
            index.add([name] * len(vectors), vectors, boxes)
    keys = template_keys(maps["coco"], (112, 42, 154, 152), (images["coco"].shape[1], images["coco"].shape[0]), 3)
    assert keys.shape == (9, maps["coco"].shape[0])
    hits = vote(index, keys, 4)
    assert [h.frame_id for h in hits][0] == "pasted" and len(hits) == 4
    assert hits[0].score > hits[1].score
    # A frame's vote is the mean over the keys of its best cell's cosine (a key that did not reach it: the
    # lowest cosine that key found).
    ids, sims = index.search(keys, CELLS_PER_KEY * 4)
    owner = index.owner
    for hit in hits:
        row = index.frame_ids.index(hit.frame_id)
        expected = [s[owner[i] == row].max() if (owner[i] == row).any() else s.min() for i, s in zip(ids, sims)]
        assert hit.score == pytest.approx(float(np.mean(expected)), abs=1e-5)
    assert vote(index, keys[:0], 4) == []
