"""The candidate frames as the mining methods read them: their maps for template matching (read only when a
method asks for them), whole-frame vectors and region vectors."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from objret.mining.template_matching import MapStack
from objret.regions.encoding import RegionVectors

if TYPE_CHECKING:
    from objret.graph.discovery import DiscoveryVectors


class LakeMaps:
    """``stack`` is a MapStack or a function that reads one (a method that matches no template never calls it,
    so a gem or regions ranking of a large lake reads no map); ``frame_ids`` and ``image_sizes`` are then given.
    Every other array's rows follow ``frame_ids``."""

    def __init__(self, stack: MapStack | Callable[[], MapStack], global_vectors: np.ndarray,
                 regions: RegionVectors | None = None, rmac_vectors: np.ndarray | None = None,
                 discovery: DiscoveryVectors | None = None, *, frame_ids: list[str] | None = None,
                 image_sizes: np.ndarray | None = None):
        if isinstance(stack, MapStack):
            self._stack, self._read = stack, None
            frame_ids, image_sizes = stack.frame_ids, stack.image_sizes
        else:
            self._stack, self._read = None, stack
        self.frame_ids = list(frame_ids)
        self.image_sizes = np.asarray(image_sizes, np.float32)   # (width, height) in pixels
        self.global_vectors = global_vectors      # N x D
        self.regions = regions
        self.rmac_vectors = rmac_vectors          # N x D whole-image R-MAC, for the baseline
        self.discovery = discovery                # OS.EGM descriptors, for method discovery

    def __len__(self) -> int:
        return len(self.frame_ids)

    @property
    def stack(self) -> MapStack:
        if self._stack is None:
            self._stack = self._read()
        return self._stack

    def subset(self, rows) -> "LakeMaps":
        """The frames at ``rows`` (in that order), with their regions."""
        rows = np.asarray(rows, np.int64)
        regions = self.regions
        if regions is not None:
            new_row = np.full(len(self), -1, np.int64)
            new_row[rows] = np.arange(len(rows))
            keep = new_row[regions.owner] >= 0
            regions = replace(regions, vectors=regions.vectors[keep], owner=new_row[regions.owner[keep]],
                              boxes=regions.boxes[keep],
                              classes=None if regions.classes is None else regions.classes[keep],
                              class_scores=None if regions.class_scores is None else regions.class_scores[keep])
        return LakeMaps(lambda: self.stack.subset(rows), self.global_vectors[rows], regions,
                        None if self.rmac_vectors is None else self.rmac_vectors[rows],
                        None if self.discovery is None else self.discovery.subset(rows),
                        frame_ids=[self.frame_ids[r] for r in rows], image_sizes=self.image_sizes[rows])
