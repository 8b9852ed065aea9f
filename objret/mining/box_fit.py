"""A mined frame's box, chosen among the boxes its match offers by where the template matched and by colour.

Template matching finds where the query's features are, and its best centre gives the box. In a frame holding
several objects of the query's class (a street of pedestrians, a row of cars) that centre is often on another of
them: among the bench's video-instance hits in the top 10, 47 of the 81 badly placed boxes did not touch the
right object (IoU < 0.01) but sat on another person or car. Two things tell that object apart. The frame's
region boxes (SSD detector proposals, EGM and grid regions, in the region index already) follow objects; and
colour (clothes, paint), which the unit-normalised stride-8 cells the templates are matched on barely keep, tells
instances of one class apart.

So each of a ranking's first frames (the ones a report outputs) takes, among its box, its template's box and its
region boxes of a comparable size (within ``AREA_RANGE`` of the template box's area), the one with the best heat
at its centre (the template's score there, in [0, 1]) plus ``weight`` times the likeness of its colours to the
query box's: the intersection of HSV histograms of the box's top, middle and bottom thirds (a person's head,
clothes and legs).
Bench, instance queries, production path: all-instance Loc@10 0.775 -> 0.838 at weight 1, 0.820 held out
(benchmarks/box_scale.py --param mining.box_colour; docs/evaluation.md).
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

from objret.errors import ObjretError
from objret.mining.evidence import Ranking
from objret.mining.lakemaps import LakeMaps

AREA_RANGE = 3.0    # a region box is a candidate when its area is within this factor of the match box's
STRIPES = 3         # horizontal thirds: a pedestrian's head, clothes and legs, a car's roof, body and wheels
BINS = (8, 4, 4)    # hue, saturation, value


def colour_signature(rgb: np.ndarray, box) -> np.ndarray:
    """The colours of ``box`` (x, y, w, h pixels) in ``rgb`` (H x W x 3 uint8): one HSV histogram per horizontal
    stripe, each summing to 1 / STRIPES (so two signatures' intersection is in [0, 1])."""
    return _signature(cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2HSV), box)


def _signature(hsv: np.ndarray, box) -> np.ndarray:
    height, width = hsv.shape[:2]
    x, y, w, h = (float(v) for v in box)
    x0, y0 = int(np.clip(np.floor(x), 0, width - 1)), int(np.clip(np.floor(y), 0, height - 1))
    x1, y1 = int(np.clip(np.ceil(x + w), x0 + 1, width)), int(np.clip(np.ceil(y + h), y0 + 1, height))
    crop = hsv[y0:y1, x0:x1]
    stripes = []
    for stripe in np.array_split(crop, STRIPES, axis=0):
        stripe = np.ascontiguousarray(stripe if stripe.size else crop)   # a box under STRIPES pixels high: all of it
        counts = cv2.calcHist([stripe], [0, 1, 2], None, list(BINS), [0, 180, 0, 256, 0, 256]).ravel()
        stripes.append(counts / (counts.sum() * STRIPES))
    return np.concatenate(stripes).astype(np.float32)


def colour_likeness(a: np.ndarray, b: np.ndarray) -> float:
    """Histogram intersection of two colour signatures, in [0, 1]."""
    return float(np.minimum(a, b).sum())


def fit_box(box, region_boxes: np.ndarray, heat: np.ndarray, rgb: np.ndarray, query_colour: np.ndarray,
            weight: float, template_box=None) -> np.ndarray:
    """The best of a frame's ``box`` (its ranking's), its ``template_box`` (the template match's, where the ranking
    took another) and its ``region_boxes`` (n x 4) of a size comparable to the template box's, in ``rgb``: heat at
    the centre (``heat``: its template heat map in cells) + ``weight`` x colour likeness to ``query_colour``."""
    box = np.asarray(box, np.float32)
    template = box if template_box is None else np.asarray(template_box, np.float32)
    area = max(float(template[2] * template[3]), 1e-6)
    regions = np.asarray(region_boxes, np.float32).reshape(-1, 4)
    ratio = regions[:, 2] * regions[:, 3] / area
    offered = [box] if np.array_equal(template, box) else [box, template]   # dtm's box is its template's
    candidates = np.concatenate([np.stack(offered), regions[(ratio >= 1 / AREA_RANGE) & (ratio <= AREA_RANGE)]])
    height, width = rgb.shape[:2]
    rows, cols = heat.shape
    cx = np.clip(((candidates[:, 0] + candidates[:, 2] / 2) / width * cols).astype(int), 0, cols - 1)
    cy = np.clip(((candidates[:, 1] + candidates[:, 3] / 2) / height * rows).astype(int), 0, rows - 1)
    hsv = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2HSV)   # once for every candidate
    scores = heat[cy, cx] + weight * np.array([colour_likeness(query_colour, _signature(hsv, c)) for c in candidates])
    return candidates[int(np.argmax(scores))]   # the ranking's box first: it wins ties


def fit_boxes(ranking: Ranking, lake: LakeMaps, query_colour: np.ndarray, read_image: Callable[[str], np.ndarray],
              frames: int, weight: float) -> int:
    """Refit, in place, the boxes of the ranking's first ``frames`` frames that have a heat map (fit_box), their
    region boxes read from ``lake``; a frame whose image cannot be read keeps its match's box. Returns how many
    boxes moved."""
    position = {f: i for i, f in enumerate(lake.frame_ids)}
    regions = lake.regions
    moved = 0
    for i in ranking.order()[:frames]:
        frame_id = ranking.frame_ids[i]
        heat = ranking.heatmaps.get(frame_id)
        if heat is None or frame_id not in position:
            continue
        try:
            rgb = read_image(frame_id)
        except (ObjretError, OSError):
            continue
        own = regions.boxes[regions.owner == position[frame_id]] if regions is not None else np.zeros((0, 4))
        template = ranking.template_boxes.get(frame_id)   # fused: the template's box, beside the one it chose
        fitted = fit_box(ranking.boxes[i], own[np.isfinite(own).all(axis=1)], heat, rgb, query_colour, weight, template)
        moved += not np.array_equal(fitted, ranking.boxes[i])
        ranking.boxes[i] = fitted
    return moved
