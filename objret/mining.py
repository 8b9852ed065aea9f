"""Mining: rank lake frames for a query object (a frame + a box) and keep a budget of distinct frames.

Methods share one interface so evaluation compares them over the same cached maps:
  - ``dtm``: deep template matching of the box's template over every candidate's dense map;
  - ``gem``: whole-image GeM of the query frame against whole-image GeM of each frame (baseline).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from objret.metrics import iou_xywh
from objret.matching import MapStack, heatmap_for, match_template
from objret.pooling import box_template, box_to_cells, gem

METHODS = ("dtm", "gem")


@dataclass
class QueryObject:
    """The object to mine for: the query frame's maps (per layer), its pixel size and the box."""

    maps: dict[str, np.ndarray]
    image_size: tuple[int, int]  # width, height
    box: tuple[float, float, float, float]


@dataclass
class Ranking:
    frame_ids: list[str]
    scores: np.ndarray
    boxes: np.ndarray                    # N x 4 [x, y, w, h] pixels
    heatmaps: dict[str, np.ndarray] = field(default_factory=dict)  # frame id -> cell heat map in [0, 1]
    evidence: dict[str, dict] = field(default_factory=dict)

    def order(self) -> np.ndarray:
        return np.argsort(-self.scores, kind="stable")


@dataclass
class LakeMaps:
    """What the methods read: a MapStack for template matching and whole-frame GeM vectors."""

    stack: MapStack
    global_vectors: np.ndarray           # N x D, rows follow stack.frame_ids


def rank_dtm(query: QueryObject, lake: LakeMaps, *, layer: str, template_cells: int, scales,
             keep_heatmaps: int = 0) -> Ranking:
    fmap = query.maps[layer]
    template = box_template(fmap, query.box, query.image_size, template_cells)
    _, _, w_cells, h_cells = box_to_cells(query.box, query.image_size, fmap.shape[-2:])
    result = match_template(template, (h_cells, w_cells), lake.stack, scales)
    ranking = Ranking(lake.stack.frame_ids, result.scores, result.boxes)
    for i in np.argsort(-result.scores, kind="stable")[:keep_heatmaps]:
        fid = lake.stack.frame_ids[i]
        ranking.heatmaps[fid] = heatmap_for(result, i, lake.stack)
        ranking.evidence[fid] = {"template": float(result.scores[i])}
    return ranking


def rank_gem(query: QueryObject, lake: LakeMaps, *, global_layer: str, gem_p: float) -> Ranking:
    scores = lake.global_vectors @ gem(query.maps[global_layer], gem_p)
    sizes = lake.stack.image_sizes
    boxes = np.stack([np.zeros(len(sizes)), np.zeros(len(sizes)), sizes[:, 0], sizes[:, 1]], axis=1)
    return Ranking(lake.stack.frame_ids, scores.astype(np.float32), boxes.astype(np.float32))


def rank(method: str, query: QueryObject, lake: LakeMaps, params, keep_heatmaps: int = 0) -> Ranking:
    """Rank every frame of ``lake`` for ``query`` with ``method``; ``params`` is the mining + index sections."""
    if method == "dtm":
        return rank_dtm(query, lake, layer=params["layer"], template_cells=params["template_cells"],
                        scales=tuple(params["scales"]), keep_heatmaps=keep_heatmaps)
    if method == "gem":
        return rank_gem(query, lake, global_layer="stride32", gem_p=params.get("gem_p", 3.0))
    raise ValueError(f"unknown mining method {method!r}; choose one of {', '.join(METHODS)}")


def collapse_near_duplicates(ranked: list[dict], max_frame_gap: int, min_iou: float) -> list[dict]:
    """Keep the best of each group of neighbouring video frames showing the object at the same place.

    ``ranked`` items carry ``source``, ``frame_index``, ``box``; kept items get ``duplicates`` (frame ids).
    Frames without a frame index (still images) never collapse.
    """
    kept: list[dict] = []
    for item in ranked:
        twin = None
        if item.get("frame_index") is not None:
            for other in kept:
                if (other["source"] == item["source"] and other.get("frame_index") is not None
                        and abs(other["frame_index"] - item["frame_index"]) <= max_frame_gap
                        and iou_xywh(other["box"], item["box"]) >= min_iou):
                    twin = other
                    break
        if twin is None:
            kept.append({**item, "duplicates": []})
        else:
            twin["duplicates"].append(item["frame_id"])
    return kept
