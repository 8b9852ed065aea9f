"""The box's scale rule (``mining.scale_tolerance``) chosen leave-one-set-out on the bench's instance queries.

    objret eval --bench ../shared/bench --methods fused,gem --workdir W      # builds the bench as a lake (W)
    python benchmarks/box_scale.py --bench ../shared/bench --workdir W --tolerances 0,0.02,0.03,0.04,0.05,0.06

Every instance query is ranked through the path of ``objret mine`` (objret.steps.mine.query_ranker, the default
method) once per tolerance; the tolerance moves boxes only (a frame's score is its best scale's), so mAP is the
same in every row. For each set, the tolerance with the best mean Loc@10 on the other sets is the one its queries
are scored with (objret.eval.heldout.leave_one_set_out with localization_score), beside the in-sample choice.
Writes benchmarks/results/box_scale.json and box_scale.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bench", default=str(Path(__file__).resolve().parents[2] / "shared" / "bench"))
    parser.add_argument("--workdir", required=True, help="a work folder with the bench built as its lake")
    parser.add_argument("--tolerances", default="0,0.02,0.03,0.04,0.05,0.06")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a parameter override")
    parser.add_argument("--out", default=str(RESULTS / "box_scale"))
    args = parser.parse_args()

    from objret.config import load_params
    from objret.eval.bench import load_bench
    from objret.eval.heldout import held_out_table, leave_one_set_out, localization_score
    from objret.eval.run import bench_frame_ids, evaluate_methods
    from objret.steps.mine import load_search, query_ranker
    from objret.steps.workspace import Workspace

    params = load_params(None, args.set)
    method = params.eval.methods.split(",")[0].strip()
    bench = load_bench(args.bench)
    instances = dataclasses.replace(bench, queries=[q for q in bench.queries if q.kind == "instance"])
    ws = Workspace(params, args.workdir)
    search = load_search(ws, [method])   # the same lake and indexes for every tolerance
    frame_of = bench_frame_ids(bench, ws.lake)

    tolerances = [float(t) for t in args.tolerances.split(",")]
    settings = [{"mining.scale_tolerance": t} for t in tolerances]
    results, per_set = [], {}
    for t in tolerances:
        tuned = Workspace(params.replace(f"mining.scale_tolerance={t}"), args.workdir)
        run = evaluate_methods(instances, frame_of, [method], query_ranker(tuned, search, frame_of))[0]
        results.append(run.results)
        per_set[t] = {g.name: {"n": g.n, "mAP": g.mAP, "Loc@10": g.loc10, "Loc@10_n": g.loc10_n}
                      for g in run.report.groups if g.name.startswith("instance/")}
        print(f"tolerance {t}: " + ", ".join(f"{name.removeprefix('instance/')} {v['Loc@10']:.3f}"
                                            for name, v in per_set[t].items() if v["Loc@10"] is not None))

    held = leave_one_set_out(instances, results, settings, score=localization_score)
    table = held_out_table(held)
    print(table)
    groups = {g.name: {"in_sample": {"mAP": g.mAP, "Loc@10": g.loc10},
                       "held_out": {"mAP": h.mAP, "Loc@10": h.loc10}, "n": g.n, "Loc@10_n": g.loc10_n}
              for g, h in zip(held.in_sample_report.groups, held.held_out_report.groups)}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({
        "command": "python benchmarks/box_scale.py --bench ../shared/bench --workdir W --tolerances " + args.tolerances
                   + "".join(f" --set {s}" for s in args.set),
        "method": method, "tolerances": tolerances, "per_tolerance": per_set,
        "in_sample": settings[held.in_sample], "held_out_choice": {s: settings[i] for s, i in held.chosen.items()},
        "groups": groups}, indent=1))
    out.with_suffix(".md").write_text("```\n" + table + "\n```\n")


if __name__ == "__main__":
    main()
