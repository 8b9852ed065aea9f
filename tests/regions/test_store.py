"""objret.regions.store: batches of per-frame regions and raw descriptors of real bench frames, written atomically
and loaded as one table."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import torch

from objret import storage
from objret.config import load_params
from objret.features.backbone import build_backbone
from objret.features.cache import extract_maps
from objret.ingest.decode import load_image
from objret.regions.store import RegionStore, RegionTable, params_key
from objret.regions.sources import SOURCES, frame_regions, pool_regions

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FRAMES = {  # frame id -> bench image: three sizes, so the map sizes differ per frame
    "pets-101": "pets09_s2l1/images/000101.jpg",
    "kitti-40": "kitti_0005/images/0000000040.jpg",
    "coco-64": "coco_mini/images/000000000064.jpg",
    "tud-50": "tud_stadtmitte/images/000050.jpg",
}


@pytest.fixture(scope="module")
def per_frame(bench_dir):
    """``{frame_id: (regions, raw avg descriptors, map_hw)}`` from lite0 stride-32 maps at 320 px, as
    ``pipeline.regions`` stores them."""
    backbone = build_backbone("efficientnet_lite0", layers=("stride32",), max_side=320)
    images = [(fid, load_image(str(bench_dir / rel))) for fid, rel in FRAMES.items()]
    maps = extract_maps(backbone, images, device=torch.device("cpu"))
    out = {}
    for fid, _ in images:
        fmap = maps[fid]["stride32"]
        regions = frame_regions(fmap, load_params(None, ["regions.sources=[whole, uniform]"]).regions)
        out[fid] = (regions, pool_regions(fmap, regions.boxes, "avg"), tuple(fmap.shape[-2:]))
    return out


def _check_frame(table: RegionTable, row: int, expected) -> None:
    regions, descriptors, map_hw = expected
    mine = table.owner == row
    np.testing.assert_array_equal(table.boxes[mine], regions.boxes)
    np.testing.assert_array_equal(table.sources[mine], regions.sources)
    np.testing.assert_array_equal(table.scores[mine], regions.scores)
    assert table.descriptors.dtype == np.float32
    np.testing.assert_allclose(table.descriptors[mine], descriptors, rtol=2e-3, atol=2e-4)  # stored as fp16
    assert tuple(table.map_hw[row]) == map_hw


def test_write_and_load_round_trip(per_frame, tmp_path):
    assert len({v[2] for v in per_frame.values()}) >= 3  # real maps of different sizes
    store = RegionStore(tmp_path / "regions")
    assert store.batches() == [] and store.stored_ids() == set()
    with pytest.raises(FileNotFoundError):
        store.load()
    path = store.write(per_frame)
    assert path.parent == store.dir and path.name.startswith("regions-") and path.suffix == ".npz"
    assert store.batches() == [path]
    assert store.stored_ids() == set(per_frame)

    table = store.load()
    assert table.frame_ids == sorted(per_frame)  # a batch is written in frame-id order
    assert len(table) == sum(len(v[0]) for v in per_frame.values())
    assert table.owner.dtype == np.int32 and table.map_hw.shape == (len(per_frame), 2)
    assert np.all(np.diff(table.owner) >= 0)  # regions grouped by frame, frames in table order
    for row, fid in enumerate(table.frame_ids):
        _check_frame(table, row, per_frame[fid])
    # The descriptors survive fp16 storage as unit vectors pointing the same way.
    np.testing.assert_allclose(np.linalg.norm(table.descriptors, axis=1), 1.0, atol=2e-3)
    # Writing the same frames again gives the same file name (content-addressed by the frame ids).
    assert store.write(per_frame) == path and store.batches() == [path]


def test_select_keeps_the_given_order_and_owners(per_frame, tmp_path):
    store = RegionStore(tmp_path)
    store.write(per_frame)
    table = store.load()
    wanted = ["tud-50", "pets-101"]
    sub = table.select(wanted)
    assert sub.frame_ids == wanted
    assert len(sub) == len(per_frame["tud-50"][0]) + len(per_frame["pets-101"][0])
    assert set(sub.owner.tolist()) == {0, 1}
    for row, fid in enumerate(wanted):
        _check_frame(sub, row, per_frame[fid])
    # load(frame_ids) is the same selection.
    direct = store.load(wanted)
    assert direct.frame_ids == wanted
    np.testing.assert_array_equal(direct.owner, sub.owner)
    np.testing.assert_array_equal(direct.descriptors, sub.descriptors)
    # An empty selection is an empty table; an unknown frame is an error.
    assert len(table.select([])) == 0
    with pytest.raises(KeyError):
        table.select(["nope"])


def test_two_batches_load_as_one_table(per_frame, tmp_path):
    store = RegionStore(tmp_path)
    first = {k: per_frame[k] for k in ("pets-101", "kitti-40")}
    second = {k: per_frame[k] for k in ("coco-64", "tud-50")}
    paths = {store.write(first), store.write(second)}
    assert set(store.batches()) == paths and len(paths) == 2
    assert store.stored_ids() == set(per_frame)
    table = store.load()
    assert sorted(table.frame_ids) == sorted(per_frame) and len(set(table.frame_ids)) == 4
    assert len(table) == sum(len(v[0]) for v in per_frame.values())
    for row, fid in enumerate(table.frame_ids):
        _check_frame(table, row, per_frame[fid])
    # Frames of both batches can be selected together, in any order.
    mixed = store.load(["tud-50", "pets-101", "coco-64"])
    for row, fid in enumerate(mixed.frame_ids):
        _check_frame(mixed, row, per_frame[fid])


def test_frames_without_regions_keep_their_row(per_frame, tmp_path):
    """A frame whose sources found nothing (e.g. only the detector, no boxes) still counts as stored."""
    blank = np.zeros((320, 8, 10), np.float16)
    empty = frame_regions(blank, load_params(None, ["regions.sources=[egm]"]).regions)  # no salient region on zeros
    assert len(empty) == 0
    store = RegionStore(tmp_path)
    store.write({"blank": (empty, pool_regions(blank, empty.boxes), (8, 10)),
                 "pets-101": per_frame["pets-101"]})
    table = store.load()
    assert table.frame_ids == ["blank", "pets-101"] and store.stored_ids() == {"blank", "pets-101"}
    assert (table.owner == 1).sum() == len(per_frame["pets-101"][0]) and (table.owner == 0).sum() == 0
    _check_frame(table, 1, per_frame["pets-101"])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork to kill a writer mid-write")
def test_a_killed_write_leaves_no_batch(per_frame, tmp_path):
    """A process killed (SIGKILL) after writing the temp file but before the rename leaves only a dot-file
    that is never read as a batch; the stored frames are still the complete batches'."""
    store = RegionStore(tmp_path / "regions")
    store.write({"pets-101": per_frame["pets-101"]})
    before = store.load()

    # The other frames are written by a forked child that is killed at the rename (the temp file is complete).
    rest = {k: v for k, v in per_frame.items() if k != "pets-101"}
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            storage.os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
            store.write(rest)
        finally:
            os._exit(3)  # only reached if the kill did not happen
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    leftovers = [p for p in store.dir.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".regions-")
    assert leftovers[0].stat().st_size > 1000  # the whole batch was in the temp file

    assert len(store.batches()) == 1
    assert store.stored_ids() == {"pets-101"}
    after = store.load()
    assert after.frame_ids == before.frame_ids
    np.testing.assert_array_equal(after.descriptors, before.descriptors)
    # The next run writes the missing frames for real.
    store.write(rest)
    assert store.stored_ids() == set(per_frame) and len(store.batches()) == 2


def test_params_key_follows_the_parameters():
    base = {"layer": "stride32", "sources": ["whole", "uniform"], "uniform_levels": 3, "pooling": "avg"}
    key = params_key(base)
    assert len(key) == 10 and key == params_key(dict(reversed(list(base.items()))))  # key order does not matter
    assert params_key({**base, "pooling": "max"}) != key
    assert params_key({**base, "sources": ["whole", "uniform", "egm"]}) != key
    # The Workspace keys its store by RegionsParams.store_key(): what the stored regions depend on only.
    params = load_params()
    stored = params_key(params.regions.store_key())
    assert params_key(params.replace("regions.pooling=max").regions.store_key()) != stored
    assert params_key(params.replace("regions.egm.sigma=3.0").regions.store_key()) != stored
    assert params_key(params.replace("regions.batch=8", "regions.whitening.enabled=true").regions.store_key()) == stored
    assert SOURCES.index("whole") == 0  # stored source codes index this tuple: never reorder it
