"""The mining methods: a registry of ranking functions with one signature, chosen by name (``mining.method``).

Each method ranks every frame of the lake it is given (the candidates that objret.mining.shortlist kept):
  - ``fused`` (default): region, whole-frame and template evidence fused per query (objret.mining.fusion);
  - ``regions``: the region descriptors alone (best region per frame, the region's box) + weighted GeM;
  - ``dtm``: deep template matching of the box's template (and its mirror view) on each frame's dense map;
  - ``gem``: whole-image GeM of the query frame against whole-image GeM of each frame (baseline);
  - ``rmac``: whole-image R-MAC (uniform regions max-pooled, summed) against the same of each frame (baseline);
  - ``discovery``: the OS.EGM global descriptor of each frame ("Unsupervised object discovery" sec. 3.9)
    against the query box's descriptor (objret.graph.discovery), the frame's box its OS.EGM region nearest it.

The per-method functions take explicit arguments (a notebook calls them directly); the registry adapts the
mining parameters to them, so ``objret mine`` and ``objret eval`` call exactly the same function per name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from objret.config import METHOD_NAMES, MiningParams
from objret.errors import ObjretError
from objret.mining.evidence import Ranking, best_region_per_frame, whole_frame_boxes
from objret.mining.feedback import FeedbackQuery
from objret.mining.fusion import match_query, rank_fused
from objret.mining.lakemaps import LakeMaps
from objret.mining.query import QueryObject
from objret.mining.template_matching import heatmap_for
from objret.regions.pooling import gem
from objret.regions.sources import rmac


def rank_dtm(query: QueryObject, lake: LakeMaps, *, layer: str, template_cells: int, scales, scale_tolerance: float,
             keep_heatmaps: int = 0, feedback: FeedbackQuery | None = None) -> Ranking:
    result = match_query(query, lake.stack, layer, template_cells, scales, feedback, scale_tolerance)
    ranking = Ranking(lake.frame_ids, result.scores, result.boxes)
    for i in np.argsort(-result.scores, kind="stable")[:keep_heatmaps]:
        fid = lake.frame_ids[i]
        ranking.heatmaps[fid] = heatmap_for(result, i, lake.stack)
        ranking.evidence[fid] = {"template": float(result.scores[i])}
    return ranking


def rank_gem(query: QueryObject, lake: LakeMaps, *, global_layer: str, gem_p: float) -> Ranking:
    scores = lake.global_vectors @ gem(query.maps[global_layer], gem_p)
    sizes = lake.image_sizes
    boxes = np.stack([np.zeros(len(sizes)), np.zeros(len(sizes)), sizes[:, 0], sizes[:, 1]], axis=1)
    return Ranking(lake.frame_ids, scores.astype(np.float32), boxes.astype(np.float32))


def rank_regions(query: QueryObject, lake: LakeMaps, *, global_weight: float, gem_p: float,
                 feedback: FeedbackQuery | None = None) -> Ranking:
    scores, boxes = best_region_per_frame(query, lake, None if feedback is None else feedback.region_vector)
    if global_weight:
        whole = gem(query.maps["stride32"], gem_p) if feedback is None else feedback.global_vector
        scores = scores + global_weight * (lake.global_vectors @ whole)
    return Ranking(lake.frame_ids, scores.astype(np.float32), boxes)


def rank_rmac(query: QueryObject, lake: LakeMaps) -> Ranking:
    fmap = query.maps["stride32"]
    vector = rmac(fmap)
    return Ranking(lake.frame_ids, (lake.rmac_vectors @ vector).astype(np.float32), whole_frame_boxes(lake))


def rank_discovery(query: QueryObject, lake: LakeMaps) -> Ranking:
    """003 sec. 3.9: frames by the cosine of their OS.EGM descriptor with the query's.

    The query's descriptor is its box alone, pooled as one region (003 sec. 4.1: "detection is applied to
    dataset images only, while we use the provided bounding boxes on the query side"). A frame's box is its
    OS.EGM region whose own descriptor is nearest the query's (the whole frame when it has none); frames the
    descriptors do not cover score -2, below any cosine.
    """
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
    return Ranking(lake.frame_ids, scores, boxes)


@dataclass(frozen=True)
class RankInputs:
    """What a method reads besides the query and the lake: the mining parameters and the query's extras."""

    mining: MiningParams
    gem_p: float                          # index.gem_p: the lake's whole-frame GeM vectors were pooled with it
    keep_heatmaps: int = 0                # heat maps (and evidence) of this many best frames
    diffusion: np.ndarray | None = None   # per-frame diffusion scores (fused only)
    feedback: FeedbackQuery | None = None # a review of the report's last mine (fused, regions, dtm)


Ranker = Callable[[QueryObject, LakeMaps, RankInputs], Ranking]


@dataclass(frozen=True)
class Method:
    """A named ranking function and what candidate selection must know about it."""

    name: str
    rank: Ranker
    matches_template: bool = False   # matches the query's template: the query needs its mirror view, and a box
                                     # under mining.small_box is shortlisted by the cell index
    every_frame: bool = False        # one cheap score a frame: no shortlist at all
    fuses_diffusion: bool = False    # takes the query's region-graph diffusion as evidence
    learns_from_review: bool = False # moves its query by a review's verdicts (objret.mining.feedback)
    standardises: bool = False       # weighs evidence by how it stands out from the frames it ranks
    reads_classes: bool = False      # weighs the detector's classes in the query box (objret.mining.class_agreement)


def box_scale_tolerance(query: QueryObject, m: MiningParams) -> float:
    """mining.scale_tolerance for a box under mining.small_box of its frame, else 0. A small box's template cells
    are single map cells mixing object and background, which makes the best-scoring scale undersize the box;
    a larger box's cells are pooled over many map cells (bench: the tolerance on boxes over 1% lowered their
    Loc@10, 0.61 -> 0.56; benchmarks/results/box_scale.md)."""
    return m.scale_tolerance if query.is_small(m.small_box) else 0.0


def _fused(query: QueryObject, lake: LakeMaps, x: RankInputs) -> Ranking:
    m = x.mining
    return rank_fused(query, lake, weights=m.weights, layer=m.layer, template_cells=m.template_cells,
                      scales=tuple(m.scales), scale_tolerance=box_scale_tolerance(query, m), gem_p=x.gem_p,
                      fusion=m.fusion, gate=m.gate,
                      keep_heatmaps=x.keep_heatmaps, diffusion=x.diffusion, diffusion_weight=m.diffusion.weight,
                      feedback=x.feedback)


def _regions(query: QueryObject, lake: LakeMaps, x: RankInputs) -> Ranking:
    return rank_regions(query, lake, global_weight=x.mining.weights.global_, gem_p=x.gem_p, feedback=x.feedback)


def _dtm(query: QueryObject, lake: LakeMaps, x: RankInputs) -> Ranking:
    m = x.mining
    return rank_dtm(query, lake, layer=m.layer, template_cells=m.template_cells, scales=tuple(m.scales),
                    scale_tolerance=box_scale_tolerance(query, m), keep_heatmaps=x.keep_heatmaps, feedback=x.feedback)


METHODS: dict[str, Method] = {method.name: method for method in (
    Method("fused", _fused, matches_template=True, fuses_diffusion=True, standardises=True, learns_from_review=True,
           reads_classes=True),
    Method("regions", _regions, learns_from_review=True),
    Method("dtm", _dtm, matches_template=True, learns_from_review=True),
    Method("gem", lambda query, lake, x: rank_gem(query, lake, global_layer="stride32", gem_p=x.gem_p),
           every_frame=True),
    Method("rmac", lambda query, lake, x: rank_rmac(query, lake), every_frame=True),
    Method("discovery", lambda query, lake, x: rank_discovery(query, lake), every_frame=True),
)}
assert tuple(METHODS) == METHOD_NAMES, "objret.config.METHOD_NAMES names the registered methods"


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ObjretError(f"unknown mining method {name!r}; choose one of {', '.join(METHODS)}") from None


def rank(method: str, query: QueryObject, lake: LakeMaps, inputs: RankInputs) -> Ranking:
    """Every frame of ``lake`` ranked for ``query`` by the method named ``method``."""
    chosen = get_method(method)
    if inputs.diffusion is not None and not chosen.fuses_diffusion:
        raise ObjretError(f"diffusion evidence is fused by the fused method only, not {method!r}")
    return chosen.rank(query, lake, inputs)
