"""What every ranking method reads off a query: its template(s), its region vector, each frame's best region,
and the ranking they return (one score and one box per frame)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from objret.mining.lakemaps import LakeMaps

from objret.regions.encoding import RegionVectors
from objret.mining.query import QueryObject
from objret.regions.pooling import box_template, box_to_cells, template_grid
from objret.regions.sources import pool_regions


@dataclass
class Ranking:
    frame_ids: list[str]
    scores: np.ndarray
    boxes: np.ndarray                    # N x 4 [x, y, w, h] pixels
    heatmaps: dict[str, np.ndarray] = field(default_factory=dict)  # frame id -> cell heat map in [0, 1]
    evidence: dict[str, dict] = field(default_factory=dict)
    template_boxes: dict[str, np.ndarray] = field(default_factory=dict)   # fused: the template's box, where kept

    def order(self) -> np.ndarray:
        return np.argsort(-self.scores, kind="stable")


def query_templates(query: QueryObject, layer: str, template_cells: int):
    """The box's template on ``layer`` (and its mirror view's, when the query has one) and the box's size in
    cells of that layer: what match_template takes."""
    fmap = query.maps[layer]
    _, _, w_cells, h_cells = box_to_cells(query.box, query.image_size, fmap.shape[-2:])
    grid = template_grid((w_cells, h_cells), template_cells)
    templates = [box_template(fmap, query.box, query.image_size, grid=grid)]
    if query.mirror is not None:
        m = query.mirror
        templates.append(box_template(m.maps[layer], m.box, m.image_size, grid=grid))
    return templates, (h_cells, w_cells)


def query_region_vector(query: QueryObject, regions: RegionVectors) -> np.ndarray:
    fmap = query.maps[regions.layer]
    cells = np.asarray(box_to_cells(query.box, query.image_size, fmap.shape[-2:]), np.float32)
    return regions.encode(pool_regions(fmap, cells[None], regions.pooling))[0]


def best_region_per_frame(query: QueryObject, lake: LakeMaps,
                          vector: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each frame's best region similarity to ``vector`` (default: the query box's region vector) and that
    region's box (frames without regions: -1, whole frame)."""
    regions = lake.regions
    sims = regions.vectors @ (query_region_vector(query, regions) if vector is None else vector)
    n = len(lake)
    order = np.lexsort((-sims, regions.owner))  # per owner, best first
    first = order[np.r_[True, regions.owner[order][1:] != regions.owner[order][:-1]]]
    scores = np.full(n, -1.0, np.float32)
    boxes = whole_frame_boxes(lake)
    scores[regions.owner[first]] = sims[first]
    boxes[regions.owner[first]] = regions.boxes[first]
    return scores, boxes


def whole_frame_boxes(lake: LakeMaps) -> np.ndarray:
    sizes = lake.image_sizes
    return np.stack([np.zeros(len(sizes)), np.zeros(len(sizes)), sizes[:, 0], sizes[:, 1]], 1).astype(np.float32)
