"""Mining latency per failure report over the bench lake (every set of the bench as one lake).

    python benchmarks/mining_latency.py --bench ../shared/bench --workdir .objret-bench --reports 20

Ingests the bench and caches its features if that was not done yet (a one-off of several minutes), builds
the index, loads it once (``objret.steps.mine.open_search``, as a process serving reports does), then mines bench queries as
failure reports, half with boxes under mining.small_box and half above (without pushing), and prints the
latency split: query (the report's maps and mirror view, the shortlist), rank (template matching, fusion),
outputs (heat maps, contact sheet, mined.json). Results go to benchmarks/results/mining_latency.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from objret.steps import features as features_step, index as index_step, ingest as ingest_step, mine as mine_step
from objret.eval.bench import load_bench
from objret.config import load_params
from objret.mining.report import parse_report
from objret.steps.workspace import Workspace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", default=str(Path(__file__).resolve().parents[2] / "shared" / "bench"))
    parser.add_argument("--workdir", default=".objret-bench")
    parser.add_argument("--reports", type=int, default=20)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "mining_latency.json"))
    args = parser.parse_args()

    ws = Workspace(load_params(), args.workdir)
    bench = load_bench(args.bench)
    ingest_step.ingest(ws, [str(Path(args.bench, s).resolve()) for s in bench.sets])
    features_step.features(ws)
    index = index_step.build_index(ws)
    start = time.perf_counter()
    mine_step.open_search(ws)
    open_s = time.perf_counter() - start
    # Half the reports with boxes under mining.small_box (template-matched on every frame), half above it
    # (template-matched on the region shortlist): the two costs differ by the size of the lake.
    small = ws.params.mining.small_box
    half = args.reports // 2
    queries = ([q for q in bench.queries if q.area_frac < small][:half]
               + [q for q in bench.queries if q.area_frac >= small][: args.reports - half])
    timings = []
    for q in queries:
        report = parse_report({"report_id": f"bench-{q.id}", "detector": {"name": "bench", "version": "1"},
                               "frame": {"uri": str(Path(bench.images[q.key].path).resolve())},
                               "box": list(q.bbox), "class_name": q.category, "failure_kind": "false_negative"})
        t = mine_step.mine(ws, report, progress=False).timings
        timings.append({**t, "search_s": t["query_s"] + t["rank_s"], "small_box": q.area_frac < small})
    keys = [k for k in timings[0] if k not in ("small_box", "open_s")]
    summary = {}
    for group, rows in (("all", timings), ("small_boxes", [t for t in timings if t["small_box"]]),
                        ("other_boxes", [t for t in timings if not t["small_box"]])):
        if rows:
            summary[group] = {k: {"median_s": statistics.median(t[k] for t in rows), "max_s": max(t[k] for t in rows)}
                              for k in keys} | {"reports": len(rows)}
    figures = {"lake_frames": index.frames, "reports": len(timings), "method": ws.params.mining.method,
               "small_box": small, "cpu_threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
               "open_s": open_s, **summary}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(figures, indent=1) + "\n")
    print(f"{len(timings)} reports mined over a lake of {index.frames} frames ({figures['method']}); "
          f"index and maps loaded once in {open_s:.1f} s")
    for group, stats in summary.items():
        print(f" {group} ({stats['reports']} reports)")
        for k in keys:
            print(f"  {k:12s} median {stats[k]['median_s'] * 1000:7.0f} ms   max {stats[k]['max_s'] * 1000:7.0f} ms")


if __name__ == "__main__":
    main()
