"""Near-duplicate collapse: neighbouring video frames that show the object at the same place count once."""

from __future__ import annotations


from objret.boxes import iou_xywh


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
