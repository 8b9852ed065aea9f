"""Regions of a frame and their descriptors.

A region is a box on a frame's feature map. Sources (selectable and combinable in params.yaml):
  - ``whole``: the whole map (one region; keeps whole-frame similarity in the index);
  - ``uniform``: the R-MAC grid (Tolias et al. 2016): square regions at L scales with ~40% overlap;
  - ``egm``: EGM regions on the feature saliency map (003 sec. 3.3-3.4, objret.regions.saliency / objret.regions.egm);
  - ``detector``: SSD-MobileNetV2 boxes as hard attention (002, objret.regions.detector);
  - ``dasr``: DASR* regions (001 sec. III, objret.regions.dasr);
  - ``os_egm``: EGM regions on the *object* saliency map (003 sec. 3.8-3.9, "OS.EGM"; objret.graph.discovery). They
    need the region graph, so they are not a source of ``frame_regions``: the discovery step
    (objret.steps.discovery) detects them after the graph and stores them beside it.
Descriptors pool a map inside each box (average and/or max) and are L2-normalised; whitening comes after.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from objret.regions.pooling import box_to_cells

if TYPE_CHECKING:
    from objret.config import RegionsParams

SOURCES = ("whole", "uniform", "egm", "detector", "dasr", "os_egm")   # stored codes index this: append only


@dataclass
class FrameRegions:
    """The regions of one frame: boxes in map cells of the region layer, their source and score, and the class
    a detector gave the box, with its confidence (``classes`` -1 and ``class_scores`` 0 for other sources)."""

    boxes: np.ndarray    # R x 4 float32, x, y, w, h in cells
    sources: np.ndarray  # R int8, index into SOURCES
    scores: np.ndarray   # R float32, e.g. mean feature saliency inside (003 eq. 9) or detector score
    classes: np.ndarray | None = None        # R int16, the detector's class id (COCO's for the SSD), -1: none
    class_scores: np.ndarray | None = None   # R float32, the detector's confidence in that class

    def __post_init__(self):
        if self.classes is None:
            self.classes = np.full(len(self.boxes), -1, np.int16)
        if self.class_scores is None:
            self.class_scores = np.zeros(len(self.boxes), np.float32)

    def __len__(self) -> int:
        return len(self.boxes)

    @staticmethod
    def concat(parts: list["FrameRegions"]) -> "FrameRegions":
        parts = [p for p in parts if len(p)]
        if not parts:
            return FrameRegions(np.zeros((0, 4), np.float32), np.zeros(0, np.int8), np.zeros(0, np.float32))
        return FrameRegions(*(np.concatenate([getattr(p, name) for p in parts])
                              for name in ("boxes", "sources", "scores", "classes", "class_scores")))


def _regions(boxes, source: str, scores=None, classes=None, class_scores=None) -> FrameRegions:
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    scores = np.ones(len(boxes), np.float32) if scores is None else np.asarray(scores, np.float32)
    return FrameRegions(boxes, np.full(len(boxes), SOURCES.index(source), np.int8), scores,
                        None if classes is None else np.asarray(classes, np.int16).reshape(-1),
                        None if class_scores is None else np.asarray(class_scores, np.float32).reshape(-1))


def whole_region(map_hw: tuple[int, int]) -> FrameRegions:
    h, w = map_hw
    return _regions([[0, 0, w, h]], "whole")


def uniform_regions(map_hw: tuple[int, int], levels: int = 3) -> FrameRegions:
    """R-MAC grid: at level l, squares of side 2*min(h, w)/(l+1) on a grid with ~40% overlap."""
    h, w = map_hw
    boxes = []
    for level in range(1, levels + 1):
        side = max(1.0, 2.0 * min(h, w) / (level + 1))
        nx = max(1, int(np.ceil((w - side) / (0.6 * side))) + 1) if w > side else 1
        ny = max(1, int(np.ceil((h - side) / (0.6 * side))) + 1) if h > side else 1
        xs = np.linspace(0, max(0.0, w - side), nx)
        ys = np.linspace(0, max(0.0, h - side), ny)
        boxes += [[x, y, min(side, w), min(side, h)] for y in ys for x in xs]
    return _regions(boxes, "uniform")


def _integer_box(box, map_hw) -> tuple[int, int, int, int]:
    """Cells covered by a box, at least one."""
    h, w = map_hw
    x0 = int(np.clip(np.floor(box[0]), 0, w - 1))
    y0 = int(np.clip(np.floor(box[1]), 0, h - 1))
    x1 = int(np.clip(np.ceil(box[0] + box[2]), x0 + 1, w))
    y1 = int(np.clip(np.ceil(box[1] + box[3]), y0 + 1, h))
    return x0, y0, x1, y1


def pool_regions(feature_map: np.ndarray, boxes: np.ndarray, pooling: str = "avg") -> np.ndarray:
    """Descriptors (R x C, or R x 2C for ``avgmax``) of the map inside each box, each part L2-normalised.

    Average pooling keeps what a region mostly shows (better for classes), max pooling its strongest
    responses (MAC, better for instances); ``avgmax`` concatenates both.
    """
    fmap = np.asarray(feature_map, np.float32)
    channels, h, w = fmap.shape
    # Integral image: any box's sum in O(1), so many regions per frame cost little.
    integral = np.zeros((channels, h + 1, w + 1), np.float64)
    integral[:, 1:, 1:] = fmap.cumsum(1).cumsum(2)
    out = []
    for box in boxes:
        x0, y0, x1, y1 = _integer_box(box, (h, w))
        parts = []
        if pooling in ("avg", "avgmax"):
            total = integral[:, y1, x1] - integral[:, y0, x1] - integral[:, y1, x0] + integral[:, y0, x0]
            parts.append(total / ((y1 - y0) * (x1 - x0)))
        if pooling in ("max", "avgmax"):
            parts.append(fmap[:, y0:y1, x0:x1].reshape(channels, -1).max(axis=1))
        if not parts:
            raise ValueError(f"unknown pooling {pooling!r}: avg, max or avgmax")
        out.append(np.concatenate([p / (np.linalg.norm(p) + 1e-12) for p in parts]))
    return np.asarray(out, np.float32).reshape(len(boxes), channels * (2 if pooling == "avgmax" else 1))


def cells_to_pixels(boxes: np.ndarray, map_hw: tuple[int, int], image_size: tuple[int, int]) -> np.ndarray:
    """Boxes in map cells -> boxes in the frame's pixels (x, y, w, h)."""
    (h, w), (width, height) = map_hw, image_size
    scale = np.array([width / w, height / h, width / w, height / h], np.float32)
    return np.asarray(boxes, np.float32) * scale


def mean_inside(saliency: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Average of a 2-d map over each box (003 eq. 9): a region's feature saliency."""
    h, w = saliency.shape
    integral = np.zeros((h + 1, w + 1), np.float64)
    integral[1:, 1:] = saliency.cumsum(0).cumsum(1)
    out = np.empty(len(boxes), np.float32)
    for i, box in enumerate(boxes):
        x0, y0, x1, y1 = _integer_box(box, (h, w))
        total = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
        out[i] = total / ((y1 - y0) * (x1 - x0))
    return out


def frame_regions(feature_map: np.ndarray, params: RegionsParams, *, image_size: tuple[int, int] | None = None,
                  detections=None, dasr_boxes=None) -> FrameRegions:
    """The regions of one frame from the sources named in ``params.sources`` (params.yaml's ``regions``), boxes
    in map cells.

    ``detections`` (objret.regions.detector, pixels of the frame) and ``dasr_boxes`` (x, y, w, h in pixels of the frame)
    come from sources that need the image; the others work on the map alone. Every region is scored by its
    mean feature saliency.
    """
    from objret.regions.egm import egm_regions
    from objret.regions.saliency import feature_saliency

    map_hw = feature_map.shape[-2:]
    saliency = feature_saliency(feature_map)
    parts = []
    sources = params.sources
    if "whole" in sources:
        parts.append(whole_region(map_hw))
    if "uniform" in sources:
        parts.append(uniform_regions(map_hw, params.uniform_levels))
    if "egm" in sources:
        egm = params.egm
        found = egm_regions(saliency, sigma=egm.sigma, tau=egm.tau, rho=egm.rho, purge=egm.purge)
        parts.append(_regions([[r.x, r.y, r.w, r.h] for r in found], "egm"))
    if "detector" in sources and detections is not None:
        cells = [box_to_cells((d.x, d.y, d.w, d.h), image_size, map_hw) for d in detections]
        parts.append(_regions(cells, "detector", classes=[d.label for d in detections],
                              class_scores=[d.score for d in detections]))
    if "dasr" in sources and dasr_boxes is not None:
        parts.append(_regions([box_to_cells(b, image_size, map_hw) for b in dasr_boxes], "dasr"))
    regions = FrameRegions.concat(parts)
    regions.scores = mean_inside(saliency, regions.boxes) if len(regions) else regions.scores
    return regions


def rmac(feature_map: np.ndarray, levels: int = 3) -> np.ndarray:
    """Whole-image R-MAC (Tolias et al.): L2-normalised MACs of the uniform regions, summed, L2-normalised."""
    boxes = FrameRegions.concat([whole_region(feature_map.shape[-2:]),
                                 uniform_regions(feature_map.shape[-2:], levels)]).boxes
    total = pool_regions(feature_map, boxes, "max").sum(axis=0)
    return (total / (np.linalg.norm(total) + 1e-12)).astype(np.float32)
