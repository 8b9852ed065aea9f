"""objret.features.cache: the sharded fp16 map cache over real bench frames ingested into a real lake."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from objret.features import cache as features_module
from objret.features.backbone import build_backbone, resized_shape
from objret.errors import ObjretError
from objret.features.cache import FeatureCache, cache_features, extract_maps
from objret.ingest.lake import Lake
from tests.helpers.sigkill import run_killed, sigkill_at_call
from objret.ingest.decode import load_image

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MAX_SIDE = 256
SHARD_SIZE = 4
LAYERS = ("stride16", "stride32")
CHANNELS = {"stride16": 112, "stride32": 320}
CPU = torch.device("cpu")

# 12 real images of five sizes: 7 tud_campus frames (640x480) and landscape, portrait, near-square and very
# wide frames from coco_mini, pets09 and kitti.
BENCH_FILES = [*(f"tud_campus/images/{i:06d}.jpg" for i in range(14, 21)),
               "coco_mini/images/000000000034.jpg", "coco_mini/images/000000000064.jpg",
               "coco_mini/images/000000000394.jpg", "pets09_s2l1/images/000101.jpg",
               "kitti_0005/images/0000000000.jpg"]


@pytest.fixture(scope="module")
def backbone():
    return build_backbone("efficientnet_lite0", layers=LAYERS, max_side=MAX_SIDE)


@pytest.fixture(scope="module")
def ingested(tmp_path_factory, bench_dir):
    """A real lake over a folder holding copies of 12 bench images and one truncated JPEG."""
    folder = tmp_path_factory.mktemp("lake_src")
    for i, name in enumerate(BENCH_FILES):
        source = bench_dir / name
        shutil.copy(source, folder / f"{i:02d}_{source.parent.parent.name}_{source.name}")
    jpeg = (bench_dir / BENCH_FILES[0]).read_bytes()
    (folder / "corrupt.jpg").write_bytes(jpeg[: len(jpeg) // 3])  # a cut-off download
    lake = Lake(tmp_path_factory.mktemp("lake"))
    result = lake.ingest(str(folder), every_n=1, progress=False)
    return lake, result, folder


@pytest.fixture(scope="module")
def frames(ingested):
    lake, _, _ = ingested
    return lake.frames()


@pytest.fixture(scope="module")
def bad_frame(frames, tmp_path_factory):
    """A frame record whose file went bad after ingestion (a truncated copy): cache_features must report it."""
    broken = tmp_path_factory.mktemp("broken") / "went_bad.jpg"
    data = Path(frames[0].image_uri).read_bytes()
    broken.write_bytes(data[:2000])
    return dataclasses.replace(frames[0], frame_id="b" * 64, uri=str(broken), image_uri=str(broken))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, backbone, frames):
    """An uninterrupted run over the 12 frames in its own folder."""
    cache = FeatureCache(tmp_path_factory.mktemp("cache_ref"), backbone.spec.cache_key())
    result = cache_features(backbone, cache, frames, load_image, shard_size=SHARD_SIZE, device=CPU,
                            progress=False)
    return cache, result


def _shard_header(path: Path) -> dict:
    # safetensors: 8-byte little-endian header length, then a JSON header, then raw tensor bytes (no pickle).
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + length])


def _all_maps(cache: FeatureCache, frame_ids) -> dict[str, dict[str, np.ndarray]]:
    return {layer: cache.load(frame_ids, layer) for layer in LAYERS}


def test_ingest_keeps_the_12_images_and_reports_the_corrupt_jpeg(ingested, frames):
    lake, result, _ = ingested
    assert result.added == 12 and len(frames) == 12
    assert [Path(uri).name for uri, _ in result.errors] == ["corrupt.jpg"]
    assert "corrupt.jpg" not in {Path(f.uri).name for f in frames}
    assert len({(f.width, f.height) for f in frames}) == 6


def test_cache_writes_fp16_shards_keyed_by_frame_id(tmp_path, backbone, frames, bad_frame):
    cache = FeatureCache(tmp_path, backbone.spec.cache_key())
    todo = [*frames[:6], bad_frame, *frames[6:]]  # chunks of 4: 4, 3 good + the bad one, 4, 1
    result = cache_features(backbone, cache, todo, load_image, shard_size=SHARD_SIZE, device=CPU, progress=False)

    assert result.computed == 12 and result.already_cached == 0
    assert [fid for fid, _ in result.failed] == [bad_frame.frame_id]
    assert "went_bad.jpg" in result.failed[0][1]
    assert cache.dir == tmp_path / backbone.spec.cache_key()

    shards = cache.shards()
    assert len(shards) == 4
    assert sorted(p.name for p in cache.dir.iterdir()) == sorted(p.name for p in shards)  # no leftovers
    good_ids = {f.frame_id for f in frames}
    seen: list[str] = []
    for shard in shards:
        header = _shard_header(shard)
        shard_ids = json.loads(header["__metadata__"]["frames"])
        assert shard_ids == sorted(shard_ids)
        assert header["__metadata__"]["cache_key"] == backbone.spec.cache_key()
        assert header["__metadata__"]["backbone"] == "efficientnet_lite0"
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        assert set(tensors) == {f"{fid}/{layer}" for fid in shard_ids for layer in LAYERS}
        assert {v["dtype"] for v in tensors.values()} == {"F16"}
        with safe_open(shard, framework="numpy") as f:
            assert all(f.get_tensor(name).dtype == np.float16 for name in f.keys())
        seen += shard_ids
    assert sorted(len(json.loads(_shard_header(s)["__metadata__"]["frames"])) for s in shards) == [1, 3, 4, 4]
    assert sorted(seen) == sorted(good_ids)  # every good frame once, the bad one nowhere
    assert cache.cached_ids() == good_ids and bad_frame.frame_id not in cache

    # Map sizes follow the resized input: ceil(side / stride); the values are real activations.
    fresh = FeatureCache(tmp_path, backbone.spec.cache_key())  # reads the shard headers anew
    for layer, stride in (("stride16", 16), ("stride32", 32)):
        maps = fresh.load([f.frame_id for f in frames], layer)
        for frame in frames:
            width, height = resized_shape(frame.width, frame.height, MAX_SIDE)
            arr = maps[frame.frame_id]
            assert arr.dtype == np.float16
            assert arr.shape == (CHANNELS[layer], math.ceil(height / stride), math.ceil(width / stride))
            assert np.isfinite(arr).all() and float(np.abs(arr).mean()) > 0.01

    # A second run computes nothing and writes nothing; the bad frame is reported again.
    before = {p: p.stat().st_mtime_ns for p in shards}
    again = cache_features(backbone, fresh, todo, load_image, shard_size=SHARD_SIZE, device=CPU, progress=False)
    assert again.computed == 0 and again.already_cached == 12
    assert [fid for fid, _ in again.failed] == [bad_frame.frame_id]
    assert {p: p.stat().st_mtime_ns for p in fresh.shards()} == before


def test_cached_maps_equal_a_fresh_extraction(backbone, frames, reference):
    cache, result = reference
    assert result.computed == 12 and not result.failed
    ids = [f.frame_id for f in frames]
    cached = _all_maps(cache, ids)
    fresh = extract_maps(backbone, [(f.frame_id, load_image(f.image_uri)) for f in frames], batch_size=8,
                         device=CPU)
    assert set(fresh) == set(ids)
    for layer in LAYERS:
        for fid in ids:
            a = cached[layer][fid].astype(np.float32)
            b = fresh[fid][layer].astype(np.float32)
            assert a.shape == b.shape
            # fp16 storage (of bf16-autocast activations on CPUs with native bf16): equal to within a few steps
            np.testing.assert_allclose(a, b, rtol=0.02, atol=0.02 * float(np.abs(b).max()))
    # Different frames give different maps (the cache does not mix frames up).
    tud = [f.frame_id for f in frames if f.width == 640 and f.height == 480]
    assert len(tud) >= 2
    assert not np.allclose(cached["stride16"][tud[0]], cached["stride16"][tud[1]], atol=1e-2)


def test_maps_are_the_forward_rounded_once_to_fp16(backbone, frames):
    """The backbone's activations (bf16 under CPU autocast, fp16 on CUDA, else fp32) become fp16 in one
    conversion, the same values as through float32 (bf16 and fp16 values are all exact in float32)."""
    from objret.features.backbone import preprocess

    batch = torch.stack([preprocess(load_image(f.image_uri), backbone.spec.preprocessing) for f in frames[:3]])
    for autocast in (True, False):
        out = features_module.forward(backbone, batch, CPU, autocast)
        maps = extract_maps(backbone, [(f.frame_id, load_image(f.image_uri)) for f in frames[:3]], device=CPU,
                            autocast=autocast)
        for layer, value in out.items():
            through_float32 = value.float().numpy().astype(np.float16)
            for i, f in enumerate(frames[:3]):
                assert maps[f.frame_id][layer].dtype == np.float16
                assert np.array_equal(maps[f.frame_id][layer], through_float32[i])


def test_killed_run_keeps_finished_shards_and_resumes(tmp_path, backbone, frames, reference):
    ref_cache, _ = reference
    key = backbone.spec.cache_key()

    def run():   # in a forked child, SIGKILLed (no cleanup of any kind) as it starts writing its third shard
        sigkill_at_call(FeatureCache, "write_shard", 3)
        cache_features(backbone, FeatureCache(tmp_path, key), frames, load_image, shard_size=SHARD_SIZE,
                       device=CPU, progress=False)

    run_killed(run)

    after_kill = FeatureCache(tmp_path, key)
    assert len(after_kill.shards()) == 2
    assert sorted(p.name for p in after_kill.dir.iterdir()) == sorted(p.name for p in after_kill.shards())
    first_eight = {f.frame_id for f in frames[:8]}
    assert after_kill.cached_ids() == first_eight

    resumed = cache_features(backbone, after_kill, frames, load_image, shard_size=SHARD_SIZE, device=CPU,
                             progress=False)
    assert resumed.computed == 4 and resumed.already_cached == 8 and not resumed.failed
    final = FeatureCache(tmp_path, key)
    assert len(final.shards()) == 3
    assert final.cached_ids() == ref_cache.cached_ids() == {f.frame_id for f in frames}
    ids = [f.frame_id for f in frames]
    got, want = _all_maps(final, ids), _all_maps(ref_cache, ids)
    for layer in LAYERS:
        for fid in ids:
            np.testing.assert_array_equal(got[layer][fid], want[layer][fid])


def test_kill_between_temp_write_and_rename_leaves_no_visible_shard(tmp_path, backbone, frames):
    key = backbone.spec.cache_key()
    four = frames[:4]

    def run():   # in a forked child, SIGKILLed at the rename of its shard: the temp file written in full
        sigkill_at_call(features_module.storage.os, "replace", 1)
        cache_features(backbone, FeatureCache(tmp_path, key), four, load_image, shard_size=SHARD_SIZE, device=CPU,
                       progress=False)

    pid = run_killed(run)
    cache = FeatureCache(tmp_path, key)
    # What a kill -9 leaves (no handler removes it): the whole shard in a hidden temp file named for the dead writer,
    # which no reader takes for a shard.
    (leftover,) = cache.dir.iterdir()
    assert leftover.name.startswith(".shard-") and leftover.name.endswith(".tmp") and f"-{pid}-" in leftover.name
    leftover_size = leftover.stat().st_size
    assert cache.shards() == [] and cache.cached_ids() == set()

    # The next run removes the dead writer's temp file and writes the shard.
    resumed = cache_features(backbone, cache, four, load_image, shard_size=SHARD_SIZE, device=CPU, progress=False)
    assert resumed.computed == 4 and resumed.already_cached == 0
    final = FeatureCache(tmp_path, key)
    assert final.cached_ids() == {f.frame_id for f in four}
    assert list(final.dir.iterdir()) == final.shards() and final.shards()[0].stat().st_size == leftover_size


def test_other_max_side_uses_another_cache(tmp_path, backbone, frames, reference):
    ref_cache, _ = reference
    other = build_backbone("efficientnet_lite0", layers=LAYERS, max_side=320)
    assert other.spec.cache_key() != backbone.spec.cache_key()
    root = ref_cache.dir.parent
    other_cache = FeatureCache(root, other.spec.cache_key())
    assert other_cache.dir != ref_cache.dir
    assert other_cache.cached_ids() == set()  # the 256 px maps are not reused for 320 px
    kitti = [f for f in frames if f.width == 1242]
    result = cache_features(other, other_cache, kitti, load_image, shard_size=SHARD_SIZE, device=CPU,
                            progress=False)
    assert result.computed == 1
    fid = kitti[0].frame_id
    assert other_cache.load([fid], "stride16")[fid].shape == (112, 7, 20)    # 320 x 97 input
    assert ref_cache.load([fid], "stride16")[fid].shape == (112, 5, 16)      # 256 x 77 input
    # The same configuration gives the same key, so a rebuilt backbone finds its maps again.
    assert build_backbone("efficientnet_lite0", layers=LAYERS, max_side=MAX_SIDE).spec.cache_key() == \
        backbone.spec.cache_key()


def test_load_unknown_frame_names_it(reference, frames):
    cache, _ = reference
    unknown = "0" * 64
    with pytest.raises(ObjretError, match=unknown):
        cache.load([frames[0].frame_id, unknown], "stride16")
    assert unknown not in cache


def test_autocast_only_where_the_hardware_has_the_type(monkeypatch):
    """bf16 on a CPU without native bf16 is emulated (12x slower than fp32 on an AVX2 CPU): fp32 there."""
    import objret.features.cache as features

    monkeypatch.setattr(features, "cpu_has_native_bf16", lambda: False)
    assert features.autocast_dtype(torch.device("cpu")) is None
    monkeypatch.setattr(features, "cpu_has_native_bf16", lambda: True)
    assert features.autocast_dtype(torch.device("cpu")) is torch.bfloat16
    assert features.autocast_dtype(torch.device("cuda")) is torch.float16
