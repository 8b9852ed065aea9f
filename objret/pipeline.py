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
from tqdm import tqdm

from objret import storage
from objret.contact_sheet import contact_sheet, save_png
from objret.dataset import MinedFrame, PushResult, push
from objret.errors import ObjretError
from objret.features import CacheResult, cache_features, extract_maps
from objret.region_index import RegionIndex
from objret.regions import frame_regions, pool_regions
from objret.whitening import Whitening, fit_whitening
from objret.lake import Frame, IngestResult, load_image
from objret.lakemaps import region_vectors
from objret.mining import TEMPLATE_METHODS, collapse_near_duplicates, rank
from objret.pooling import box_to_cells
from objret.query import QueryObject, mirrored_view
from objret.report import FailureReport, check_box_in_frame
from objret.search import LakeSearch
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
class RegionsResult:
    extracted: int
    already_stored: int
    regions: int
    directory: str


def regions(ws: Workspace, progress: bool = True) -> RegionsResult:
    """Regions and raw descriptors of every cached frame not stored yet, from the sources in params.yaml."""
    rp = ws.params.section("regions")
    store = ws.region_store
    done = store.stored_ids()
    cached = ws.cache.cached_ids()
    todo = [f for f in ws.lake.frames() if f.frame_id in cached and f.frame_id not in done]
    proposer = None
    sources = rp.get("sources", [])
    if "detector" in sources:
        from objret.detector import BoxProposer

        det = rp.get("detector", {})
        proposer = BoxProposer(score_threshold=float(det.get("score_threshold", 0.05)),
                               max_boxes=int(det.get("max_boxes", 30)))
    batch = int(rp.get("batch", 256))
    count = 0
    for start in tqdm(range(0, len(todo), batch), desc="regions", unit="batch", disable=not progress):
        chunk = todo[start:start + batch]
        maps = ws.cache.load([f.frame_id for f in chunk], rp.get("layer", "stride32"))
        per_frame = {}
        for frame in chunk:
            fmap = maps[frame.frame_id]
            image = load_image(frame.image_uri, ws.s3_endpoint_url) if proposer or "dasr" in sources else None
            detections = proposer.propose(image) if proposer is not None else None
            dasr_boxes = _dasr_boxes(ws, image, rp.get("dasr", {})) if "dasr" in sources else None
            found = frame_regions(fmap, rp, image_size=(frame.width, frame.height), detections=detections,
                                  dasr_boxes=dasr_boxes)
            per_frame[frame.frame_id] = (found, pool_regions(fmap, found.boxes, rp.get("pooling", "avg")),
                                         tuple(fmap.shape[-2:]))
            count += len(found)
        store.write(per_frame)
    return RegionsResult(len(todo), len(done), count, str(store.dir))


def _dasr_boxes(ws: Workspace, image: np.ndarray, params: dict) -> list[tuple[float, float, float, float]]:
    """DASR* boxes (001) of one frame in the frame's pixels (DASR works on the resized network input)."""
    from objret.backbone import preprocess
    from objret.dasr import dasr_regions

    x = preprocess(image, ws.backbone.spec.preprocessing)
    found = dasr_regions(ws.backbone, x[None], to_layer=params.get("to_layer", "stride16"),
                         max_peaks=int(params.get("max_peaks", 32)))[0]
    sx, sy = image.shape[1] / x.shape[-1], image.shape[0] / x.shape[-2]
    return [(r.box[0] * sx, r.box[1] * sy, r.box[2] * sx, r.box[3] * sy) for r in found]


def whitening(ws: Workspace) -> str | None:
    """Fit PCA-whitening on the lake's region descriptors once (when enabled); returns its version."""
    w = ws.params.section("regions").get("whitening", {})
    if not w.get("enabled"):
        return None
    if ws.whitening_path.exists():
        return Whitening.load(str(ws.whitening_path)).version()
    table = ws.region_store.load()
    sample = table.descriptors
    limit = int(w.get("max_samples", 200_000))
    if len(sample) > limit:  # a seeded sample: the fit is stable long before millions of regions
        sample = sample[np.random.default_rng(0).choice(len(sample), limit, replace=False)]
    fitted = fit_whitening(sample, int(w.get("dim", 256)), float(w.get("shrinkage", 0.0)))
    return fitted.save(str(ws.whitening_path))


@dataclass
class IndexResult:
    frames: int
    regions: int
    version: str
    directory: str
    bytes_per_region: float


def build_index(ws: Workspace) -> IndexResult:
    """The region index: every stored region of the lake, encoded (whitened when enabled), frames added once.

    New frames are added to the existing index; a change of whitening rebuilds it.
    """
    whitening_obj = ws.load_whitening()
    directory = ws.current_index_dir()
    ip = ws.params.section("index")
    try:
        index = RegionIndex.load(directory)
    except ObjretError:
        index = None
    table = ws.region_store.load()
    frames = {f.frame_id: f for f in ws.lake.frames()}
    indexed = set(index.frame_ids) if index is not None else set()
    new = [fid for fid in table.frame_ids if fid in frames and fid not in indexed]
    vectors = None
    if new:
        table = table.select(new)
        vectors = region_vectors(table, [frames[f] for f in new], ws.params.section("regions").get("layer", "stride32"),
                                 ws.params.section("regions").get("pooling", "avg"), whitening_obj)
        if index is None:
            index = RegionIndex(vectors.vectors.shape[1], kind=ip.get("region_kind", "auto"),
                                flat_max=int(ip.get("flat_max", 200_000)))
        index.add([new[o] for o in vectors.owner], vectors.vectors, vectors.boxes,
                  {"saliency": table.scores[np.argsort(table.owner, kind="stable")]})
        index.save(directory)
    return IndexResult(index.n_frames, len(index), index_version(sorted(index.frame_ids)), str(directory),
                       index.bytes_per_region())


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
    if m.get("method") == "fused" and small:
        # A small object: region descriptors cannot shortlist it, so every indexed frame is template-matched.
        rows = search.rows(exclude=query_info["frame_id"])
    else:
        rows = search.shortlist(vector, int(m.get("rerank", 200)), exclude=query_info["frame_id"])
    if not len(rows):
        raise ObjretError("the index holds no frame to mine besides the query: ingest a lake first")
    lake_maps = search.maps.subset(rows)
    timings["query_s"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    top_k = int(m.get("top_k", 50))
    method = m.get("method", "dtm")
    ranking = rank(method, query, lake_maps, {**m, "rerank": len(rows),
                                              "gem_p": ws.params.section("index").get("gem_p", 3.0)},
                   keep_heatmaps=top_k * 4)
    timings["rank_s"] = time.perf_counter() - t2

    t3 = time.perf_counter()
    ranked = []
    for i in ranking.order():
        frame = search.frames[ranking.frame_ids[i]]
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

    timings["outputs_s"] = time.perf_counter() - t3
    timings["total_s"] = time.perf_counter() - t0
    provenance = {"backbone": ws.backbone.spec.cache_key(), "index_version": index_version(sorted(search.index.frame_ids)),
                  "method": method}
    return MiningOutcome(report.report_id, query_info, kept, provenance, str(run_dir), str(sheet), str(mined_json),
                         timings, len(rows))


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
