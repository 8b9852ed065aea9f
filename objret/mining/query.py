"""The query object of a failure report: a frame's maps and a box, plus its mirror image.

Objects show up mirrored (a car driving the other way, a person walking left instead of right), and CNN
maps are not mirror-invariant, so a query also carries the maps of its frame flipped left-right; the
template matcher scores a frame by the better of the two. The whole frame is flipped, not a crop around the
box: on ../shared/bench paste_visible a crop with two box sides of context gave mAP 0.396, the whole frame
0.424 (the box's maps depend on context far outside it).

A small box is also seen zoomed in (``mining.query_zoom``, 2): a CNN cell describes what filled its receptive
field at one scale, and resizing a template's cells does not change what they saw, so the object seen twice as
large is what finds its copies twice as large. The view is a window of half the frame's sides around the box,
passed through the backbone at the frame's own input size (the same cost as the frame's pass). It gives the cell
shortlist more keys and the template matcher one more template (bench paste_visible, whose copies differ up to
3x in side: 0.45 of the other copies in the cell shortlist's first 150 frames at 640 px alone, 0.54 with the
zoomed keys added; on its 40 queries and the 159 class queries under 1%, mAP 0.307 -> 0.370 and 0.307 -> 0.310).
The whole frame at 1280 px scored the same (0.372 and 0.311) at 1.4 s a query against 1.05 s, and put a mining
process of a 100k-frame lake 250 MB over the window's peak RSS (4.14 GB).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from objret.features.backbone import Backbone
from objret.features.cache import extract_maps


@dataclass
class QueryObject:
    """The object to mine for: the query frame's maps (per layer), its pixel size and the box."""

    maps: dict[str, np.ndarray]
    image_size: tuple[int, int]  # width, height
    box: tuple[float, float, float, float]
    mirror: "QueryObject | None" = None  # the frame flipped left-right, with the box flipped with it
    zoomed: "QueryObject | None" = None  # a small box's surroundings zoomed in (zoomed_view), with their mirror
    frame_id: str | None = None          # the query frame's lake id, when it is in the lake (left out of statistics)
    colour: np.ndarray | None = None     # the box's colour signature (objret.mining.box_fit), when boxes are fitted
    classes: dict[int, float] | None = None   # the detector's classes in the box (objret.mining.class_agreement)

    def is_small(self, small_box: float) -> bool:
        """The box covers less than ``small_box`` of its frame (mining.small_box)."""
        width, height = self.image_size
        return self.box[2] * self.box[3] < small_box * width * height


def mirrored_view(backbone: Backbone, image: np.ndarray, box) -> QueryObject:
    """The query frame flipped left-right through the backbone, the box flipped with it."""
    height, width = image.shape[:2]
    maps = extract_maps(backbone, [("mirror", np.ascontiguousarray(image[:, ::-1]))])["mirror"]
    return QueryObject(maps, (width, height), mirrored_box(box, width))


def zoomed_view(backbone: Backbone, image: np.ndarray, box, zoom: float, mirror: bool) -> QueryObject:
    """The box's surroundings through the backbone at ``zoom`` times the frame's input scale (with their mirror
    view when ``mirror``): a window of 1/zoom of the frame's sides centred on the box (objret.mining.query.
    zoom_window), so that the pass costs what the frame's own does. The window is wide context for a small box
    (at zoom 2, five box sides at least), and the whole frame at 1280 px put a mining process 250 MB higher at its
    peak. The view's size and box are the window's, in pixels."""
    height, width = image.shape[:2]
    x0, y0, x1, y1 = zoom_window(box, width, height, zoom)
    crop = np.ascontiguousarray(image[y0:y1, x0:x1])
    size = (x1 - x0, y1 - y0)
    inner = (box[0] - x0, box[1] - y0, box[2], box[3])
    side = round(zoom * backbone.spec.preprocessing.max_side * max(size) / max(width, height))
    views = [("frame", crop)] + ([("mirror", np.ascontiguousarray(crop[:, ::-1]))] if mirror else [])
    maps = extract_maps(backbone, views, batch_size=1, max_side=side)   # one image a pass: a lower peak
    zoomed = QueryObject(maps["frame"], size, inner)
    if mirror:
        zoomed.mirror = QueryObject(maps["mirror"], size, mirrored_box(inner, size[0]))
    return zoomed


def zoom_window(box, width: int, height: int, zoom: float) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1): a window of 1/zoom of the frame's sides (or the box's when it is larger), centred on
    the box and moved inside the frame."""
    x, y, w, h = box
    win_w = min(width, max(round(width / zoom), math.ceil(w)))
    win_h = min(height, max(round(height / zoom), math.ceil(h)))
    x0 = min(max(round(x + w / 2 - win_w / 2), 0), width - win_w)
    y0 = min(max(round(y + h / 2 - win_h / 2), 0), height - win_h)
    return x0, y0, x0 + win_w, y0 + win_h


def mirrored_box(box, width: int) -> tuple[float, float, float, float]:
    x, y, w, h = box
    return (width - x - w, y, w, h)
