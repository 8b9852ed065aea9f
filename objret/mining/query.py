"""The query object of a failure report: a frame's maps and a box, plus its mirror image.

Objects show up mirrored (a car driving the other way, a person walking left instead of right), and CNN
maps are not mirror-invariant, so a query also carries the maps of its frame flipped left-right; the
template matcher scores a frame by the better of the two. The whole frame is flipped, not a crop around the
box: on ../shared/bench paste_visible a crop with two box sides of context gave mAP 0.396, the whole frame
0.424 (the box's maps depend on context far outside it).

A small box's frame is also seen zoomed in (``mining.query_zoom`` times the backbone's input size): a CNN cell
describes what fills its receptive field at one scale, and resizing a template's cells does not change what they
saw, so the object's cells seen twice as large are what finds its copies twice as large. The zoomed view gives the
cell shortlist more keys and the template matcher one more template (bench paste_visible, whose copies differ up
to 3x in side: 0.45 of the other copies in the cell shortlist's first 150 frames at 640 px alone, 0.54 with the
1280 px keys added; mAP 0.307 -> 0.324 with the keys, 0.372 with the template too).
"""

from __future__ import annotations

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
    zoomed: "QueryObject | None" = None  # the frame (and its mirror) at mining.query_zoom x the input size
    frame_id: str | None = None          # the query frame's lake id, when it is in the lake (left out of statistics)

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
    """The query frame through the backbone at ``zoom`` times its input size (with its mirror view when ``mirror``),
    the box unchanged: boxes are in the frame's pixels whatever the size of its maps."""
    height, width = image.shape[:2]
    views = [("frame", image)] + ([("mirror", np.ascontiguousarray(image[:, ::-1]))] if mirror else [])
    maps = extract_maps(backbone, views, max_side=round(zoom * backbone.spec.preprocessing.max_side))
    zoomed = QueryObject(maps["frame"], (width, height), tuple(box))
    if mirror:
        zoomed.mirror = QueryObject(maps["mirror"], (width, height), mirrored_box(box, width))
    return zoomed


def mirrored_box(box, width: int) -> tuple[float, float, float, float]:
    x, y, w, h = box
    return (width - x - w, y, w, h)
