"""A parameter that moves boxes only, chosen leave-one-set-out by Loc@10 on the bench's instance queries: the box's
scale rule (``mining.scale_tolerance``, the default) or the box fit's colour weight (``mining.box_colour``).

    objret eval --bench ../shared/bench --methods fused,gem --workdir W      # builds the bench as a lake (W)
    python benchmarks/box_scale.py --bench ../shared/bench --workdir W --values 0,0.02,0.03,0.04,0.05,0.06
    python benchmarks/box_scale.py --bench ../shared/bench --workdir W --param mining.box_colour \
        --values 1,0,0.5,2 --out benchmarks/results/box_colour

Every instance query is ranked through the path of ``objret mine`` (objret.steps.mine.query_ranker, the default
method) once per value; the parameter moves boxes only (a frame's score is the same), so mAP is the same in every
row. For each set, the value with the best mean Loc@10 on the other sets is the one its queries are scored with
(objret.eval.heldout.leave_one_set_out with localization_score), beside the in-sample choice; ties go to the
first value. Writes OUT.json and OUT.md (default benchmarks/results/box_scale).
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
    parser.add_argument("--param", default="mining.scale_tolerance", help="the parameter (it must move boxes only)")
    parser.add_argument("--values", "--tolerances", default="0,0.02,0.03,0.04,0.05,0.06")
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

    values = [float(t) for t in args.values.split(",")]
    settings = [{args.param: t} for t in values]
    results, per_set = [], {}
    for t in values:
        tuned = Workspace(params.replace(f"{args.param}={t}"), args.workdir)
        run = evaluate_methods(instances, frame_of, [method], query_ranker(tuned, search, frame_of))[0]
        results.append(run.results)
        per_set[t] = {g.name: {"n": g.n, "mAP": g.mAP, "Loc@10": g.loc10, "Loc@10_n": g.loc10_n}
                      for g in run.report.groups if g.name.startswith("instance/")}
        print(f"{args.param} {t}: " + ", ".join(f"{name.removeprefix('instance/')} {v['Loc@10']:.3f}"
                                            for name, v in per_set[t].items() if v["Loc@10"] is not None))

    held = leave_one_set_out(instances, results, settings, score=localization_score)
    table = held_out_table(held)
    print(table)
    groups = {g.name: {"in_sample": {"mAP": g.mAP, "Loc@10": g.loc10},
                       "held_out": {"mAP": h.mAP, "Loc@10": h.loc10}, "n": g.n, "Loc@10_n": g.loc10_n}
              for g, h in zip(held.in_sample_report.groups, held.held_out_report.groups)}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({
        "command": f"python benchmarks/box_scale.py --bench ../shared/bench --workdir W --param {args.param} --values "
                   + args.values + "".join(f" --set {s}" for s in args.set),
        "method": method, "param": args.param, "values": values, "per_value": per_set,
        "in_sample": settings[held.in_sample], "held_out_choice": {s: settings[i] for s, i in held.chosen.items()},
        "groups": groups}, indent=1))
    out.with_suffix(".md").write_text("```\n" + table + "\n```\n")


if __name__ == "__main__":
    main()
