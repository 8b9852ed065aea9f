"""Ablation of the fused method's fusion on a bench folder: the evidence is computed once, fusions are cheap.

    python benchmarks/fusion_ablation.py --bench ../shared/bench --workdir .objret-bench

For every query (and every frame of the bench lake) it computes the three kinds of evidence the `fused`
method combines (best region similarity + box, whole-frame GeM, template-matching peak + box with the mirror
view, on every frame) with the library's own functions, stores them in <workdir>/fusion_evidence.npz (reused
by the next run while the parameters are the same; ~1 s a query to compute on a 2-core CPU), then ranks the
bench with objret.mining.fusion.fuse_evidence under each configuration: template or region evidence alone, sum, max,
the adaptive fusion and its gate parameters, the region shortlist of `mining.rerank` frames (as rank_fused
applies it) on/off, and with --diffusion the diffusion evidence over the region graph (003 / Iscen et al.; the
index and the graph are built first if missing) at a few weights. Writes benchmarks/results/fusion_ablation.md
and .json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from objret.steps import features as features_step, graph as graph_step, index as index_step, ingest as ingest_step, regions as regions_step
from objret.eval.bench import load_bench
from objret.config import load_params
from objret.eval.run import bench_lake_maps, bench_query, gallery_entries
from objret.mining.template_matching import match_template
from objret.eval.metrics import evaluate, flat_metrics
from objret.mining.evidence import best_region_per_frame, query_templates
from objret.mining.fusion import fuse_evidence
from objret.regions.pooling import gem
from objret.steps.workspace import Workspace

COLUMNS = [("class_mAP", "class mAP"), ("class_area_lt1_mAP", "class <1%"), ("paste_visible_mAP", "paste mAP"),
           ("paste_visible_Loc10", "paste Loc@10"), ("video_instance_mAP", "video inst mAP"),
           ("instance_Loc10", "all inst Loc@10")]
DEFAULT_GATE = {"top": 3, "offset": 1.0, "slope": 2.0}
# (label, fusion, gate, shortlist of the best region frames (None: every frame), evidence kept or diffusion weight)
CONFIGS = [
    ("region + 0.3 global evidence alone (= regions)", "adaptive", {"offset": 100.0}, None, "all"),
    ("template evidence alone (= dtm)", "adaptive", {"offset": -100.0}, None, "all"),
    ("sum", "sum", None, None, "all"),
    ("max", "max", None, None, "all"),
    ("adaptive (default)", "adaptive", DEFAULT_GATE, None, "all"),
    ("adaptive, gate offset 0", "adaptive", {**DEFAULT_GATE, "offset": 0.0}, None, "all"),
    ("adaptive, gate offset 0.5", "adaptive", {**DEFAULT_GATE, "offset": 0.5}, None, "all"),
    ("adaptive, gate offset 1.5", "adaptive", {**DEFAULT_GATE, "offset": 1.5}, None, "all"),
    ("adaptive, gate slope 8", "adaptive", {**DEFAULT_GATE, "slope": 8.0}, None, "all"),
    ("adaptive, gate peaks over the top 10", "adaptive", {**DEFAULT_GATE, "top": 10}, None, "all"),
    ("adaptive, without the global evidence", "adaptive", DEFAULT_GATE, None, "no-global"),
    ("adaptive, re-ranking the 200 best region frames (small boxes: all)", "adaptive", DEFAULT_GATE, 200, "all"),
    ("max, re-ranking the 200 best region frames (small boxes: all)", "max", None, 200, "all"),
]
DIFFUSION_CONFIGS = [
    ("region + 0.3 global + diffusion 0.5, alone", "adaptive", {"offset": 100.0}, None, 0.5),
    ("region + 0.3 global + diffusion 1.0, alone", "adaptive", {"offset": 100.0}, None, 1.0),
    ("adaptive + diffusion 0.5", "adaptive", DEFAULT_GATE, None, 0.5),
    ("adaptive + diffusion 1.0", "adaptive", DEFAULT_GATE, None, 1.0),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", default=str(Path(__file__).resolve().parents[2] / "shared" / "bench"))
    parser.add_argument("--workdir", default=".objret-bench")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--diffusion", action="store_true", help="also the rows with diffusion evidence")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "fusion_ablation"))
    args = parser.parse_args()

    ws = Workspace(load_params(None, args.overrides), args.workdir)
    bench = load_bench(args.bench)
    ingest_step.ingest(ws, [str(Path(args.bench, s).resolve()) for s in bench.sets], progress=False)
    features_step.features(ws)
    regions_step.regions(ws)
    mining = {**ws.params.section("mining"), "gem_p": ws.params.section("index").get("gem_p", 3.0)}
    frame_of, lake = bench_lake_maps(bench, ws.lake, ws.cache, mining, ws.region_store.load(),
                                     dict(ws.params.section("regions")))
    evidence = load_or_compute_evidence(ws, bench, frame_of, lake, mining)
    row_of = {fid: i for i, fid in enumerate(lake.stack.frame_ids)}
    query_rows = np.array([row_of[frame_of[q.key]] for q in bench.queries])
    small = np.array([q.area_frac < float(mining.get("small_box", 0.0)) for q in bench.queries])

    configs = list(CONFIGS)
    if args.diffusion:
        evidence["diffusion"] = diffusion_evidence(ws, bench, frame_of, lake, mining)
        configs += DIFFUSION_CONFIGS
    rows = []
    for label, fusion, gate, shortlist_size, kept in configs:
        weights = dict(mining["weights"]) | ({"global": 0.0} if kept == "no-global" else {})
        diffusion_weight = kept if isinstance(kept, float) else None
        results, weight_of = {}, []
        for qi, q in enumerate(bench.queries):
            region, glob, template = evidence["region"][qi], evidence["global"][qi], evidence["template"][qi]
            template_boxes = evidence["template_boxes"][qi]
            shortlist = np.arange(len(region))
            if shortlist_size is not None and not small[qi]:
                # As rank_fused: template evidence on the shortlist only, the others at its lowest score.
                shortlist = np.argsort(-(region + weights.get("global", 0.0) * glob), kind="stable")[:shortlist_size]
                template = np.full_like(template, template[shortlist].min())
                template[shortlist] = evidence["template"][qi][shortlist]
                template_boxes = evidence["region_boxes"][qi].copy()
                template_boxes[shortlist] = evidence["template_boxes"][qi][shortlist]
            reference = shortlist[shortlist != query_rows[qi]]
            scores, boxes, weight = fuse_evidence(
                region, glob, template, evidence["region_boxes"][qi], template_boxes, reference, weights, fusion,
                gate, diffusion=evidence["diffusion"][qi] if diffusion_weight else None,
                diffusion_weight=diffusion_weight or 0.0)
            weight_of.append(weight)
            results[q.id] = gallery_entries(bench, q, frame_of, row_of, scores, boxes)
        figures = flat_metrics(evaluate(bench, results))
        row = {"label": label, "fusion": fusion, "gate": gate, "shortlist": shortlist_size, "evidence": kept,
               **{key: figures.get(key) for key, _ in COLUMNS}}
        if fusion == "adaptive" and abs((gate or {}).get("offset", 0.0)) < 100:
            w = np.array(weight_of)
            kinds = np.array(["paste" if q.set == "paste_visible" else q.kind for q in bench.queries])
            row["mean_template_weight"] = {k: round(float(w[kinds == k].mean()), 3) for k in ("class", "instance", "paste")}
        rows.append(row)
        print(f"{label:70s} " + " ".join(f"{name}={figures.get(key, float('nan')):.3f}" for key, name in COLUMNS),
              flush=True)
    write(rows, Path(args.out), args, evidence_seconds=float(evidence["seconds_per_query"]))


def load_or_compute_evidence(ws: Workspace, bench, frame_of: dict, lake, mining: dict) -> dict:
    key = hashlib.sha256(json.dumps([ws.cache.cache_key, ws.region_store.dir.name, mining["layer"],
                                     mining["template_cells"], mining["scales"], mining.get("mirror"),
                                     mining["gem_p"], len(bench.queries)], sort_keys=True).encode()).hexdigest()[:12]
    path = Path(ws.root) / f"fusion_evidence-{key}.npz"
    if path.exists():
        return dict(np.load(path))
    n, q_count = len(lake.stack), len(bench.queries)
    out = {"region": np.zeros((q_count, n), np.float32), "global": np.zeros((q_count, n), np.float32),
           "template": np.zeros((q_count, n), np.float32), "region_boxes": np.zeros((q_count, n, 4), np.float32),
           "template_boxes": np.zeros((q_count, n, 4), np.float32)}
    layers = sorted({mining["layer"], "stride32"})
    backbone = ws.backbone if mining.get("mirror") else None
    start = time.perf_counter()
    for qi, q in enumerate(tqdm(bench.queries, desc="evidence", unit="query")):
        query = bench_query(bench, q, frame_of, ws.cache, layers, backbone)
        out["region"][qi], out["region_boxes"][qi] = best_region_per_frame(query, lake)
        out["global"][qi] = lake.global_vectors @ gem(query.maps["stride32"], mining["gem_p"])
        templates, footprint = query_templates(query, mining["layer"], mining["template_cells"])
        matched = match_template(templates, footprint, lake.stack, tuple(mining["scales"]))
        out["template"][qi], out["template_boxes"][qi] = matched.scores, matched.boxes
    out["seconds_per_query"] = np.float64((time.perf_counter() - start) / max(1, q_count))
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **out)
    tmp.replace(path)   # atomic: a killed run leaves no half-written evidence
    return out


def diffusion_evidence(ws: Workspace, bench, frame_of: dict, lake, mining: dict) -> np.ndarray:
    """Every query's diffusion score of every frame (queries x frames), over the bench lake's region graph."""
    from objret.graph.store import open_diffusion
    from objret.mining.evidence import query_region_vector
    from objret.index.region_index import RegionIndex

    index_step.build_index(ws)
    graph_step.graph(ws)
    diffusion = open_diffusion(ws.graph_dir(), ws.current_index_dir(), RegionIndex.load(ws.current_index_dir()),
                               mining["diffusion"])
    key = hashlib.sha256(json.dumps([diffusion.version, mining["diffusion"], len(bench.queries)],
                                    sort_keys=True).encode()).hexdigest()[:12]
    path = Path(ws.root) / f"fusion_diffusion-{key}.npy"
    if path.exists():
        return np.load(path)
    rows = diffusion.rows_for(lake.stack.frame_ids)
    out = np.zeros((len(bench.queries), len(lake.stack)), np.float32)
    for qi, q in enumerate(tqdm(bench.queries, desc="diffusion", unit="query")):
        query = bench_query(bench, q, frame_of, ws.cache, ["stride32"])
        out[qi] = diffusion.scores(query_region_vector(query, lake.regions), rows)[0]
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, out)
    tmp.replace(path)
    return out


def write(rows: list[dict], out: Path, args, evidence_seconds: float) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"evidence_seconds_per_query": evidence_seconds, "rows": rows},
                                                   indent=1) + "\n")
    lines = ["| fusion | " + " | ".join(name for _, name in COLUMNS) + " | mean template weight (class / inst / paste) |",
             "|---|" + "---:|" * len(COLUMNS) + "---|"]
    for row in rows:
        cells = [f"{row[key]:.3f}" if row[key] is not None else "-" for key, _ in COLUMNS]
        w = row.get("mean_template_weight")
        weights = f"{w['class']:.2f} / {w['instance']:.2f} / {w['paste']:.2f}" if w else "-"
        lines.append(f"| {row['label']} | " + " | ".join(cells) + f" | {weights} |")
    command = "python benchmarks/fusion_ablation.py --bench ../shared/bench --workdir .objret-bench" + "".join(
        f" --set {o}" for o in args.overrides)
    out.with_suffix(".md").write_text(f"Command: `{command}`\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
