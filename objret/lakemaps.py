"""Load the cached maps of a set of frames into the in-memory form the mining methods read."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from objret.features import FeatureCache
from objret.matching import MapStack
from objret.mining import LakeMaps, RegionVectors, rmac
from objret.pooling import gem
from objret.region_store import RegionTable
from objret.regions import cells_to_pixels


def region_vectors(table: RegionTable, frames: Sequence, layer: str, pooling: str, whitening=None) -> RegionVectors:
    """The table's regions for ``frames`` (in that order), encoded for search, boxes in frame pixels."""
    table = table.select([f.frame_id for f in frames])
    sizes = np.array([(f.width, f.height) for f in frames], np.float32)
    boxes = np.concatenate([cells_to_pixels(table.boxes[table.owner == i], table.map_hw[i], sizes[i])
                            for i in range(len(frames))]) if len(table) else np.zeros((0, 4), np.float32)
    order = np.argsort(table.owner, kind="stable")  # boxes above were built frame by frame
    vectors = RegionVectors(np.zeros((0, 0), np.float32), table.owner[order], boxes, layer, pooling, whitening)
    vectors.vectors = vectors.encode(table.descriptors[order])
    return vectors


def load_lake_maps(cache: FeatureCache, frames: Sequence, layer: str, global_layer: str = "stride32",
                   gem_p: float = 3.0, regions: RegionTable | None = None, region_params: dict | None = None,
                   whitening=None, with_rmac: bool = False) -> LakeMaps:
    """``frames`` are lake Frame records (frame_id, width, height), all cached."""
    ids = [f.frame_id for f in frames]
    maps = cache.load(ids, layer)
    global_maps = maps if global_layer == layer else cache.load(ids, global_layer)
    stack = MapStack(ids, [maps[i] for i in ids], [(f.width, f.height) for f in frames])
    vectors = np.stack([gem(global_maps[i], gem_p) for i in ids]) if ids else np.zeros((0, 1), np.float32)
    lake = LakeMaps(stack, vectors)
    if regions is not None:
        rp = region_params or {}
        lake.regions = region_vectors(regions, frames, rp.get("layer", "stride32"), rp.get("pooling", "avg"),
                                      whitening)
    if with_rmac:
        lake.rmac_vectors = np.stack([rmac(global_maps[i]) for i in ids])
    return lake
