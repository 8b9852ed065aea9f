"""Feature caching and region extraction on a local two-worker Dask cluster (scale_out) against the
single-process run: the same shards, maps, regions and index, the work spread over both workers, and a failed
chunk that fails the step by name and resumes.

One cluster for the module, reached at its address as a real cluster would be (starting worker processes that
import torch costs tens of seconds on a loaded 2-core machine): tasks.scale_out.gpu_cluster, one worker per
"GPU", so each worker sees a CUDA_VISIBLE_DEVICES of its own (and no CUDA here: they run on the CPU)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

# 12 frames; shards of 2 frames, region batches of 3: chunks of 4 frames hold 2 shards, of 3 frames 1 batch.
# One torch thread here as in each worker (threads_per_worker=1): bit-identical maps need the same kernels.
pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = ["features.backbone=efficientnet_lite0", "features.max_side=320", "features.shard_size=2",
         "features.batch_size=2", "regions.batch=3", "graph.enabled=false"]
SCALE = ["scale_out.enabled=true", "scale_out.chunk_frames=4"]


@pytest.fixture(scope="module")
def cluster_address():
    from tasks.scale_out import gpu_cluster, local_cluster_environ

    with local_cluster_environ(), gpu_cluster(["0", "1"]) as cluster:
        yield cluster.scheduler_address


@pytest.fixture(scope="module")
def lake_folder(bench_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("lake")
    for n in range(101, 125, 2):
        shutil.copy(bench_dir / "pets09_s2l1" / "images" / f"{n:06d}.jpg", folder)
    return folder


def _workspace(workdir: Path, overrides: list[str]):
    from objret.config import load_params
    from objret.steps.workspace import Workspace

    return Workspace(load_params(None, overrides), workdir)


@pytest.fixture(scope="module")
def single_and_dask(prefect_server, cluster_address, lake_folder, tmp_path_factory):
    from flows.build_index import build_index_flow
    from objret.steps import features as features_step, index as index_step, ingest as ingest_step, regions as regions_step

    single = _workspace(tmp_path_factory.mktemp("single"), SMALL)
    ingest_step.ingest(single, [str(lake_folder)], progress=False)
    features_step.features(single, progress=False)
    regions_step.regions(single, progress=False)
    index_step.build_index(single)

    workdir = tmp_path_factory.mktemp("dask")
    overrides = SMALL + SCALE + [f"scale_out.address={cluster_address}"]
    result = build_index_flow(sources=[str(lake_folder)], overrides=overrides, workdir=str(workdir))
    return single, _workspace(workdir, overrides), result


def test_the_dask_run_equals_the_single_process_run(single_and_dask):
    from objret.index.region_index import RegionIndex

    single, spread, result = single_and_dask
    assert result["features"]["computed"] == 12 and result["regions"]["extracted"] == 12

    # The same shard files and bit-identical maps.
    ids = [f.frame_id for f in single.lake.frames()]
    assert [f.frame_id for f in spread.lake.frames()] == ids
    assert [p.name for p in spread.cache.shards()] == [p.name for p in single.cache.shards()]
    for layer in single.backbone.spec.layers:
        a, b = single.cache.load(ids, layer), spread.cache.load(ids, layer)
        assert all(np.array_equal(a[f], b[f]) for f in ids), layer

    # The same region batches and bit-identical regions and descriptors, in the same order.
    assert [p.name for p in spread.region_store.batches()] == [p.name for p in single.region_store.batches()]
    ta, tb = single.region_store.load(), spread.region_store.load()
    assert ta.frame_ids == tb.frame_ids and len(ta) == len(tb) > 12
    for name in ("owner", "boxes", "sources", "scores", "descriptors", "map_hw"):
        assert np.array_equal(getattr(ta, name), getattr(tb, name)), name

    # The same index: every region searched with its own vector finds the same regions with the same scores.
    ia, ib = RegionIndex.load(single.current_index_dir()), RegionIndex.load(spread.current_index_dir())
    assert list(ia.frame_ids) == list(ib.frame_ids)
    queries = ia.index.reconstruct_n(0, len(ia))
    (ids_a, sims_a), (ids_b, sims_b) = ia.search(queries, 10), ib.search(queries, 10)
    assert np.array_equal(ids_a, ids_b) and np.array_equal(sims_a, sims_b)
    assert [h.frame_id for h in ia.best_frames(queries[0], 5)] == [h.frame_id for h in ib.best_frames(queries[0], 5)]


def test_the_chunks_ran_on_both_workers(single_and_dask):
    _, _, result = single_and_dask
    feature_chunks, region_chunks = result["features"]["chunks"], result["regions"]["chunks"]
    assert [c["frames"] for c in feature_chunks] == [4, 4, 4]     # whole shards: chunk_frames 4 = 2 shards
    assert [c["frames"] for c in region_chunks] == [3, 3, 3, 3]   # whole batches: 4 rounded to 1 batch of 3
    pids = {c["pid"] for c in feature_chunks + region_chunks}
    assert len(pids) == 2 and os.getpid() not in pids
    assert {c["worker"] for c in feature_chunks + region_chunks} == {"0", "1"}
    assert {(c["worker"], c["cuda_visible_devices"]) for c in feature_chunks} == {("0", "0"), ("1", "1")}


@pytest.mark.parametrize("small_box", [0.0, 1.0], ids=["region-shortlist", "cell-shortlist"])
def test_index_shards_built_on_the_cluster_mine_as_the_single_index(single_and_dask, cluster_address, lake_folder,
                                                                   small_box, request):
    """The mining store, the cell index and the region index built as shards of 2 frames by the two workers,
    then mined through the sharded indexes: the same store codes, ranked frames and boxes as the single-process
    store and indexes, with the shortlist doing real work (4 of 11 frames re-ranked)."""
    from objret.mining.shortlist import rank_query
    from objret.steps import store as store_step
    from objret.steps.mine import frame_query, load_search
    from objret.steps.shards import saved_shards
    from objret.steps.workspace import Workspace
    from tasks import scale_out, shard_serving

    single, spread, _ = single_and_dask
    mining = ["index.map_store.shard_frames=2", "mining.rerank=4", "mining.shortlist=8", "mining.reference=3",
              f"mining.small_box={small_box}"]
    one = _workspace(single.root, SMALL + mining)
    store_step.store(one, progress=False)
    store_step.cells(one, progress=False)
    sharded = _workspace(spread.root, SMALL + SCALE + mining + [
        f"scale_out.address={cluster_address}", "scale_out.chunk_frames=2", "scale_out.index_shards=true"])
    if not saved_shards(sharded):   # built once for both cases, the store again by the workers
        shutil.rmtree(sharded.map_store.dir, ignore_errors=True)
        built = scale_out.run(sharded, ["shards"])["shards"]
        assert (built["built"], built["frames"], built["shards"]) == (6, 12, 6)
        assert len({c["pid"] for c in built["chunks"]}) == 2 and os.getpid() not in {c["pid"] for c in built["chunks"]}
        again = scale_out.run(sharded, ["shards"])["shards"]   # every frame is in a saved shard: nothing to do
        assert again["built"] == 0 and again["shards"] == 6
        last = saved_shards(sharded)[-1]
        shutil.rmtree(last / "regions")   # what a build killed between a shard's two indexes leaves
        assert len(saved_shards(sharded)) == 5
        resumed = scale_out.run(sharded, ["shards"])["shards"]
        assert (resumed["built"], resumed["frames"], resumed["shards"]) == (1, 2, 6) and saved_shards(sharded)[-1] == last

    ids = [f.frame_id for f in one.lake.frames()]
    assert sharded.map_store.stored_ids() == one.map_store.stored_ids() == set(ids)
    for f in ids:
        assert np.array_equal(sharded.map_store.codes(f)[0], one.map_store.codes(f)[0])

    # Searched here, and served: each shard held and searched by one of the two workers (scale_out.serve_shards).
    served = sharded.params.replace("scale_out.serve_shards=true")
    a, b = load_search(one, ["fused"]), load_search(sharded, ["fused"])
    c = load_search(sharded, ["fused"], served_by=shard_serving.served_by(Workspace(served, spread.root)))
    request.addfinalizer(shard_serving.close_clients)   # before the module's cluster closes
    assert type(b.index).__name__ == type(c.index).__name__ == "ShardedIndex" and b.frame_ids == a.frame_ids
    assert c.index.shards[0].mapped and c.cells.shards[0].mapped   # here only the rows a shortlist reads
    frames = one.lake.frames()
    for frame, box in ((frames[3], [60.0, 70.0, 30.0, 60.0]), (frames[8], [150.0, 90.0, 24.0, 40.0])):
        query = frame_query(one, frame, box, "fused")
        ra, rb, rc = (rank_query(s, query, "fused", one.params.mining, gem_p=one.params.index.gem_p) for s in (a, b, c))
        assert ra.stage == rb.stage == rc.stage == ("cells+regions" if small_box else "regions")
        assert ra.candidates == rb.candidates == rc.candidates == 4
        assert rb.ranking.frame_ids == rc.ranking.frame_ids == ra.ranking.frame_ids and len(ra.ranking.frame_ids) == 8
        for r in (rb, rc):
            np.testing.assert_allclose(r.ranking.boxes, ra.ranking.boxes, atol=0.01)
            np.testing.assert_allclose(r.ranking.scores, ra.ranking.scores, atol=1e-4)
    # Every search went to the workers, each shard always to the same one, the six shards over both.
    for index in (c.index, c.cells) if small_box else (c.index,):
        log = [[pid for pid, _ in answers] for answers in index.search_shards.log]
        assert log and all(len(pids) == 6 for pids in log)
        assert all(pids == log[0] for pids in log) and len(set(log[0])) == 2 and os.getpid() not in log[0]
    held = index.search_shards.client.run(shard_serving.held_shards)   # worker address -> shard folders held
    regions_held = [sorted(f for f in folders if f.endswith("regions")) for folders in held.values()]
    assert sorted(len(f) for f in regions_held) == [3, 3] and not set(regions_held[0]) & set(regions_held[1])

    if small_box:   # build-index with index_shards: the shards step in place of index and store (all built already)
        from flows.build_index import build_index_flow
        from objret.errors import ObjretError

        overrides = SMALL + SCALE + mining + [f"scale_out.address={cluster_address}", "scale_out.chunk_frames=2",
                                              "scale_out.index_shards=true"]
        flowed = build_index_flow(sources=[str(lake_folder)], overrides=overrides, workdir=str(spread.root))
        assert flowed["index"] is flowed["store"] and (flowed["index"]["built"], flowed["index"]["shards"]) == (0, 6)
        with pytest.raises(ObjretError, match="graph.enabled: false"):
            build_index_flow(overrides=overrides + ["graph.enabled=true"], workdir=str(spread.root))


def test_a_failed_chunk_fails_the_step_by_name_and_a_rerun_resumes(prefect_server, cluster_address, lake_folder,
                                                                    tmp_path):
    from objret.steps import ingest as ingest_step
    from objret.errors import ObjretError
    from tasks import scale_out

    folder = Path(shutil.copytree(lake_folder, tmp_path / "lake"))
    ws = _workspace(tmp_path / "work", SMALL + SCALE + [f"scale_out.address={cluster_address}"])
    ingest_step.ingest(ws, [str(folder)], progress=False)
    frames = ws.lake.frames()
    lost = Path(frames[5].image_uri)   # in the second chunk (frames 4..7)
    hidden = lost.rename(lost.with_suffix(".hidden"))

    with pytest.raises(ObjretError) as err:
        scale_out.run(ws)
    message = str(err.value)
    assert "features: 1 of 3 chunks failed" in message and "chunk 1 (4 frames" in message and lost.name in message
    assert frames[4].image_uri in message and frames[7].image_uri in message
    cached = {f.frame_id for f in frames if f.frame_id in ws.cache}
    assert cached == {f.frame_id for f in frames[:4] + frames[8:]}   # the other chunks stay cached

    hidden.rename(lost)
    again = scale_out.run(ws)
    assert again["features"]["computed"] == 4 and again["features"]["already_cached"] == 8
    assert again["regions"]["extracted"] == 12
    third = scale_out.run(ws)   # nothing left to do: no chunks (and no cluster)
    assert third["features"]["computed"] == 0 and not third["features"]["chunks"] and not third["regions"]["chunks"]


def test_the_task_runner_follows_the_scale_out_params(monkeypatch):
    from objret.config import load_params
    from tasks import scale_out

    def so(*assignments: str):
        return load_params(None, [f"scale_out.{a}" for a in assignments]).scale_out

    runner = scale_out.task_runner(so("address=tcp://10.0.0.5:8786", "n_workers=4"))
    assert runner.address == "tcp://10.0.0.5:8786" and not runner.cluster_kwargs

    monkeypatch.setattr(scale_out, "visible_gpus", lambda: [])
    runner = scale_out.task_runner(so("n_workers=2", "threads_per_worker=1"))
    assert runner.cluster_class is None
    assert runner.cluster_kwargs == {"n_workers": 2, "threads_per_worker": 1, "processes": True,
                                     "dashboard_address": ":0"}

    monkeypatch.setattr(scale_out, "visible_gpus", lambda: ["2", "3"])   # CUDA_VISIBLE_DEVICES=2,3
    runner = scale_out.task_runner(so("n_workers=null"))
    assert runner.cluster_class is scale_out.gpu_cluster
    assert runner.cluster_kwargs == {"gpus": ["2", "3"], "threads_per_worker": 1}   # one worker per GPU
    assert scale_out.task_runner(so("n_workers=3")).cluster_kwargs["gpus"] == ["2", "3", "2"]   # round robin


def test_served_shards_on_an_unreachable_scheduler_is_an_error_naming_the_address(monkeypatch):
    from objret.config import load_params
    from objret.errors import ObjretError
    from tasks import shard_serving

    monkeypatch.setattr(shard_serving, "CONNECT_TIMEOUT", "2s")
    params = load_params(None, ["scale_out.index_shards=true", "scale_out.serve_shards=true",
                                "scale_out.address=tcp://127.0.0.1:1"])
    with pytest.raises(ObjretError, match="scale_out.address tcp://127.0.0.1:1: no Dask scheduler answers"):
        shard_serving.cluster_client(params.scale_out)
    with pytest.raises(ObjretError, match="serve_shards needs index_shards"):
        load_params(None, ["scale_out.serve_shards=true"])
