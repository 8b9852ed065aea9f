"""Feature caching and region extraction in chunks of frames, for the workers of a Dask cluster (scale_out).

A worker needs only picklable inputs: the parameters (a plain dict: objret.config.Params.to_dict(), validated again
by the worker), the work folder (the same path on every
machine) and a chunk's frame ids. Each chunk holds whole feature shards / region batches of the single-process
run, so a worker writes the very files the single-process run would (named by their frames, written atomically:
workers never collide) and the numbers come out the same.
"""

from __future__ import annotations

import threading

from objret.config import params_from_dict
from objret.features.cache import CacheResult, FeatureCache
from objret.index.region_index import RegionIndex
from objret.steps import features as features_step
from objret.steps import regions as regions_step
from objret.steps import shards as shards_step
from objret.steps.workspace import Workspace

_local = threading.local()


def workspace(params: dict, workdir: str) -> Workspace:
    """This thread's Workspace for these parameters, kept between chunks: the backbone is built once per worker.

    One per thread: a FeatureCache's shard index is not thread-safe."""
    typed = params_from_dict(params)
    key = (str(workdir), typed.digest())
    if getattr(_local, "key", None) != key:
        _local.key, _local.ws = key, Workspace(typed, workdir)
    return _local.ws


def chunk_size(unit: int, chunk_frames: int) -> int:
    """``chunk_frames`` rounded to a whole number (at least one) of ``unit``-frame shards or batches."""
    return unit * max(1, round(chunk_frames / unit))


def split(frame_ids: list[str], size: int) -> list[list[str]]:
    return [frame_ids[i:i + size] for i in range(0, len(frame_ids), size)]


def _cached_ids(ws: Workspace) -> set[str]:
    # A fresh shard index: ws.cache's may predate shards that workers wrote since.
    return FeatureCache(ws.cache.dir.parent, ws.cache.cache_key).cached_ids()


def feature_chunks(ws: Workspace, chunk_frames: int) -> list[list[str]]:
    """The lake frames not cached yet, in lake order, cut where the single-process run cuts its shards."""
    cached = _cached_ids(ws)
    todo = [f.frame_id for f in ws.lake.frames() if f.frame_id not in cached]
    return split(todo, chunk_size(ws.params.features.shard_size, chunk_frames))


def region_chunks(ws: Workspace, chunk_frames: int) -> list[list[str]]:
    """The cached frames without stored regions, in lake order, cut where the single-process run cuts its
    batches (the region store reads batches in name order, so equal batches give an equal index)."""
    cached, done = _cached_ids(ws), ws.region_store.stored_ids()
    todo = [f.frame_id for f in ws.lake.frames() if f.frame_id in cached and f.frame_id not in done]
    return split(todo, chunk_size(ws.params.regions.batch, chunk_frames))


def features_chunk(params: dict, workdir: str, frame_ids: list[str]) -> CacheResult:
    """Cache the maps of one chunk's frames (those not cached already: a re-run resumes)."""
    return features_step.features(workspace(params, workdir), progress=False, frame_ids=frame_ids)


def regions_chunk(params: dict, workdir: str, frame_ids: list[str]) -> regions_step.RegionsResult:
    """Regions and raw descriptors of one chunk's frames (those not stored already)."""
    return regions_step.regions(workspace(params, workdir), progress=False, frame_ids=frame_ids)


def shard_chunks(ws: Workspace, chunk_frames: int) -> list[list[str]]:
    """The cached frames with stored regions in no saved index shard, cut at whole mining-store shards, in the
    order the single region index adds them (the region store's): the shards joined list the frames as it does."""
    cached = _cached_ids(ws)
    done = {f for p in shards_step.saved_shards(ws) for f in RegionIndex.load(p / "regions", mapped=True).frame_ids}
    todo = [f for f in ws.region_store.frame_order() if f in cached and f not in done]
    return split(todo, chunk_size(ws.params.index.map_store.shard_frames, chunk_frames))


def shard_chunk(params: dict, workdir: str, number: int, frame_ids: list[str]) -> shards_step.ShardResult:
    """Index shard ``number`` of a chunk's frames (objret.steps.shards.build_shard)."""
    return shards_step.build_shard(workspace(params, workdir), shards_step.shard_name(number), frame_ids)
