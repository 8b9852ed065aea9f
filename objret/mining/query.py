"""The query object of a failure report: a frame's maps and a box, plus its mirror image.

Objects show up mirrored (a car driving the other way, a person walking left instead of right), and CNN
maps are not mirror-invariant, so a query also carries the maps of its frame flipped left-right; the
template matcher scores a frame by the better of the two. The whole frame is flipped, not a crop around the
box: on ../shared/bench paste_visible a crop with two box sides of context gave mAP 0.396, the whole frame
0.424 (the box's maps depend on context far outside it).
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
    frame_id: str | None = None          # the query frame's lake id, when it is in the lake (left out of statistics)

    def is_small(self, small_box: float) -> bool:
        """The box covers less than ``small_box`` of its frame (mining.small_box)."""
        width, height = self.image_size
        return self.box[2] * self.box[3] < small_box * width * height


def mirrored_view(backbone: Backbone, image: np.ndarray, box) -> QueryObject:
    """The query frame flipped left-right through the backbone, the box flipped with it."""
    height, width = image.shape[:2]
    maps = extract_maps(backbone, [("mirror", np.ascontiguousarray(image[:, ::-1]))])["mirror"]
    x, y, w, h = box
    return QueryObject(maps, (width, height), (width - x - w, y, w, h))
