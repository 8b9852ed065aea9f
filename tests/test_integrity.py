"""Truncated or altered artifacts are named, never used (issue 17 point 4): the region index (faiss file and its
arrays), a feature shard, a region batch and the region graph, each damaged two ways (cut in half; one bit
flipped in the middle, size unchanged). Also: the manifest's sha256 is checked again after a file changes even
when it was checked before, and not re-hashed while nothing changed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from objret import versions
from objret.errors import ObjretError
from objret.features.cache import FeatureCache
from objret.graph.centrality import katz_centrality
from objret.graph.knn import build_region_graph
from objret.graph.store import load_graph, save_graph
from objret.index.region_index import RegionIndex
from objret.regions.sources import FrameRegions
from objret.regions.store import RegionStore
from tests.helpers.figures import record_figures

pytestmark = pytest.mark.usefixtures("one_faiss_thread")

DAMAGES = ("truncate", "flip")
DETECTED: dict[str, str] = {}   # "<artifact> <damage>": what caught it, for hardening.json
CAUGHT_BY = {"sha256": "sha256 in the manifest", "the manifest says": "size in the manifest",
             "CRC-32": "CRC-32", "deserializing header": "safetensors header", "zip": "zip directory"}


def detected(what: str, error: pytest.ExceptionInfo) -> None:
    DETECTED[what] = next((label for key, label in CAUGHT_BY.items() if key in str(error.value)), "other")
    record_figures("tampering", {"detected": len(DETECTED), "cases": dict(sorted(DETECTED.items()))})


def damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:   # one bit, in the middle (the payload, not a header)
        data[len(data) // 2] ^= 0x10
        path.write_bytes(bytes(data))


def unit_rows(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def current(directory: Path) -> Path:
    return directory / (directory / "CURRENT").read_text().strip()


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("name", ["regions.faiss", "boxes.npy", "frame_ids.json"])
def test_a_damaged_region_index_file_is_named(tmp_path, name, how):
    index = RegionIndex(16, kind="flat", use_gpu=False)
    index.add([f"{i:064x}" for i in range(200)], unit_rows(200, 16, 0), np.ones((200, 4), np.float32))
    index.save(tmp_path)
    for mapped in (False, True):   # the first load checks the hashes and remembers the files as checked
        assert len(RegionIndex.load(tmp_path, mapped=mapped)) == 200
    damage(current(tmp_path) / name, how)
    for mapped in (False, True):
        with pytest.raises(ObjretError, match=rf"region index .*unusable .*{name}.*(bytes|sha256)") as error:
            RegionIndex.load(tmp_path, mapped=mapped)
        detected(f"region index {name} {how}{' mapped' if mapped else ''}", error)


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_feature_shard_is_named(tmp_path, how):
    cache = FeatureCache(tmp_path, "key")
    maps = {f"{i:064x}": {"layer3": np.random.default_rng(i).standard_normal((8, 12, 16))} for i in range(4)}
    shard = cache.write_shard(maps, {"backbone": "test"})
    np.testing.assert_allclose(cache.load(list(maps), "layer3")[f"{0:064x}"], maps[f"{0:064x}"]["layer3"],
                               atol=1e-2)
    damage(shard, how)
    fresh = FeatureCache(tmp_path, "key")
    with pytest.raises(ObjretError, match=rf"feature shard {shard} is truncated or damaged") as error:
        fresh.load(list(maps), "layer3")
    detected(f"feature shard {how}", error)


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_region_batch_is_named(tmp_path, how):
    store = RegionStore(tmp_path)
    rng = np.random.default_rng(0)
    per_frame = {f"{i:064x}": (FrameRegions(rng.random((30, 4), np.float32), np.zeros(30, np.int8),
                                            rng.random(30, np.float32)), unit_rows(30, 64, i), (20, 30))
                 for i in range(6)}
    batch = store.write(per_frame)
    assert len(store.load()) == 180
    damage(batch, how)
    with pytest.raises(ObjretError, match=rf"region batch {batch} is truncated or damaged") as error:
        store.load()
    detected(f"region batch {how}", error)


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("name", ["matrix.npz", "centrality.npy", "knn.npz"])
def test_a_damaged_graph_file_is_named(tmp_path, name, how):
    x = unit_rows(300, 16, 1)
    graph = build_region_graph(x, k=8)
    manifest = {"index": {"current": "v-1"}, "settings": {"knn": {"beta": 3.0}}, "stats": {"nodes": graph.nodes}}
    save_graph(tmp_path, graph, katz_centrality(graph.matrix).values, np.arange(3), x[:3], manifest)
    assert load_graph(tmp_path).nodes == 300
    damage(current(tmp_path) / name, how)
    with pytest.raises(ObjretError, match=rf"region graph in .*unusable .*{name}.*(bytes|sha256)") as error:
        load_graph(tmp_path)
    detected(f"region graph {name} {how}", error)


def test_hashes_are_checked_once_per_change_of_a_file(tmp_path, monkeypatch):
    index = RegionIndex(16, kind="flat", use_gpu=False)
    index.add([f"{i:064x}" for i in range(50)], unit_rows(50, 16, 2))
    index.save(tmp_path)
    version = current(tmp_path)
    files = json.loads((version / "manifest.json").read_text())["files"]
    assert set(files) >= {"regions.faiss", "owner.npy", "boxes.npy", "frame_ids.json"}
    assert all(len(f["sha256"]) == 64 and f["bytes"] == (version / n).stat().st_size for n, f in files.items())

    hashed = []
    real = versions.file_sha256
    monkeypatch.setattr(versions, "file_sha256", lambda path: hashed.append(path.name) or real(path))
    RegionIndex.load(tmp_path, mapped=True)
    assert hashed == []   # the build checked them; nothing changed since
    (version / "owner.npy").write_bytes((version / "owner.npy").read_bytes())   # rewritten, the same bytes
    RegionIndex.load(tmp_path, mapped=True)
    assert hashed == ["owner.npy"]   # checked again (and good), then remembered
    RegionIndex.load(tmp_path)
    assert hashed == ["owner.npy"]
