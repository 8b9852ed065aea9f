"""Relevance feedback: a review's verdicts on a report's mined frames teach the report's next mine.

Accepted frames are more views of the object: each one's box becomes an extra template (a frame scores as its
best template, so a copy seen at another scale, angle or light is found by the view it resembles), and with the
rejected frames they move the query's region and whole-frame vectors by Rocchio's rule (Rocchio 1971, with
the weights Salton and Buckley 1990 found robust, 0.75 and 0.15: not tuned on the bench):

    q' = q + positive * mean(accepted) - negative * mean(rejected),   then L2-normalised.

An accepted frame's region vector is its region that best covers the accepted box; a rejected frame's is its
region nearest the query (what made it rank). The query box's detector classes (objret.mining.class_agreement)
move towards the classes the detector found on the accepted boxes, by the same ``positive`` weight: a query box
the detector saw nothing in, or took for another class, learns what the accepted objects are. Rejected frames do
not move them: a frame without the object says what it holds, not what the object is not. Judged frames are
never ranked again: the next mine shows frames the reviewer has not seen.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from objret.boxes import iou_xywh
from objret.mining.class_agreement import box_classes, normalised
from objret.mining.evidence import query_templates
from objret.mining.lakemaps import LakeMaps
from objret.mining.query import QueryObject
from objret.regions.detector import Detection


@dataclass(frozen=True)
class Feedback:
    """A review's verdicts on frames mined for one report."""

    accepted: dict[str, tuple[float, float, float, float]] = field(default_factory=dict)   # frame id -> box
    rejected: frozenset[str] = frozenset()

    @property
    def judged(self) -> set[str]:
        return set(self.accepted) | set(self.rejected)

    def __bool__(self) -> bool:
        return bool(self.accepted or self.rejected)


@dataclass
class FeedbackQuery:
    """What ranking reads of a review: the moved vectors and the accepted frames' templates."""

    region_vector: np.ndarray
    global_vector: np.ndarray
    templates: list[tuple[np.ndarray, tuple[float, float]]]   # (th x tw x C template, its box in cells h, w)
    accepted: int
    rejected: int
    classes: dict[int, float] | None = None   # the query box's detector classes moved (None: not known)


def rocchio(query: np.ndarray, positives: np.ndarray, negatives: np.ndarray, positive: float,
            negative: float) -> np.ndarray:
    """``query`` moved towards the mean of ``positives`` and away from the mean of ``negatives``, unit length."""
    moved = np.asarray(query, np.float64).copy()
    if len(positives):
        moved += positive * np.asarray(positives, np.float64).mean(axis=0)
    if len(negatives):
        moved -= negative * np.asarray(negatives, np.float64).mean(axis=0)
    return (moved / (np.linalg.norm(moved) + 1e-12)).astype(np.float32)


def feedback_query(vector: np.ndarray, global_vector: np.ndarray, judged: LakeMaps, feedback: Feedback, *,
                   layer_maps: bool, template_cells: int, positive: float, negative: float,
                   max_templates: int, classes: dict[int, float] | None = None) -> FeedbackQuery:
    """The query's vectors (and its box's detector ``classes``, when known) moved by ``feedback`` and the accepted
    frames' templates (at most ``max_templates``, in the order the review listed them). ``judged``: the judged
    frames as the methods read them (frames the lake no longer holds are skipped); ``layer_maps``: whether
    templates are wanted (methods that match them)."""
    row_of = {f: i for i, f in enumerate(judged.frame_ids)}
    region_pos, region_neg, global_pos, global_neg, templates, classes_pos = [], [], [], [], [], []
    for frame_id, box in feedback.accepted.items():
        if frame_id not in row_of:
            continue
        row = row_of[frame_id]
        _collect(judged, row, lambda vectors, boxes: np.argmax([iou_xywh(b, box) for b in boxes]),
                 global_pos, region_pos)
        if classes is not None:
            classes_pos.append(frame_box_classes(judged, row, box))
        if layer_maps and len(templates) < max_templates:
            templates.append(frame_template(judged, row, box, template_cells))
    for frame_id in sorted(feedback.rejected):
        if frame_id in row_of:
            _collect(judged, row_of[frame_id], lambda vectors, boxes: np.argmax(vectors @ vector),
                     global_neg, region_neg)
    dim, gdim = len(vector), len(global_vector)
    return FeedbackQuery(
        rocchio(vector, np.reshape(region_pos, (-1, dim)), np.reshape(region_neg, (-1, dim)), positive, negative),
        rocchio(global_vector, np.reshape(global_pos, (-1, gdim)), np.reshape(global_neg, (-1, gdim)), positive,
                negative),
        templates, len(global_pos), len(global_neg),
        None if classes is None else moved_classes(classes, classes_pos, positive))


def moved_classes(classes: dict[int, float], accepted: list[dict[int, float]], positive: float) -> dict[int, float]:
    """The query box's class weights plus ``positive`` x the mean of the accepted boxes' (each summing to 1, or
    empty where the detector saw nothing), normalised to sum 1."""
    moved = dict(classes)
    for seen in accepted:
        for label, weight in seen.items():
            moved[label] = moved.get(label, 0.0) + positive * weight / len(accepted)
    return normalised(moved)


def frame_box_classes(lake: LakeMaps, row: int, box) -> dict[int, float]:
    """The detector's classes in ``box`` on frame ``row`` of ``lake``, from its stored detector regions (the
    detections the lake frame was indexed with: objret.mining.class_agreement.box_classes)."""
    regions = lake.regions
    if regions is None or regions.classes is None or regions.class_scores is None:
        return {}
    mine = np.flatnonzero((regions.owner == row) & (np.asarray(regions.classes) >= 0))
    return box_classes([Detection(*(float(v) for v in regions.boxes[r]), float(regions.class_scores[r]),
                                  int(regions.classes[r])) for r in mine], box)


def _collect(judged: LakeMaps, row: int, choose, global_out: list, region_out: list) -> None:
    """Append frame ``row``'s whole-frame vector, and its region that ``choose(vectors, boxes)`` picks among its
    regions (none when it has no region)."""
    global_out.append(judged.global_vectors[row])
    regions = judged.regions
    mine = np.flatnonzero(regions.owner == row) if regions is not None else np.zeros(0, np.int64)
    if len(mine):
        region_out.append(regions.vectors[mine[int(choose(regions.vectors[mine], regions.boxes[mine]))]])


def frame_template(lake: LakeMaps, row: int, box, template_cells: int) -> tuple[np.ndarray, tuple[float, float]]:
    """The template of ``box`` on frame ``row`` of ``lake`` (its map as template matching reads it) and the
    box's size in cells (h, w): the accepted box taken as a query on that frame (objret.mining.evidence)."""
    stack = lake.stack
    h, w = (int(v) for v in stack.map_sizes[row])
    fmap = stack.rows(row, row + 1)[0][0, :, :h, :w].numpy()
    view = QueryObject({"matched": fmap}, tuple(int(v) for v in stack.image_sizes[row]), tuple(box))
    (template,), footprint = query_templates(view, "matched", template_cells)
    return template, footprint
