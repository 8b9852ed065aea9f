"""Box geometry shared by every stage: boxes are [x, y, w, h] in pixels (top-left origin)."""

from __future__ import annotations


def iou_xywh(a, b) -> float:
    """Intersection over union of two [x, y, w, h] boxes; 0 when either is empty."""
    ax, ay, aw, ah = (float(v) for v in a)
    bx, by, bw, bh = (float(v) for v in b)
    inter_w = min(ax + aw, bx + bw) - max(ax, bx)
    inter_h = min(ay + ah, by + bh) - max(ay, by)
    if inter_w <= 0 or inter_h <= 0:
        return 0.0
    inter = inter_w * inter_h
    union = aw * ah + bw * bh - inter
    return inter / union if union > 0 else 0.0
