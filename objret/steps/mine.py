"""Mine step: a failure report -> query -> shortlist -> ranking -> de-duplicated top-K with boxes, heat maps, contact sheet."""

from __future__ import annotations

import io
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from objret import storage
from objret.dataset.contact_sheet import contact_sheet, save_png
from objret.errors import ObjretError
from objret.features.cache import extract_maps
from objret.index.region_index import index_version
from objret.ingest.lake import Frame, load_image
from objret.ingest.roots import resolve_report_frame, workspace_roots
from objret.mining.methods import TEMPLATE_METHODS, rank
from objret.mining.dedup import collapse_near_duplicates
from objret.mining.query import QueryObject, mirrored_view
from objret.mining.report import FailureReport, check_box_in_frame
from objret.mining.search import LakeSearch
from objret.regions.pooling import box_to_cells
from objret.regions.sources import pool_regions
from objret.steps.discovery import lake_discovery
from objret.steps.workspace import Workspace


@dataclass
class MiningOutcome:
    report_id: str
    query_frame: dict
    mined: list[dict]
    provenance: dict
    run_dir: str
    contact_sheet: str
    mined_json: str
    timings: dict = field(default_factory=dict)
    candidates: int = 0


def resolve_query(ws: Workspace, report: FailureReport) -> tuple[Frame | None, np.ndarray | None, str]:
    """The report's frame: a lake frame (by id or URI) or, for an image outside the lake, its pixels: only under
    the lake sources or the work folder (objret.ingest.roots; anything else is a ReportError naming the field)."""
    frame, uri = resolve_report_frame(ws.lake, report, workspace_roots(ws))
    if frame is not None:
        return frame, None, uri
    return None, load_image(uri, ws.s3_endpoint_url), uri


def query_object(ws: Workspace, report: FailureReport) -> tuple[QueryObject, dict]:
    frame, pixels, uri = resolve_query(ws, report)
    layers = ws.backbone.spec.layers
    if frame is not None and frame.frame_id in ws.cache:
        maps = {layer: ws.cache.load([frame.frame_id], layer)[frame.frame_id] for layer in layers}
        size = (frame.width, frame.height)
    else:
        pixels = pixels if pixels is not None else load_image(frame.image_uri, ws.s3_endpoint_url)
        maps = extract_maps(ws.backbone, [("query", pixels)])["query"]
        size = (pixels.shape[1], pixels.shape[0])
    box = check_box_in_frame(report.box, *size)
    info = {"uri": uri, "frame_id": frame.frame_id if frame else None, "width": size[0], "height": size[1],
            "box": list(box), "image_uri": frame.image_uri if frame else uri}
    query = QueryObject(maps, size, box, frame_id=frame.frame_id if frame else None)
    m = ws.params.section("mining")
    if m.get("mirror") and m.get("method", "fused") in TEMPLATE_METHODS:
        pixels = pixels if pixels is not None else load_image(frame.image_uri, ws.s3_endpoint_url)
        query.mirror = mirrored_view(ws.backbone, pixels, box)
    return query, info


def mine(ws: Workspace, report: FailureReport, progress: bool = True) -> MiningOutcome:
    """Report -> query template -> candidates from the index -> template matching -> de-duplicated top-K.

    The index and the lake's maps come from ``LakeSearch.open``: loaded on a process's first report and kept
    for the next ones while the index is unchanged (``timings["open_s"]`` is that load, 0 when warm).
    """
    m = ws.params.section("mining")
    timings = {}
    t0 = time.perf_counter()
    search = LakeSearch.open(ws)
    timings["open_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    query, query_info = query_object(ws, report)
    rp = ws.params.section("regions")
    fmap = query.maps[rp.get("layer", "stride32")]
    cells = np.asarray(box_to_cells(query.box, query.image_size, fmap.shape[-2:]), np.float32)
    vector = search.maps.regions.encode(pool_regions(fmap, cells[None], rp.get("pooling", "avg")))[0]
    width, height = query.image_size
    small = query.box[2] * query.box[3] < float(m.get("small_box", 0.0)) * width * height
    if (m.get("method") == "fused" and small) or m.get("method") == "discovery":
        # A small object: region descriptors cannot shortlist it, so every indexed frame is template-matched.
        # Discovery: one global descriptor a frame, every frame scored (a matrix-vector product).
        rows = search.rows(exclude=query_info["frame_id"])
    else:
        rows = search.shortlist(vector, int(m.get("rerank", 200)), exclude=query_info["frame_id"])
    if not len(rows):
        raise ObjretError("the index holds no frame to mine besides the query: ingest a lake first")
    candidates = len(rows)   # frames mined (the query's own never is)
    if candidates == len(search.frames_but(query_info["frame_id"])):
        # Every frame: rank the resident lake as it is (a subset would gather every map again) and drop the
        # query's own frame from the ranking below.
        rows = np.arange(len(search.frame_ids))
    lake_maps = search.maps if len(rows) == len(search.frame_ids) else search.maps.subset(rows)
    if m.get("method") == "discovery":
        lake_maps = replace(lake_maps, discovery=lake_discovery(ws, [search.frames[f] for f in search.frame_ids]
                                                                ).subset(rows))   # a copy: search stays as loaded
    timings["query_s"] = time.perf_counter() - t1

    top_k = int(m.get("top_k", 50))
    method = m.get("method", "dtm")
    diffusion_info, diffusion_scores = _diffusion_evidence(ws, report, search, vector, rows, method, timings)

    t2 = time.perf_counter()
    ranking = rank(method, query, lake_maps, {**m, "rerank": len(rows),
                                              "gem_p": ws.params.section("index").get("gem_p", 3.0)},
                   keep_heatmaps=top_k * 4, diffusion=diffusion_scores)
    timings["rank_s"] = time.perf_counter() - t2

    t3 = time.perf_counter()
    ranked = []
    for i in ranking.order():
        if ranking.frame_ids[i] == query_info["frame_id"]:
            continue
        frame = search.frames[ranking.frame_ids[i]]
        ranked.append({**asdict(frame), "score": float(ranking.scores[i]),
                       "box": [float(v) for v in ranking.boxes[i]], "evidence": ranking.evidence.get(frame.frame_id, {})})
    kept = collapse_near_duplicates(ranked, int(m.get("dedup_frames", 10)), float(m.get("dedup_iou", 0.3)))[:top_k]
    by_id = {r["frame_id"]: r for r in ranked}
    for item in kept:   # what the review page shows of a collapsed group
        item["duplicate_frames"] = [{k: by_id[f][k] for k in ("frame_id", "image_uri", "frame_index", "time_s",
                                                              "width", "height", "score", "box")}
                                    for f in item["duplicates"]]

    run_dir = ws.run_dir(f"mine-{report.report_id}")
    for rank_no, item in enumerate(kept, start=1):
        item["rank"] = rank_no
        heat = ranking.heatmaps.get(item["frame_id"])
        if heat is not None:
            item["heatmap"] = _save_heatmap(heat, item, run_dir)
    provenance = {"backbone": ws.backbone.spec.cache_key(), "index_version": index_version(sorted(search.index.frame_ids)),
                  "method": method, "diffusion": {k: v for k, v in diffusion_info.items() if k != "cg"}}
    mined_json = run_dir / "mined.json"
    storage.write_bytes(str(mined_json), json.dumps({"report": report.to_dict(), "query": query_info,
                                                     "method": method, "provenance": provenance,
                                                     "diffusion": diffusion_info, "mined": kept}, indent=1).encode())
    sheet = run_dir / "contact_sheet.png"
    save_png(_contact_sheet(ws, query_info, kept[:20], report), str(sheet))

    timings["outputs_s"] = time.perf_counter() - t3
    timings["total_s"] = time.perf_counter() - t0
    return MiningOutcome(report.report_id, query_info, kept, provenance, str(run_dir), str(sheet), str(mined_json),
                         timings, candidates)


def diffusion_wanted(mining_params: dict, report: FailureReport | None = None) -> tuple[bool, str]:
    """Whether this mining run fuses diffusion evidence, and who said so: the report's ``mining.diffusion``
    when it has one, else params.yaml's ``mining.diffusion.enabled``."""
    if report is not None and report.diffusion is not None:
        return bool(report.diffusion), "report"
    return bool((mining_params.get("diffusion") or {}).get("enabled", False)), "params"


def _diffusion_evidence(ws: Workspace, report: FailureReport, search: LakeSearch, vector: np.ndarray,
                        rows: np.ndarray, method: str, timings: dict) -> tuple[dict, np.ndarray | None]:
    """Per-frame diffusion scores of the shortlisted ``rows`` (None when off) and what to record about them."""
    m = ws.params.section("mining")
    enabled, source = diffusion_wanted(m, report)
    info = {"enabled": enabled, "source": source, "applied": enabled and method == "fused"}
    if not info["applied"]:
        if enabled:
            info["why_not"] = f"method {method!r} fuses no evidence (diffusion is fused by method 'fused')"
        return info, None
    t = time.perf_counter()
    d = dict(m.get("diffusion") or {})
    diffusion = search.diffusion(ws, d)
    scores, solve = diffusion.scores(vector, search.graph_rows(diffusion)[rows])
    timings["diffusion_s"] = time.perf_counter() - t
    info.update(k=diffusion.k, alpha=diffusion.alpha, max_iter=diffusion.max_iter, beta=diffusion.beta,
                weight=float(d.get("weight", 1.0)), graph_version=diffusion.version,
                cg={"iterations": solve.iterations, "residual": solve.residual_norm,
                    "relative_residual": solve.relative_residual, "converged": solve.converged})
    return info, scores


def _save_heatmap(heat: np.ndarray, item: dict, run_dir: Path) -> str:
    """Heat map upsampled to the frame's size as an 8-bit PNG (cells are 8-32 px, so bilinear looks right).

    Fast zlib level: a smooth map compresses well anyway, and level 6 made the 50 maps of a report cost 1 s."""
    image = Image.fromarray((np.clip(heat, 0, 1) * 255).astype(np.uint8)).resize(
        (item["width"], item["height"]), Image.BILINEAR)
    path = run_dir / "heatmaps" / f"{item['frame_id']}.png"
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    storage.write_bytes(str(path), buffer.getvalue())   # atomic: a killed run leaves no cut-off PNG
    return str(path)


def _contact_sheet(ws: Workspace, query_info: dict, kept: list[dict], report: FailureReport):
    tiles = [(load_image(query_info["image_uri"], ws.s3_endpoint_url), tuple(query_info["box"]),
              f"query: {report.class_name}")]
    tiles += [(load_image(k["image_uri"], ws.s3_endpoint_url), tuple(k["box"]), f"#{k['rank']}  {k['score']:.3f}")
              for k in kept]
    return contact_sheet(tiles, columns=5, thumb=256, title=f"report {report.report_id}: top {len(kept)} frames")
