"""Run the mining methods over a benchmark folder (bench format) as one lake and score them."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from objret.errors import ObjretError
from objret.eval.bench import Bench, Query, load_bench
from objret.eval.metrics import EvalReport, evaluate
from objret.features.cache import FeatureCache
from objret.graph.diffusion import GraphDiffusion
from objret.ingest.lake import load_image
from objret.mining.lakemaps import load_lake_maps
from objret.mining.methods import TEMPLATE_METHODS, rank
from objret.mining.evidence import query_region_vector
from objret.mining.query import QueryObject, mirrored_view


@dataclass
class MethodRun:
    method: str
    results: dict[str, list[dict]]
    report: EvalReport
    seconds_per_query: float


def bench_frame_ids(bench: Bench, lake) -> dict[tuple[str, int], str]:
    """Map each bench image (set, image_id) to its lake frame id (the lake must hold every bench image)."""
    out, missing = {}, []
    for key, image in bench.images.items():
        frame = lake.find(str(Path(image.path).resolve()))
        if frame is None:
            missing.append(str(image.path))
        else:
            out[key] = frame.frame_id
    if missing:
        raise ObjretError(f"{len(missing)} bench images are not in the lake (first: {missing[0]}); ingest the bench")
    return out


def run_method(method: str, bench: Bench, frame_of: dict, lake_maps, query_of: Callable[[Query], QueryObject],
               mining_params: dict, progress: bool = True,
               diffusion: GraphDiffusion | None = None) -> tuple[dict[str, list[dict]], float]:
    """Rank every gallery image of every query with ``method``; results in the bench README's format.

    With ``diffusion`` (a GraphDiffusion over the lake's region graph), ``fused`` fuses each query's diffusion
    scores as evidence (objret.mining.fusion.rank_fused); the other methods ignore it.
    """
    row_of = {fid: i for i, fid in enumerate(lake_maps.stack.frame_ids)}
    use_diffusion = diffusion is not None and method == "fused"
    graph_rows = diffusion.rows_for(lake_maps.stack.frame_ids) if use_diffusion else None
    results: dict[str, list[dict]] = {}
    start = time.perf_counter()
    for q in tqdm(bench.queries, desc=method, unit="query", disable=not progress, dynamic_ncols=True):
        query = query_of(q)
        scores = (diffusion.scores(query_region_vector(query, lake_maps.regions), graph_rows)[0]
                  if use_diffusion else None)
        ranking = rank(method, query, lake_maps, mining_params, diffusion=scores)
        results[q.id] = gallery_entries(bench, q, frame_of, row_of, ranking.scores, ranking.boxes)
    return results, (time.perf_counter() - start) / max(1, len(bench.queries))


def gallery_entries(bench: Bench, q: Query, frame_of: dict, row_of: dict, scores, boxes) -> list[dict]:
    """A query's gallery images with their frame's score and box, best first (the bench's result format)."""
    entries = []
    for key in bench.gallery_keys(q):
        row = row_of[frame_of[key]]
        entries.append({"set": key[0], "image_id": key[1], "score": float(scores[row]),
                        "bbox": [round(float(v), 2) for v in boxes[row]]})
    entries.sort(key=lambda e: -e["score"])
    return entries


def bench_query(bench: Bench, q: Query, frame_of: dict, cache: FeatureCache, layers, backbone=None) -> QueryObject:
    """A bench query as mining sees it: its frame's cached maps, the box, and the mirror view when a backbone
    is given."""
    fid, image = frame_of[q.key], bench.images[q.key]
    query = QueryObject({layer: cache.load([fid], layer)[fid] for layer in layers},
                        (image.width, image.height), q.bbox, frame_id=fid)
    if backbone is not None:
        query.mirror = mirrored_view(backbone, load_image(str(image.path)), q.bbox)
    return query


def bench_lake_maps(bench: Bench, lake, cache: FeatureCache, mining_params: dict, regions=None,
                    region_params: dict | None = None, whitening=None, with_rmac: bool = False):
    """Every bench image's frame id, and the maps of those frames (in lake order) as the methods read them."""
    frame_of = bench_frame_ids(bench, lake)
    frames = {f.frame_id: f for f in lake.frames()}
    position = {fid: i for i, fid in enumerate(frames)}
    ids = sorted(set(frame_of.values()), key=position.__getitem__)
    return frame_of, load_lake_maps(cache, [frames[i] for i in ids], mining_params["layer"],
                                    gem_p=mining_params.get("gem_p", 3.0), regions=regions,
                                    region_params=region_params, whitening=whitening, with_rmac=with_rmac)


def evaluate_methods(bench: Bench, lake, cache: FeatureCache, methods: list[str], mining_params: dict,
                     progress: bool = True, regions=None, region_params: dict | None = None,
                     whitening=None, backbone=None, diffusion: GraphDiffusion | None = None,
                     discovery=None) -> list[MethodRun]:
    """Every method over the same cached maps; ``regions`` (a RegionTable) is needed by fused/regions, the
    ``backbone`` by ``mining.mirror`` (the mirrored query view); ``diffusion`` (over the lake's region graph)
    adds diffusion evidence to ``fused``; ``discovery`` (an objret.graph.discovery.StoredDiscovery: the lake's OS.EGM
    descriptors) is needed by method ``discovery``."""
    if regions is None and {"fused", "regions"} & set(methods):
        raise ObjretError("methods fused/regions need the lake's regions: run the regions step first")
    if discovery is None and "discovery" in methods:
        raise ObjretError("method discovery needs the lake's OS.EGM descriptors: run build-index (index, graph, "
                          "discovery steps)")
    frame_of, lake_maps = bench_lake_maps(bench, lake, cache, mining_params, regions, region_params, whitening,
                                          with_rmac="rmac" in methods)
    if discovery is not None:
        from objret.graph.discovery import discovery_vectors

        frames = {f.frame_id: f for f in lake.frames()}
        lake_maps.discovery = discovery_vectors(discovery, [frames[i] for i in lake_maps.stack.frame_ids],
                                                (region_params or {}).get("layer", "stride32"), whitening)
        if not lake_maps.discovery.present.all():
            raise ObjretError(f"the OS.EGM descriptors ({discovery.directory}) lack "
                              f"{int((~lake_maps.discovery.present).sum())} bench frames: run build-index")
    layers = sorted({mining_params["layer"], "stride32", (region_params or {}).get("layer", "stride32")})

    mirror = bool(mining_params.get("mirror")) and backbone is not None

    def query_for(method: str) -> Callable[[Query], QueryObject]:
        # A backbone pass for the mirror view only where a template is matched.
        with_mirror = backbone if mirror and method in TEMPLATE_METHODS else None
        return lambda q: bench_query(bench, q, frame_of, cache, layers, with_mirror)

    runs = []
    for method in methods:
        results, spq = run_method(method, bench, frame_of, lake_maps, query_for(method), mining_params, progress,
                                  diffusion=diffusion)
        runs.append(MethodRun(method, results, evaluate(bench, results), spq))
    return runs


__all__ = ["MethodRun", "bench_frame_ids", "bench_lake_maps", "bench_query", "evaluate_methods", "gallery_entries", "load_bench",
           "run_method"]
