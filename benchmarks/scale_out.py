"""Feature caching + region extraction: one process against a local Dask cluster (scale_out), same frames.

    python benchmarks/scale_out.py --bench ../shared/bench --frames 96 --workers 2

Three runs, each into a work folder of its own holding the same lake: (1) the single-process steps
(objret.features_step.features, .regions); (2) the scale-out flow on a cluster already running with its workers
warmed up (torch imported, backbone built), reached at its address; (3) the scale-out flow as build-index runs
it, starting its local cluster (worker start-up included). Prints wall times and writes
benchmarks/results/scale_out.json, with whether the Dask runs' maps and regions equal the single run's bit for bit.
Shards and region batches are made small (--shard-frames) so that the frames split into several chunks.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

for _key, _value in {"DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true",
                     "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                     "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}.items():
    os.environ.setdefault(_key, _value)


def _warm(params: dict, workdir: str) -> int:
    """On a worker: build its Workspace and backbone as a chunk would (kept for the chunks that follow)."""
    from objret.steps import chunks
    chunks.workspace(params, workdir).backbone
    return os.getpid()


def _same(a, b) -> bool:
    """Bit-identical maps (every layer) and regions of two work folders."""
    import numpy as np

    ids = [f.frame_id for f in a.lake.frames()]
    for layer in a.backbone.spec.layers:
        ma, mb = a.cache.load(ids, layer), b.cache.load(ids, layer)
        if not all(np.array_equal(ma[f], mb[f]) for f in ids):
            return False
    ta, tb = a.region_store.load(), b.region_store.load()
    return ta.frame_ids == tb.frame_ids and all(np.array_equal(getattr(ta, k), getattr(tb, k)) for k in
                                                ("owner", "boxes", "sources", "scores", "descriptors", "map_hw"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", default=str(Path(__file__).resolve().parents[2] / "shared" / "bench"))
    parser.add_argument("--set", default="pets09_s2l1", help="bench set whose frames are used")
    parser.add_argument("--frames", type=int, default=96)
    parser.add_argument("--backbone", default="efficientnet_lite2")
    parser.add_argument("--max-side", type=int, default=640)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shard-frames", type=int, default=16, help="feature shard = region batch = chunk size")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "scale_out.json"))
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="objret-scale-out-"))
    atexit.register(shutil.rmtree, tmp, True)   # registered before Prefect's server stop: runs after it
    os.environ.setdefault("PREFECT_HOME", str(tmp / "prefect"))   # not the user's Prefect database (read on import)

    import torch
    from distributed import Client, LocalCluster
    from prefect import flow

    from objret.steps import features as features_step, ingest as ingest_step, regions as regions_step
    from objret.config import load_params
    from objret.steps.workspace import Workspace
    from tasks import scale_out
    overrides = [f"features.backbone={args.backbone}", f"features.max_side={args.max_side}",
                 f"features.shard_size={args.shard_frames}", f"regions.batch={args.shard_frames}",
                 "scale_out.enabled=true", f"scale_out.n_workers={args.workers}",
                 f"scale_out.chunk_frames={args.shard_frames}"]
    images = sorted(Path(args.bench, args.set, "images").glob("*.jpg"))[: args.frames]
    lake_dir = tmp / "images"
    lake_dir.mkdir()
    for path in images:
        (lake_dir / path.name).symlink_to(path.resolve())

    def workspace(name: str, extra: list[str] = []) -> Workspace:
        ws = Workspace(load_params(None, overrides + extra), tmp / name)
        ingest_step.ingest(ws, [str(lake_dir)], progress=False)
        return ws

    @flow(name="start-prefect")
    def start_prefect() -> None:
        pass

    start_prefect()   # Prefect's (temporary) API server up before anything is timed

    single = workspace("single")
    load_before = os.getloadavg()[0]   # other people's work on the machine skews every figure
    t = time.perf_counter()
    feats = features_step.features(single, progress=False)
    single_features = time.perf_counter() - t
    t = time.perf_counter()
    regions_step.regions(single, progress=False)
    single_regions = time.perf_counter() - t

    local = dict(n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=":0")
    with scale_out.local_cluster_environ(), LocalCluster(**local) as cluster, Client(cluster) as client:
        warm_ws = workspace("dask-warm", [f"scale_out.address={cluster.scheduler_address}"])
        params = warm_ws.params.to_dict()
        pids = client.gather([client.submit(_warm, params, str(warm_ws.root), workers=[w], pure=False)
                              for w in client.scheduler_info()["workers"]])
        t = time.perf_counter()
        warm = scale_out.run(warm_ws)
        warm_total = time.perf_counter() - t
    assert len(set(pids)) == args.workers

    cold_ws = workspace("dask-cold")
    t = time.perf_counter()
    cold = scale_out.run(cold_ws)
    cold_total = time.perf_counter() - t

    def chunk_figures(out: dict) -> dict:
        done = out["features"]["chunks"] + out["regions"]["chunks"]
        return {"features_chunks": len(out["features"]["chunks"]), "regions_chunks": len(out["regions"]["chunks"]),
                "workers_used": len(scale_out.workers(done)), "features_s": out["features"]["seconds"]}

    n = len(images)
    figures = {
        "frames": n, "backbone": args.backbone, "max_side": args.max_side, "workers": args.workers,
        "chunk_frames": args.shard_frames, "machine": platform.machine(), "cpus": os.cpu_count(),
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "single_torch_threads": torch.get_num_threads(), "worker_torch_threads": 1,
        "single": {"features_s": single_features, "regions_s": single_regions,
                   "total_s": single_features + single_regions, "computed": feats.computed},
        "dask_warm": {"total_s": warm_total, **chunk_figures(warm), "identical": _same(single, warm_ws)},
        "dask_cold": {"total_s": cold_total, **chunk_figures(cold), "identical": _same(single, cold_ws)},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(figures, indent=1) + "\n")
    s, w, c = figures["single"], figures["dask_warm"], figures["dask_cold"]
    print(f"{n} frames of {args.set}, {args.backbone} at {args.max_side} px, {os.cpu_count()} CPUs, chunks of "
          f"{args.shard_frames} frames; load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    print(f"  single process ({torch.get_num_threads()} torch threads): features {s['features_s']:6.1f} s, "
          f"regions {s['regions_s']:6.1f} s, total {s['total_s']:6.1f} s")
    print(f"  Dask, {args.workers} warm workers   : features {w['features_s']:6.1f} s, total {w['total_s']:6.1f} s "
          f"({s['total_s'] / w['total_s']:.2f}x), identical: {w['identical']}")
    print(f"  Dask, cluster started  : total {c['total_s']:6.1f} s ({s['total_s'] / c['total_s']:.2f}x), "
          f"identical: {c['identical']}")


if __name__ == "__main__":
    main()
