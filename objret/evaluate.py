"""Run the mining methods over a benchmark folder (bench format) as one lake and score them."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from objret.bench import Bench, Query, load_bench
from objret.errors import ObjretError
from objret.features import FeatureCache
from objret.lakemaps import load_lake_maps
from objret.metrics import EvalReport, evaluate
from objret.lake import load_image
from objret.mining import TEMPLATE_METHODS, rank
from objret.query import QueryObject, mirrored_view


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
               mining_params: dict, progress: bool = True) -> tuple[dict[str, list[dict]], float]:
    """Rank every gallery image of every query with ``method``; results in the bench README's format."""
    row_of = {fid: i for i, fid in enumerate(lake_maps.stack.frame_ids)}
    results: dict[str, list[dict]] = {}
    start = time.perf_counter()
    for q in tqdm(bench.queries, desc=method, unit="query", disable=not progress, dynamic_ncols=True):
        ranking = rank(method, query_of(q), lake_maps, mining_params)
        entries = []
        for key in bench.gallery_keys(q):
            row = row_of[frame_of[key]]
            entries.append({"set": key[0], "image_id": key[1], "score": float(ranking.scores[row]),
                            "bbox": [round(float(v), 2) for v in ranking.boxes[row]]})
        entries.sort(key=lambda e: -e["score"])
        results[q.id] = entries
    return results, (time.perf_counter() - start) / max(1, len(bench.queries))


def evaluate_methods(bench: Bench, lake, cache: FeatureCache, methods: list[str], mining_params: dict,
                     progress: bool = True, regions=None, region_params: dict | None = None,
                     whitening=None, backbone=None) -> list[MethodRun]:
    """Every method over the same cached maps; ``regions`` (a RegionTable) is needed by fused/regions, the
    ``backbone`` by ``mining.mirror`` (the mirrored query view)."""
    frame_of = bench_frame_ids(bench, lake)
    frames = {f.frame_id: f for f in lake.frames()}
    position = {fid: i for i, fid in enumerate(frames)}
    ids = sorted(set(frame_of.values()), key=position.__getitem__)
    if regions is None and {"fused", "regions"} & set(methods):
        raise ObjretError("methods fused/regions need the lake's regions: run the regions step first")
    lake_maps = load_lake_maps(cache, [frames[i] for i in ids], mining_params["layer"],
                               gem_p=mining_params.get("gem_p", 3.0), regions=regions,
                               region_params=region_params, whitening=whitening, with_rmac="rmac" in methods)
    layers = sorted({mining_params["layer"], "stride32", (region_params or {}).get("layer", "stride32")})

    mirror = bool(mining_params.get("mirror")) and backbone is not None

    def query_for(method: str) -> Callable[[Query], QueryObject]:
        def query_of(q: Query) -> QueryObject:
            fid, image = frame_of[q.key], bench.images[q.key]
            query = QueryObject({layer: cache.load([fid], layer)[fid] for layer in layers},
                                (image.width, image.height), q.bbox, frame_id=fid)
            if mirror and method in TEMPLATE_METHODS:   # a backbone pass only where a template is matched
                query.mirror = mirrored_view(backbone, load_image(str(image.path)), q.bbox)
            return query
        return query_of

    runs = []
    for method in methods:
        results, spq = run_method(method, bench, frame_of, lake_maps, query_for(method), mining_params, progress)
        runs.append(MethodRun(method, results, evaluate(bench, results), spq))
    return runs


__all__ = ["MethodRun", "bench_frame_ids", "evaluate_methods", "load_bench", "run_method"]
