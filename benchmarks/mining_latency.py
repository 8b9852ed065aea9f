"""Mining latency per failure report over the bench lake (every set of the bench as one lake).

    python benchmarks/mining_latency.py --bench ../shared/bench --workdir .objret-bench --reports 20

Ingests the bench and caches its features if that was not done yet (a one-off of several minutes), builds
the index, then mines the first paste_visible and video instance queries of the bench as failure reports
(without pushing) and prints the latency split. Results go to benchmarks/results/mining_latency.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from objret import pipeline
from objret.bench import load_bench
from objret.config import load_params
from objret.report import parse_report
from objret.workspace import Workspace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", default=str(Path(__file__).resolve().parents[2] / "shared" / "bench"))
    parser.add_argument("--workdir", default=".objret-bench")
    parser.add_argument("--reports", type=int, default=20)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "mining_latency.json"))
    args = parser.parse_args()

    ws = Workspace(load_params(), args.workdir)
    bench = load_bench(args.bench)
    pipeline.ingest(ws, [str(Path(args.bench, s).resolve()) for s in bench.sets])
    pipeline.features(ws)
    index = pipeline.build_index(ws)
    queries = [q for q in bench.queries if q.kind == "instance"][: args.reports]
    timings = []
    for q in queries:
        report = parse_report({"report_id": f"bench-{q.id}", "detector": {"name": "bench", "version": "1"},
                               "frame": {"uri": str(Path(bench.images[q.key].path).resolve())},
                               "box": list(q.bbox), "class_name": q.category, "failure_kind": "false_negative"})
        timings.append(pipeline.mine(ws, report, progress=False).timings)
    keys = list(timings[0])
    summary = {k: {"median_s": statistics.median(t[k] for t in timings), "max_s": max(t[k] for t in timings)}
               for k in keys}
    figures = {"lake_frames": index.frames, "reports": len(timings), "method": ws.params.mining.method, **summary}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(figures, indent=1) + "\n")
    print(f"{len(timings)} reports mined over a lake of {index.frames} frames ({figures['method']})")
    for k in keys:
        print(f"  {k:12s} median {summary[k]['median_s'] * 1000:7.0f} ms   max {summary[k]['max_s'] * 1000:7.0f} ms")


if __name__ == "__main__":
    main()
