"""objret.steps.store over a small real lake (12 bench frames, Lite0 at 320 px): the mining store and the cell index
are built after the region index, new frames are appended to both without a rebuild, and with
``features.keep_cache: false`` the fp16 cache is dropped once its frames are encoded, mining still works and
a later build computes no feature again for them."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from objret.config import load_params
from objret.index.region_index import RegionIndex
from objret.mining.report import parse_report
from objret.steps import features as features_step, index as index_step, ingest as ingest_step
from objret.steps import mine as mine_step, regions as regions_step, store as store_step
from objret.steps import whitening as whitening_step
from objret.steps.workspace import Workspace

pytestmark = pytest.mark.usefixtures("one_torch_thread")

IMAGES = ["tud_campus/images/000014.jpg", "tud_campus/images/000015.jpg", "tud_campus/images/000016.jpg",
          "tud_stadtmitte/images/000040.jpg", "kitti_0005/images/0000000040.jpg", "pets09_s2l1/images/000101.jpg",
          "coco_mini/images/000000000034.jpg", "coco_mini/images/000000000064.jpg",
          "tud_stadtmitte/images/000005.jpg", "tud_stadtmitte/images/000024.jpg",
          "kitti_0005/images/0000000000.jpg", "pets09_s2l1/images/000103.jpg"]
OVERRIDES = ["features.backbone=efficientnet_lite0", "features.max_side=320", "features.shard_size=4",
             "regions.sources=[whole, uniform]", "index.map_store={pq_m: 8, train_frames: 4, shard_frames: 4}",
             "mining.mirror=false", "mining.scales=[1.0]", "mining.top_k=5"]


def _build(ws: Workspace, folder: Path):
    ingest_step.ingest(ws, [str(folder)], progress=False)
    cached = features_step.features(ws, progress=False)
    regions_step.regions(ws, progress=False)
    whitening_step.whitening(ws)
    index_step.build_index(ws)
    stored = store_step.store(ws, progress=False)
    cells = store_step.cells(ws, progress=False)
    return cached, stored, cells, store_step.prune_cache(ws)


def test_the_store_grows_with_the_lake_and_the_cache_can_go(bench_dir, tmp_path):
    folder = tmp_path / "lake"
    folder.mkdir()
    for rel in IMAGES[:8]:
        shutil.copy(bench_dir / rel, folder / rel.replace("/", "_"))
    ws = Workspace(load_params(None, [*OVERRIDES, "features.keep_cache=false"]), tmp_path / "work")
    cached, stored, cells, dropped = _build(ws, folder)
    assert cached.computed == 8 and stored.stored == 8 and cells.frames == 8 and cells.added == 8
    assert dropped == 2 and ws.cache.shards() == []   # both 4-frame shards: every frame encoded and indexed
    first_shards = ws.map_store.shards()
    assert len(first_shards) == 2 and 8 * 40 * 8 < stored.bytes_per_frame * 8
    cells_index = RegionIndex.load(ws.cells_dir(), recipe=ws.cells_recipe())
    assert cells_index.recipe == {"backbone": ws.backbone.spec.cache_key(), "layer": "stride16", "per_frame": 128}

    # New frames: only they are computed, encoded and indexed; the old shards stay as they were.
    for rel in IMAGES[8:]:
        shutil.copy(bench_dir / rel, folder / rel.replace("/", "_"))
    before = {p.name: p.read_bytes() for p in first_shards}
    cached, stored, cells, dropped = _build(ws, folder)
    assert (cached.computed, cached.already_cached) == (4, 0)   # the 8 dropped frames are not computed again
    assert (stored.stored, stored.already_stored) == (4, 8) and (cells.added, cells.frames) == (4, 12)
    assert dropped == 1 and ws.cache.shards() == []
    assert all(ws.map_store.dir.joinpath(name).read_bytes() == data for name, data in before.items())
    assert ws.map_store.codec_path.exists() and len(ws.map_store.shards()) == 3

    # Mining reads the store (the query frame's own maps are computed from its pixels: no cache left).
    frame = next(f for f in ws.lake.frames() if f.uri.endswith("000000000064.jpg"))
    report = parse_report({"report_id": "no-cache", "detector": {"name": "t", "version": "1"},
                           "frame": {"uri": frame.uri}, "box": [112, 42, 154, 152], "class_name": "clock",
                           "failure_kind": "false_negative"})
    outcome = mine_step.mine(ws, report, progress=False)
    assert outcome.candidates == 11 and len(outcome.mined) == 5
    assert all(np.isfinite(m["score"]) for m in outcome.mined)
    assert frame.frame_id not in {m["frame_id"] for m in outcome.mined}
