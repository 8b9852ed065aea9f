"""Load the cached maps of a set of frames into the in-memory form the mining methods read."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from objret.features.cache import FeatureCache
from objret.mining.template_matching import MapStack
from objret.regions.encoding import RegionVectors, region_vectors
from objret.regions.sources import rmac

if TYPE_CHECKING:
    from objret.graph.discovery import DiscoveryVectors
from objret.regions.pooling import gem
from objret.regions.store import RegionTable


@dataclass
class LakeMaps:
    """What the methods read: a MapStack for template matching, whole-frame vectors, region vectors."""

    stack: MapStack
    global_vectors: np.ndarray           # N x D, rows follow stack.frame_ids
    regions: RegionVectors | None = None
    rmac_vectors: np.ndarray | None = None  # N x D whole-image R-MAC, for the baseline
    discovery: DiscoveryVectors | None = None  # objret.graph.discovery.DiscoveryVectors (OS.EGM), for method discovery

    def subset(self, rows) -> "LakeMaps":
        """The frames at ``rows`` (in that order), with their regions."""
        rows = np.asarray(rows, np.int64)
        regions = self.regions
        if regions is not None:
            new_row = np.full(len(self.stack), -1, np.int64)
            new_row[rows] = np.arange(len(rows))
            keep = new_row[regions.owner] >= 0
            regions = replace(regions, vectors=regions.vectors[keep], owner=new_row[regions.owner[keep]],
                              boxes=regions.boxes[keep])
        return LakeMaps(self.stack.subset(rows), self.global_vectors[rows], regions,
                        None if self.rmac_vectors is None else self.rmac_vectors[rows],
                        None if self.discovery is None else self.discovery.subset(rows))


def load_lake_maps(cache: FeatureCache, frames: Sequence, layer: str, *, gem_p: float, global_layer: str = "stride32",
                   regions: RegionTable | None = None, region_layer: str = "stride32", pooling: str = "avg",
                   whitening=None, with_rmac: bool = False) -> LakeMaps:
    """``frames`` are lake Frame records (frame_id, width, height), all cached; ``regions`` (with the layer and
    pooling their descriptors were made with) become region vectors encoded with ``whitening``."""
    ids = [f.frame_id for f in frames]
    maps = cache.load(ids, layer)
    global_maps = maps if global_layer == layer else cache.load(ids, global_layer)
    stack = MapStack(ids, [maps[i] for i in ids], [(f.width, f.height) for f in frames])
    vectors = np.stack([gem(global_maps[i], gem_p) for i in ids]) if ids else np.zeros((0, 1), np.float32)
    lake = LakeMaps(stack, vectors)
    if regions is not None:
        lake.regions = region_vectors(regions, frames, region_layer, pooling, whitening)
    if with_rmac:
        lake.rmac_vectors = np.stack([rmac(global_maps[i]) for i in ids])
    return lake
