"""The review page of a mining run: one self-contained HTML file in which a labeller looks at the mined frames,
marks each accept or reject and exports the decisions (``objret review apply`` applies them, objret.dataset.decisions).

Everything the page shows is inside the file (images as data URIs, no external script, font or style sheet;
a Content-Security-Policy forbids any fetch), so it opens from disk, an MLflow artifact or a mail attachment.
Thumbnails are small JPEGs that the page decodes only when a card nears the viewport, so 500 frames stay fast.
Text from the report and the lake is escaped by Jinja's autoescape, JSON for the script by its ``tojson``.
"""

from __future__ import annotations

import base64
import io
import json
import math
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from objret import storage
from objret.dataset.labels import dataset_label

THUMB_WIDTH = 320      # a mined frame's thumbnail, pixels wide
DUPLICATE_WIDTH = 150  # a near-duplicate's thumbnail (shown when its group is expanded)
QUERY_WIDTH = 560      # the report's frame
HEAT_WIDTH = 96        # heat maps are smooth: the browser upsamples a small one without visible loss
JPEG_QUALITY = 72
DECISIONS_FORMAT = "objret-review-decisions/1"

# Evidence names as a labeller reads them (objret.mining.methods: what ranked the frame).
EVIDENCE_LABELS = {"region": "region match", "template": "template match", "diffusion": "diffusion",
                   "global": "whole frame", "classes": "detector class"}


def review_page(mined: dict, run: dict | None = None,
                read_bytes: Callable[[str], bytes] = storage.read_bytes) -> str:
    """The HTML page of a mining run's ``mined.json`` content: the failure report, then the mined frames in rank
    order. ``run`` (MLflow run id, dataset version, ...) is shown and copied into the exported decisions;
    ``read_bytes(uri)`` reads the frames and heat maps (a frame that cannot be read gets a placeholder)."""
    report, query = mined["report"], mined["query"]
    items = mined["mined"]
    run_info = {"method": mined.get("method"), "index_version": (mined.get("provenance") or {}).get("index_version"),
                **(run or {})}
    ranges = _evidence_ranges(items)
    cards = [_card(item, ranges, read_bytes) for item in sorted(items, key=lambda i: i["rank"])]
    page = {
        "report": report,
        "report_fields": _report_fields(report, query),
        "query": _query(query, read_bytes),
        "run": run_info,
        "cards": cards,
        "duplicates": sum(len(c["duplicates"]) for c in cards),
        "info": {"format": DECISIONS_FORMAT, "report_id": report["report_id"], "run": run_info},
    }
    return _template().render(**page)


def write_review_page(mined_json: str, out_uris: list[str], run: dict | None = None,
                      endpoint_url: str | None = None) -> list[str]:
    """Render the page of ``mined_json`` (a mining run's file) and write it to each of ``out_uris``."""
    mined = json.loads(storage.read_bytes(mined_json, endpoint_url))
    data = review_page(mined, run, lambda uri: storage.read_bytes(uri, endpoint_url)).encode()
    for uri in out_uris:
        storage.write_bytes(uri, data, endpoint_url)
    return out_uris


@lru_cache(maxsize=1)
def _template():
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    env = Environment(loader=FileSystemLoader(Path(__file__).resolve().parent / "templates"), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["short"] = lambda fid: str(fid)[:12]
    return env.get_template("review.html")


def _report_fields(report: dict, query: dict) -> list[tuple[str, str]]:
    frame = report.get("frame") or {}
    detector = report.get("detector") or {}
    fields = [("report", report.get("report_id")), ("class", report.get("class_name")),
              ("failure", report.get("failure_kind")), ("detector said", report.get("predicted_class")),
              ("accepted frames go in as", dataset_label(report).describe()),
              ("detector", f"{detector.get('name', '')} {detector.get('version', '')}".strip()),
              ("frame", frame.get("frame_id") or frame.get("uri")),
              ("frame index", frame.get("frame_index")), ("box [x, y, w, h]", _box_text(report.get("box"))),
              ("frame size", f"{query.get('width')} x {query.get('height')}"),
              ("reported", report.get("created_at")), ("notes", report.get("notes"))]
    return [(name, str(value)) for name, value in fields if value not in (None, "")]


def _box_text(box) -> str | None:
    return None if box is None else "[" + ", ".join(f"{float(v):.0f}" for v in box) + "]"


def _query(query: dict, read_bytes) -> dict:
    """The report's frame (box in its thumbnail's pixels) and the crop of its box."""
    image = _open(query.get("image_uri"), read_bytes)
    width, height = int(query["width"]), int(query["height"])
    out = {"width": QUERY_WIDTH, "height": _scaled_height(width, height, QUERY_WIDTH),
           "box": _scaled_box(query["box"], QUERY_WIDTH / width), "src": None, "crop": None}
    if image is not None:
        out["src"] = _jpeg_uri(image, QUERY_WIDTH)
        s = image.width / width   # the decoded image may be smaller than the frame (JPEG draft mode)
        x, y, w, h = (float(v) * s for v in query["box"])
        pad = 0.15 * max(w, h)   # a little context around the object
        crop = image.crop((round(max(0, x - pad)), round(max(0, y - pad)), round(min(image.width, x + w + pad)),
                           round(min(image.height, y + h + pad))))
        scale = min(4.0, 240 / crop.height)   # 240 px high at most, never blown up more than 4x
        out["crop"] = _jpeg_uri(crop, max(1, round(crop.width * scale)))
    return out


def _card(item: dict, ranges: dict, read_bytes) -> dict:
    width, height = int(item["width"]), int(item["height"])
    image = _open(item.get("image_uri"), read_bytes)
    return {"frame_id": item["frame_id"], "rank": item["rank"], "score": f"{float(item['score']):.3f}",
            "uri": item.get("uri", ""), "time": _time_text(item.get("time_s"), item.get("frame_index")),
            "width": THUMB_WIDTH, "height": _scaled_height(width, height, THUMB_WIDTH),
            "box": _scaled_box(item["box"], THUMB_WIDTH / width),
            "src": _jpeg_uri(image, THUMB_WIDTH) if image is not None else None,
            "heat": _heat_uri(item.get("heatmap"), read_bytes),
            "evidence": _evidence(item.get("evidence") or {}, ranges),
            "duplicates": _duplicates(item, read_bytes)}


def _duplicates(item: dict, read_bytes) -> list[dict]:
    """The near-duplicates collapsed into ``item``: thumbnails with their box where mined.json has their frames,
    else their frame ids only."""
    details = {d["frame_id"]: d for d in item.get("duplicate_frames") or []}
    out = []
    for fid in item.get("duplicates") or []:
        d = details.get(fid)
        if d is None:
            out.append({"frame_id": fid, "src": None, "time": "", "score": "", "box": None, "width": 0, "height": 0})
            continue
        image = _open(d.get("image_uri"), read_bytes)
        width = int(d.get("width") or item["width"])
        out.append({"frame_id": fid, "time": _time_text(d.get("time_s"), d.get("frame_index")),
                    "score": f"{float(d['score']):.3f}" if d.get("score") is not None else "",
                    "width": DUPLICATE_WIDTH,
                    "height": _scaled_height(width, int(d.get("height") or item["height"]), DUPLICATE_WIDTH),
                    "box": _scaled_box(d["box"], DUPLICATE_WIDTH / width) if d.get("box") else None,
                    "src": _jpeg_uri(image, DUPLICATE_WIDTH) if image is not None else None})
    return out


def _evidence_ranges(items: list[dict]) -> dict[str, tuple[float, float]]:
    """Each evidence's lowest and highest value over the page's frames: bars show where a frame stands."""
    values: dict[str, list[float]] = {}
    for item in items:
        for key, value in (item.get("evidence") or {}).items():
            if key in EVIDENCE_LABELS and isinstance(value, (int, float)) and math.isfinite(value):
                values.setdefault(key, []).append(float(value))
    return {key: (min(v), max(v)) for key, v in values.items()}


def _evidence(evidence: dict, ranges: dict) -> list[dict]:
    """The evidence rows of one frame, in EVIDENCE_LABELS order; ``lead`` marks the match it stands highest in
    among the page's frames (what ranked it up here), when it stands in the upper half of one."""
    rows = []
    for key, label in EVIDENCE_LABELS.items():
        value = evidence.get(key)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        low, high = ranges.get(key, (value, value))
        standing = (value - low) / (high - low) if high > low else None   # None: the same on every frame
        rows.append({"key": key, "label": label, "value": f"{value:.3f}",
                     "bar": 100 if standing is None else round(100 * standing), "standing": standing, "lead": False})
    # The whole-frame similarity is context (and nearly the same on every frame of one scene): never the lead.
    ranked = [r for r in rows if r["standing"] is not None and r["key"] != "global"]
    best = max(ranked, key=lambda r: r["standing"], default=None)
    if best is not None and best["standing"] >= 0.5:   # a frame low in every evidence has no lead
        best["lead"] = True
    weight = evidence.get("template_weight")
    if isinstance(weight, (int, float)) and math.isfinite(weight):
        rows.append({"key": "template_weight", "label": "template weight", "value": f"{weight:.2f}",
                     "bar": round(100 * min(max(weight, 0.0), 1.0)), "standing": None, "lead": False})
    return rows


def _time_text(time_s, frame_index) -> str:
    parts = []
    if time_s is not None:
        minutes, seconds = divmod(float(time_s), 60)
        parts.append(f"{int(minutes)}:{seconds:05.2f}")
    if frame_index is not None:
        parts.append(f"frame {frame_index}")
    return " · ".join(parts)


def _scaled_height(width: int, height: int, thumb_width: int) -> int:
    return max(1, round(height * thumb_width / width))


def _scaled_box(box, scale: float) -> list[float]:
    return [round(float(v) * scale, 1) for v in box]


def _open(uri: str | None, read_bytes) -> Image.Image | None:
    """The image at ``uri``, or None when it cannot be read or decoded (the card says so, the page still works)."""
    if not uri:
        return None
    try:
        image = Image.open(io.BytesIO(read_bytes(uri)))
        image.draft("RGB", (THUMB_WIDTH * 2, THUMB_WIDTH * 2))   # JPEG: decode at a fraction of the size, faster
        return image.convert("RGB")
    except Exception:  # a missing object, a broken file: Pillow and the stores raise many types
        return None


def _jpeg_uri(image: Image.Image, width: int) -> str:
    height = max(1, round(image.height * width / image.width))
    small = image.resize((width, height), Image.Resampling.BILINEAR, reducing_gap=2.0)
    out = io.BytesIO()
    small.save(out, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode()


def _heat_uri(path: str | None, read_bytes) -> str | None:
    """The heat map as a small RGBA PNG scaled by its peak: inferno colours, opacity rising with the heat (cold
    parts clear)."""
    import cv2

    if not path:
        return None
    try:
        heat = Image.open(io.BytesIO(read_bytes(path))).convert("L")
    except Exception:
        return None
    height = max(1, round(heat.height * HEAT_WIDTH / heat.width))
    values = np.asarray(heat.resize((HEAT_WIDTH, height), Image.Resampling.BILINEAR), np.float32)
    unit = values / values.max() if values.max() > 0 else values   # scaled by its peak, as the contact sheets
    rgb = cv2.cvtColor(cv2.applyColorMap((unit * 255).astype(np.uint8), cv2.COLORMAP_INFERNO), cv2.COLOR_BGR2RGB)
    alpha = (unit ** 1.5 * 220).astype(np.uint8)
    out = io.BytesIO()
    # 64 colours: a fifth of the bytes of full RGBA, no visible steps at this size
    overlay = Image.fromarray(np.dstack([rgb, alpha]), "RGBA").quantize(64, method=Image.Quantize.FASTOCTREE)
    overlay.save(out, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()
