"""A shard's first-stage search, in the mining process against served by a Dask worker (scale_out.serve_shards).

    python benchmarks/lake_scale.py --workdir W --sizes 100000   # leaves the lake in W/scale/lake-100000
    python benchmarks/shard_serving.py --index W/scale/lake-100000/regions W/scale/lake-100000/cells

Each folder is one shard (a region index or a cell index as build-index saves it). For each, the searches a
report's shortlist makes (objret.index.frame_scoring.best_frames: one query vector, the nearest
8 x ``mining.shortlist`` regions by PQ code) are run with query vectors taken from the index itself (a random
region's stored vector plus noise): (1) in this process on the memory-mapped index, as mining reads an
unsharded lake (first pass from a cold page cache where the OS lets us drop it, then warm); (2) by a worker of a
local two-process Dask cluster holding the shard in memory (tasks/shard_serving.py), the mining process
reading nothing of it. Prints per-search latency p50/p95, the part of a served search spent outside the
worker's faiss call (Dask's round trip and the result's transfer), the worker's load time and the memory each
side holds; writes benchmarks/results/shard_serving.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "shard_serving.json"


def rss_mb(pid: int | None = None) -> float:
    import psutil

    return psutil.Process(pid or os.getpid()).memory_info().rss / 2**20


def drop_page_cache(folder: Path) -> bool:
    """Evict the folder's files from the page cache (posix_fadvise DONTNEED); False where that is not possible."""
    try:
        for path in folder.rglob("*"):
            if path.is_file():
                with open(path, "rb") as f:
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        return True
    except (AttributeError, OSError):
        return False


def percentiles(seconds: list[float]) -> dict:
    return {"p50_ms": float(np.percentile(seconds, 50)) * 1e3, "p95_ms": float(np.percentile(seconds, 95)) * 1e3}


def query_vectors(index, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q = index.vectors(rng.choice(len(index), n, replace=False))
    q = q + rng.normal(0, 0.05, q.shape).astype(np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def bench_shard(client, folder: Path, n_queries: int, k: int) -> dict:
    from objret.index.region_index import RegionIndex
    from tasks.shard_serving import ServedShards

    before = rss_mb()
    index = RegionIndex.load(folder, mapped=True)
    queries = query_vectors(index, n_queries)
    out = {"folder": folder.name, "parent": folder.parent.name, "regions": len(index), "frames": index.n_frames,
           "kind": index.active, "k_regions": k, "queries": n_queries,
           "disk_mb": sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20}

    cold = drop_page_cache(folder)
    here = {}
    for name in ("cold", "warm") if cold else ("warm",):
        seconds = []
        for q in queries:
            start = time.perf_counter()
            index.search(q, k, refine=False)
            seconds.append(time.perf_counter() - start)
        here[name] = percentiles(seconds)
    here["rss_growth_mb"] = rss_mb() - before
    out["here_mapped"] = here

    served = ServedShards(client, [folder], index.recipe)
    start = time.perf_counter()
    served(queries[:1], k, False)   # the worker loads the shard into memory
    load_s = time.perf_counter() - start
    seconds, outside = [], []
    for q in queries:
        start = time.perf_counter()
        (found,) = served(q[None], k, False)
        seconds.append(time.perf_counter() - start)
        outside.append(seconds[-1] - served.log[-1][0][1])
        ids_here, _ = index.search(q, k, refine=False)
        assert np.array_equal(found[0][0], ids_here), "served and local searches disagree"
    pid = served.log[-1][0][0]
    out["served"] = {**percentiles(seconds), "outside_faiss_ms_p50": float(np.median(outside)) * 1e3,
                     "first_search_with_load_s": load_s, "worker_rss_mb": rss_mb(pid), "identical_ids": True}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", nargs="+", required=True, help="saved region or cell index folders (one shard each)")
    parser.add_argument("--queries", type=int, default=40)
    parser.add_argument("--shortlist", type=int, default=1000,
                        help="mining.shortlist: searches ask 8x this many regions")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()

    from distributed import Client, LocalCluster

    from tasks.scale_out import local_cluster_environ

    with local_cluster_environ():
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0")
    client = Client(cluster)
    try:
        shards = [bench_shard(client, Path(f), args.queries, 8 * args.shortlist) for f in args.index]
    finally:
        client.close()
        cluster.close()
    result = {"command": "python benchmarks/shard_serving.py " + " ".join(
                  ["--index", *(f"{Path(f).parent.name}/{Path(f).name}" for f in args.index),
                   "--queries", str(args.queries), "--shortlist", str(args.shortlist)]),
              "machine": platform.machine(), "cpus": os.cpu_count(), "shards": shards}
    Path(args.out).write_text(json.dumps(result, indent=1))
    for s in shards:
        h, v = s["here_mapped"], s["served"]
        print(f"{s['parent']}/{s['folder']}: {s['regions']:,} regions of {s['frames']:,} frames ({s['kind']}, "
              f"{s['disk_mb']:.0f} MB), k={s['k_regions']}")
        for name in ("cold", "warm"):
            if name in h:
                print(f"  here, memory-mapped, {name}: p50 {h[name]['p50_ms']:.1f} ms, p95 {h[name]['p95_ms']:.1f} ms")
        print(f"  served by a worker: p50 {v['p50_ms']:.1f} ms, p95 {v['p95_ms']:.1f} ms "
              f"({v['outside_faiss_ms_p50']:.1f} ms outside faiss), load {v['first_search_with_load_s']:.1f} s, "
              f"worker RSS {v['worker_rss_mb']:.0f} MB; this process grew {h['rss_growth_mb']:.0f} MB mapped")


if __name__ == "__main__":
    main()
