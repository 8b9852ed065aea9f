"""Mining: rank lake frames for a query object (a frame + a box) and keep a budget of distinct frames.

Methods share one interface so evaluation compares them over the same cached maps:
  - ``fused`` (default): candidates from the region descriptors (a frame scores as its best region), re-ranked
    by deep template matching on their dense maps, the evidence summed with weights into one score;
  - ``regions``: the region descriptors alone (best region per frame, the region's box);
  - ``dtm``: deep template matching of the box's template over every frame's dense map (baseline);
  - ``gem``: whole-image GeM of the query frame against whole-image GeM of each frame (baseline);
  - ``rmac``: whole-image R-MAC (uniform regions max-pooled, summed) against the same of each frame (baseline);
  - ``discovery``: 003 sec. 3.9's global descriptor (OS.EGM regions max-pooled, summed, whitened) of each frame
    against the query box's descriptor (objret.discovery), the frame's box its OS.EGM region nearest the query.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from objret.metrics import iou_xywh
from objret.matching import MapStack, heatmap_for, match_template
from objret.pooling import box_template, box_to_cells, gem, template_grid
from objret.query import QueryObject
from objret.regions import FrameRegions, pool_regions, uniform_regions, whole_region

if TYPE_CHECKING:
    from objret.discovery import DiscoveryVectors

METHODS = ("fused", "regions", "dtm", "gem", "rmac", "discovery")
TEMPLATE_METHODS = ("fused", "dtm")   # the methods that match the query's template (and its mirror view)


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
class RegionVectors:
    """The lake's region descriptors aligned with a MapStack: ``owner[i]`` is the stack row of region i."""

    vectors: np.ndarray          # R x d, L2-normalised (whitened when a whitening is given)
    owner: np.ndarray            # R int, rows of stack.frame_ids
    boxes: np.ndarray            # R x 4, pixels of the owning frame
    layer: str
    pooling: str
    whitening: object | None = None  # objret.whitening.Whitening

    def encode(self, descriptors: np.ndarray) -> np.ndarray:
        """Raw pooled descriptors -> the vectors' space (whitened, or L2 only)."""
        if self.whitening is not None:
            return self.whitening.apply(descriptors)
        d = np.atleast_2d(descriptors).astype(np.float32)
        return d / (np.linalg.norm(d, axis=1, keepdims=True) + 1e-12)


@dataclass
class LakeMaps:
    """What the methods read: a MapStack for template matching, whole-frame vectors, region vectors."""

    stack: MapStack
    global_vectors: np.ndarray           # N x D, rows follow stack.frame_ids
    regions: RegionVectors | None = None
    rmac_vectors: np.ndarray | None = None  # N x D whole-image R-MAC, for the baseline
    discovery: DiscoveryVectors | None = None  # objret.discovery.DiscoveryVectors (OS.EGM), for method discovery

    def subset(self, rows) -> "LakeMaps":
        """The frames at ``rows`` (in that order), with their regions."""
        rows = np.asarray(rows, np.int64)
        regions = self.regions
        if regions is not None:
            new_row = np.full(len(self.stack), -1, np.int64)
            new_row[rows] = np.arange(len(rows))
            keep = new_row[regions.owner] >= 0
            regions = replace(regions, vectors=regions.vectors[keep], owner=new_row[regions.owner[keep]],
                              boxes=regions.boxes[keep])
        return LakeMaps(self.stack.subset(rows), self.global_vectors[rows], regions,
                        None if self.rmac_vectors is None else self.rmac_vectors[rows],
                        None if self.discovery is None else self.discovery.subset(rows))


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


def rank_gem(query: QueryObject, lake: LakeMaps, *, global_layer: str, gem_p: float) -> Ranking:
    scores = lake.global_vectors @ gem(query.maps[global_layer], gem_p)
    sizes = lake.stack.image_sizes
    boxes = np.stack([np.zeros(len(sizes)), np.zeros(len(sizes)), sizes[:, 0], sizes[:, 1]], axis=1)
    return Ranking(lake.stack.frame_ids, scores.astype(np.float32), boxes.astype(np.float32))


def query_region_vector(query: QueryObject, regions: RegionVectors) -> np.ndarray:
    fmap = query.maps[regions.layer]
    cells = np.asarray(box_to_cells(query.box, query.image_size, fmap.shape[-2:]), np.float32)
    return regions.encode(pool_regions(fmap, cells[None], regions.pooling))[0]


def best_region_per_frame(query: QueryObject, lake: LakeMaps) -> tuple[np.ndarray, np.ndarray]:
    """Each frame's best region similarity and that region's box (frames without regions: -1, whole frame)."""
    regions = lake.regions
    sims = regions.vectors @ query_region_vector(query, regions)
    n = len(lake.stack)
    order = np.lexsort((-sims, regions.owner))  # per owner, best first
    first = order[np.r_[True, regions.owner[order][1:] != regions.owner[order][:-1]]]
    scores = np.full(n, -1.0, np.float32)
    boxes = _whole_frame_boxes(lake)
    scores[regions.owner[first]] = sims[first]
    boxes[regions.owner[first]] = regions.boxes[first]
    return scores, boxes


def _whole_frame_boxes(lake: LakeMaps) -> np.ndarray:
    sizes = lake.stack.image_sizes
    return np.stack([np.zeros(len(sizes)), np.zeros(len(sizes)), sizes[:, 0], sizes[:, 1]], 1).astype(np.float32)


def rank_regions(query: QueryObject, lake: LakeMaps, *, global_weight: float = 0.0, gem_p: float = 3.0) -> Ranking:
    scores, boxes = best_region_per_frame(query, lake)
    if global_weight:
        scores = scores + global_weight * (lake.global_vectors @ gem(query.maps["stride32"], gem_p))
    return Ranking(lake.stack.frame_ids, scores.astype(np.float32), boxes)


def rank_fused(query: QueryObject, lake: LakeMaps, *, candidates: int, weights: dict, layer: str,
               template_cells: int, scales, gem_p: float = 3.0, keep_heatmaps: int = 0, fusion: str = "adaptive",
               small_box: float = 0.0, gate: dict | None = None, diffusion: np.ndarray | None = None,
               diffusion_weight: float = 1.0) -> Ranking:
    """Region evidence for every frame; template matching on a shortlist; one score per frame.

    The shortlist is the best ``candidates`` frames by region (+ global) evidence, or every frame when the
    query box covers less than ``small_box`` of its frame: region descriptors cannot shortlist objects of a
    few cells (see README, measured). Evidence is standardised over the shortlist (the query's own frame left
    out) and combined by ``fusion``:

    - ``adaptive`` (query-adaptive late fusion, after Zheng et al., CVPR 2015): a query whose template
      evidence stands out more from the lake than its region evidence does (the mean of its top ``gate.top``
      standardised scores, minus ``gate.offset``, through a logistic of slope ``gate.slope``) is ranked by
      template matching, the others by region (+ global) evidence, and mixtures in between. Template
      matching finds the same object again (an instance, a pasted cut-out); pooled regions find other objects
      of the class, where template matching is near chance (bench: class mAP 0.09 vs 0.41). A frame's box
      comes from the evidence that adds more to its score: the template's box places the same object well,
      the best region's box other objects of the class (bench, class queries, top 10: a box with IoU >= 0.5
      on an object of the class for 25% of the region boxes, 5% of the template boxes).
    - ``sum`` adds the weighted evidence; ``max`` takes the better of the region (+ global) side and the
      template side.

    Frames left out of the re-ranking keep their region evidence plus the lowest template score seen.

    ``diffusion`` (one score per frame of ``lake``, e.g. objret.diffusion.GraphDiffusion.scores: the query's
    diffusion over the region graph, 003 / Iscen et al.) is one more evidence on the context side, standardised
    like the others and weighted by ``diffusion_weight``; it does not change the shortlist. None: nothing
    changes.
    """
    region, region_boxes = best_region_per_frame(query, lake)
    glob = lake.global_vectors @ gem(query.maps["stride32"], gem_p)
    n = len(region)
    width, height = query.image_size
    if query.box[2] * query.box[3] < small_box * width * height:
        shortlist, sub = np.arange(n), lake.stack
    elif candidates >= n:   # every frame, in place (a subset would gather every map)
        shortlist, sub = np.arange(n), lake.stack
    else:
        shortlist = np.argsort(-(region + weights.get("global", 0.0) * glob), kind="stable")[:candidates]
        sub = lake.stack.subset(shortlist)
    templates, footprint = query_templates(query, layer, template_cells)
    matched = match_template(templates, footprint, sub, scales)
    template_scores = np.full(n, matched.scores.min() if len(shortlist) else 0.0, np.float32)
    template_scores[shortlist] = matched.scores
    template_boxes = region_boxes.copy()
    template_boxes[shortlist] = matched.boxes
    reference = shortlist[np.asarray(lake.stack.frame_ids)[shortlist] != query.frame_id]
    fused, boxes, weight = fuse_evidence(region, glob, template_scores, region_boxes, template_boxes,
                                         reference if len(reference) else shortlist, weights, fusion, gate,
                                         diffusion=diffusion, diffusion_weight=diffusion_weight)
    ranking = Ranking(lake.stack.frame_ids, fused.astype(np.float32), boxes.astype(np.float32))
    for j in np.argsort(-fused[shortlist], kind="stable")[:keep_heatmaps]:
        i = shortlist[j]
        fid = lake.stack.frame_ids[i]
        ranking.heatmaps[fid] = heatmap_for(matched, j, sub)
        ranking.evidence[fid] = {"region": float(region[i]), "template": float(template_scores[i]),
                                 "global": float(glob[i])}
        if weight is not None:
            ranking.evidence[fid]["template_weight"] = float(weight)
        if diffusion is not None:
            ranking.evidence[fid]["diffusion"] = float(diffusion[i])
    return ranking


def fuse_evidence(region: np.ndarray, glob: np.ndarray, template: np.ndarray, region_boxes: np.ndarray,
                  template_boxes: np.ndarray, reference: np.ndarray, weights: dict, fusion: str = "adaptive",
                  gate: dict | None = None, diffusion: np.ndarray | None = None,
                  diffusion_weight: float = 1.0) -> tuple[np.ndarray, np.ndarray, float | None]:
    """One score and one box per frame from the three kinds of evidence (see rank_fused), standardised over
    the frames at ``reference``; returns the scores, the boxes and the template weight (adaptive only).
    ``diffusion`` (per-frame scores, optional) is a fourth evidence on the context side, weighted by
    ``diffusion_weight``, added after the adaptive gate has weighed the query's own evidence (diffusion
    spreads the region side's peak over the query's graph neighbourhood, so gating on it would send
    instance queries to the region side: bench paste mAP 0.414 -> 0.116); None changes nothing."""
    context = (weights.get("region", 1.0) * _standardized(region, reference)
               + weights.get("global", 0.0) * _standardized(glob, reference))
    template = weights.get("template", 1.0) * _standardized(template, reference)
    weight = None
    if fusion == "adaptive":
        context = context / (context[reference].std() + 1e-6)
        weight = template_weight(context[reference], template[reference], **(gate or {}))
    if diffusion is not None:
        diffusion = np.asarray(diffusion, np.float64)
        if diffusion.shape != region.shape:
            raise ValueError(f"diffusion evidence has shape {diffusion.shape}, expected one score per frame "
                             f"{region.shape}")
        context = context + diffusion_weight * _standardized(diffusion, reference)
        if fusion == "adaptive":
            context = context / (context[reference].std() + 1e-6)
    if fusion == "adaptive":
        from_template = weight * template
        boxes = np.where(((from_template > (1.0 - weight) * context) & (from_template > 0))[:, None],
                         template_boxes, region_boxes)
        return (1.0 - weight) * context + from_template, boxes, weight
    if fusion in ("sum", "max"):
        return (context + template if fusion == "sum" else np.maximum(context, template)), template_boxes, None
    raise ValueError(f"unknown fusion {fusion!r}: adaptive, sum or max")


def template_weight(context: np.ndarray, template: np.ndarray, top: int = 3, offset: float = 1.0,
                    slope: float = 2.0) -> float:
    """How much a query's ranking should follow template matching rather than region evidence, in (0, 1).

    Each evidence's peak is the mean of its ``top`` best standardised scores: how far the best frames stand
    out from the rest of the lake. Bench (Lite2, 640 px, top 3): the template peak minus the context peak
    is -1.7 +- 1.6 for class queries, +2.0 +- 1.1 for video instances and +2.0 +- 1.5 for pasted objects.
    """
    k = max(1, min(int(top), len(context)))
    peak_template = float(np.sort(template)[-k:].mean())
    peak_context = float(np.sort(context)[-k:].mean())
    return float(1.0 / (1.0 + np.exp(-slope * (peak_template - peak_context - offset))))


def _standardized(scores: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Scores in units of their spread over the re-ranked frames, so that evidence of different kinds
    (cosines of pooled regions, mean cosines of template cells) adds up on a common scale."""
    ref = scores[reference]
    return (scores - ref.mean()) / (ref.std() + 1e-6)


def rank_rmac(query: QueryObject, lake: LakeMaps) -> Ranking:
    fmap = query.maps["stride32"]
    vector = rmac(fmap)
    return Ranking(lake.stack.frame_ids, (lake.rmac_vectors @ vector).astype(np.float32), _whole_frame_boxes(lake))


def rmac(feature_map: np.ndarray, levels: int = 3) -> np.ndarray:
    """Whole-image R-MAC (Tolias et al.): L2-normalised MACs of the uniform regions, summed, L2-normalised."""
    boxes = FrameRegions.concat([whole_region(feature_map.shape[-2:]),
                                 uniform_regions(feature_map.shape[-2:], levels)]).boxes
    total = pool_regions(feature_map, boxes, "max").sum(axis=0)
    return (total / (np.linalg.norm(total) + 1e-12)).astype(np.float32)


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
    boxes = _whole_frame_boxes(lake)
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
