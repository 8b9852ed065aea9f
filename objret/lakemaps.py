"""Load the cached maps of a set of frames into the in-memory form the mining methods read."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from objret.features import FeatureCache
from objret.matching import MapStack
from objret.mining import LakeMaps
from objret.pooling import gem


def load_lake_maps(cache: FeatureCache, frames: Sequence, layer: str, global_layer: str = "stride32",
                   gem_p: float = 3.0) -> LakeMaps:
    """``frames`` are lake Frame records (frame_id, width, height), all cached."""
    ids = [f.frame_id for f in frames]
    maps = cache.load(ids, layer)
    global_maps = maps if global_layer == layer else cache.load(ids, global_layer)
    stack = MapStack(ids, [maps[i] for i in ids], [(f.width, f.height) for f in frames])
    vectors = np.stack([gem(global_maps[i], gem_p) for i in ids]) if ids else np.zeros((0, 1), np.float32)
    return LakeMaps(stack, vectors)
