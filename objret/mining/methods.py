"""Mining: rank lake frames for a query object (a frame + a box) and keep a budget of distinct frames.

Methods share one interface so evaluation compares them over the same cached maps:
  - ``fused`` (default): candidates from the region descriptors (a frame scores as its best region), re-ranked
    by deep template matching on their dense maps, the evidence summed with weights into one score;
  - ``regions``: the region descriptors alone (best region per frame, the region's box);
  - ``dtm``: deep template matching of the box's template over every frame's dense map (baseline);
  - ``gem``: whole-image GeM of the query frame against whole-image GeM of each frame (baseline);
  - ``rmac``: whole-image R-MAC (uniform regions max-pooled, summed) against the same of each frame (baseline);
  - ``discovery``: 003 sec. 3.9's global descriptor (OS.EGM regions max-pooled, summed, whitened) of each frame
    against the query box's descriptor (objret.graph.discovery), the frame's box its OS.EGM region nearest the query.
"""

from __future__ import annotations


import numpy as np

from objret.mining.evidence import Ranking, best_region_per_frame, query_templates, whole_frame_boxes
from objret.mining.fusion import rank_fused
from objret.mining.lakemaps import LakeMaps
from objret.mining.query import QueryObject
from objret.mining.template_matching import heatmap_for, match_template
from objret.regions.pooling import gem
from objret.regions.sources import rmac


METHODS = ("fused", "regions", "dtm", "gem", "rmac", "discovery")
TEMPLATE_METHODS = ("fused", "dtm")   # the methods that match the query's template (and its mirror view)


def rank_dtm(query: QueryObject, lake: LakeMaps, *, layer: str, template_cells: int, scales,
             keep_heatmaps: int = 0) -> Ranking:
    templates, footprint = query_templates(query, layer, template_cells)
    result = match_template(templates, footprint, lake.stack, scales)
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


def rank_regions(query: QueryObject, lake: LakeMaps, *, global_weight: float = 0.0, gem_p: float = 3.0) -> Ranking:
    scores, boxes = best_region_per_frame(query, lake)
    if global_weight:
        scores = scores + global_weight * (lake.global_vectors @ gem(query.maps["stride32"], gem_p))
    return Ranking(lake.stack.frame_ids, scores.astype(np.float32), boxes)


def rank_rmac(query: QueryObject, lake: LakeMaps) -> Ranking:
    fmap = query.maps["stride32"]
    vector = rmac(fmap)
    return Ranking(lake.stack.frame_ids, (lake.rmac_vectors @ vector).astype(np.float32), whole_frame_boxes(lake))


def rank_discovery(query: QueryObject, lake: LakeMaps) -> Ranking:
    """003 sec. 3.9: frames by the cosine of their OS.EGM descriptor with the query's.

    The query's descriptor is its box alone, pooled as one region (003 sec. 4.1: "detection is applied to
    dataset images only, while we use the provided bounding boxes on the query side"). A frame's box is its
    OS.EGM region whose own descriptor is nearest the query's (the whole frame when it has none); frames the
    descriptors do not cover score -2, below any cosine.
    """
    from objret.errors import ObjretError

    d = lake.discovery
    if d is None:
        raise ObjretError("method discovery needs the lake's OS.EGM descriptors: run build-index with "
                          "graph.discovery.enabled: true (no discovery descriptors loaded)")
    q = d.query(query.maps, query.box, query.image_size)
    scores = np.where(d.present, d.descriptors @ q, -2.0).astype(np.float32)
    boxes = whole_frame_boxes(lake)
    if len(d.owner):
        sims = d.region_vectors @ q
        order = np.lexsort((-sims, d.owner))  # per frame, best region first
        first = order[np.r_[True, d.owner[order][1:] != d.owner[order][:-1]]]
        boxes[d.owner[first]] = d.boxes[first]
    return Ranking(lake.stack.frame_ids, scores, boxes)


def rank(method: str, query: QueryObject, lake: LakeMaps, params, keep_heatmaps: int = 0,
         diffusion: np.ndarray | None = None) -> Ranking:
    """Rank every frame of ``lake`` for ``query`` with ``method``; ``params`` is the mining section (+ gem_p).

    ``diffusion``: per-frame diffusion scores, fused by ``fused`` with weight ``params["diffusion"]["weight"]``.
    """
    gem_p = params.get("gem_p", 3.0)
    if diffusion is not None and method != "fused":
        raise ValueError(f"diffusion evidence is fused by the fused method only, not {method!r}")
    if method == "fused":
        return rank_fused(query, lake, candidates=int(params.get("rerank", 200)), weights=dict(params["weights"]),
                          layer=params["layer"], template_cells=params["template_cells"],
                          scales=tuple(params["scales"]), gem_p=gem_p, keep_heatmaps=keep_heatmaps,
                          fusion=params.get("fusion", "adaptive"), small_box=float(params.get("small_box", 0.0)),
                          gate=dict(params.get("gate") or {}), diffusion=diffusion,
                          diffusion_weight=float((params.get("diffusion") or {}).get("weight", 1.0)))
    if method == "regions":
        return rank_regions(query, lake, global_weight=dict(params["weights"]).get("global", 0.0), gem_p=gem_p)
    if method == "dtm":
        return rank_dtm(query, lake, layer=params["layer"], template_cells=params["template_cells"],
                        scales=tuple(params["scales"]), keep_heatmaps=keep_heatmaps)
    if method == "gem":
        return rank_gem(query, lake, global_layer="stride32", gem_p=gem_p)
    if method == "rmac":
        return rank_rmac(query, lake)
    if method == "discovery":
        return rank_discovery(query, lake)
    raise ValueError(f"unknown mining method {method!r}; choose one of {', '.join(METHODS)}")
