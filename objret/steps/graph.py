"""Graph step: the region index's vectors -> mutual k-NN region graph + Katz centrality, saved beside the index."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from objret.config import GraphParams
from objret.dataset.contact_sheet import save_png
from objret.errors import ObjretError
from objret.index.region_index import RegionIndex, index_version
from objret.ingest.decode import load_image
from objret.regions.encoding import RegionVectors
from objret.steps.workspace import Workspace


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
    only gained regions since (objret.graph.knn.refresh_region_graph); left alone when the index did not
    change. Node i is region i of the index, with the vector the index holds (re-encoded from the region store
    as build_index encodes it).
    """
    from objret.graph.centrality import katz_centrality
    from objret.graph.knn import build_region_graph, default_nlist, refresh_region_graph
    from objret.graph.store import current_version, load_graph, save_graph

    start = time.perf_counter()
    gp = ws.params.graph
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
            and not _outgrown(previous, n, gp.rebuild_growth)):
        full_nodes = int(previous.manifest.get("full_nodes", previous.nodes))
        built = refresh_region_graph(previous.knn, vectors, beta=float(knn_settings["beta"]),
                                     recall_sample=gp.recall_sample)
        mode, new_nodes = "refresh", n - previous.nodes
    else:
        exact_max = int(knn_settings["exact_max"])
        nprobe = int(knn_settings["nprobe"]) if n <= exact_max else min(int(knn_settings["nprobe"]), default_nlist(n))
        built = build_region_graph(vectors, k=k, beta=float(knn_settings["beta"]), exact_max=exact_max,
                                   nprobe=nprobe, recall_sample=gp.recall_sample)
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


def graph_settings(gp: GraphParams) -> dict:
    """The parameters a stored graph depends on: the k-NN lists' and the centrality's."""
    return {"knn": {"k": gp.k, "beta": gp.beta, "exact_max": gp.exact_max, "nprobe": gp.nprobe},
            "katz": {"alpha": gp.alpha, "tol": gp.cg.tol, "max_iter": gp.cg.max_iter}}


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
    rp = ws.params.regions
    encoder = RegionVectors(np.zeros((0, 0), np.float32), owner, np.zeros((0, 4), np.float32), rp.layer, rp.pooling,
                            ws.load_whitening())
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
    from objret.dataset.contact_sheet import saliency_panels
    from objret.graph.store import current_version, load_graph
    from objret.regions.saliency import feature_saliency
    from objret.regions.sources import SOURCES

    count = ws.params.graph.sample_frames if count is None else int(count)
    if count <= 0:
        return []
    index_dir = ws.current_index_dir()
    index = RegionIndex.load(index_dir)
    stored = load_graph(ws.graph_dir())
    if stored is None or stored.manifest["index"]["current"] != current_version(index_dir):
        raise ObjretError("no region graph for the current region index: run the graph step first")
    vectors, region_saliency, sources = graph_nodes(ws, index)
    layer = ws.params.regions.layer
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
        fmap = ws.cache.load([fid], layer)[fid].astype(np.float32)
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
    """``f(feature_map, frame_saliency=None) -> object saliency`` (003 eq. 14, objret.graph.centrality.object_saliency)
    of one frame's regions-layer map over the ``stored`` graph of ``index``: its nodes (``vectors``, ``region_saliency``
    from graph_nodes) and centrality, ``graph.object_saliency``'s exponents, patch and k, the graph's beta, the
    regions' pooling and whitening.

    The patches' k nearest regions are searched as the graph's own k-NN lists were: exactly (the region index)
    when the graph's lists are exact, else in an IVF-Flat over the graph's nodes with the graph's coarse centroids
    and lists, probing ``graph.nprobe`` lists (an exact search of ~300 patches a frame against 80k regions took
    ~2.5 s a frame on a 2-core CPU)."""
    from objret.graph.centrality import object_saliency

    osp = ws.params.graph.object_saliency
    whitening_obj = ws.load_whitening()
    search = patch_search(index, stored, vectors)
    settings = dict(whiten=whitening_obj.apply if whitening_obj is not None else None,
                    k=min(osp.k, len(vectors)), beta=float(stored.manifest["settings"]["knn"]["beta"]),
                    Theta=osp.Theta, theta=osp.theta, patch=osp.patch, pooling=ws.params.regions.pooling,
                    index=search)

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
    from objret.graph.knn_search import ivf as graph_ivf   # the graph's own IVF-Flat, from its stored lists

    ivf = graph_ivf(knn.centroids, [(np.ascontiguousarray(vectors, np.float32), knn.probes)])
    ivf.nprobe = min(int(stored.manifest["settings"]["knn"]["nprobe"]), len(knn.centroids))
    return ivf


class _IndexSearch:
    """A RegionIndex as the faiss-like ``search(x, k) -> (sims, ids)`` object_saliency takes."""

    def __init__(self, index: RegionIndex):
        self.index = index

    def search(self, x: np.ndarray, k: int):
        ids, sims = self.index.search(np.asarray(x, np.float32), k)
        return np.atleast_2d(sims), np.atleast_2d(ids)
