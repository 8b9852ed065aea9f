"""Class agreement: how sure the region detector is that a frame holds an object of the class it sees in the
query box (the fused method's fourth evidence, for class queries).

The detector whose boxes are region proposals (objret.regions.detector, the SSD's 90 COCO classes) also names a
class for each box. The query box takes the classes of the detections that overlap it (IoU >= ``MIN_IOU``),
each weighted by its confidence times its overlap, normalised to sum 1; a lake frame scores, per class, its most
confident detection of that class, and the agreement is the query's weights times those scores: in [0, 1], 0 for
a query box the detector sees nothing in (the evidence then adds nothing) and for a frame without the classes.

Pooled CNN regions of a classification backbone find other objects of a class only in part (bench class mAP
0.39); a detector's class names what the object is, whatever it looks like, where its training covers the class.
For a class it does not know, the weights follow the classes it confuses the object with, or there are none.
On ../shared/bench (`objret eval`, weight 2): class mAP 0.391 -> 0.473, under 1% of the frame 0.314 -> 0.359,
instances within 0.004. In-sample: every class query is coco_mini's, and the SSD was trained on COCO's photos
(its gain is the same on coco_mini's val2017 half as on its train2017 half: docs/evaluation.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from objret.boxes import iou_xywh
from objret.index.class_frames import ClassFrames
from objret.mining.query import zoom_window

MIN_IOU = 0.3   # a detection overlapping the query box this much names its object (0.5: bench class mAP -0.005)


def box_classes(detections: Sequence, box) -> dict[int, float]:
    """``{class id: weight}`` of the detections (objret.regions.detector.Detection) overlapping ``box`` (x, y, w,
    h pixels) by IoU >= MIN_IOU: a class's weight is its best detection's confidence x IoU, the weights summing
    to 1. Empty when no detection overlaps the box."""
    weights: dict[int, float] = {}
    for d in detections:
        overlap = iou_xywh((d.x, d.y, d.w, d.h), box)
        if overlap >= MIN_IOU:
            weights[int(d.label)] = max(weights.get(int(d.label), 0.0), float(d.score) * overlap)
    return normalised(weights)


def seen_classes(detect: Callable[[np.ndarray], Sequence], pixels: np.ndarray, box, zoom: float = 1.0
                 ) -> dict[int, float]:
    """The query box's classes (box_classes) as ``detect`` sees them in the frame ``pixels`` and, when ``zoom`` >
    1 (a small box's zoomed view, objret.mining.query), in the window of 1/zoom of the frame around the box, which
    the detector's fixed input (300 x 300 px) then shows ``zoom`` times larger; the views' weights summed, then
    normalised to sum 1. Bench, the 159 class queries under 1% of the frame: a class found in the box 0.60 ->
    0.79 of them, the query's own class weighing 0.46 -> 0.61 on average (a window of a quarter of the sides
    alone: 0.63, a mining parameter more)."""
    views = [box_classes(detect(pixels), box)]
    if zoom > 1:
        height, width = pixels.shape[:2]
        x0, y0, x1, y1 = zoom_window(box, width, height, zoom)
        window = np.ascontiguousarray(pixels[y0:y1, x0:x1])
        views.append(box_classes(detect(window), (box[0] - x0, box[1] - y0, box[2], box[3])))
    summed: dict[int, float] = {}
    for view in views:
        for label, weight in view.items():
            summed[label] = summed.get(label, 0.0) + weight
    return normalised(summed)


def class_agreement(query_classes: dict[int, float], classes: np.ndarray, class_scores: np.ndarray,
                    owner: np.ndarray, n_frames: int) -> np.ndarray:
    """Per frame: the sum over the query's classes of its weight times the frame's most confident detection of
    that class (``classes``, ``class_scores`` and ``owner``: one row per region, objret.regions.encoding.
    RegionVectors; class -1 is a region of another source). The lake-wide class list computes the same."""
    rows, agreement = ClassFrames.from_regions(owner, classes, class_scores, n_frames).agreement(query_classes)
    out = np.zeros(n_frames, np.float64)
    out[rows] = agreement
    return out


def normalised(weights: dict[int, float]) -> dict[int, float]:
    """``weights`` scaled to sum 1 (empty when they sum to nothing)."""
    total = sum(weights.values())
    return {c: w / total for c, w in weights.items()} if total > 0 else {}
