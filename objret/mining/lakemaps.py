"""Load the cached maps of a set of frames into the in-memory form the mining methods read."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from objret.features.cache import FeatureCache
from objret.mining.template_matching import MapStack
from objret.regions.sources import rmac

if TYPE_CHECKING:
    from objret.graph.discovery import DiscoveryVectors
from objret.regions.pooling import gem
from objret.regions.sources import cells_to_pixels
from objret.regions.store import RegionTable


@dataclass
class RegionVectors:
    """The lake's region descriptors aligned with a MapStack: ``owner[i]`` is the stack row of region i."""

    vectors: np.ndarray          # R x d, L2-normalised (whitened when a whitening is given)
    owner: np.ndarray            # R int, rows of stack.frame_ids
    boxes: np.ndarray            # R x 4, pixels of the owning frame
    layer: str
    pooling: str
    whitening: object | None = None  # objret.regions.whitening.Whitening

    def encode(self, descriptors: np.ndarray) -> np.ndarray:
        """Raw pooled descriptors -> the vectors' space (whitened, or L2 only)."""
        if self.whitening is not None:
            return self.whitening.apply(descriptors)
        d = np.atleast_2d(descriptors).astype(np.float32)
        return d / (np.linalg.norm(d, axis=1, keepdims=True) + 1e-12)


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
