"""Region graph + Katz centrality (003 sec. 3.6-3.7) at growing lake sizes: time per step, peak memory, k-NN
recall, growth exponent, and incremental refresh vs full build.

    python benchmarks/graph_scale.py [--sizes 10000,100000,1000000] [--dim 256] [--k 50]

Synthetic regions: --clusters (2000) Gaussian clusters on the unit sphere (noise norm 0.6, cosine ~0.7 inside a
cluster), L2-normalised float32, seeded. Each size runs in its own process so that its peak RSS
(ru_maxrss: the vectors themselves included, and reported apart) is its own. Per size:

  graph_s      objret.graph.knn.build_region_graph with the library defaults (exact k-NN up to
               EXACT_MAX rows, IVF-Flat above), split into its steps (k-means, assignment, search, sparse
               assembly, connected components)
  katz_s       objret.graph.centrality.katz_centrality (CG to relative residual 1e-6), with its iterations
  total_s      graph_s + katz_s: the goal is 1M regions in under 10 minutes and 8 GB on a 2-core CPU
  recall       k-NN recall vs exact on 1000 seeded rows (1.0 for exact lists; timed apart)
  refresh_s    refresh_region_graph after appending --new-fraction (1%) new regions, vs graph_s (the full
               build of the N old rows; a build of N * 1.01 rows costs the same to within noise)

The growth exponent is the least-squares slope of log(seconds) against log(N) over the sizes run.
Results go to benchmarks/results/graph_scale.json.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "graph_scale.json"
GOAL_SECONDS, GOAL_GB, GOAL_N = 600, 8, 1_000_000


def clustered(n: int, dim: int, centres: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), np.float32)
    for s in range(0, n, 100_000):   # in chunks: 1M x 256 is 1 GB already
        m = min(100_000, n - s)
        x = centres[rng.integers(0, len(centres), m)]
        x += rng.standard_normal((m, dim), dtype=np.float32) * (0.6 / math.sqrt(dim))
        out[s:s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux reports KiB


def run_one(n: int, dim: int, k: int, n_clusters: int, new_fraction: float) -> dict:
    """One size, in this process."""
    import faiss

    from objret.graph.centrality import katz_centrality
    from objret.graph.knn import build_region_graph, refresh_region_graph

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((n_clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    n_new = max(1, int(n * new_fraction))
    x = np.empty((n + n_new, dim), np.float32)
    x[:n] = clustered(n, dim, centres, seed=1)
    x[n:] = clustered(n_new, dim, centres, seed=2)
    rss_data = peak_rss_mb()

    graph = build_region_graph(x[:n], k=k, recall_sample=1000)
    katz = katz_centrality(graph.matrix)
    peak_build = peak_rss_mb()
    t = time.perf_counter()
    refreshed = refresh_region_graph(graph, x)
    refresh_s = time.perf_counter() - t
    return {
        "n": n, "dim": dim, "k": k, "kind": graph.knn.kind, "threads": faiss.omp_get_max_threads(),
        "nlist": None if graph.knn.centroids is None else len(graph.knn.centroids),
        "nprobe": None if graph.knn.probes is None else graph.knn.probes.shape[1],
        "graph_s": graph.build_seconds, "steps": graph.timings,
        "katz_s": katz.seconds, "katz_iterations": katz.iterations, "katz_residual": katz.residual_norm,
        "katz_relative_residual": katz.relative_residual, "katz_converged": katz.converged,
        "total_s": graph.build_seconds + katz.seconds,
        "recall": graph.recall, "edges": graph.edges, "mean_degree": graph.mean_degree,
        "isolated": graph.isolated, "components": graph.components,
        "n_new": n_new, "refresh_s": refresh_s, "refresh_steps": refreshed.timings,
        "refresh_vs_full": refresh_s / graph.build_seconds,
        "data_mb": x.nbytes / 2**20, "rss_after_data_mb": rss_data,
        "peak_rss_build_mb": peak_build, "peak_rss_mb": peak_rss_mb(),
    }


def growth_exponent(rows: list[dict], key: str) -> float | None:
    """Least-squares slope of log(rows[key]) on log(n)."""
    points = [(r["n"], r[key]) for r in rows if r.get(key)]
    if len(points) < 2:
        return None
    n, y = np.log([p[0] for p in points]), np.log([p[1] for p in points])
    return float(np.polyfit(n, y, 1)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--clusters", type=int, default=2000)
    parser.add_argument("--new-fraction", type=float, default=0.01)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)   # internal: run one size, print JSON
    args = parser.parse_args()

    if args.one:
        print(json.dumps(run_one(args.one, args.dim, args.k, args.clusters, args.new_fraction)))
        return

    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        command = [sys.executable, __file__, "--one", str(n), "--dim", str(args.dim), "--k", str(args.k),
                   "--clusters", str(args.clusters), "--new-fraction", str(args.new_fraction)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            print(f"n={n} failed (exit {done.returncode}):\n{done.stderr[-3000:]}", file=sys.stderr)
            rows.append({"n": n, "error": done.stderr[-3000:]})
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print_row(rows[-1])

    ok = [r for r in rows if "error" not in r]
    summary = {key: growth_exponent(ok, key) for key in ("graph_s", "katz_s", "total_s", "refresh_s")}
    goal = next((r for r in ok if r["n"] == GOAL_N), None)
    result = {
        "dim": args.dim, "k": args.k, "clusters": args.clusters, "new_fraction": args.new_fraction,
        "rows": rows, "growth_exponent": summary,
        "goal": {"n": GOAL_N, "seconds": GOAL_SECONDS, "gb": GOAL_GB,
                 "met": None if goal is None else bool(goal["total_s"] < GOAL_SECONDS
                                                       and goal["peak_rss_mb"] < GOAL_GB * 1024)},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print("growth exponent (time ~ N^e): " + ", ".join(f"{k} {v:.2f}" for k, v in summary.items() if v))
    print(f"goal (1M in < {GOAL_SECONDS} s and < {GOAL_GB} GB): "
          f"{'not run' if goal is None else ('met' if result['goal']['met'] else 'NOT met')}")
    print(f"wrote {RESULTS}")


def print_row(r: dict) -> None:
    if not hasattr(print_row, "header"):
        print_row.header = True
        print(f"{'N':>9} {'kind':>5} {'graph s':>8} {'katz s':>7} {'iters':>5} {'total s':>8} {'recall':>6} "
              f"{'deg':>5} {'peak MB':>8} {'refresh s':>9} {'refresh/full':>12}")
    print(f"{r['n']:>9} {r['kind']:>5} {r['graph_s']:>8.1f} {r['katz_s']:>7.1f} {r['katz_iterations']:>5} "
          f"{r['total_s']:>8.1f} {r['recall']:>6.3f} {r['mean_degree']:>5.1f} {r['peak_rss_mb']:>8.0f} "
          f"{r['refresh_s']:>9.1f} {r['refresh_vs_full']:>12.3f}", flush=True)


if __name__ == "__main__":
    main()
