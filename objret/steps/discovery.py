"""Discovery step: the region graph + cached maps -> object saliency and OS.EGM descriptors of every frame."""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from objret.errors import ObjretError
from objret.index.region_index import RegionIndex, index_version
from objret.steps.graph import graph_nodes, object_saliency_function
from objret.steps.workspace import Workspace


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
    gp, rp = ws.params.graph, ws.params.regions
    knn = stored_graph.manifest["settings"]["knn"]
    search = "exact" if stored_graph.manifest["stats"]["kind"] == "exact" else f"ivf-nprobe{int(knn['nprobe'])}"
    return {"graph_version": stored_graph.version, "patch_search": search, "layer": rp.layer, "pooling": rp.pooling,
            "object_saliency": gp.object_saliency.model_dump(), "egm": gp.discovery.egm.model_dump()}


def discovery(ws: Workspace, progress: bool = True) -> DiscoveryResult:
    """Object discovery over the region graph (003 sec. 3.8-3.9) for every frame of the region index: object
    saliency (eq. 14) -> OS.EGM regions -> max-pool, L2, sum, whiten (or L2) descriptor; saved as one version
    beside the graph (objret.graph.discovery.save_discovery), keyed to the graph version and the parameters.

    A run with the same graph version and parameters does nothing. A new graph version (a graph refreshed with
    new frames changes every region's centrality, so every frame's object saliency) recomputes every frame.
    Frames are computed in parts saved as they finish; an interrupted run's parts are taken over by the next run
    for the same graph and parameters. ObjretError when the index or its graph is missing.
    """
    import hashlib
    import shutil

    from objret.graph import discovery as disc
    from objret.graph.store import current_version, load_graph
    from objret.regions.saliency import feature_saliency

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

    egm = ws.params.graph.discovery.egm
    layer = settings["layer"]
    whitening_obj = ws.load_whitening()
    timings = {"nodes_s": 0.0, "load_s": 0.0, "object_saliency_s": 0.0, "os_egm_s": 0.0, "descriptor_s": 0.0}
    if todo:
        t = time.perf_counter()
        vectors, region_saliency, _ = graph_nodes(ws, index)
        saliency_of = object_saliency_function(ws, index, stored_graph, vectors, region_saliency)
        timings["nodes_s"] = time.perf_counter() - t
    chunk_size = ws.params.features.shard_size
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
    from objret.graph.discovery import discovery_vectors, load_discovery
    from objret.graph.store import load_graph

    stored = load_discovery(discovery_dir(ws))
    stored_graph = load_graph(ws.graph_dir())
    if stored is None or stored_graph is None or stored.manifest["graph"]["version"] != stored_graph.version:
        raise ObjretError(f"run build-index (with graph.discovery.enabled: true): no OS.EGM descriptors for the "
                          f"current region graph in {discovery_dir(ws)}")
    if stored.manifest["settings"] != discovery_settings(ws, stored_graph):
        raise ObjretError(f"run build-index (or `objret graph`): the OS.EGM descriptors in {discovery_dir(ws)} were "
                          "computed with other parameters (graph.object_saliency, graph.discovery.egm, regions)")
    return discovery_vectors(stored, frames, ws.params.regions.layer, ws.load_whitening())


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
