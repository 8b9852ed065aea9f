"""Region descriptors encoded for search: L2-normalised, or PCA-whitened when a whitening is fitted, with each
region's frame row and its box in the frame's pixels (what the region index stores and mining reads)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

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
    classes: np.ndarray | None = None       # R, a detector box's class id (-1: another source); None: not known
    class_scores: np.ndarray | None = None  # R, the detector's confidence in it

    def encode(self, descriptors: np.ndarray) -> np.ndarray:
        """Raw pooled descriptors -> the vectors' space (whitened, or L2 only)."""
        if self.whitening is not None:
            return self.whitening.apply(descriptors)
        d = np.atleast_2d(descriptors).astype(np.float32)
        return d / (np.linalg.norm(d, axis=1, keepdims=True) + 1e-12)


def region_vectors(table: RegionTable, frames: Sequence, layer: str, pooling: str, whitening=None) -> RegionVectors:
    """The table's regions for ``frames`` (in that order), encoded for search, boxes in frame pixels."""
    table = table.select([f.frame_id for f in frames])
    sizes = np.array([(f.width, f.height) for f in frames], np.float32)
    boxes = np.concatenate([cells_to_pixels(table.boxes[table.owner == i], table.map_hw[i], sizes[i])
                            for i in range(len(frames))]) if len(table) else np.zeros((0, 4), np.float32)
    order = np.argsort(table.owner, kind="stable")  # boxes above were built frame by frame
    vectors = RegionVectors(np.zeros((0, 0), np.float32), table.owner[order], boxes, layer, pooling, whitening,
                            table.classes[order], table.class_scores[order])
    vectors.vectors = vectors.encode(table.descriptors[order])
    return vectors
