"""Mine step: a failure report -> query -> shortlist -> ranking -> de-duplicated top-K with boxes, heat maps, contact sheet."""

from __future__ import annotations

import io
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from objret import storage
from objret.config import MiningParams
from objret.dataset.contact_sheet import contact_sheet, save_png
from objret.dataset.decisions import review_feedback
from objret.errors import ObjretError
from objret.features.backbone import resized_shape
from objret.features.cache import extract_maps
from objret.graph.store import current_version, open_diffusion
from objret.index.map_store import MapStore
from objret.index.region_index import RegionIndex, index_version
from objret.ingest.frame_table import FrameTable
from objret.ingest.lake import Frame, Lake
from objret.ingest.decode import load_image
from objret.ingest.roots import resolve_report_frame, workspace_roots
from objret.mining.box_fit import colour_signature
from objret.mining.class_agreement import seen_classes
from objret.mining.dedup import collapse_near_duplicates
from objret.mining.feedback import Feedback
from objret.mining.methods import get_method
from objret.mining.query import QueryObject, mirrored_view, zoomed_view
from objret.mining.report import FailureReport, check_report_box
from objret.mining.search import LakeSearch, MapReader
from objret.regions.encoding import RegionVectors
from objret.regions.sources import rmac
from objret.mining.shortlist import QueryRanking, rank_query
from objret.steps.discovery import lake_discovery
from objret.steps.shards import ServedBy, open_shards, saved_shards, shards_dir
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


_current: dict[str, LakeSearch] = {}   # one per process: the latest opened, keyed by search_key


def search_key(ws: Workspace) -> str:
    """Changes whenever a new index version is saved or a parameter the loaded maps depend on changes."""
    directory = shards_dir(ws) if ws.params.scale_out.index_shards else ws.current_index_dir()
    try:
        if ws.params.scale_out.index_shards:
            version = [(p.name, (p / "regions" / "CURRENT").read_text().strip()) for p in saved_shards(ws)]
        else:
            version = (directory / "CURRENT").read_text().strip()
    except OSError as exc:
        raise ObjretError(f"no region index in {directory}: run build-index first") from exc
    m = ws.params.mining
    # Method discovery reads OS.EGM descriptors computed with the graph's parameters: a change of those is a
    # change of what is loaded.
    discovery = ws.params.graph.model_dump() if m.method == "discovery" else None
    cells = (ws.cells_dir() / "CURRENT").read_text().strip() if (ws.cells_dir() / "CURRENT").exists() else None
    return json.dumps([str(Path(directory).resolve()), version, cells, m.layer, m.maps, m.rerank, m.method,
                       ws.params.index.gem_p, discovery])


def open_search(ws: Workspace, served_by: ServedBy | None = None) -> LakeSearch:
    """The work folder's LakeSearch: loaded on a process's first report, kept while the index (and the
    parameters the maps were loaded with) are unchanged. The region index must have been built with the
    descriptor recipe the current parameters give (backbone, layer, pooling, whitening)."""
    key = search_key(ws)
    cached = _current.get("search")
    if cached is not None and cached.key == key:
        return cached
    _current.clear()   # drop the old maps before loading new ones (memory)
    search = load_search(ws, [ws.params.mining.method], served_by)
    search.key = key
    _current["search"] = search
    return search


def load_search(ws: Workspace, methods: list[str], served_by: ServedBy | None = None) -> LakeSearch:
    """The work folder's region and cell indexes, a reader of the maps template matching reads (the mining
    store, or the fp16 feature cache with ``mining.maps: cache``) and the per-frame vectors every method in
    ``methods`` reads (R-MAC for ``rmac``, OS.EGM descriptors for ``discovery``). Each index must carry the
    recipe the current parameters give (backbone, layer, pooling, whitening). Index shards are searched where
    ``served_by`` sends them (tasks/shard_serving.py), else here."""
    m, rp = ws.params.mining, ws.params.regions
    mapped = m.mapped_indexes   # memory-mapped: in the page cache, not in this process's memory
    if ws.params.scale_out.index_shards:
        index, cells = open_shards(ws, mapped=mapped, served_by=served_by)
    else:
        index = RegionIndex.load(ws.current_index_dir(), recipe=ws.index_recipe(), mapped=mapped)
        cells = (RegionIndex.load(ws.cells_dir(), recipe=ws.cells_recipe(), mapped=mapped)
                 if (ws.cells_dir() / "CURRENT").exists() else None)
    store = ws.map_store
    if m.maps == "store":
        read_maps = store.load_maps
    else:
        def read_maps(frame_ids):
            return ws.cache.load(frame_ids, m.layer)
    encoding = RegionVectors(np.zeros((0, index.dim), np.float32), np.zeros(0, np.int64), np.zeros((0, 4), np.float32),
                             rp.layer, rp.pooling, ws.load_whitening())
    search = lake_search(ws.lake, index, cells, store, read_maps, encoding, m.rerank)
    search.read_image = lambda frame_id: load_image(search.frames[frame_id].image_uri, ws.s3_endpoint_url)
    if "rmac" in methods:
        search.rmac_vectors = lake_rmac(ws, search.frame_ids)
    if "discovery" in methods:
        search.discovery = lake_discovery(ws, [search.frames[f] for f in search.frame_ids])
    return search


def lake_search(lake: Lake, index: RegionIndex, cells: RegionIndex | None, store: MapStore, read_maps: MapReader,
                encoding: RegionVectors, rerank: int) -> LakeSearch:
    """A LakeSearch over the indexed frames still in ``lake``. What it holds for every frame is small: the
    indexes' id maps and the frame ids; the frames themselves and their GeM vectors are read when a report asks
    for them (the manifest, the mining store)."""
    ids = lake.present(index.frame_ids)
    if not ids:
        raise ObjretError("the index holds no frame of the lake: run build-index first")
    return LakeSearch(index, FrameTable(lake), read_maps, ids, store.gem_rows(ids), encoding, cells=cells,
                      resident_max=rerank)


def lake_rmac(ws: Workspace, frame_ids: list[str], batch: int = 256) -> np.ndarray:
    """Whole-frame R-MAC vectors (the rmac baseline), pooled from the feature cache's stride-32 maps."""
    out = []
    for start in range(0, len(frame_ids), batch):
        maps = ws.cache.load(frame_ids[start:start + batch], "stride32")
        out += [rmac(maps[f]) for f in frame_ids[start:start + batch]]
    return np.stack(out)


def resolve_query(ws: Workspace, report: FailureReport) -> tuple[Frame | None, np.ndarray | None, str]:
    """The report's frame: a lake frame (by id or URI) or, for an image outside the lake, its pixels: only under
    the lake sources or the work folder (objret.ingest.roots; anything else is a ReportError naming the field)."""
    frame, uri = resolve_report_frame(ws.lake, report, workspace_roots(ws))
    if frame is not None:
        return frame, None, uri
    return None, load_image(uri, ws.s3_endpoint_url), uri


def frame_query(ws: Workspace, frame: Frame | None, box, method: str, pixels: np.ndarray | None = None) -> QueryObject:
    """The query object of ``box`` on a lake ``frame`` (its cached maps) or on ``pixels`` (maps computed now),
    with its mirror view when ``method`` matches templates and ``mining.mirror`` is on, and a small box seen
    zoomed in too (``mining.query_zoom``, objret.mining.query). ``box`` is checked against the frame
    (objret.mining.report.check_box_in_frame)."""
    if frame is not None and frame.frame_id in ws.cache:
        maps = {layer: ws.cache.load([frame.frame_id], layer)[frame.frame_id] for layer in ws.backbone.spec.layers}
        size = (frame.width, frame.height)
    else:
        pixels = pixels if pixels is not None else load_image(frame.image_uri, ws.s3_endpoint_url)
        maps = extract_maps(ws.backbone, [("query", pixels)])["query"]
        size = (pixels.shape[1], pixels.shape[0])
    box = check_report_box(box, *size, cell_size(ws, size))
    query = QueryObject(maps, size, box, frame_id=frame.frame_id if frame else None)
    mining = ws.params.mining
    templates = get_method(method).matches_template
    mirror = templates and mining.mirror
    zoom = templates and mining.query_zoom > 1 and query.is_small(mining.small_box)
    colour = templates and mining.box_colour > 0
    # The detector's classes in the box: where the lake's regions carry theirs (detector regions)
    classes = (get_method(method).reads_classes and mining.weights.classes > 0
               and "detector" in ws.params.regions.sources)
    if mirror or zoom or colour or classes:
        pixels = pixels if pixels is not None else load_image(frame.image_uri, ws.s3_endpoint_url)
    if colour:
        query.colour = colour_signature(pixels, box)
    if classes:   # a small box is also seen in its zoomed window, where the detector sees it larger
        query.classes = seen_classes(ws.detect, pixels, box, mining.query_zoom if zoom else 1.0)
    if mirror:
        query.mirror = mirrored_view(ws.backbone, pixels, box)
    if zoom:
        query.zoomed = zoomed_view(ws.backbone, pixels, box, mining.query_zoom, mining.mirror)
    return query


def cell_size(ws: Workspace, size: tuple[int, int]) -> tuple[float, float]:
    """Pixels of a ``size`` (width, height) frame that one cell of mining.layer covers."""
    stride = int(ws.params.mining.layer.removeprefix("stride"))
    resized_w, resized_h = resized_shape(*size, ws.params.features.max_side)
    return stride * size[0] / resized_w, stride * size[1] / resized_h


def check_report(ws: Workspace, report: FailureReport) -> None:
    """The report's frame found (a lake frame, or an image where objret may read it) and its box checked against
    that frame (objret.mining.report.check_report_box): a ReportError naming the field, before any work."""
    frame, pixels, _ = resolve_query(ws, report)
    size = (frame.width, frame.height) if frame is not None else (pixels.shape[1], pixels.shape[0])
    check_report_box(report.box, *size, cell_size(ws, size))


def query_object(ws: Workspace, report: FailureReport) -> tuple[QueryObject, dict]:
    frame, pixels, uri = resolve_query(ws, report)
    query = frame_query(ws, frame, report.box, ws.params.mining.method, pixels)
    info = {"uri": uri, "frame_id": query.frame_id, "width": query.image_size[0], "height": query.image_size[1],
            "box": list(query.box), "image_uri": frame.image_uri if frame else uri}
    return query, info


def rank_report_query(ws: Workspace, search: LakeSearch, query: QueryObject, method: str, keep_heatmaps: int = 0,
                      report: FailureReport | None = None,
                      feedback: Feedback | None = None) -> tuple[QueryRanking, dict]:
    """The one ranking path of ``objret mine`` and ``objret eval``: ``query`` through objret.mining.shortlist
    with the work folder's parameters, diffusion evidence when wanted (the report may ask for it) and what a
    review of the report's last mine taught (``feedback``, objret.mining.feedback)."""
    m = ws.params.mining
    enabled, source = diffusion_wanted(m, report)
    info = {"enabled": enabled, "source": source, "applied": enabled and method == "fused"}
    diffusion = None
    if info["applied"]:
        if search.diffusion is None or search.diffusion.version != current_version(ws.graph_dir()):
            search.diffusion = open_diffusion(ws.graph_dir(), ws.current_index_dir(), search.index,
                                              k=m.diffusion.k, alpha=m.diffusion.alpha,
                                              max_iter=m.diffusion.max_iter)
        diffusion = search.diffusion
    elif enabled:
        info["why_not"] = f"method {method!r} fuses no evidence (diffusion is fused by method 'fused')"
    result = rank_query(search, query, method, m, gem_p=ws.params.index.gem_p, keep_heatmaps=keep_heatmaps,
                        diffusion=diffusion, feedback=feedback)
    if diffusion is not None:
        solve = result.diffusion_solve
        info.update(k=diffusion.k, alpha=diffusion.alpha, max_iter=diffusion.max_iter, beta=diffusion.beta,
                    weight=m.diffusion.weight, graph_version=diffusion.version,
                    cg={"iterations": solve.iterations, "residual": solve.residual_norm,
                        "relative_residual": solve.relative_residual, "converged": solve.converged})
    return result, info


def query_ranker(ws: Workspace, search: LakeSearch, frame_of: dict):
    """``rank_with(method, q, feedback=None)`` for objret.eval: a labelled query (its frame's ``key`` into
    ``frame_of`` and its ``bbox``) through the path of ``objret mine``: frame_query, then rank_report_query (with
    a review's verdicts, as a re-mine after a review)."""
    def rank_with(method: str, q, feedback: Feedback | None = None):
        query = frame_query(ws, search.frames[frame_of[q.key]], q.bbox, method)
        return rank_report_query(ws, search, query, method, feedback=feedback)[0].ranking

    return rank_with


def mine(ws: Workspace, report: FailureReport, progress: bool = True,
         served_by: ServedBy | None = None) -> MiningOutcome:
    """Report -> query -> candidates from the index -> ranking -> de-duplicated top-K.

    The index and the lake's maps come from ``open_search``: loaded on a process's first report and kept
    for the next ones while the index is unchanged (``timings["open_s"]`` is that load, 0 when warm).
    """
    m = ws.params.mining
    timings = {}
    t1 = time.perf_counter()
    query, query_info = query_object(ws, report)   # a report with a bad box is refused before the lake loads
    timings["query_s"] = time.perf_counter() - t1
    t0 = time.perf_counter()
    search = open_search(ws, served_by)
    timings["open_s"] = time.perf_counter() - t0

    t2 = time.perf_counter()
    # What reviews of this report decided: judged frames are not shown again, and the query learns from them.
    feedback = (review_feedback(str(ws.dataset_registry.dataset_dir), report.report_id, ws.s3_endpoint_url)
                if m.feedback.enabled else None)
    result, diffusion_info = rank_report_query(ws, search, query, m.method, keep_heatmaps=m.top_k * 4,
                                               report=report, feedback=feedback)
    ranking = result.ranking
    timings["rank_s"] = time.perf_counter() - t2

    t3 = time.perf_counter()
    ranked = []
    for i in ranking.order():
        if ranking.frame_ids[i] == query_info["frame_id"]:
            continue
        frame = search.frames[ranking.frame_ids[i]]
        ranked.append({**asdict(frame), "score": float(ranking.scores[i]),
                       "box": [float(v) for v in ranking.boxes[i]], "evidence": ranking.evidence.get(frame.frame_id, {})})
    kept = collapse_near_duplicates(ranked, m.dedup_frames, m.dedup_iou)[:m.top_k]
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
                  "method": m.method, "diffusion": {k: v for k, v in diffusion_info.items() if k != "cg"},
                  "feedback": feedback_info(feedback, result.feedback)}
    mined_json = run_dir / "mined.json"
    storage.write_bytes(str(mined_json), json.dumps({"report": report.to_dict(), "query": query_info,
                                                     "method": m.method, "provenance": provenance,
                                                     "diffusion": diffusion_info, "mined": kept}, indent=1).encode())
    sheet = run_dir / "contact_sheet.png"
    save_png(_contact_sheet(ws, query_info, kept[:20], report), str(sheet))

    timings["outputs_s"] = time.perf_counter() - t3
    timings["total_s"] = time.perf_counter() - t0
    return MiningOutcome(report.report_id, query_info, kept, provenance, str(run_dir), str(sheet), str(mined_json),
                         timings, result.candidates)


def feedback_info(feedback: Feedback | None, learned) -> dict:
    """What a mining run learned from reviews of its report: frames judged and kept out, what moved the query."""
    if not feedback:
        return {"judged": 0}
    info = {"judged": len(feedback.judged), "accepted": len(feedback.accepted), "rejected": len(feedback.rejected)}
    if learned is not None:
        info.update(accepted_used=learned.accepted, rejected_used=learned.rejected, templates=len(learned.templates))
    return info


def diffusion_wanted(mining: MiningParams, report: FailureReport | None = None) -> tuple[bool, str]:
    """Whether this mining run fuses diffusion evidence, and who said so: the report's ``mining.diffusion``
    when it has one, else params.yaml's ``mining.diffusion.enabled``."""
    if report is not None and report.diffusion is not None:
        return bool(report.diffusion), "report"
    return mining.diffusion.enabled, "params"


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
