"""One query through candidate selection and ranking: the path ``objret mine`` and ``objret eval`` both take.

First stage, cheap and sublinear in the lake: the ``mining.shortlist`` frames whose best region is nearest the
query's region vector in the region index (faiss). A box under ``mining.small_box`` of its frame, for a method
that matches templates (``fused``, ``dtm``), is found by the cell index too (region descriptors cannot
shortlist objects of a few cells: objret.index.cell_index): each view of the object (the query, its mirror, its
zoomed view and that one's mirror) votes in the cell index, the query and its zoomed view search the region
index, and the lists are merged round-robin, cells first, so that other objects of the class stay in reach.
Second stage: the chosen method (objret.mining.methods) ranks the first ``mining.rerank`` of them, reading their
maps, and, for a method that weighs the region detector's classes (fused), the ``mining.class_frames`` frames
where the detector most confidently finds the query box's classes (objret.index.class_frames) that are not among
them; the rest of the shortlist follows in first-stage order, below every re-ranked frame. A lake of at most
``mining.rerank`` frames is ranked whole, and so is every frame for a method that needs it (``discovery``,
``gem``, ``rmac``: one cheap score a frame). The query's own frame is never a candidate, nor are frames a review
already judged (objret.mining.feedback: their verdicts move the query instead).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from objret.config import MiningParams
from objret.errors import ObjretError
from objret.graph.diffusion import GraphDiffusion
from objret.index.cell_index import template_keys
from objret.index.frame_scoring import FrameHit
from objret.mining.box_fit import fit_boxes
from objret.mining.evidence import Ranking, query_region_vector
from objret.mining.feedback import Feedback, FeedbackQuery, feedback_query
from objret.mining.methods import Method, RankInputs, get_method
from objret.mining.query import QueryObject
from objret.mining.search import LakeSearch
from objret.regions.pooling import gem


@dataclass
class QueryRanking:
    ranking: Ranking          # re-ranked frames, then the rest of the shortlist (and the query's own frame when
                              # every frame was ranked)
    candidates: int           # frames re-ranked by the method: the query's own frame never is
    vector: np.ndarray        # the query's region vector (the region shortlist's key)
    stage: str = "all"        # how the candidates were chosen: all | regions | cells+regions (+classes: and the
                              # frames holding the query box's detector classes)
    diffusion_solve: object | None = None   # objret.graph.centrality's CG solve, when diffusion was fused
    feedback: FeedbackQuery | None = None   # what a review taught the query (None: no review, or not learned)


def first_stage(search: LakeSearch, method: Method, query: QueryObject, vector: np.ndarray,
                mining: MiningParams, judged: set[str] = frozenset()) -> tuple[str, list[FrameHit] | None]:
    """How candidates are chosen and the shortlist, best first, none of the ``judged`` frames (None: every frame
    is a candidate)."""
    exclude = {f for f in (query.frame_id, *judged) if f in search.row_of}
    others = len(search) - len(exclude)
    if method.every_frame or others <= mining.rerank:
        return "all", None
    k = mining.shortlist
    by_region = search.region_shortlist(vector, k, exclude=exclude)
    if not (method.matches_template and query.is_small(mining.small_box) and search.cells is not None):
        return "regions", by_region
    # Each view of the object (the query, its mirror, a small box's zoomed view and its mirror) votes in the cell
    # index on its own, and the zoomed view searches the region index too (a pooled region vector barely changes
    # with the mirror: cosine 0.92 to the query's on the bench's small boxes, the zoomed view's 0.69). The lists
    # are merged round-robin, so a copy only one view sees well still comes early: keys pooled into one vote are
    # diluted by the views that do not see it. Bench, small boxes, positives in the first 150 of 1,526 frames:
    # pasted 0.525 -> 0.584, class under 1% 0.528 -> 0.557, video 0.468 -> 0.481. A view asks for its share of
    # the shortlist only (the same recall, at the cost of one pooled vote).
    views = [v for v in (query, query.mirror, query.zoomed, query.zoomed and query.zoomed.mirror) if v is not None]
    share = -(-k // len(views))
    layer = search.cells_layer
    by_cell = round_robin([search.cell_shortlist(template_keys(v.maps[layer], v.box, v.image_size,
                                                               mining.template_cells), share, exclude=exclude)
                           for v in views], k)
    if query.zoomed is not None:
        zoomed = search.region_shortlist(query_region_vector(query.zoomed, search.encoding), share, exclude=exclude)
        by_region = round_robin([by_region, zoomed], k)
    # The cell list first, then alternating with the region list: a small box may be a class query.
    return "cells+regions", round_robin([by_cell, by_region], k)


def rerank_candidates(search: LakeSearch, method: Method, query: QueryObject, vector: np.ndarray, mining: MiningParams,
                      judged: set[str] = frozenset()) -> tuple[str, list[FrameHit] | None, list[FrameHit]]:
    """How candidates are chosen, the frames the method re-ranks and the rest of the shortlist, in order (None
    and []: every frame is a candidate)."""
    stage, hits = first_stage(search, method, query, vector, mining, judged)
    if hits is None:
        return stage, None, []
    head, tail = hits[:mining.rerank], hits[mining.rerank:]
    # Other objects of the query box's classes, however unlike it they look, join the re-ranked frames (past
    # the rerank, so that they displace none). Bench, share of the positives among the re-ranked frames: class
    # queries under 1% of the frame 0.556 -> 0.647, others 0.696 -> 0.810, video instances 0.719 -> 0.722, for
    # 15 to 41 more frames a query on average; taken from the re-ranked frames' places instead (round-robin),
    # video instances fell to 0.568.
    if not (query.classes and mining.class_frames):
        return stage, head, tail
    taken = {h.frame_id for h in head}
    by_class = [h for h in search.class_shortlist(query.classes, mining.class_frames,
                                                  exclude={query.frame_id, *judged}) if h.frame_id not in taken]
    if not by_class:
        return stage, head, tail
    added = {h.frame_id for h in by_class}
    return f"{stage}+classes", head + by_class, [h for h in tail if h.frame_id not in added]


def classes_weighed_by_lake(search: LakeSearch, query: QueryObject) -> QueryObject:
    """``query`` with each of its box's detector classes weighed by the share of the lake without the class
    (objret.index.class_frames.ClassFrames.discounted): a class the detector finds in most frames tells them apart
    little, and its confidence would only add noise to their scores (every frame of a street video holds
    persons). Bench, instance queries: mAP 0.517 -> 0.524 (without any class evidence 0.522)."""
    frames = search.class_frames() if query.classes else None
    return query if frames is None else replace(query, classes=frames.discounted(query.classes))


def round_robin(lists: list[list[FrameHit]], k: int) -> list[FrameHit]:
    """The lists' first frames in turn, then their second ones, ..., each frame once, ``k`` at most."""
    out, seen = [], set()
    for rank in range(max(map(len, lists), default=0)):
        for hits in lists:
            if rank < len(hits) and hits[rank].frame_id not in seen:
                seen.add(hits[rank].frame_id)
                out.append(hits[rank])
    return out[:k]


def rank_query(search: LakeSearch, query: QueryObject, method_name: str, mining: MiningParams, *, gem_p: float,
               keep_heatmaps: int = 0, diffusion: GraphDiffusion | None = None,
               feedback: Feedback | None = None) -> QueryRanking:
    """Candidates for ``query`` ranked by the method ``method_name``; ``diffusion`` (fused only) adds the query's
    diffusion over the region graph as evidence; ``feedback`` (a review of the report's last mine) keeps the
    judged frames out and, for a method that learns from it, moves the query (objret.mining.feedback)."""
    method = get_method(method_name)
    vector = query_region_vector(query, search.encoding)
    judged = feedback.judged if feedback else set()
    learned = None
    if feedback and method.learns_from_review and mining.feedback.enabled:
        learned = learn_from_review(search, query, vector, feedback, method, mining, gem_p)
        vector = learned.region_vector
        if learned.classes is not None:
            query = replace(query, classes=learned.classes)
    query = classes_weighed_by_lake(search, query)
    stage, hits, tail = rerank_candidates(search, method, query, vector, mining, judged)
    if hits is None:
        # Every frame: the whole lake as it is but the judged frames (the caller drops the query's own frame).
        rows = np.arange(len(search))
        if judged:
            rows = np.setdiff1d(rows, [search.row_of[f] for f in judged if f in search.row_of])
        n_candidates = len(rows) - (query.frame_id in search.row_of and query.frame_id not in judged)
    else:
        rows = np.array([search.row_of[h.frame_id] for h in hits], np.int64)
        n_candidates = len(rows)
    if not n_candidates:
        raise ObjretError("the index holds no frame to mine besides the query: ingest a lake first")
    kept = len(rows)
    if hits is not None and method.standardises and mining.reference:
        rows = np.concatenate([rows, reference_rows(search, rows, mining.reference, {query.frame_id, *judged})])
    lake = search.lake_maps(rows)
    scores = solve = None
    if diffusion is not None:
        if not method.fuses_diffusion:
            raise ObjretError(f"diffusion evidence is fused by the fused method only, not {method.name!r}")
        scores, solve = diffusion.scores(vector, search.graph_rows(diffusion)[rows])
    fitting = (method.matches_template and mining.box_colour > 0 and query.colour is not None
               and search.read_image is not None)
    # Heat maps of the first top_k frames, whatever reference frames rank among them.
    heatmaps = max(keep_heatmaps, mining.top_k + len(rows) - kept) if fitting else keep_heatmaps
    ranking = method.rank(query, lake, RankInputs(mining, gem_p, heatmaps, scores, learned))
    if len(rows) > kept:   # the reference frames were scored for the statistics only
        ranking = ranking_head(ranking, kept)
    if fitting:   # the boxes a report outputs, fitted to the object (objret.mining.box_fit)
        fit_boxes(ranking, lake, query.colour, search.read_image, mining.top_k, mining.box_colour)
    if tail:
        ranking = with_tail(ranking, tail)
    return QueryRanking(ranking, n_candidates, vector, stage, solve, learned)


def learn_from_review(search: LakeSearch, query: QueryObject, vector: np.ndarray, feedback: Feedback, method: Method,
                      mining: MiningParams, gem_p: float) -> FeedbackQuery:
    """The query moved by the review's verdicts, read off the judged frames (objret.mining.feedback)."""
    rows = np.array([search.row_of[f] for f in [*feedback.accepted, *sorted(feedback.rejected)] if f in search.row_of],
                    np.int64)
    judged = search.lake_maps(rows)
    f = mining.feedback
    return feedback_query(vector, gem(query.maps["stride32"], gem_p), judged, feedback,
                          layer_maps=method.matches_template, template_cells=mining.template_cells,
                          positive=f.positive, negative=f.negative, max_templates=f.templates,
                          classes=query.classes)


def reference_rows(search: LakeSearch, candidates: np.ndarray, n: int, exclude: set[str]) -> np.ndarray:
    """``n`` rows spread evenly over the lake (the same for every query), none a candidate nor ``exclude``: what
    the evidence of the shortlist's frames is standardised against besides themselves, as exhaustive ranking
    standardises over the whole lake (over the candidates alone, the shortlist's best frames all look alike and
    the adaptive gate loses its measure: bench all-instance Loc@10 0.70 exhaustive, 0.55 at rerank 150)."""
    taken = set(candidates.tolist()) | {search.row_of[f] for f in exclude if f in search.row_of}
    spread = np.linspace(0, len(search) - 1, num=min(len(search), n + len(taken))).astype(np.int64)
    return np.array([r for r in dict.fromkeys(spread.tolist()) if r not in taken][:n], np.int64)


def ranking_head(ranking: Ranking, n: int) -> Ranking:
    """The first ``n`` frames of ``ranking`` (in its frame order), with their heat maps and evidence."""
    ids = ranking.frame_ids[:n]
    kept = set(ids)
    return Ranking(ids, ranking.scores[:n], ranking.boxes[:n], {f: h for f, h in ranking.heatmaps.items() if f in kept},
                   {f: e for f, e in ranking.evidence.items() if f in kept},
                   {f: b for f, b in ranking.template_boxes.items() if f in kept})


def with_tail(ranking: Ranking, tail: list[FrameHit]) -> Ranking:
    """``ranking`` followed by ``tail`` (first-stage order, each with its first-stage box), every tail frame
    scored below every ranked one."""
    floor = float(np.min(ranking.scores)) if len(ranking.scores) else 0.0
    scores = floor - 1.0 - np.arange(1, len(tail) + 1, dtype=np.float32) / len(tail)
    boxes = np.array([h.box for h in tail], np.float32)
    return Ranking(ranking.frame_ids + [h.frame_id for h in tail], np.concatenate([ranking.scores, scores]),
                   np.concatenate([ranking.boxes, boxes]), ranking.heatmaps, ranking.evidence, ranking.template_boxes)
