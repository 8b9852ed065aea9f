"""RegionIndex at growing lake sizes: build time, add rate, query latency, recall vs flat, memory.

    python benchmarks/region_index_scale.py [--sizes 10000,100000,1000000] [--dim 256] [--queries 100]

Synthetic lake: 1000 Gaussian clusters on the unit sphere (noise norm 0.6, so regions of one cluster have
cosine ~0.7 to each other), 30 regions a frame, L2-normalised float32. Queries are fresh draws from the
same clusters. Each (size, kind) runs in its own process so that its peak RSS (ru_maxrss, which includes
the lake's own float32 vectors, reported apart) is its own. Per run:

  build_s     adding the first 90% of the regions in one call (for ivfpq: flat until trained, training on a
              sample, then encoding everything)
  add_rate    regions/s of adding the last 10% (new frames) to the built index
  query_ms    median (and p90) over the queries of one best_frames(q, k_frames=100) call, one query at a time
  recall      |top-100 frames of the kind & top-100 frames of flat| / 100, averaged over the queries
  B/region    RegionIndex.bytes_per_region() (serialized faiss index + owner, box, frame ids)

Kinds: flat, ivfpq (IVF-PQ with the default sq8 re-ranking), ivfpq-pq (PQ codes only, refine=None), hnsw.
hnsw is skipped at a size where its build is predicted (from the previous size) to exceed --max-build-s,
and any run whose predicted build would take the whole run past --budget-s; both are printed and recorded.
Results go to benchmarks/results/region_index_scale.json.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REGIONS_PER_FRAME = 30
N_CLUSTERS = 1000
K_FRAMES = 100
# How build time grows with n, to predict the next size's build from this one's: flat is a copy, HNSW
# inserts cost ~log n each, IVF-PQ assigns every region to nlist ~ 4*sqrt(n) lists (n^1.5) but at 100k its
# fixed PQ training still dominates. ivfpq-pq builds exactly like ivfpq, so it is predicted from that run.
BUILD_GROWTH = {"flat": 1.0, "ivfpq": 1.2, "ivfpq-pq": 1.2, "hnsw": 1.1}
SIBLING = {"ivfpq-pq": "ivfpq"}
KIND_ARGS = {"flat": {"kind": "flat"}, "ivfpq": {"kind": "ivfpq"},
             "ivfpq-pq": {"kind": "ivfpq", "refine": None}, "hnsw": {"kind": "hnsw"}}


def clustered(n: int, dim: int, seed: int, centres: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), np.float32)
    for s in range(0, n, 100_000):   # in chunks: the lake alone is 1 GB at 1M x 256
        m = min(100_000, n - s)
        x = centres[rng.integers(0, len(centres), m)]
        x += rng.standard_normal((m, dim), dtype=np.float32) * (0.6 / math.sqrt(dim))
        out[s:s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def lake(n: int, dim: int, n_queries: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((N_CLUSTERS, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    frame_ids = [f"frame-{i // REGIONS_PER_FRAME:08d}" for i in range(n)]
    return frame_ids, clustered(n, dim, 1, centres), clustered(n_queries, dim, 2, centres)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux reports KiB


def run_one(n: int, kind: str, dim: int, n_queries: int) -> dict:
    """One (size, kind) measurement, in this process."""
    from objret.index.region_index import RegionIndex

    frame_ids, x, queries = lake(n, dim, n_queries)
    rss_data = peak_rss_mb()
    # Split on a frame boundary so the last 10% are whole new frames.
    split = (int(n * 0.9) // REGIONS_PER_FRAME) * REGIONS_PER_FRAME
    index = RegionIndex(dim, use_gpu=False, **KIND_ARGS[kind])
    t = time.perf_counter()
    index.add(frame_ids[:split], x[:split])
    build_s = time.perf_counter() - t
    t = time.perf_counter()
    index.add(frame_ids[split:], x[split:])
    add_s = time.perf_counter() - t
    del x
    index.best_frames(queries[0], K_FRAMES)   # warm-up
    times, tops = [], []
    for q in queries:
        t = time.perf_counter()
        hits = index.best_frames(q, K_FRAMES)
        times.append(time.perf_counter() - t)
        tops.append([int(h.frame_id[6:]) for h in hits])
    rss_peak = peak_rss_mb()
    return {"n": n, "kind": kind, "active": index.active, "nlist": index.nlist if index.active == "ivfpq" else None,
            "build_s": build_s, "add_rate": (n - split) / add_s, "query_ms": 1000 * statistics.median(times),
            "query_p90_ms": 1000 * float(np.percentile(times, 90)), "bytes_per_region": index.bytes_per_region(),
            "data_mb": n * dim * 4 / 2**20, "rss_after_data_mb": rss_data, "peak_rss_mb": rss_peak, "tops": tops}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--kinds", default="flat,ivfpq,hnsw,ivfpq-pq")
    parser.add_argument("--max-build-s", type=float, default=180.0, help="hnsw build limit")
    parser.add_argument("--budget-s", type=float, default=540.0, help="whole-run limit")
    parser.add_argument("--threads", type=int, default=1,
                        help="faiss OpenMP threads (default 1: on a shared 2-core box OpenMP barriers stall, "
                             "e.g. a 12k-region flat query took 15 ms on 2 threads, 0.3 ms on 1)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "region_index_scale.json"))
    parser.add_argument("--one", help=argparse.SUPPRESS)   # "n,kind,json_path": a child run
    args = parser.parse_args()

    if args.one:
        n, kind, path = args.one.split(",")
        import faiss
        faiss.omp_set_num_threads(args.threads)
        Path(path).write_text(json.dumps(run_one(int(n), kind, args.dim, args.queries)))
        return

    sizes = [int(s) for s in args.sizes.split(",")]
    kinds = args.kinds.split(",")
    if "flat" not in kinds:
        kinds.insert(0, "flat")   # the recall reference
    rows, skipped, last_build = [], [], {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            truth = None
            for kind in kinds:
                predicted, why = 0.0, ""
                if last_build.get(SIBLING.get(kind), (0,))[0] == n:
                    predicted = last_build[SIBLING[kind]][1]
                elif kind in last_build:
                    prev_n, prev_s = last_build[kind]
                    predicted = prev_s * (n / prev_n) ** BUILD_GROWTH[kind]
                if kind == "hnsw" and predicted > args.max_build_s:
                    why = f"build predicted {predicted:.0f} s > {args.max_build_s:.0f} s"
                elif time.perf_counter() - started + predicted > args.budget_s:
                    why = f"build predicted {predicted:.0f} s would pass the {args.budget_s:.0f} s budget"
                if why:
                    skipped.append({"n": n, "kind": kind, "predicted_build_s": predicted, "why": why})
                    print(f"skip {kind} at {n}: {why}", flush=True)
                    continue
                path = Path(tmp) / f"{n}-{kind}.json"
                subprocess.run([sys.executable, __file__, "--one", f"{n},{kind},{path}", "--dim", str(args.dim),
                                "--queries", str(args.queries), "--threads", str(args.threads)], check=True)
                row = json.loads(path.read_text())
                tops = row.pop("tops")
                if kind == "flat":
                    truth = tops
                row["recall_frames"] = float(np.mean([len(set(a) & set(b)) / max(1, len(b))
                                                      for a, b in zip(tops, truth)]))
                last_build[kind] = (n, row["build_s"])
                rows.append(row)
                print(f"  {n:>9} {kind:9s} build {row['build_s']:7.1f} s  query {row['query_ms']:7.2f} ms  "
                      f"recall {row['recall_frames']:.3f}", flush=True)

    slopes = {}
    for kind in kinds:
        pts = [(r["n"], r["query_ms"]) for r in rows if r["kind"] == kind]
        slopes[kind] = [{"from": a[0], "to": b[0], "slope": math.log(b[1] / a[1]) / math.log(b[0] / a[0])}
                        for a, b in zip(pts, pts[1:])]

    print(f"\nRegionIndex scale, d={args.dim}, {REGIONS_PER_FRAME} regions/frame, {args.queries} queries, "
          f"best_frames k_frames={K_FRAMES}; 2-core CPU shared with other jobs, faiss threads {args.threads}")
    header = (f"{'regions':>9} {'kind':9s} {'build s':>8} {'add reg/s':>10} {'query ms':>9} {'p90 ms':>8} "
              f"{'recall@100':>10} {'B/region':>9} {'peak RSS MB':>11} {'(data MB)':>9}")
    print(header + "\n" + "-" * len(header))
    for r in rows:
        print(f"{r['n']:>9} {r['kind']:9s} {r['build_s']:8.2f} {r['add_rate']:10.0f} {r['query_ms']:9.2f} "
              f"{r['query_p90_ms']:8.2f} {r['recall_frames']:10.3f} {r['bytes_per_region']:9.1f} "
              f"{r['peak_rss_mb']:11.0f} {r['data_mb']:9.0f}")
    for s in skipped:
        print(f"{s['n']:>9} {s['kind']:9s} skipped: {s['why']}")
    print("\nquery latency growth (log-log slope of median query ms vs regions):")
    for kind, segs in slopes.items():
        if segs:
            print(f"  {kind:9s} " + "   ".join(f"{s['from']}->{s['to']}: {s['slope']:.2f}" for s in segs))
    total = time.perf_counter() - started
    print(f"\ntotal {total:.0f} s")

    result = {"dim": args.dim, "threads": args.threads, "regions_per_frame": REGIONS_PER_FRAME, "clusters": N_CLUSTERS,
              "queries": args.queries, "k_frames": K_FRAMES, "rows": rows, "skipped": skipped,
              "query_latency_slopes": slopes, "total_s": total}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
