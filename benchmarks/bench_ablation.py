"""The method comparison and ablation on a bench folder, one run over the same cached features.

    python benchmarks/bench_ablation.py --bench ../shared/bench --workdir .objret-bench

Baselines (whole-image GeM, whole-image R-MAC, uniform R-MAC regions, plain template matching), the region
sources one by one and combined, whitening on/off and re-ranking on/off. Writes the table to
benchmarks/results/bench_ablation.md and every configuration's figures to bench_ablation.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from objret.steps import features as features_step, index as index_step, ingest as ingest_step, regions as regions_step, whitening as whitening_step
from objret.eval.bench import load_bench
from objret.config import load_params
from objret.eval.run import bench_frame_ids, evaluate_methods
from objret.eval.metrics import flat_metrics
from objret.steps.mine import load_search, query_ranker
from objret.steps.workspace import Workspace

COLUMNS = [("class_mAP", "class mAP"), ("class_area_lt1_mAP", "class <1%"), ("paste_visible_mAP", "paste mAP"),
           ("paste_visible_Loc10", "paste Loc@10"), ("video_instance_mAP", "video inst mAP"),
           ("instance_Loc10", "all inst Loc@10")]

# (label, method, parameter overrides, queries). Methods that template-match every frame of the lake cost
# ~2.5 s a query on a 2-core CPU, so their rows run on the instance queries only (84); the rest on all 679.
OLD_TM = ["mining.layer=stride16", "mining.mirror=false"]
CONFIGS = [
    ("whole-image GeM", "gem", [], "all"),
    ("whole-image R-MAC", "rmac", [], "all"),
    ("uniform R-MAC regions (best region)", "regions",
     ["regions.sources=[whole,uniform]", "mining.weights={region: 1.0, template: 0.0, global: 0.0, classes: 0.0}"], "all"),
    ("regions: whole + EGM", "regions", ["regions.sources=[whole,egm]"], "all"),
    ("regions: whole + uniform + EGM", "regions", ["regions.sources=[whole,uniform,egm]"], "all"),
    ("regions: whole + uniform + detector", "regions", ["regions.sources=[whole,uniform,detector]"], "all"),
    ("regions: whole + uniform + EGM + detector (default)", "regions", [], "all"),
    ("  + whitening", "regions", ["regions.whitening.enabled=true"], "all"),
    ("plain template matching (stride 16, one template)", "dtm", OLD_TM, "instance"),
    ("template matching, stride 8", "dtm", ["mining.mirror=false"], "instance"),
    ("template matching, stride 8 + mirror (default matcher)", "dtm", [], "instance"),
    ("fused, sum of evidence", "fused", ["mining.fusion=sum"], "instance"),
    ("fused, max of evidence (default)", "fused", [], "instance"),
    ("fused, max, small boxes from the region shortlist only", "fused", ["mining.small_box=0.0"], "instance"),
]
QUERY_SETS = {"all": lambda q: True, "instance": lambda q: q.kind == "instance", "class": lambda q: q.kind == "class"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", default=str(Path(__file__).resolve().parents[2] / "shared" / "bench"))
    parser.add_argument("--workdir", default=".objret-bench")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="applies to every config")
    parser.add_argument("--only", default=None, help="comma-separated config numbers to run")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "bench_ablation"))
    args = parser.parse_args()

    bench = load_bench(args.bench)
    chosen = [CONFIGS[int(i)] for i in args.only.split(",")] if args.only else CONFIGS
    rows = []
    for label, method, overrides, queries in chosen:
        ws = Workspace(load_params(None, args.overrides + overrides), args.workdir)
        ingest_step.ingest(ws, [str(Path(args.bench, s).resolve()) for s in bench.sets], progress=False)
        features_step.features(ws, progress=False)
        regions_step.regions(ws, progress=False)
        whitening_step.whitening(ws)
        index_step.build_index(ws)
        start = time.perf_counter()
        subset = dataclasses.replace(bench, queries=[q for q in bench.queries if QUERY_SETS[queries](q)])
        # Every query through the path `objret mine` takes, as flows.evaluate does.
        search = load_search(ws, [method])
        frame_of = bench_frame_ids(subset, ws.lake)

        run = evaluate_methods(subset, frame_of, [method], query_ranker(ws, search, frame_of), progress=False)[0]
        figures = flat_metrics(run.report)
        rows.append({"label": label, "method": method, "overrides": args.overrides + overrides, "queries": queries,
                     "seconds_per_query": run.seconds_per_query, "seconds": time.perf_counter() - start,
                     **{key: figures.get(key) for key, _ in COLUMNS}})
        print(f"{label:55s} {queries:8s} " + " ".join(f"{name}={figures.get(key, float('nan')):.3f}" for key, name in COLUMNS),
              flush=True)
    write(rows, Path(args.out), args)


def write(rows: list[dict], out: Path, args) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = ["| configuration | method | queries | " + " | ".join(name for _, name in COLUMNS) + " | s/query |",
             "|---|---|---|" + "---:|" * (len(COLUMNS) + 1)]
    for row in rows:
        cells = [f"{row[key]:.3f}" if row[key] is not None and row[key] == row[key] else "-" for key, _ in COLUMNS]
        lines.append(f"| {row['label']} | {row['method']} | {row['queries']} | " + " | ".join(cells) + f" | {row['seconds_per_query']:.3f} |")
    command = "python benchmarks/bench_ablation.py --bench ../shared/bench --workdir .objret-bench" + "".join(
        f" --set {o}" for o in args.overrides) + (f" --only {args.only}" if args.only else "")
    out.with_suffix(".md").write_text(f"Command: `{command}`\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
