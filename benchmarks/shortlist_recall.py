"""How much of exhaustive matching's best frames the shortlist keeps, per query kind.

    python benchmarks/shortlist_recall.py --bench ../shared/bench --workdir W [--class-queries 80]

W: a work folder where `objret eval --bench ../shared/bench --workdir W` ran (the bench built as a lake). For
every instance query of the bench (pasted objects, video instances) and a fixed sample of class queries (half
with boxes under 1% of the frame): the frames `objret mine` would re-rank
(objret.mining.shortlist.rerank_candidates, with the current params.yaml) against the top 50 gallery frames of
exhaustive matching (the same method with every frame template-matched over the fp16 cache: mining.rerank above
the lake, mining.maps=cache), and against the positives exhaustive matching ranks in its first 20 (what the
shortlist costs in mAP: most gallery frames in a top 50 are negatives for an instance query). Prints and writes
the mean recall per query group (benchmarks/results/shortlist_recall.json).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from objret.config import load_params
from objret.eval.bench import load_bench
from objret.eval.run import bench_frame_ids, gallery_entries
from objret.mining.evidence import query_region_vector
from objret.mining.methods import get_method
from objret.mining.shortlist import classes_weighed_by_lake, rerank_candidates
from objret.steps.mine import frame_query, load_search, rank_report_query
from objret.steps.workspace import Workspace


def group_of(q) -> str:
    if q.key[0] == "paste_visible":
        return "paste_visible"
    if q.kind == "instance":
        return "video_instance"
    return "class_area_lt1" if q.area_frac < 0.01 else "class_area_ge1"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--class-queries", type=int, default=80)
    parser.add_argument("--top", type=int, default=50)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "shortlist_recall.json"))
    args = parser.parse_args()
    ws = Workspace(load_params(), args.workdir)
    m = ws.params.mining
    bench = load_bench(args.bench)
    frame_of = bench_frame_ids(bench, ws.lake)
    exhaustive_ws = Workspace(ws.params.replace("mining.rerank=1000000000", "mining.maps=cache"), ws.root)
    search = load_search(ws, [m.method])
    every = load_search(exhaustive_ws, [m.method])
    method = get_method(m.method)
    rng = np.random.default_rng(0)
    small = [q for q in bench.queries if q.kind == "class" and q.area_frac < 0.01]
    large = [q for q in bench.queries if q.kind == "class" and q.area_frac >= 0.01]
    half = args.class_queries // 2
    queries = ([q for q in bench.queries if q.kind == "instance"]
               + [small[i] for i in sorted(rng.choice(len(small), min(half, len(small)), replace=False))]
               + [large[i] for i in sorted(rng.choice(len(large), min(half, len(large)), replace=False))])
    recall, found, stages = defaultdict(list), defaultdict(list), defaultdict(lambda: defaultdict(int))
    for q in tqdm(queries, desc="shortlist", unit="query"):
        query = frame_query(ws, search.frames[frame_of[q.key]], q.bbox, m.method)
        ranking = rank_report_query(exhaustive_ws, every, query, m.method)[0].ranking
        entries = gallery_entries(bench, q, frame_of, ranking)
        best = [frame_of[(e["set"], e["image_id"])] for e in entries[:args.top]]
        positives = bench.positives(q)
        top_positives = {frame_of[(e["set"], e["image_id"])] for e in entries[:20]
                         if (e["set"], e["image_id"]) in positives}
        if not best:
            continue
        stage, hits, _ = rerank_candidates(search, method, classes_weighed_by_lake(search, query), query_region_vector(query, search.encoding), m)
        kept = set(search.frame_ids) if hits is None else {h.frame_id for h in hits}
        for group in (group_of(q), "all"):
            recall[group].append(len(kept & set(best)) / len(best))
            if top_positives:
                found[group].append(len(kept & top_positives) / len(top_positives))
            stages[group][stage] += 1
    report = {"command": f"python benchmarks/shortlist_recall.py --bench {args.bench} --workdir W "
                         f"--class-queries {args.class_queries}",
              "rerank": m.rerank, "lake_frames": len(search), "top": args.top,
              "recall": {g: {"queries": len(v), "mean": float(np.mean(v))} for g, v in sorted(recall.items())},
              "positives_in_top20": {g: {"queries": len(v), "mean": float(np.mean(v))}
                                     for g, v in sorted(found.items())},
              "stages": {g: dict(v) for g, v in sorted(stages.items())}}
    Path(args.out).write_text(json.dumps(report, indent=1))
    for g, v in report["recall"].items():
        hit = report["positives_in_top20"].get(g, {"mean": float("nan"), "queries": 0})
        print(f"{g:16s} {v['queries']:4d} queries  recall of exhaustive top {args.top}: {v['mean']:.3f}  "
              f"of its positives in the top 20: {hit['mean']:.3f} ({hit['queries']} queries)  {report['stages'][g]}")


if __name__ == "__main__":
    main()
