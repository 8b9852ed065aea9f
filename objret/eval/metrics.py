"""Retrieval metrics over a bench, as defined in the bench README.

Results format (the README's suggestion)::

    {"q0000": [{"set": "coco_mini", "image_id": 139, "score": 0.93, "bbox": [x, y, w, h]}, ...], ...}

Each list is a ranking, best first; its order is used as given. Per query the ranking is filtered
(unknown images, the query image, junk and non-gallery images removed; a repeated image keeps its
first rank), then AP, Recall@10/50/100 and, for instance queries, Localization@10 are computed.
Class and instance queries are always aggregated apart; instance queries are further split into
video sets (images with frame numbers) and each still-image set such as ``paste_visible``, whose
chance level is far lower.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Iterable

import numpy as np

from objret.boxes import iou_xywh
from objret.eval.bench import Bench, Key, Query

log = logging.getLogger(__name__)

RECALL_KS = (10, 50, 100)
LOC_K = 10
LOC_IOU = 0.5
SIZE_BUCKETS = (  # (label, key suffix, lower bound inclusive, upper bound exclusive) on area_frac
    ("area<1%", "area_lt1", 0.0, 0.01),
    ("1-5%", "area_1to5", 0.01, 0.05),
    (">=5%", "area_ge5", 0.05, float("inf")),
)


def average_precision(ranked_keys: Iterable, positives) -> float:
    """Non-interpolated AP over the full ranking; positives never returned contribute 0."""
    positives = set(positives)
    if not positives:
        return 0.0
    hits, precision_sum, seen = 0, 0.0, set()
    for rank, key in enumerate(ranked_keys, start=1):
        if key in positives and key not in seen:
            seen.add(key)
            hits += 1
            precision_sum += hits / rank
    return precision_sum / len(positives)


def recall_at_k(ranked_keys: list, positives, k: int) -> float:
    positives = set(positives)
    if not positives:
        return 0.0
    return len(positives.intersection(ranked_keys[:k])) / len(positives)


@dataclass
class QueryResult:
    id: str
    kind: str
    set: str
    category: str
    area_frac: float
    size_bucket: str
    num_positives: int
    ap: float
    recall: dict[int, float]  # K -> Recall@K
    loc10: float | None  # instance queries with >= 1 true positive in the top 10; None otherwise
    num_returned: int  # ranking length after filtering
    missing: bool  # the query had no entry in the results


@dataclass
class GroupStats:
    name: str  # table label, e.g. "class/area<1%"
    key: str  # MLflow-safe prefix, e.g. "class_area_lt1"
    kind: str
    n: int
    mAP: float
    recall: dict[int, float]
    loc10: float | None
    loc10_n: int  # queries that Loc@10 is averaged over


@dataclass
class EvalReport:
    queries: list[QueryResult]
    groups: list[GroupStats]
    warnings: dict[str, int] = field(default_factory=dict)

    def group(self, name: str) -> GroupStats | None:
        return next((g for g in self.groups if g.name == name), None)

    def to_dict(self) -> dict:
        def with_recall_keys(d: dict) -> dict:
            recall = d.pop("recall")
            d.update({f"R@{k}": v for k, v in recall.items()})
            return d

        return {
            "groups": [with_recall_keys(asdict(g)) for g in self.groups],
            "queries": [with_recall_keys(asdict(q)) for q in self.queries],
            "warnings": dict(self.warnings),
        }


def size_bucket(area_frac: float) -> str:
    for label, _, low, high in SIZE_BUCKETS:
        if low <= area_frac < high:
            return label
    return SIZE_BUCKETS[0][0]  # negative or NaN area: treat as smallest


def _entry_key(entry, images) -> Key | None:
    """The bench key a result entry names, or None; "139" is read as 139 for integer image ids."""
    try:
        key = (entry["set"], entry["image_id"])
        if key not in images:
            key = (key[0], int(key[1]))
    except (KeyError, TypeError, ValueError):
        return None
    return key if key in images else None


def _filtered_ranking(bench: Bench, q: Query, entries: list | None,
                      counts: dict[str, int]) -> tuple[list[Key], list]:
    """A query's ranking as scored: unknown images, the query image, junk and non-gallery images removed, a
    repeated image kept at its first rank; the keys and their boxes."""
    gallery = set(q.gallery)
    ranked: list[Key] = []
    boxes: list = []
    seen: set[Key] = set()
    last_score = float("inf")
    unsorted = False
    for entry in entries or []:
        key = _entry_key(entry, bench.images)
        if key is None:
            counts["unknown_images"] += 1
            continue
        score = entry.get("score")
        if isinstance(score, (int, float)):
            unsorted |= score > last_score
            last_score = score
        if key == q.key or key in q.junk or key[0] not in gallery:
            continue
        if key in seen:
            counts["duplicate_entries"] += 1
            continue
        seen.add(key)
        ranked.append(key)
        boxes.append(entry.get("bbox"))
    counts["unsorted_rankings"] += unsorted
    return ranked, boxes


def _evaluate_query(bench: Bench, q: Query, entries: list | None, counts: dict[str, int]) -> QueryResult:
    positives = bench.positives(q)
    ranked, boxes = _filtered_ranking(bench, q, entries, counts)
    loc10 = None
    if q.kind == "instance":
        top_hits = [(key, box) for key, box in zip(ranked[:LOC_K], boxes[:LOC_K]) if key in positives]
        if top_hits:
            localized = sum(
                box is not None and any(iou_xywh(box, gt) >= LOC_IOU for gt in bench.gt_boxes(q, key))
                for key, box in top_hits
            )
            loc10 = localized / len(top_hits)

    if not positives:
        counts["queries_without_positives"] += 1
    if q.num_positives is not None and q.num_positives != len(positives):
        counts["num_positives_mismatch"] += 1  # the bench's count disagrees with the README rules
    return QueryResult(
        id=q.id, kind=q.kind, set=q.set, category=q.category, area_frac=q.area_frac,
        size_bucket=size_bucket(q.area_frac), num_positives=len(positives),
        ap=average_precision(ranked, positives),
        recall={k: recall_at_k(ranked, positives, k) for k in RECALL_KS},
        loc10=loc10, num_returned=len(ranked), missing=entries is None,
    )


def _safe(name: str) -> str:
    """Set and category names as MLflow-safe key parts ("traffic light" -> "traffic_light")."""
    return re.sub(r"[^A-Za-z0-9_]+", "_", name).strip("_")


def _group(name: str, key: str, kind: str, rows: list[QueryResult]) -> GroupStats:
    n = len(rows)
    localized = [r.loc10 for r in rows if r.loc10 is not None]
    return GroupStats(
        name=name, key=key, kind=kind, n=n,
        mAP=sum(r.ap for r in rows) / n,
        recall={k: sum(r.recall[k] for r in rows) / n for k in RECALL_KS},
        loc10=sum(localized) / len(localized) if localized else None,
        loc10_n=len(localized),
    )


def _groups(bench: Bench, rows: list[QueryResult]) -> list[GroupStats]:
    """Aggregates in table order; empty groups are left out."""
    specs: list[tuple[str, str, str, list[QueryResult]]] = []
    class_rows = [r for r in rows if r.kind == "class"]
    instance_rows = [r for r in rows if r.kind == "instance"]

    specs.append(("class/all", "class", "class", class_rows))
    for label, suffix, _, _ in SIZE_BUCKETS:
        specs.append((f"class/{label}", f"class_{suffix}", "class",
                      [r for r in class_rows if r.size_bucket == label]))
    class_sets = sorted({r.set for r in class_rows})
    if len(class_sets) > 1:
        for s in class_sets:
            specs.append((f"class/set {s}", f"class_set_{_safe(s)}", "class",
                          [r for r in class_rows if r.set == s]))

    video_rows = [r for r in instance_rows if bench.is_video_set(r.set)]
    specs.append(("instance/video-sets", "video_instance", "instance", video_rows))
    for s in sorted({r.set for r in video_rows}):
        specs.append((f"instance/video {s}", f"video_instance_{_safe(s)}", "instance",
                      [r for r in video_rows if r.set == s]))
    for s in sorted({r.set for r in instance_rows if not bench.is_video_set(r.set)}):
        specs.append((f"instance/{s}", _safe(s), "instance", [r for r in instance_rows if r.set == s]))
    for label, suffix, _, _ in SIZE_BUCKETS:
        specs.append((f"instance/{label}", f"instance_{suffix}", "instance",
                      [r for r in instance_rows if r.size_bucket == label]))
    specs.append(("instance/all", "instance", "instance", instance_rows))

    for category in sorted({r.category for r in class_rows}):
        specs.append((f"class/cat {category}", f"class_cat_{_safe(category)}", "class",
                      [r for r in class_rows if r.category == category]))
    return [_group(name, key, kind, members) for name, key, kind, members in specs if members]


def evaluate(bench: Bench, results: dict[str, list[dict]]) -> EvalReport:
    """Score every bench query against ``results``; missing queries score 0 and are counted."""
    counts = {name: 0 for name in ("missing_queries", "unknown_queries", "unknown_images",
                                   "duplicate_entries", "unsorted_rankings", "queries_without_positives",
                                   "num_positives_mismatch")}
    query_ids = {q.id for q in bench.queries}
    counts["unknown_queries"] = sum(1 for qid in results if qid not in query_ids)
    rows = []
    for q in bench.queries:
        entries = results.get(q.id)
        if entries is None:
            counts["missing_queries"] += 1
        rows.append(_evaluate_query(bench, q, entries, counts))
    for name, count in counts.items():
        if count and name != "duplicate_entries":  # duplicates are legal: the first rank counts
            log.warning("evaluate: %s = %d", name, count)
    return EvalReport(queries=rows, groups=_groups(bench, rows), warnings=counts)


def flat_metrics(report: EvalReport) -> dict[str, float]:
    """Every aggregate as one flat dict with MLflow-safe keys (class_mAP, paste_visible_Loc10, ...)."""
    flat: dict[str, float] = {}
    for g in report.groups:
        flat[f"{g.key}_n"] = float(g.n)
        flat[f"{g.key}_mAP"] = g.mAP
        for k, value in g.recall.items():
            flat[f"{g.key}_R{k}"] = value
        if g.kind == "instance":
            flat[f"{g.key}_Loc10_n"] = float(g.loc10_n)
            if g.loc10 is not None:
                flat[f"{g.key}_Loc10"] = g.loc10
    for name, count in report.warnings.items():
        flat[f"warn_{name}"] = float(count)
    return flat


def recall_curve(bench: Bench, results: dict[str, list[dict]]) -> list[tuple[int, float]]:
    """Mean Recall@K over every bench query for K = 1 .. the longest ranking, as ``(K, recall)`` pairs: the
    rankings filtered as evaluate() filters them (a query without positives counts 0, as in Recall@K)."""
    counts: dict[str, int] = defaultdict(int)
    per_query = []
    for q in bench.queries:
        positives = bench.positives(q)
        ranked, _ = _filtered_ranking(bench, q, results.get(q.id), counts)
        hits = np.zeros(len(ranked))
        if positives:
            hits[[i for i, key in enumerate(ranked) if key in positives]] = 1.0 / len(positives)
        per_query.append(hits)
    longest = max((len(h) for h in per_query), default=0)
    if not per_query or longest == 0:
        return []
    total = sum(np.cumsum(np.pad(h, (0, longest - len(h)))) for h in per_query) / len(per_query)
    return [(k, float(r)) for k, r in enumerate(total, start=1)]


def summary_metrics(report: EvalReport) -> dict[str, dict[str, float | None]]:
    """The aggregates the comparison table shows, keyed by group (class, video_instance, ...): a short metrics
    file (``dvc metrics show``) beside the full report."""
    return {g.key: {"n": g.n, "mAP": g.mAP, **{f"R@{k}": v for k, v in g.recall.items()},
                    **({"Loc@10": g.loc10} if g.kind == "instance" else {})}
            for g in shown_groups(report.groups)}


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _loc_cell(g: GroupStats | None) -> str:
    if g is None or g.kind != "instance":
        return "-"
    return f"{_cell(g.loc10)} ({g.loc10_n})"


def _metric_cells(g: GroupStats | None) -> list[str]:
    if g is None:
        return ["-"] * (1 + len(RECALL_KS)) + ["-"]
    return [_cell(g.mAP), *(_cell(g.recall[k]) for k in RECALL_KS), _loc_cell(g)]


_METRIC_HEADERS = ["mAP", *(f"R@{k}" for k in RECALL_KS), "Loc@10 (n)"]
_METRIC_WIDTHS = [6] * (1 + len(RECALL_KS)) + [13]


def _is_detail(g: GroupStats) -> bool:
    """Per-category and instance size rows: in the report, but only in tables when asked for."""
    return g.name.startswith("class/cat ") or (g.kind == "instance" and g.key.startswith("instance_area"))


def shown_groups(groups: list[GroupStats], details: bool = False) -> list[GroupStats]:
    """The groups a table shows: per-category and instance size rows only with ``details``."""
    return [g for g in groups if details or not _is_detail(g)]


def paired_table(first: EvalReport, second: EvalReport, labels: tuple[str, str]) -> list[str]:
    """The shown groups' mAP (and Loc@10 for instance groups) in ``first`` beside ``second``, columns headed by
    ``labels`` (e.g. in-sample / held-out, before / after): table lines."""
    a, b = labels
    wa, wb, wl = len(f"mAP {a}"), max(len(b), 7), len(f"Loc@10 {a}")
    lines = [f"{'group':32s} {'n':>4s}  {'mAP ' + a:>{wa}s} {b:>{wb}s}  {'Loc@10 ' + a:>{wl}s} {b:>{wb}s}"]
    paired = {g.name: g for g in second.groups}
    for g in shown_groups(first.groups):
        h = paired[g.name]
        both = g.loc10 is not None and h.loc10 is not None
        loc = f"{g.loc10:{wl}.3f} {h.loc10:{wb}.3f}" if both else f"{'':{wl}s} {'':{wb}s}"
        lines.append(f"{g.name:32s} {g.n:4d}  {g.mAP:{wa}.3f} {h.mAP:{wb}.3f}  {loc}")
    return lines


def format_table(report: EvalReport, details: bool = False) -> str:
    """Fixed-width text table, one row per group; per-category and instance size rows only with details."""
    groups = shown_groups(report.groups, details)
    name_width = max([len("group")] + [len(g.name) for g in groups])
    header = f"{'group':<{name_width}} {'n':>5} " + " ".join(
        f"{h:>{w}}" for h, w in zip(_METRIC_HEADERS, _METRIC_WIDTHS))
    lines = [header, "-" * len(header)]
    for g in groups:
        cells = " ".join(f"{c:>{w}}" for c, w in zip(_metric_cells(g), _METRIC_WIDTHS))
        lines.append(f"{g.name:<{name_width}} {g.n:>5} {cells}")
    notes = {name: count for name, count in report.warnings.items() if count}
    if notes:
        lines.append("warnings: " + ", ".join(f"{name} {count}" for name, count in notes.items()))
    return "\n".join(lines)


def compare_table(reports: dict[str, EvalReport], details: bool = False) -> str:
    """One table, one column group per method, rows = the union of the methods' groups."""
    names: list[str] = []
    sizes: dict[str, int] = {}
    for report in reports.values():
        for g in shown_groups(report.groups, details):
            if g.name not in sizes:
                names.append(g.name)
                sizes[g.name] = g.n
    name_width = max([len("group")] + [len(n) for n in names])
    group_width = sum(_METRIC_WIDTHS) + len(_METRIC_WIDTHS) - 1
    prefix = f"{'':<{name_width}} {'':>5}"
    method_line = prefix + "".join(f" | {m[:group_width]:^{group_width}}" for m in reports)
    metric_header = " ".join(f"{h:>{w}}" for h, w in zip(_METRIC_HEADERS, _METRIC_WIDTHS))
    header = f"{'group':<{name_width}} {'n':>5}" + "".join(f" | {metric_header}" for _ in reports)
    lines = [method_line, header, "-" * len(header)]
    for name in names:
        row = f"{name:<{name_width}} {sizes[name]:>5}"
        for report in reports.values():
            cells = _metric_cells(report.group(name))
            row += " | " + " ".join(f"{c:>{w}}" for c, w in zip(cells, _METRIC_WIDTHS))
        lines.append(row)
    return "\n".join(lines)
