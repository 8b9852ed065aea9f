"""Features step: lake frames not cached yet -> their dense backbone maps in the feature cache."""

from __future__ import annotations

from objret.features.cache import CacheResult, cache_features
from objret.ingest.decode import load_image
from objret.steps.workspace import Workspace


def features(ws: Workspace, progress: bool = True, frame_ids: list[str] | None = None) -> CacheResult:
    """Cache the maps of every lake frame not cached yet (``frame_ids``: of these frames only, one chunk of a
    scale-out run, objret.steps.chunks)."""
    f = ws.params.features
    frames = ws.lake.frames()
    if not f.keep_cache:   # frames whose cache shard was dropped once they were encoded (objret.steps.store)
        stored = ws.map_store.stored_ids()
        frames = [frame for frame in frames if frame.frame_id not in stored]
    if frame_ids is not None:
        wanted = set(frame_ids)
        frames = [frame for frame in frames if frame.frame_id in wanted]
    return cache_features(ws.backbone, ws.cache, frames, lambda uri: load_image(uri, ws.s3_endpoint_url),
                          shard_size=f.shard_size, batch_size=f.batch_size,
                          progress=progress)
