"""Store step: cached maps -> the mining store (compact template-matching maps + GeM vectors, objret.index.map_store)
and the small-object shortlist's cell index (objret.index.cell_index), new frames appended to both."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from objret import storage
from objret.errors import ObjretError
from objret.index.cell_index import salient_cells
from objret.index.map_store import MapCodec
from objret.index.region_index import RegionIndex
from objret.regions.pooling import gem
from objret.regions.sources import cells_to_pixels
from objret.steps.workspace import Workspace

SAVE_EVERY = 32              # cell index batches between saves
GLOBAL_LAYER = "stride32"   # whole-frame GeM vectors (methods gem, regions, fused) are pooled from this layer


def prune_cache(ws: Workspace) -> int:
    """With ``features.keep_cache: false``: delete every feature cache shard whose frames are all in the mining
    store, the region store and the cell index (what later steps and mining read of them); returns how many."""
    if ws.params.features.keep_cache:
        return 0
    done = ws.map_store.stored_ids() & ws.region_store.stored_ids()
    if (ws.cells_dir() / "CURRENT").exists():
        done &= set(RegionIndex.load(ws.cells_dir(), recipe=ws.cells_recipe()).frame_ids)
    else:
        done = set()
    dropped = 0
    for shard in ws.cache.shards():
        if set(ws.cache.shard_frames(shard)) <= done:
            ws.cache.drop_shard(shard)
            dropped += 1
    return dropped


@dataclass
class StoreResult:
    stored: int
    already_stored: int
    bytes_per_frame: float
    directory: str


@dataclass
class CellsResult:
    frames: int
    added: int
    cells: int
    bytes_per_frame: float
    directory: str


def store(ws: Workspace, progress: bool = True, frame_ids: list[str] | None = None) -> StoreResult:
    """Encode every cached lake frame not in the mining store yet (``frame_ids``: of these only, one chunk of a
    scale-out run); the codebooks are learned on the first frames the first time."""
    sp = ws.params.index.map_store
    layer = ws.params.mining.layer
    st = ws.map_store
    storage.remove_stale_temps(st.dir)   # shards that killed runs left half-written
    done = st.stored_ids()
    cached = ws.cache.cached_ids() if frame_ids is None else set(frame_ids)
    todo = [f.frame_id for f in ws.lake.frames() if f.frame_id in cached and f.frame_id not in done]
    if todo and not st.has_codec():
        st.set_codec(fit_codec(ws, todo[:sp.train_frames]))
    for start in tqdm(range(0, len(todo), sp.shard_frames), desc="mining store", unit="shard",
                      disable=not progress, dynamic_ncols=True):
        chunk = todo[start:start + sp.shard_frames]
        maps = ws.cache.load(chunk, layer)
        global_maps = maps if layer == GLOBAL_LAYER else ws.cache.load(chunk, GLOBAL_LAYER)
        st.write_shard(maps, {f: gem(global_maps[f], ws.params.index.gem_p) for f in chunk})
    n = len(st.stored_ids())
    return StoreResult(len(todo), len(done), st.bytes_on_disk() / max(1, n), str(st.dir))


def fit_codec(ws: Workspace, frame_ids: list[str], max_cells: int = 100_000) -> MapCodec:
    """PQ codebooks learned on (a sample of) the cells of ``frame_ids``."""
    maps = ws.cache.load(frame_ids, ws.params.mining.layer)
    cells = np.concatenate([m.reshape(m.shape[0], -1).T for m in maps.values()]).astype(np.float32)
    if len(cells) > max_cells:
        cells = cells[np.random.default_rng(0).choice(len(cells), max_cells, replace=False)]
    return MapCodec.fit(cells, ws.params.index.map_store.pq_m)


def cells(ws: Workspace, progress: bool = True, frame_ids: list[str] | None = None,
          directory: Path | None = None) -> CellsResult:
    """Add the most distinctive cells of every cached lake frame not in the cell index yet (``frame_ids`` and
    ``directory``: of these frames only, into an index there: a shard, objret.steps.shards)."""
    cp, ip = ws.params.index.cells, ws.params.index
    directory = directory or ws.cells_dir()
    recipe = ws.cells_recipe()
    try:
        index = RegionIndex.load(directory, recipe=recipe)
    except ObjretError:
        if (directory / "CURRENT").exists():
            raise
        index = None
    indexed = set(index.frame_ids) if index is not None else set()
    frames = {f.frame_id: f for f in ws.lake.frames()}
    cached = ws.cache.cached_ids() if frame_ids is None else ws.cache.cached_ids() & set(frame_ids)
    todo = [f for f in frames if f in cached and f not in indexed]
    added = 0
    batch = ws.params.index.map_store.shard_frames
    for start in tqdm(range(0, len(todo), batch), desc="cell index", unit="batch", disable=not progress,
                      dynamic_ncols=True):
        chunk = todo[start:start + batch]
        owners, vectors, boxes = [], [], []
        for fid, fmap in ws.cache.load(chunk, cp.layer).items():
            v, b = salient_cells(fmap, cp.per_frame)
            frame = frames[fid]
            owners += [fid] * len(v)
            vectors.append(v)
            boxes.append(cells_to_pixels(b, fmap.shape[-2:], np.array([frame.width, frame.height], np.float32)))
        if index is None:
            # PQ codes only past flat_max: the votes pick frames that template matching then verifies.
            index = RegionIndex(vectors[0].shape[1], kind=ip.region_kind, flat_max=ip.flat_max, refine=None,
                                recipe=recipe)
        index.add(owners, np.concatenate(vectors), np.concatenate(boxes))
        added += len(chunk)
        if added % (SAVE_EVERY * batch) == 0:
            index.save(directory)   # a killed build resumes from the last save
    if added and added % (SAVE_EVERY * batch):
        index.save(directory)
    if index is None:
        return CellsResult(0, 0, 0, 0.0, str(directory))
    return CellsResult(index.n_frames, added, len(index), index.bytes_per_region() * len(index) / max(1, index.n_frames),
                       str(directory))
