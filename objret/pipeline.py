"""The pipeline's steps as plain functions over a Workspace: ingest, features, index, mine.

Prefect tasks in ``tasks/`` wrap these one to one; a notebook can call them directly.
"""

from __future__ import annotations

import io
import json
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from objret import storage
from objret.contact_sheet import contact_sheet, save_png
from objret.dataset import ANNOTATIONS_FILE, MinedFrame, PushResult, publish, push
from objret.decisions import ApplyResult, Decisions, apply_decisions, rejected_frames
from objret.errors import ObjretError, StoreError
from objret.features import CacheResult, cache_features, extract_maps
from objret.region_index import RegionIndex
from objret.regions import frame_regions, pool_regions
from objret.review import write_review_page
from objret.whitening import Whitening, fit_whitening
from objret.lake import MAX_PIXELS, MIN_SIDE, Frame, IngestResult, load_image
from objret.lakemaps import region_vectors
from objret.mining import TEMPLATE_METHODS, RegionVectors, collapse_near_duplicates, rank
from objret.pooling import box_to_cells
from objret.query import QueryObject, mirrored_view
from objret.report import FailureReport, check_box_in_frame
from objret.roots import resolve_report_frame, workspace_roots
from objret.search import LakeSearch
from objret.workspace import Workspace


def ingest(ws: Workspace, sources: list[str], progress: bool = True) -> list[IngestResult]:
    lake_params = ws.params.section("lake")
    if not sources:
        raise ObjretError("no lake sources: name a folder, a video file or an s3:// prefix (lake.sources)")
    return [ws.lake.ingest(src, every_n=int(lake_params.get("video_every_n") or 1), fps=lake_params.get("video_fps"),
                           endpoint_url=ws.s3_endpoint_url, progress=progress,
                           max_pixels=int(lake_params.get("max_pixels") or MAX_PIXELS),
                           min_side=int(lake_params.get("min_side") or MIN_SIDE)) for src in sources]


def features(ws: Workspace, progress: bool = True, frame_ids: list[str] | None = None) -> CacheResult:
    """Cache the maps of every lake frame not cached yet (``frame_ids``: of these frames only, one chunk of a
    scale-out run, objret.chunks)."""
    f = ws.params.section("features")
    frames = ws.lake.frames()
    if frame_ids is not None:
        wanted = set(frame_ids)
        frames = [frame for frame in frames if frame.frame_id in wanted]
    return cache_features(ws.backbone, ws.cache, frames, lambda uri: load_image(uri, ws.s3_endpoint_url),
                          shard_size=int(f.get("shard_size", 64)), batch_size=int(f.get("batch_size", 8)),
                          progress=progress)


@dataclass
class RegionsResult:
    extracted: int
    already_stored: int
    regions: int
    directory: str


def regions(ws: Workspace, progress: bool = True, frame_ids: list[str] | None = None) -> RegionsResult:
    """Regions and raw descriptors of every cached frame not stored yet, from the sources in params.yaml
    (``frame_ids``: of these cached frames only, one chunk of a scale-out run, objret.chunks)."""
    rp = ws.params.section("regions")
    store = ws.region_store
    storage.remove_stale_temps(store.dir)   # batches that killed runs left half-written
    done = store.stored_ids()
    if frame_ids is None:
        cached = ws.cache.cached_ids()
        todo = [f for f in ws.lake.frames() if f.frame_id in cached and f.frame_id not in done]
    else:  # cached by other workers maybe: the cache's load() reads their shards, cached_ids() may not know them
        wanted = set(frame_ids)
        todo = [f for f in ws.lake.frames() if f.frame_id in wanted and f.frame_id not in done]
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
    """Fit PCA-whitening on the lake's region descriptors (when enabled); returns its version.

    Fitted once, and fitted again when the regions grew by ``refit_growth`` since (a new whitening is a new
    index: build_index then rebuilds it).
    """
    w = ws.params.section("regions").get("whitening", {})
    if not w.get("enabled"):
        (ws.root / "whitening").mkdir(exist_ok=True)   # the folder all the same: a DVC stage's output
        return None
    table = ws.region_store.load()
    storage.remove_stale_temps(ws.whitening_path.parent)
    fit_record = ws.whitening_path.with_suffix(".json")
    record = json.loads(fit_record.read_text()) if fit_record.exists() else None
    if ws.whitening_path.exists():
        current = Whitening.load(str(ws.whitening_path))
        # The record is written before the whitening: one that names another version is a fit a kill cut short.
        if record is None or record.get("version") == current.version():
            fitted_on = record["regions"] if record else len(table.descriptors)
            growth = w.get("refit_growth")
            if growth is None or len(table.descriptors) < fitted_on * (1 + float(growth)):
                return current.version()
    sample = table.descriptors
    limit = int(w.get("max_samples", 200_000))
    if len(sample) > limit:  # a seeded sample: the fit is stable long before millions of regions
        sample = sample[np.random.default_rng(0).choice(len(sample), limit, replace=False)]
    fitted = fit_whitening(sample, int(w.get("dim", 256)), float(w.get("shrinkage", 0.0)))
    # Record first, whitening second: a kill in between leaves a record the whitening does not match (refitted
    # next time), never a whitening without its record.
    storage.write_bytes(str(fit_record), json.dumps({"regions": len(table.descriptors),
                                                     "version": fitted.version()}).encode())
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
class GraphResult:
    """The region graph of the current index (003 sec. 3.6-3.7) and how this run got it."""

    mode: str                 # full (built from scratch) | refresh (new regions appended) | unchanged
    nodes: int                # == the index's regions; node i is region i
    edges: int                # undirected mutual k-NN edges
    mean_degree: float
    components: int           # connected components, isolated nodes included
    isolated: int             # nodes with no mutual neighbour
    kind: str                 # exact | ivf k-NN lists
    k: int
    recall: float | None      # k-NN recall against exact on a sample (ivf); None for exact lists
    cg_iterations: int        # Katz centrality by conjugate gradients
    cg_residual: float        # ||1 - L_alpha g*||
    cg_converged: bool
    new_nodes: int            # nodes added by this run (all of them for a full build, 0 when unchanged)
    graph_seconds: float      # k-NN lists + normalised adjacency
    katz_seconds: float
    seconds: float            # this run, all of it (saving included)
    version: str
    index_version: str
    directory: str


def graph(ws: Workspace) -> GraphResult:
    """The mutual k-NN graph over the region index's vectors and their Katz centrality, saved beside the index.

    Built from scratch the first time (or when its parameters change); refreshed incrementally when the index
    only gained regions since (objret.region_graph.refresh_region_graph); left alone when the index did not
    change. Node i is region i of the index, with the vector the index holds (re-encoded from the region store
    as build_index encodes it).
    """
    from objret.centrality import katz_centrality
    from objret.graph_store import current_version, load_graph, save_graph
    from objret.region_graph import build_region_graph, default_nlist, refresh_region_graph

    start = time.perf_counter()
    gp = ws.params.section("graph")
    index_dir = ws.current_index_dir()
    index = RegionIndex.load(index_dir)
    index_current = current_version(index_dir)
    n = len(index)
    if n < 2:
        raise ObjretError(f"the region index holds {n} region(s): a region graph needs at least 2")
    settings = graph_settings(gp)
    directory = ws.graph_dir()
    try:
        previous = load_graph(directory)
    except ObjretError as exc:   # damaged: built again from scratch
        warnings.warn(str(exc))
        previous = None
    if (previous is not None and previous.manifest["index"]["current"] == index_current
            and previous.manifest["settings"] == settings):
        return _graph_result(previous, "unchanged", 0, time.perf_counter() - start)

    vectors, _, _ = graph_nodes(ws, index)
    knn_settings, katz_settings = settings["knn"], settings["katz"]
    k = min(int(knn_settings["k"]), n - 1)
    full_nodes = n
    if (previous is not None and _can_refresh(previous, index, vectors, knn_settings, k)
            and not _outgrown(previous, n, gp.get("rebuild_growth"))):
        full_nodes = int(previous.manifest.get("full_nodes", previous.nodes))
        built = refresh_region_graph(previous.knn, vectors, beta=float(knn_settings["beta"]),
                                     recall_sample=int(gp.get("recall_sample", 1000)))
        mode, new_nodes = "refresh", n - previous.nodes
    else:
        exact_max = int(knn_settings["exact_max"])
        nprobe = int(knn_settings["nprobe"]) if n <= exact_max else min(int(knn_settings["nprobe"]), default_nlist(n))
        built = build_region_graph(vectors, k=k, beta=float(knn_settings["beta"]), exact_max=exact_max,
                                   nprobe=nprobe, recall_sample=int(gp.get("recall_sample", 1000)))
        mode, new_nodes = "full", n
    katz = katz_centrality(built.matrix, alpha=float(katz_settings["alpha"]), tol=float(katz_settings["tol"]),
                           max_iter=int(katz_settings["max_iter"]))
    check_ids = np.unique(np.linspace(0, n - 1, min(n, 64)).round().astype(np.int64))
    recall = None if built.knn.kind == "exact" or not np.isfinite(built.recall) else float(built.recall)
    manifest = {
        "index": {"directory": str(index_dir), "current": index_current, "frames": index.n_frames,
                  "version": index_version(sorted(index.frame_ids)), "frame_ids_sha": _ids_digest(index.frame_ids)},
        "settings": settings,
        "mode": mode, "new_nodes": new_nodes, "full_nodes": full_nodes,
        "stats": {"nodes": built.nodes, "edges": built.edges, "mean_degree": built.mean_degree,
                  "components": built.components, "isolated": built.isolated, "kind": built.knn.kind,
                  "k": built.knn.k, "recall": recall, "graph_seconds": built.build_seconds,
                  "timings": built.timings, "cg_iterations": katz.iterations, "cg_residual": katz.residual_norm,
                  "cg_converged": katz.converged, "katz_seconds": katz.seconds},
    }
    stored = save_graph(directory, built, katz.values, check_ids, vectors[check_ids], manifest)
    return _graph_result(stored, mode, new_nodes, time.perf_counter() - start)


def graph_settings(gp: dict) -> dict:
    """The parameters a stored graph depends on: the k-NN lists' and the centrality's."""
    cg = gp.get("cg") or {}
    return {"knn": {"k": int(gp.get("k", 50)), "beta": float(gp.get("beta", 3.0)),
                    "exact_max": int(gp.get("exact_max", 50_000)), "nprobe": int(gp.get("nprobe", 16))},
            "katz": {"alpha": float(gp.get("alpha", 0.99)), "tol": float(cg.get("tol", 1e-6)),
                     "max_iter": int(cg.get("max_iter", 1000))}}


def graph_nodes(ws: Workspace, index: RegionIndex) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The index's regions in index order: vectors (encoded as build_index encodes them), feature saliency
    (003 eq. 9) and source code of each."""
    try:
        table = ws.region_store.load(list(index.frame_ids))
    except (FileNotFoundError, KeyError) as exc:
        raise ObjretError(f"the region store {ws.region_store.dir} lacks frames of the region index ({exc}): "
                          "run build-index") from exc
    order = np.argsort(table.owner, kind="stable")   # frame by frame, store order inside: the index's order
    owner = table.owner[order]
    if len(owner) != len(index) or not np.array_equal(owner, index.owner):
        raise ObjretError(f"the region store ({len(owner)} regions) and the region index ({len(index)}) disagree: "
                          "rebuild the index")
    rp = ws.params.section("regions")
    encoder = RegionVectors(np.zeros((0, 0), np.float32), owner, np.zeros((0, 4), np.float32),
                            rp.get("layer", "stride32"), rp.get("pooling", "avg"), ws.load_whitening())
    vectors = np.ascontiguousarray(encoder.encode(table.descriptors[order]), np.float32)
    if index.active == "flat" and len(index):   # the index keeps its vectors exactly: they must be these
        ids = np.unique(np.linspace(0, len(index) - 1, min(len(index), 32)).round().astype(np.int64))
        if not np.allclose(index.index.reconstruct_batch(ids), vectors[ids], atol=1e-4):
            raise ObjretError("the region index's vectors differ from the region store's: rebuild the index")
    return vectors, table.scores[order], table.sources[order]


def _can_refresh(previous, index: RegionIndex, vectors: np.ndarray, knn_settings: dict, k: int) -> bool:
    """True when the index is the previous graph's index with regions (of new frames) appended."""
    manifest = previous.manifest
    n_old, frames_old = previous.nodes, int(manifest["index"]["frames"])
    if manifest["settings"]["knn"] != knn_settings or previous.knn.k != k or previous.knn.n != n_old:
        return False
    if not (n_old <= len(index) and frames_old <= index.n_frames):
        return False
    if _ids_digest(index.frame_ids[:frames_old]) != manifest["index"]["frame_ids_sha"]:
        return False
    owner = index.owner
    if (n_old and owner[:n_old].max() >= frames_old) or (n_old < len(owner) and owner[n_old:].min() < frames_old):
        return False
    ids, stored = previous.check()
    return bool(len(ids) and ids.max() < n_old and np.allclose(vectors[ids], stored, atol=1e-4))


def _outgrown(previous, nodes: int, growth) -> bool:
    """The rebuild policy: a graph that grew by ``growth`` (a fraction) since its last full build is built again
    from scratch (refreshed IVF lists keep the coarse quantiser trained on the old regions)."""
    if growth is None:
        return False
    return nodes >= int(previous.manifest.get("full_nodes", previous.nodes)) * (1 + float(growth))


def _ids_digest(frame_ids) -> str:
    import hashlib
    return hashlib.sha256("\n".join(frame_ids).encode()).hexdigest()


def _graph_result(stored, mode: str, new_nodes: int, seconds: float) -> GraphResult:
    st = stored.manifest["stats"]
    return GraphResult(mode, st["nodes"], st["edges"], st["mean_degree"], st["components"], st["isolated"],
                       st["kind"], st["k"], st["recall"], st["cg_iterations"], st["cg_residual"],
                       st["cg_converged"], new_nodes, st["graph_seconds"] if mode != "unchanged" else 0.0,
                       st["katz_seconds"] if mode != "unchanged" else 0.0, seconds, stored.version,
                       stored.manifest["index"]["version"], str(stored.directory.parent))


def graph_samples(ws: Workspace, out_dir: str | Path, count: int | None = None) -> list[str]:
    """PNGs of ``count`` (graph.sample_frames) index frames, evenly spread: feature saliency (003 eq. 1-2),
    object saliency (eq. 14, over the current graph's centrality) and the frame with its stored regions."""
    from objret.contact_sheet import saliency_panels
    from objret.graph_store import current_version, load_graph
    from objret.regions import SOURCES
    from objret.saliency import feature_saliency

    gp = ws.params.section("graph")
    count = int(gp.get("sample_frames", 3) if count is None else count)
    if count <= 0:
        return []
    index_dir = ws.current_index_dir()
    index = RegionIndex.load(index_dir)
    stored = load_graph(ws.graph_dir())
    if stored is None or stored.manifest["index"]["current"] != current_version(index_dir):
        raise ObjretError("no region graph for the current region index: run the graph step first")
    vectors, region_saliency, sources = graph_nodes(ws, index)
    rp = ws.params.section("regions")
    saliency_of = object_saliency_function(ws, index, stored, vectors, region_saliency)
    frames = {f.frame_id: f for f in ws.lake.frames()}
    owner, boxes = index.owner, index.boxes
    grid = np.isin(sources, [SOURCES.index("whole"), SOURCES.index("uniform")])   # the same on every frame
    out_dir = Path(out_dir)
    paths = []
    for row in np.unique(np.linspace(0, index.n_frames - 1, min(count, index.n_frames)).round().astype(int)):
        fid = index.frame_ids[row]
        frame = frames.get(fid)
        if frame is None or fid not in ws.cache:
            continue
        fmap = ws.cache.load([fid], rp.get("layer", "stride32"))[fid].astype(np.float32)
        fs = feature_saliency(fmap)
        os_map = saliency_of(fmap, fs)
        mine = owner == row
        drawn = boxes[mine & ~grid]
        image = load_image(frame.image_uri, ws.s3_endpoint_url)
        panel = saliency_panels(image, fs, os_map, drawn,
                                title=f"{Path(frame.uri).name} ({fid[:12]}): feature saliency | object saliency"
                                      " | regions",
                                region_caption=f"{len(drawn)} regions (grid regions not drawn)")
        path = out_dir / f"saliency-{fid[:16]}.png"
        save_png(panel, str(path))
        paths.append(str(path))
    return paths


def object_saliency_function(ws: Workspace, index: RegionIndex, stored, vectors: np.ndarray,
                             region_saliency: np.ndarray):
    """``f(feature_map, frame_saliency=None) -> object saliency`` (003 eq. 14, objret.centrality.object_saliency)
    of one frame's regions-layer map over the ``stored`` graph of ``index``: its nodes (``vectors``, ``region_saliency``
    from graph_nodes) and centrality, ``graph.object_saliency``'s exponents, patch and k, the graph's beta, the
    regions' pooling and whitening.

    The patches' k nearest regions are searched as the graph's own k-NN lists were: exactly (the region index)
    when the graph's lists are exact, else in an IVF-Flat over the graph's nodes with the graph's coarse centroids
    and lists, probing ``graph.nprobe`` lists (an exact search of ~300 patches a frame against 80k regions took
    ~2.5 s a frame on a 2-core CPU)."""
    from objret.centrality import object_saliency

    osp = dict(ws.params.section("graph").get("object_saliency") or {})
    pooling = ws.params.section("regions").get("pooling", "avg")
    whitening_obj = ws.load_whitening()
    search = patch_search(index, stored, vectors)
    settings = dict(whiten=whitening_obj.apply if whitening_obj is not None else None,
                    k=min(int(osp.get("k", 50)), len(vectors)), beta=float(stored.manifest["settings"]["knn"]["beta"]),
                    Theta=float(osp.get("Theta", 2.0)), theta=float(osp.get("theta", 3.0)),
                    patch=int(osp.get("patch", 3)), pooling=pooling, index=search)

    def compute(feature_map: np.ndarray, frame_saliency: np.ndarray | None = None) -> np.ndarray:
        return object_saliency(feature_map, vectors, stored.centrality, region_saliency,
                               frame_saliency=frame_saliency, **settings)

    return compute


def patch_search(index: RegionIndex, stored, vectors: np.ndarray):
    """The faiss-like ``search(x, k) -> (sims, ids)`` over the graph's nodes that object saliency uses: the region
    index itself when the ``stored`` graph's k-NN lists are exact, an IVF-Flat with the graph's centroids and
    lists (``nprobe`` of its settings) when they are IVF lists."""
    knn = stored.knn
    if knn.kind == "exact":
        return _IndexSearch(index)
    from objret.region_graph import _ivf   # the graph's own IVF-Flat, built from its stored lists (no training)

    ivf = _ivf(knn.centroids, [(np.ascontiguousarray(vectors, np.float32), knn.probes)])
    ivf.nprobe = min(int(stored.manifest["settings"]["knn"]["nprobe"]), len(knn.centroids))
    return ivf


class _IndexSearch:
    """A RegionIndex as the faiss-like ``search(x, k) -> (sims, ids)`` object_saliency takes."""

    def __init__(self, index: RegionIndex):
        self.index = index

    def search(self, x: np.ndarray, k: int):
        ids, sims = self.index.search(np.asarray(x, np.float32), k)
        return np.atleast_2d(sims), np.atleast_2d(ids)


@dataclass
class DiscoveryResult:
    """OS.EGM regions and the 003 sec. 3.9 descriptor of every frame of the index, and how this run got them."""

    mode: str                     # computed | unchanged (same graph version and parameters: nothing done)
    frames: int                   # frames stored (every frame of the region index)
    computed: int                 # frames computed by this run
    resumed: int                  # frames taken over from an interrupted run's finished parts
    regions: int                  # OS.EGM regions, all frames
    mean_regions: float           # OS.EGM regions per frame
    frames_without_regions: int   # frames whose object saliency gave no region (descriptor: the whole frame)
    seconds: float                # this run, all of it
    seconds_per_frame: float      # per computed frame: maps loaded, object saliency, OS.EGM, descriptor
    timings: dict                 # seconds per part of the per-frame work, over the computed frames
    version: str
    graph_version: str
    directory: str


def discovery_dir(ws: Workspace) -> Path:
    """The OS.EGM descriptors of the current region graph: ``discovery/`` in the graph's folder."""
    return ws.graph_dir() / "discovery"


def discovery_settings(ws: Workspace, stored_graph) -> dict:
    """What stored descriptors depend on besides the maps: the graph version (its index, whitening, centrality),
    how patches search its nodes, the regions' layer and pooling, the object saliency's and the OS.EGM
    detector's parameters."""
    from objret.discovery import DEFAULT_OS_EGM

    gp, rp = ws.params.section("graph"), ws.params.section("regions")
    osp, dp = dict(gp.get("object_saliency") or {}), dict(gp.get("discovery") or {})
    knn = stored_graph.manifest["settings"]["knn"]
    search = "exact" if stored_graph.manifest["stats"]["kind"] == "exact" else f"ivf-nprobe{int(knn['nprobe'])}"
    return {"graph_version": stored_graph.version, "patch_search": search, "layer": rp.get("layer", "stride32"),
            "pooling": rp.get("pooling", "avg"),
            "object_saliency": {"Theta": float(osp.get("Theta", 2.0)), "theta": float(osp.get("theta", 3.0)),
                                "patch": int(osp.get("patch", 3)), "k": int(osp.get("k", 50))},
            "egm": {k: float(v) for k, v in {**DEFAULT_OS_EGM, **dict(dp.get("egm") or {})}.items()}}


def discovery(ws: Workspace, progress: bool = True) -> DiscoveryResult:
    """Object discovery over the region graph (003 sec. 3.8-3.9) for every frame of the region index: object
    saliency (eq. 14) -> OS.EGM regions -> max-pool, L2, sum, whiten (or L2) descriptor; saved as one version
    beside the graph (objret.discovery.save_discovery), keyed to the graph version and the parameters.

    A run with the same graph version and parameters does nothing. A new graph version (a graph refreshed with
    new frames changes every region's centrality, so every frame's object saliency) recomputes every frame.
    Frames are computed in parts saved as they finish; an interrupted run's parts are taken over by the next run
    for the same graph and parameters. ObjretError when the index or its graph is missing.
    """
    import hashlib
    import shutil

    from objret import discovery as disc
    from objret.graph_store import current_version, load_graph
    from objret.saliency import feature_saliency

    start = time.perf_counter()
    index_dir = ws.current_index_dir()
    index_current = current_version(index_dir)
    if index_current is None:
        raise ObjretError(f"run build-index: no region index in {index_dir} (OS.EGM needs the index and its graph)")
    stored_graph = load_graph(ws.graph_dir())
    if stored_graph is None:
        raise ObjretError(f"run build-index (with graph.enabled: true) or `objret graph`: no region graph in "
                          f"{ws.graph_dir()} (OS.EGM needs its centrality)")
    if stored_graph.manifest["index"]["current"] != index_current:
        raise ObjretError(f"run build-index (or `objret graph`): the region graph in {ws.graph_dir()} was built for "
                          f"another version of the region index ({stored_graph.manifest['index']['current']}, "
                          f"the index is {index_current})")
    index = RegionIndex.load(index_dir)
    settings = discovery_settings(ws, stored_graph)
    directory = discovery_dir(ws)
    try:
        previous = disc.load_discovery(directory)
    except ObjretError as exc:   # damaged: computed again
        warnings.warn(str(exc))
        previous = None
    frame_ids = list(index.frame_ids)
    if (previous is not None and previous.manifest["settings"] == settings
            and sorted(previous.frame_ids) == sorted(frame_ids)):
        return _discovery_result(previous, "unchanged", 0, 0, time.perf_counter() - start)

    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    work = directory / f".work-{key}"
    work.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(".work-*"):   # parts of runs for another graph version or other parameters
        if stale != work:
            shutil.rmtree(stale, ignore_errors=True)
    parts = [disc.read_arrays(p) for p in sorted(work.glob("part-*.npz"))]
    done = {fid for p in parts for fid in p["frame_ids"].astype(str).tolist()}
    todo = [f for f in frame_ids if f not in done]
    resumed = len(frame_ids) - len(todo)
    missing = [f for f in todo if f not in ws.cache]
    if missing:
        raise ObjretError(f"the feature cache lacks {len(missing)} frames of the region index (first {missing[0]}): "
                          "run build-index")

    egm = settings["egm"]
    layer = settings["layer"]
    whitening_obj = ws.load_whitening()
    timings = {"nodes_s": 0.0, "load_s": 0.0, "object_saliency_s": 0.0, "os_egm_s": 0.0, "descriptor_s": 0.0}
    if todo:
        t = time.perf_counter()
        vectors, region_saliency, _ = graph_nodes(ws, index)
        saliency_of = object_saliency_function(ws, index, stored_graph, vectors, region_saliency)
        timings["nodes_s"] = time.perf_counter() - t
    chunk_size = max(1, int(ws.params.section("features").get("shard_size", 64)))
    for first in tqdm(range(0, len(todo), chunk_size), desc="OS.EGM", unit="part", disable=not progress):
        chunk = todo[first:first + chunk_size]
        t = time.perf_counter()
        maps = ws.cache.load(chunk, layer)
        timings["load_s"] += time.perf_counter() - t
        per_frame = {}
        for fid in chunk:
            fmap = maps[fid].astype(np.float32)
            t0 = time.perf_counter()
            os_map = saliency_of(fmap, feature_saliency(fmap))
            t1 = time.perf_counter()
            found = disc.os_egm_regions(fmap, os_map, egm)
            t2 = time.perf_counter()
            per_frame[fid] = disc.FrameDiscovery(found, disc.discovery_descriptor(fmap, found, whitening_obj),
                                                 disc.region_vectors(fmap, found, whitening_obj),
                                                 tuple(fmap.shape[-2:]))
            timings["object_saliency_s"] += t1 - t0
            timings["os_egm_s"] += t2 - t1
            timings["descriptor_s"] += time.perf_counter() - t2
        arrays = disc.pack(per_frame)
        disc.write_arrays(work / f"part-{hashlib.sha1(chr(10).join(chunk).encode()).hexdigest()[:16]}.npz", arrays)
        parts.append(arrays)
    compute_seconds = sum(v for k, v in timings.items() if k != "nodes_s")

    merged = disc.concat_arrays(parts)
    merged = _in_order(merged, frame_ids)   # index order, one row per frame
    counts = merged["counts"]
    manifest = {
        "graph": {"directory": str(ws.graph_dir()), "version": stored_graph.version},
        "index": {"directory": str(index_dir), "current": index_current, "frames": index.n_frames,
                  "version": index_version(sorted(frame_ids))},
        "settings": settings,
        "stats": {"frames": len(frame_ids), "computed": len(todo), "resumed": resumed,
                  "regions": int(counts.sum()), "mean_regions": float(counts.mean()) if len(counts) else 0.0,
                  "frames_without_regions": int((counts == 0).sum()),
                  "dim": int(merged["descriptors"].shape[1]) if merged["descriptors"].ndim == 2 else 0,
                  "seconds_per_frame": compute_seconds / len(todo) if todo else 0.0,
                  "timings": timings, "whitening": whitening_obj.version() if whitening_obj else None},
    }
    stored = disc.save_discovery(directory, merged, manifest)
    shutil.rmtree(work, ignore_errors=True)
    return _discovery_result(stored, "computed", len(todo), resumed, time.perf_counter() - start)


def lake_discovery(ws: Workspace, frames: list):
    """The stored OS.EGM descriptors of ``frames`` (lake records, in that order) as method ``discovery`` reads
    them; ObjretError when none were computed for the current region graph."""
    from objret.discovery import discovery_vectors, load_discovery
    from objret.graph_store import load_graph

    stored = load_discovery(discovery_dir(ws))
    stored_graph = load_graph(ws.graph_dir())
    if stored is None or stored_graph is None or stored.manifest["graph"]["version"] != stored_graph.version:
        raise ObjretError(f"run build-index (with graph.discovery.enabled: true): no OS.EGM descriptors for the "
                          f"current region graph in {discovery_dir(ws)}")
    if stored.manifest["settings"] != discovery_settings(ws, stored_graph):
        raise ObjretError(f"run build-index (or `objret graph`): the OS.EGM descriptors in {discovery_dir(ws)} were "
                          "computed with other parameters (graph.object_saliency, graph.discovery.egm, regions)")
    return discovery_vectors(stored, frames, ws.params.section("regions").get("layer", "stride32"),
                             ws.load_whitening())


def _in_order(arrays: dict[str, np.ndarray], frame_ids: list[str]) -> dict[str, np.ndarray]:
    """The packed arrays of ``frame_ids`` only, in that order (regions follow their frames)."""
    ids = arrays["frame_ids"].astype(str).tolist()
    row_of = {fid: i for i, fid in enumerate(ids)}
    rows = np.array([row_of[f] for f in frame_ids], np.int64)
    starts = np.concatenate([[0], np.cumsum(arrays["counts"])]).astype(np.int64)
    region_rows = (np.concatenate([np.arange(starts[r], starts[r + 1]) for r in rows]) if len(rows)
                   else np.zeros(0, np.int64))
    out = {key: arrays[key][rows] for key in ("frame_ids", "descriptors", "counts", "map_hw")}
    out.update({key: arrays[key][region_rows] for key in ("boxes", "scores", "region_vectors")})
    return out


def _discovery_result(stored, mode: str, computed: int, resumed: int, seconds: float) -> DiscoveryResult:
    st = stored.manifest["stats"]
    return DiscoveryResult(mode, st["frames"], computed, resumed, st["regions"], st["mean_regions"],
                           st["frames_without_regions"], seconds,
                           st["seconds_per_frame"] if mode != "unchanged" else 0.0,
                           st["timings"] if mode != "unchanged" else {}, stored.version,
                           stored.manifest["graph"]["version"], str(stored.directory.parent))


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
    the lake sources or the work folder (objret.roots; anything else is a ReportError naming the field)."""
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


def push_mined(ws: Workspace, report: FailureReport, outcome: MiningOutcome) -> PushResult:
    """Push the mined frames with their boxes and provenance to the retraining dataset (idempotent)."""
    mined_frames = [MinedFrame(frame_id=k["frame_id"], uri=k["uri"], image_uri=k["image_uri"], width=k["width"],
                               height=k["height"], score=k["score"], box=tuple(k["box"]), rank=k["rank"],
                               frame_index=k["frame_index"], time_s=k["time_s"],
                               evidence={**k["evidence"], "near_duplicates": len(k["duplicates"])})
                    for k in outcome.mined]
    registry = ws.dataset_registry
    with registry.lock():   # concurrent mining runs take turns: each push builds on the one before
        rejected = rejected_frames(str(registry.dataset_dir), report.report_id)   # by a review: never again
        mined_frames = [f for f in mined_frames if f.frame_id not in rejected]
        result = push(str(registry.dataset_dir), report, mined_frames, outcome.provenance,
                      copy_frames=bool(ws.params.section("dataset").get("copy_frames", True)),
                      endpoint_url=ws.s3_endpoint_url)
        # Every call: a push that changed nothing maps to the version it already is (and a version a killed
        # run did not record is recorded now).
        version = registry.commit({"report_id": report.report_id, "annotations_sha": result.version})
        if ws.dataset_root != str(registry.dataset_dir):
            _publish(ws, version)
            result = replace(result, root=ws.dataset_root,
                             annotations_uri=storage.join(ws.dataset_root, ANNOTATIONS_FILE))
    return replace(result, dvc_md5=version.md5, dvc_version=version.number, dvc_file=version.dvc_file,
                   dvc_pushed=version.pushed, rejected=len(outcome.mined) - len(mined_frames))


def _publish(ws: Workspace, version) -> None:
    """The registry's dataset published to dataset.root (call with the registry's lock held). When the store
    fails, the error says what is safe: the version is in the registry, readers of dataset.root still see the
    previous one whole (annotations.json is written last), and the next push or review publishes it."""
    registry = ws.dataset_registry
    try:
        publish(str(registry.dataset_dir), ws.dataset_root, ws.s3_endpoint_url)
    except StoreError as exc:
        raise StoreError(f"dataset version {version.number} ({version.md5}) is saved in {registry.root} but is not "
                         f"published to {ws.dataset_root} yet (readers there see the previous version; the next "
                         f"push publishes it): {exc}") from exc


def review_page(ws: Workspace, outcome: MiningOutcome, run: dict | None = None) -> tuple[str, str]:
    """The mining run's review page (objret.review) in its run folder and beside the dataset
    (Workspace.reviews_root); returns both locations. ``run``: what else to show and export (MLflow run, dataset
    version)."""
    local = str(Path(outcome.run_dir) / "review.html")
    beside = storage.join(ws.reviews_root, f"{outcome.report_id}.html")
    write_review_page(outcome.mined_json, [local, beside], run, ws.s3_endpoint_url)
    return local, beside


def apply_review(ws: Workspace, decisions: Decisions) -> ApplyResult:
    """A review's decisions applied to the retraining dataset as a new version: the rejected frames' annotations
    removed, the rejections remembered (objret.decisions), then versioned and published as a push is."""
    registry = ws.dataset_registry
    with registry.lock():
        result = apply_decisions(str(registry.dataset_dir), decisions)
        version = registry.commit({"report_id": decisions.report_id, "annotations_sha": result.version,
                                   "review": {"accepted": result.accepted, "rejected": result.rejected,
                                              "removed": result.removed}})
        if ws.dataset_root != str(registry.dataset_dir):
            _publish(ws, version)
            result = replace(result, root=ws.dataset_root)
    return replace(result, dvc_md5=version.md5, dvc_version=version.number, dvc_file=version.dvc_file,
                   dvc_pushed=version.pushed)


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
