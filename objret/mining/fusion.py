"""The default method ``fused``: region, whole-frame and template evidence of the candidate frames, fused into
one score a frame (query-adaptive late fusion)."""

from __future__ import annotations


import numpy as np

from objret.config import GateParams, WeightsParams
from objret.mining.class_agreement import class_agreement
from objret.mining.evidence import Ranking, best_region_per_frame, query_templates
from objret.mining.feedback import FeedbackQuery
from objret.mining.lakemaps import LakeMaps
from objret.mining.query import QueryObject
from objret.mining.template_matching import MapStack, MatchResult, best_of, heatmap_for, match_template
from objret.regions.pooling import gem


def rank_fused(query: QueryObject, lake: LakeMaps, *, weights: WeightsParams, layer: str, template_cells: int,
               scales, scale_tolerance: float, gem_p: float, fusion: str, gate: GateParams, keep_heatmaps: int = 0,
               diffusion: np.ndarray | None = None, diffusion_weight: float = 0.0,
               feedback: FeedbackQuery | None = None) -> Ranking:
    """Region, whole-frame and template evidence for every frame of ``lake``, fused into one score a frame.

    ``lake`` is what the caller's candidate selection kept (objret.mining.shortlist: the region index's
    shortlist, or every frame for a small box); each frame's template is matched. Evidence is standardised over
    those frames (the query's own frame left out) and combined by ``fusion``:

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

    ``diffusion`` (one score per frame of ``lake``, e.g. objret.graph.diffusion.GraphDiffusion.scores: the query's
    diffusion over the region graph, after Iscen et al.) is one more evidence on the context side, standardised
    like the others and weighted by ``diffusion_weight``. None: nothing changes.

    ``feedback`` (objret.mining.feedback: a review of the report's last mine) replaces the region and whole-frame
    vectors with the moved ones and adds the accepted frames' templates.

    Where the query box carries the detector's classes (``query.classes``) and the lake's regions theirs, the
    frames' class agreement (objret.mining.class_agreement, in [0, 1]) adds ``weights.classes`` times itself to the
    region side's share of the score.
    """
    vector = None if feedback is None else feedback.region_vector
    region, region_boxes = best_region_per_frame(query, lake, vector)
    glob = lake.global_vectors @ (gem(query.maps["stride32"], gem_p) if feedback is None else feedback.global_vector)
    matched = match_query(query, lake.stack, layer, template_cells, scales, feedback, scale_tolerance)
    rows = np.arange(len(region))
    reference = rows[np.asarray(lake.frame_ids) != query.frame_id]
    fused, boxes, weight = fuse_evidence(region, glob, matched.scores, region_boxes, matched.boxes,
                                         reference if len(reference) else rows, weights, fusion, gate,
                                         diffusion=diffusion, diffusion_weight=diffusion_weight)
    agreement = frame_class_agreement(query, lake) if weights.classes > 0 else None
    if agreement is not None:   # class evidence: as much as the region side leads the score
        fused = fused + (1.0 - (weight or 0.0)) * weights.classes * agreement
    ranking = Ranking(lake.frame_ids, fused.astype(np.float32), boxes.astype(np.float32))
    for i in np.argsort(-fused, kind="stable")[:keep_heatmaps]:
        fid = lake.frame_ids[i]
        ranking.heatmaps[fid] = heatmap_for(matched, i, lake.stack)
        ranking.evidence[fid] = {"region": float(region[i]), "template": float(matched.scores[i]),
                                 "global": float(glob[i])}
        ranking.template_boxes[fid] = matched.boxes[i]
        if weight is not None:
            ranking.evidence[fid]["template_weight"] = float(weight)
        if diffusion is not None:
            ranking.evidence[fid]["diffusion"] = float(diffusion[i])
        if agreement is not None:
            ranking.evidence[fid]["classes"] = float(agreement[i])
    return ranking


def frame_class_agreement(query: QueryObject, lake: LakeMaps) -> np.ndarray | None:
    """Each frame's class agreement with the query box (objret.mining.class_agreement); None where the query box
    has no detector class or the lake's regions carry none."""
    regions = lake.regions
    if not query.classes or regions is None or regions.classes is None or regions.class_scores is None:
        return None
    return class_agreement(query.classes, regions.classes, regions.class_scores, regions.owner, len(lake))


def match_query(query: QueryObject, stack: MapStack, layer: str, template_cells: int, scales,
                feedback: FeedbackQuery | None = None, scale_tolerance: float = 0.0) -> MatchResult:
    """The query's template (and its mirror view's) matched on every frame of ``stack``, a frame taking its best
    template: a small box's zoomed view's too (objret.mining.query: its footprint spans the zoom's multiple of
    the box's cells, so it matches the copies that much larger), and with ``feedback`` each accepted frame's."""
    templates, footprint = query_templates(query, layer, template_cells)
    matched = [match_template(templates, footprint, stack, scales, scale_tolerance=scale_tolerance)]
    more = [query_templates(query.zoomed, layer, template_cells)] if query.zoomed is not None else []
    more += feedback.templates if feedback is not None else []
    return best_of(matched + [match_template(t, fp, stack, scales, scale_tolerance=scale_tolerance) for t, fp in more])


def fuse_evidence(region: np.ndarray, glob: np.ndarray, template: np.ndarray, region_boxes: np.ndarray,
                  template_boxes: np.ndarray, reference: np.ndarray, weights: WeightsParams, fusion: str,
                  gate: GateParams, diffusion: np.ndarray | None = None,
                  diffusion_weight: float = 0.0) -> tuple[np.ndarray, np.ndarray, float | None]:
    """One score and one box per frame from the three kinds of evidence (see rank_fused), standardised over
    the frames at ``reference``; returns the scores, the boxes and the template weight (adaptive only).
    ``diffusion`` (per-frame scores, optional) is a fourth evidence on the context side, weighted by
    ``diffusion_weight``, added after the adaptive gate has weighed the query's own evidence (diffusion
    spreads the region side's peak over the query's graph neighbourhood, so gating on it would send
    instance queries to the region side: bench paste mAP 0.414 -> 0.116); None changes nothing."""
    context = (weights.region * _standardized(region, reference)
               + weights.global_ * _standardized(glob, reference))
    template = weights.template * _standardized(template, reference)
    weight = None
    if fusion == "adaptive":
        context = context / (context[reference].std() + 1e-6)
        weight = template_weight(context[reference], template[reference], gate.top, gate.offset, gate.slope)
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


def template_weight(context: np.ndarray, template: np.ndarray, top: int, offset: float, slope: float) -> float:
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
