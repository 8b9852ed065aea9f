"""The pipeline's steps as plain functions over a Workspace: ingest, features, index, mine.

Prefect tasks in ``tasks/`` wrap these one to one; a notebook can call them directly.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from objret import storage
from objret.contact_sheet import contact_sheet, save_png
from objret.dataset import MinedFrame, PushResult, push
from objret.errors import ObjretError
from objret.features import CacheResult, cache_features, extract_maps
from objret.index import GlobalIndex
from objret.lake import Frame, IngestResult, load_image
from objret.lakemaps import load_lake_maps
from objret.mining import QueryObject, collapse_near_duplicates, rank
from objret.pooling import box_descriptor, gem
from objret.report import FailureReport, check_box_in_frame
from objret.workspace import Workspace


def ingest(ws: Workspace, sources: list[str], progress: bool = True) -> list[IngestResult]:
    lake_params = ws.params.section("lake")
    if not sources:
        raise ObjretError("no lake sources: name a folder, a video file or an s3:// prefix (lake.sources)")
    return [ws.lake.ingest(src, every_n=int(lake_params.get("video_every_n") or 1), fps=lake_params.get("video_fps"),
                           endpoint_url=ws.s3_endpoint_url, progress=progress) for src in sources]


def features(ws: Workspace, progress: bool = True) -> CacheResult:
    f = ws.params.section("features")
    return cache_features(ws.backbone, ws.cache, ws.lake.frames(), lambda uri: load_image(uri, ws.s3_endpoint_url),
                          shard_size=int(f.get("shard_size", 64)), batch_size=int(f.get("batch_size", 8)),
                          progress=progress)


@dataclass
class IndexResult:
    frames: int
    version: str
    directory: str


def build_index(ws: Workspace) -> IndexResult:
    """Whole-frame GeM vectors of every cached frame in an exact faiss index (rebuilt from the cache)."""
    gem_p = float(ws.params.section("index").get("gem_p", 3.0))
    cached = ws.cache.cached_ids()
    frames = [f for f in ws.lake.frames() if f.frame_id in cached]
    if not frames:
        raise ObjretError("no cached frames to index: run ingest and features first")
    maps = ws.cache.load([f.frame_id for f in frames], "stride32")
    vectors = np.stack([gem(maps[f.frame_id], gem_p) for f in frames])
    index = GlobalIndex(vectors.shape[1])
    index.add([f.frame_id for f in frames], vectors)
    index.save(ws.index_dir)
    return IndexResult(len(index), index_version(index.frame_ids), str(ws.index_dir))


def index_version(frame_ids: list[str]) -> str:
    import hashlib
    return hashlib.sha256("\n".join(frame_ids).encode()).hexdigest()[:12]


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
    """The report's frame: a lake frame (by id or URI) or, for an image outside the lake, its pixels."""
    lake = ws.lake
    if report.frame_id:
        return lake.get(report.frame_id), None, report.frame_id
    frame = lake.find(report.frame_uri, report.frame_index)
    if frame is not None:
        return frame, None, frame.uri
    if report.frame_index is not None:
        raise ObjretError(f"report {report.report_id}: frame {report.frame_uri}#{report.frame_index} is not in the lake")
    return None, load_image(report.frame_uri, ws.s3_endpoint_url), report.frame_uri


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
    return QueryObject(maps, size, box), info


def mine(ws: Workspace, report: FailureReport, progress: bool = True) -> MiningOutcome:
    """Report -> query template -> candidates from the index -> template matching -> de-duplicated top-K."""
    m = ws.params.section("mining")
    timings = {}
    t0 = time.perf_counter()
    query, query_info = query_object(ws, report)
    index = GlobalIndex.load(ws.index_dir)
    frames = {f.frame_id: f for f in ws.lake.frames()}
    candidates = int(m.get("candidates", 5000))
    if candidates < len(index):
        vector = box_descriptor(query.maps["stride32"], query.box, query.image_size,
                                float(ws.params.section("index").get("gem_p", 3.0)))
        candidate_ids, _ = index.search(vector, candidates)
    else:
        candidate_ids = list(index.frame_ids)
    candidate_ids = [fid for fid in candidate_ids if fid in frames and fid != query_info["frame_id"]]
    if not candidate_ids:
        raise ObjretError("the index holds no frame to mine besides the query: ingest a lake first")
    timings["query_s"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    lake_maps = load_lake_maps(ws.cache, [frames[i] for i in candidate_ids], m.get("layer", "stride16"))
    timings["load_maps_s"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    top_k = int(m.get("top_k", 50))
    method = m.get("method", "dtm")
    ranking = rank(method, query, lake_maps, {**m, "gem_p": ws.params.section("index").get("gem_p", 3.0)},
                   keep_heatmaps=top_k * 4)
    timings["rank_s"] = time.perf_counter() - t2

    ranked = []
    for i in ranking.order():
        frame = frames[ranking.frame_ids[i]]
        ranked.append({**asdict(frame), "score": float(ranking.scores[i]),
                       "box": [float(v) for v in ranking.boxes[i]], "evidence": ranking.evidence.get(frame.frame_id, {})})
    kept = collapse_near_duplicates(ranked, int(m.get("dedup_frames", 10)), float(m.get("dedup_iou", 0.3)))[:top_k]

    run_dir = ws.run_dir(f"mine-{report.report_id}")
    for rank_no, item in enumerate(kept, start=1):
        item["rank"] = rank_no
        heat = ranking.heatmaps.get(item["frame_id"])
        if heat is not None:
            item["heatmap"] = _save_heatmap(heat, item, run_dir)
    mined_json = run_dir / "mined.json"
    storage.write_bytes(str(mined_json), json.dumps({"report": report.to_dict(), "query": query_info,
                                                     "method": method, "mined": kept}, indent=1).encode())
    sheet = run_dir / "contact_sheet.png"
    save_png(_contact_sheet(ws, query_info, kept[:20], report), str(sheet))

    timings["total_s"] = time.perf_counter() - t0
    provenance = {"backbone": ws.backbone.spec.cache_key(), "index_version": index_version(index.frame_ids),
                  "method": method}
    return MiningOutcome(report.report_id, query_info, kept, provenance, str(run_dir), str(sheet), str(mined_json),
                         timings, len(candidate_ids))


def push_mined(ws: Workspace, report: FailureReport, outcome: MiningOutcome) -> PushResult:
    """Push the mined frames with their boxes and provenance to the retraining dataset (idempotent)."""
    mined_frames = [MinedFrame(frame_id=k["frame_id"], uri=k["uri"], image_uri=k["image_uri"], width=k["width"],
                               height=k["height"], score=k["score"], box=tuple(k["box"]), rank=k["rank"],
                               frame_index=k["frame_index"], time_s=k["time_s"],
                               evidence={**k["evidence"], "near_duplicates": len(k["duplicates"])})
                    for k in outcome.mined]
    return push(ws.dataset_root, report, mined_frames, outcome.provenance,
                copy_frames=bool(ws.params.section("dataset").get("copy_frames", True)),
                endpoint_url=ws.s3_endpoint_url)


def _save_heatmap(heat: np.ndarray, item: dict, run_dir: Path) -> str:
    """Heat map upsampled to the frame's size as an 8-bit PNG (cells are 16-32 px, so bilinear looks right)."""
    image = Image.fromarray((np.clip(heat, 0, 1) * 255).astype(np.uint8)).resize(
        (item["width"], item["height"]), Image.BILINEAR)
    path = run_dir / "heatmaps" / f"{item['frame_id']}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return str(path)


def _contact_sheet(ws: Workspace, query_info: dict, kept: list[dict], report: FailureReport):
    tiles = [(load_image(query_info["image_uri"], ws.s3_endpoint_url), tuple(query_info["box"]),
              f"query: {report.class_name}")]
    tiles += [(load_image(k["image_uri"], ws.s3_endpoint_url), tuple(k["box"]), f"#{k['rank']}  {k['score']:.3f}")
              for k in kept]
    return contact_sheet(tiles, columns=5, thumb=256, title=f"report {report.report_id}: top {len(kept)} frames")
