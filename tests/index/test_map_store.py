"""objret.index.map_store: real stride-8 maps of bench frames (Lite0 at 320 px) encoded as PQ codes in safetensors
shards, read back one frame at a time; a damaged shard is an error naming it, never silently wrong maps."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from objret.errors import ObjretError
from objret.features.backbone import build_backbone
from objret.features.cache import extract_maps
from objret.index import map_store
from objret.index.map_store import MapCodec, MapStore
from objret.ingest.decode import load_image
from objret.regions.pooling import gem

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FRAMES = ["tud_campus/images/000014.jpg", "tud_stadtmitte/images/000040.jpg", "kitti_0005/images/0000000040.jpg",
          "pets09_s2l1/images/000101.jpg", "coco_mini/images/000000000034.jpg", "coco_mini/images/000000000064.jpg"]


@pytest.fixture(scope="module")
def maps(bench_dir):
    backbone = build_backbone("efficientnet_lite0", layers=("stride8", "stride32"), max_side=320)
    images = [(rel.split("/")[0] + "-" + rel.rsplit("/", 1)[1], load_image(str(bench_dir / rel))) for rel in FRAMES]
    return extract_maps(backbone, images, device=torch.device("cpu"))


def _unit(fmap):
    x = np.asarray(fmap, np.float32)
    return x / (np.linalg.norm(x, axis=0, keepdims=True) + 1e-6)


@pytest.fixture(scope="module")
def codec(maps):
    cells = np.concatenate([m["stride8"].reshape(m["stride8"].shape[0], -1).T for m in maps.values()])
    return MapCodec.fit(cells.astype(np.float32), pq_m=8)


def test_codes_keep_the_cosines_template_matching_reads(maps, codec):
    fmap = next(iter(maps.values()))["stride8"]
    c, h, w = fmap.shape
    codes = codec.encode(fmap)
    assert codes.shape == (h * w, 8) and codes.dtype == np.uint8   # 8 bytes a cell against 2 * C in fp16
    decoded = codec.decode(codes, (h, w))
    assert decoded.shape == (c, h, w) and decoded.dtype == np.float32
    truth, approx = _unit(fmap).reshape(c, -1), _unit(decoded).reshape(c, -1)
    # Per cell, the decoded direction is close to the original; cosines between cells keep their order.
    assert np.median((truth * approx).sum(axis=0)) > 0.9
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, h * w, 2000), rng.integers(0, h * w, 2000)
    true_cos, coded_cos = (truth[:, a] * truth[:, b]).sum(0), (approx[:, a] * approx[:, b]).sum(0)
    assert np.corrcoef(true_cos, coded_cos)[0, 1] > 0.9
    # A codec without enough cells to learn from, or a code size that does not divide the channels, is refused.
    with pytest.raises(ObjretError, match="at least 256 cells"):
        MapCodec.fit(np.ones((10, c), np.float32), 8)
    # A code size that does not divide the channels: the largest one below it that does.
    assert c == 40 and MapCodec.fit(np.random.default_rng(0).normal(size=(1000, c)).astype(np.float32), 12).code_size == 10


def test_a_store_reads_back_each_frame_as_encoded(maps, codec, tmp_path, monkeypatch):
    store = MapStore(tmp_path / "store")
    with pytest.raises(ObjretError, match="no codebooks yet"):
        store.codec
    store.set_codec(codec)
    ids = sorted(maps)
    first, second = ids[:4], ids[4:]
    store.write_shard({f: maps[f]["stride8"] for f in first}, {f: gem(maps[f]["stride32"]) for f in first})
    store.write_shard({f: maps[f]["stride8"] for f in second}, {f: gem(maps[f]["stride32"]) for f in second})
    assert len(store.shards()) == 2 and store.stored_ids() == set(ids)

    reopened = MapStore(tmp_path / "store")   # a new process: the codebooks and shards from disk
    assert reopened.codec.version() == codec.version()
    loaded = reopened.load_maps(ids[::-1])
    for f in ids:
        fmap = maps[f]["stride8"]
        np.testing.assert_array_equal(loaded[f], codec.decode(codec.encode(fmap), fmap.shape[-2:]))
    vectors = reopened.gem_vectors(ids)
    np.testing.assert_allclose(vectors, np.stack([gem(maps[f]["stride32"]) for f in ids]), atol=2e-3)  # fp16
    # Rows read on demand, in any order, a few of a shard (its rows alone) or most of it (its whole tensor).
    rows = reopened.gem_rows(ids)
    assert len(rows) == len(ids)
    np.testing.assert_array_equal(rows[[5, 0, 2]], vectors[[5, 0, 2]])
    np.testing.assert_array_equal(rows[:], vectors)
    for share in (0.0, 2.0):   # each shard's whole tensor; only the rows wanted
        monkeypatch.setattr(map_store, "WHOLE_TENSOR_SHARE", share)
        np.testing.assert_array_equal(MapStore(tmp_path / "store").gem_vectors([ids[4], ids[1]]), vectors[[4, 1]])
    assert rows[[]].shape == (0, vectors.shape[1])
    # What a frame costs on disk: its codes (cells x 8 bytes) and its fp16 GeM vector, plus small tables.
    cells = sum(np.prod(maps[f]["stride8"].shape[-2:]) for f in ids)
    payload = cells * 8 + len(ids) * vectors.shape[1] * 2
    shards = sum(p.stat().st_size for p in reopened.shards())
    assert payload <= shards <= payload * 1.05 + 2 * 2048   # + per shard: a header, offsets, sizes, CRCs
    assert reopened.bytes_on_disk() == shards + reopened.codec_path.stat().st_size   # + the codebooks, once
    with pytest.raises(ObjretError, match="not in the mining store"):
        reopened.load_maps(["nope"])
    with pytest.raises(ObjretError, match="already has codebooks"):
        reopened.set_codec(codec)


def test_a_damaged_shard_is_an_error_naming_it(maps, codec, tmp_path):
    store = MapStore(tmp_path / "store")
    store.set_codec(codec)
    ids = sorted(maps)
    path = store.write_shard({f: maps[f]["stride8"] for f in ids}, {f: gem(maps[f]["stride32"]) for f in ids})
    data = bytearray(path.read_bytes())

    # One byte of one frame's codes changed: that frame is refused (checksum), the others still read.
    header = 8 + int.from_bytes(data[:8], "little")
    meta = json.loads(bytes(data[8:header]))
    start = header + meta["codes"]["data_offsets"][0]
    data[start + 3] ^= 0xFF
    path.write_bytes(bytes(data))
    tampered = MapStore(tmp_path / "store")
    with pytest.raises(ObjretError, match=f"{path.name}.*damaged at frame {ids[0]}.*checksum"):
        tampered.load_maps([ids[0]])
    assert set(tampered.load_maps(ids[1:])) == set(ids[1:])

    # Cut short (a copy that stopped half-way): the shard is refused whole, named.
    path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ObjretError, match=f"mining store shard .*{path.name} is unreadable"):
        MapStore(tmp_path / "store").load_maps([ids[0]])
