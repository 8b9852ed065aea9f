"""Ablation of the fused method's fusion on a bench folder: the evidence is computed once, fusions are cheap.

    python benchmarks/fusion_ablation.py --bench ../shared/bench --workdir .objret-bench

The bench is ingested, its features, regions, whitening and region index built as for benchmarks/bench_ablation.py,
and the lake loaded once as a LakeSearch (objret.steps.mine.load_search). For every query (objret.steps.mine.
frame_query: the box on its lake frame, with its mirror view when ``mining.mirror`` is on) it computes the three
kinds of evidence the `fused` method combines with the library's own functions, off the LakeSearch's maps:
best region similarity + box (best_region_per_frame) and whole-frame GeM on every frame, and the template-matching
peak + box (match_query) on the candidates objret.mining.shortlist.rerank_candidates picks, for the
parameters' ``mining.rerank`` and for every shortlist size a configuration below asks for (``mining.small_box``: a
small box's candidates are every frame). They are stored in <workdir>/fusion_evidence-<key>.npz (reused by the
next run while the parameters, the index and the queries are the same; ~1 s a query to compute on a 2-core CPU).

Each configuration then ranks the bench with objret.mining.fusion.fuse_evidence, typed WeightsParams / GateParams
made with ``params.replace``, over exactly the frames `objret mine` and `objret eval` would rank (rank_query):
the candidates, standardised over them without the query's own frame; a frame outside the candidates is not
ranked and costs its positives' recall, as in `objret eval`. Configurations: template or region evidence alone,
sum, max, the adaptive fusion and its gate parameters, without the global evidence, the region index's shortlist
of 200 frames, and with --diffusion the diffusion evidence over the region graph (003 / Iscen et al.; the graph
is built first if missing) at a few weights. Writes benchmarks/results/fusion_ablation.md and .json.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from objret.config import load_params
from objret.eval.bench import load_bench
from objret.eval.metrics import evaluate, flat_metrics
from objret.eval.run import bench_frame_ids, gallery_entries
from objret.mining.evidence import Ranking, best_region_per_frame, query_region_vector
from objret.mining.fusion import fuse_evidence, match_query
from objret.mining.methods import get_method
from objret.mining.search import LakeSearch
from objret.mining.shortlist import classes_weighed_by_lake, rerank_candidates
from objret.regions.pooling import gem
from objret.steps import features as features_step, graph as graph_step, index as index_step
from objret.steps import ingest as ingest_step, regions as regions_step, whitening as whitening_step
from objret.steps.mine import frame_query, load_search
from objret.steps.workspace import Workspace

COLUMNS = [("class_mAP", "class mAP"), ("class_area_lt1_mAP", "class <1%"), ("paste_visible_mAP", "paste mAP"),
           ("paste_visible_Loc10", "paste Loc@10"), ("video_instance_mAP", "video inst mAP"),
           ("instance_Loc10", "all inst Loc@10")]
DEFAULT_GATE = "mining.gate={top: 3, offset: 1.0, slope: 2.0}"
ADAPTIVE = ("mining.fusion=adaptive", DEFAULT_GATE)
# (label, parameter assignments over the run's parameters, mining.rerank (None: the parameters' own), diffusion)
CONFIGS = [
    ("region + 0.3 global evidence alone (= regions)", (*ADAPTIVE, "mining.gate.offset=100.0"), None, False),
    ("template evidence alone (= dtm)", (*ADAPTIVE, "mining.gate.offset=-100.0"), None, False),
    ("sum", ("mining.fusion=sum",), None, False),
    ("max", ("mining.fusion=max",), None, False),
    ("adaptive (default)", ADAPTIVE, None, False),
    ("adaptive, gate offset 0", (*ADAPTIVE, "mining.gate.offset=0.0"), None, False),
    ("adaptive, gate offset 0.5", (*ADAPTIVE, "mining.gate.offset=0.5"), None, False),
    ("adaptive, gate offset 1.5", (*ADAPTIVE, "mining.gate.offset=1.5"), None, False),
    ("adaptive, gate slope 8", (*ADAPTIVE, "mining.gate.slope=8.0"), None, False),
    ("adaptive, gate peaks over the top 10", (*ADAPTIVE, "mining.gate.top=10"), None, False),
    ("adaptive, without the global evidence", (*ADAPTIVE, "mining.weights.global=0.0"), None, False),
    ("adaptive, the index's 200 best region frames (small boxes: all)", ADAPTIVE, 200, False),
    ("max, the index's 200 best region frames (small boxes: all)", ("mining.fusion=max",), 200, False),
]
DIFFUSION_CONFIGS = [
    ("region + 0.3 global + diffusion 0.5, alone",
     (*ADAPTIVE, "mining.gate.offset=100.0", "mining.diffusion.weight=0.5"), None, True),
    ("region + 0.3 global + diffusion 1.0, alone",
     (*ADAPTIVE, "mining.gate.offset=100.0", "mining.diffusion.weight=1.0"), None, True),
    ("adaptive + diffusion 0.5", (*ADAPTIVE, "mining.diffusion.weight=0.5"), None, True),
    ("adaptive + diffusion 1.0", (*ADAPTIVE, "mining.diffusion.weight=1.0"), None, True),
]
QUERY_SETS = {"all": lambda q: True, "instance": lambda q: q.kind == "instance", "class": lambda q: q.kind == "class"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", default=str(Path(__file__).resolve().parents[2] / "shared" / "bench"))
    parser.add_argument("--workdir", default=".objret-bench")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="section.key=value")
    parser.add_argument("--diffusion", action="store_true", help="also the rows with diffusion evidence")
    parser.add_argument("--only", default=None, help="comma-separated configuration numbers to run (0-based; "
                                                     "with --diffusion the diffusion rows follow the others)")
    parser.add_argument("--queries", choices=sorted(QUERY_SETS), default="all", help="the bench queries to rank")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "fusion_ablation"))
    args = parser.parse_args()

    configs = CONFIGS + (DIFFUSION_CONFIGS if args.diffusion else [])
    if args.only:
        configs = [configs[int(i)] for i in args.only.split(",")]
    ws = Workspace(load_params(None, args.overrides), args.workdir)
    bench = load_bench(args.bench)
    bench = dataclasses.replace(bench, queries=[q for q in bench.queries if QUERY_SETS[args.queries](q)])
    build_workspace(ws, bench, args.bench)
    search = load_search(ws, ["fused"])
    frame_of = bench_frame_ids(bench, ws.lake)
    reranks = sorted({r for _, _, r, _ in configs if r is not None} | {ws.params.mining.rerank})
    evidence = load_or_compute_evidence(ws, bench, frame_of, search, reranks)
    if any(uses_diffusion for *_, uses_diffusion in configs):
        evidence["diffusion"] = diffusion_evidence(ws, bench, search, evidence["vectors"])

    frame_ids = search.frame_ids
    query_rows = np.array([search.row_of.get(frame_of[q.key], -1) for q in bench.queries])
    kinds = np.array(["paste" if q.set == "paste_visible" else q.kind for q in bench.queries])
    rows_out = []
    for label, assignments, rerank, uses_diffusion in configs:
        params = ws.params.replace(*assignments)
        m = params.mining
        rerank = m.rerank if rerank is None else rerank
        results, weight_of, candidates = {}, [], []
        for qi, q in enumerate(bench.queries):
            rows = candidates_of(evidence, qi, rerank, len(frame_ids), query_rows[qi])
            candidates.append(len(rows) - (query_rows[qi] in rows))
            region, glob = evidence["region"][qi][rows], evidence["global"][qi][rows]
            template = evidence["template"][qi][rows]
            assert np.isfinite(template).all(), "template evidence was computed on every candidate"
            reference = np.flatnonzero(rows != query_rows[qi])   # as rank_fused: the query's own frame left out
            scores, boxes, weight = fuse_evidence(
                region, glob, template, evidence["region_boxes"][qi][rows], evidence["template_boxes"][qi][rows],
                reference if len(reference) else np.arange(len(rows)), m.weights, m.fusion, m.gate,
                diffusion=evidence["diffusion"][qi][rows] if uses_diffusion else None,
                diffusion_weight=m.diffusion.weight)
            weight_of.append(weight)
            ranking = Ranking([frame_ids[r] for r in rows], scores.astype(np.float32), boxes.astype(np.float32))
            results[q.id] = gallery_entries(bench, q, frame_of, ranking)
        figures = flat_metrics(evaluate(bench, results))
        row = {"label": label, "assignments": list(assignments), "rerank": rerank, "fusion": m.fusion,
               "gate": m.gate.model_dump(), "weights": m.weights.model_dump(by_alias=True),
               "diffusion_weight": m.diffusion.weight if uses_diffusion else None,
               "mean_candidates": float(np.mean(candidates)) if candidates else 0.0,
               **{key: figures.get(key) for key, _ in COLUMNS}}
        if m.fusion == "adaptive" and abs(m.gate.offset) < 100:
            w = np.array(weight_of, np.float64)
            row["mean_template_weight"] = {k: round(float(w[kinds == k].mean()), 3) if (kinds == k).any() else None
                                           for k in ("class", "instance", "paste")}
        rows_out.append(row)
        print(f"{label:70s} " + " ".join(f"{name}={_number(figures.get(key)):.3f}" for key, name in COLUMNS)
              + f" candidates={row['mean_candidates']:.0f}", flush=True)
    write(rows_out, Path(args.out), args, evidence_seconds=float(evidence["seconds_per_query"]),
          queries=len(bench.queries), frames=len(frame_ids))


def build_workspace(ws: Workspace, bench, bench_dir: str) -> None:
    """The bench's images as the lake, with features, regions, whitening and the region index (as
    benchmarks/bench_ablation.py builds them)."""
    ingest_step.ingest(ws, [str(Path(bench_dir, s).resolve()) for s in bench.sets], progress=False)
    features_step.features(ws, progress=False)
    regions_step.regions(ws, progress=False)
    whitening_step.whitening(ws)
    index_step.build_index(ws)


def candidates_of(evidence: dict, qi: int, rerank: int, n_frames: int, query_row: int) -> np.ndarray:
    """The rows rank_query ranks for query ``qi`` with ``mining.rerank=rerank``: every frame (the resident lake,
    the query's own frame in it) when the candidates are every other frame, else the index's shortlist."""
    stored = evidence[f"candidates_{rerank}"][qi]
    rows = stored[stored >= 0]
    if len(rows) == n_frames - (query_row >= 0):
        return np.arange(n_frames)
    return rows


def evidence_key(ws: Workspace, search: LakeSearch, bench, reranks: list[int]) -> str:
    m = ws.params.mining
    index_version = (ws.current_index_dir() / "CURRENT").read_text().strip()
    return hashlib.sha256(json.dumps(
        [ws.cache.cache_key, ws.index_recipe(), index_version, len(search.frame_ids), m.layer, m.template_cells,
         m.scales, m.scale_tolerance, m.mirror, m.query_zoom, m.small_box, ws.params.index.gem_p, reranks, [q.id for q in bench.queries]],
        sort_keys=True).encode()).hexdigest()[:12]


def load_or_compute_evidence(ws: Workspace, bench, frame_of: dict, search: LakeSearch, reranks: list[int]) -> dict:
    """Per query (rows of ``bench.queries``) and frame (rows of ``search.frame_ids``): region, global and template
    evidence with their boxes (template: NaN outside the candidates), the query's region vector and its
    candidate rows for each ``mining.rerank`` in ``reranks`` (best first, padded with -1)."""
    path = Path(ws.root) / f"fusion_evidence-{evidence_key(ws, search, bench, reranks)}.npz"
    if path.exists():
        return dict(np.load(path))
    m, gem_p, fused = ws.params.mining, ws.params.index.gem_p, get_method("fused")
    lake, n, q_count = search.lake_maps(search.rows()), len(search.frame_ids), len(bench.queries)
    out = {"region": np.zeros((q_count, n), np.float32), "global": np.zeros((q_count, n), np.float32),
           "template": np.full((q_count, n), np.nan, np.float32),
           "region_boxes": np.zeros((q_count, n, 4), np.float32),
           "template_boxes": np.zeros((q_count, n, 4), np.float32),
           **{f"candidates_{k}": np.full((q_count, n), -1, np.int32) for k in reranks}}
    vectors = []
    start = time.perf_counter()
    for qi, q in enumerate(tqdm(bench.queries, desc="evidence", unit="query")):
        query = classes_weighed_by_lake(search, frame_query(ws, search.frames[frame_of[q.key]], q.bbox, "fused"))
        vector = query_region_vector(query, search.encoding)
        vectors.append(vector)
        out["region"][qi], out["region_boxes"][qi] = best_region_per_frame(query, lake)
        out["global"][qi] = lake.global_vectors @ gem(query.maps["stride32"], gem_p)
        needed = set()
        for k in reranks:
            mining = ws.params.replace(f"mining.rerank={k}").mining
            _, hits, _ = rerank_candidates(search, fused, query, vector, mining)
            rows = (search.rows(exclude=query.frame_id) if hits is None
                    else np.array([search.row_of[h.frame_id] for h in hits], np.int64))
            out[f"candidates_{k}"][qi, :len(rows)] = rows
            needed.update(rows.tolist())
        rows = np.array(sorted(needed), np.int64)
        # Template matching on the candidates: the resident stack when they are every frame, as rank_query does.
        every = len(rows) >= n - (query.frame_id in search.row_of)
        stack = lake.stack if every else lake.subset(rows).stack
        at = np.arange(n) if every else rows
        matched = match_query(query, stack, m.layer, m.template_cells, tuple(m.scales),
                              scale_tolerance=m.scale_tolerance)
        out["template"][qi, at], out["template_boxes"][qi, at] = matched.scores, matched.boxes
    out["vectors"] = np.stack(vectors) if vectors else np.zeros((0, 0), np.float32)
    out["seconds_per_query"] = np.float64((time.perf_counter() - start) / max(1, q_count))
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **out)
    tmp.replace(path)   # atomic: a killed run leaves no half-written evidence
    return out


def diffusion_evidence(ws: Workspace, bench, search: LakeSearch, vectors: np.ndarray) -> np.ndarray:
    """Every query's diffusion score of every frame (queries x frames of ``search``), over the region graph of
    the bench lake's index (built first if missing), as objret.steps.mine.rank_report_query opens it."""
    from objret.graph.store import open_diffusion

    graph_step.graph(ws)
    d = ws.params.mining.diffusion
    diffusion = open_diffusion(ws.graph_dir(), ws.current_index_dir(), search.index, k=d.k, alpha=d.alpha,
                               max_iter=d.max_iter)
    key = hashlib.sha256(json.dumps([diffusion.version, d.k, d.alpha, d.max_iter, search.frame_ids,
                                     [q.id for q in bench.queries]], sort_keys=True).encode()).hexdigest()[:12]
    path = Path(ws.root) / f"fusion_diffusion-{key}.npy"
    if path.exists():
        return np.load(path)
    rows = search.graph_rows(diffusion)
    out = np.zeros((len(bench.queries), len(search.frame_ids)), np.float32)
    for qi in tqdm(range(len(bench.queries)), desc="diffusion", unit="query"):
        out[qi] = diffusion.scores(vectors[qi], rows)[0]
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, out)
    tmp.replace(path)
    return out


def _number(value) -> float:
    return float("nan") if value is None else float(value)


def write(rows: list[dict], out: Path, args, evidence_seconds: float, queries: int, frames: int) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"evidence_seconds_per_query": evidence_seconds,
                                                    "queries": queries, "frames": frames, "rows": rows},
                                                   indent=1) + "\n")
    lines = ["| fusion | " + " | ".join(name for _, name in COLUMNS)
             + " | candidates | mean template weight (class / inst / paste) |",
             "|---|" + "---:|" * (len(COLUMNS) + 1) + "---|"]
    for row in rows:
        cells = [f"{row[key]:.3f}" if row[key] is not None and row[key] == row[key] else "-" for key, _ in COLUMNS]
        w = row.get("mean_template_weight")
        weights = (" / ".join("-" if w[k] is None else f"{w[k]:.2f}" for k in ("class", "instance", "paste"))
                   if w else "-")
        lines.append(f"| {row['label']} | " + " | ".join(cells) + f" | {row['mean_candidates']:.0f} | {weights} |")
    command = (f"python benchmarks/fusion_ablation.py --bench {args.bench} --workdir {args.workdir}"
               + "".join(f" --set {o}" for o in args.overrides) + (" --diffusion" if args.diffusion else "")
               + (f" --only {args.only}" if args.only else "")
               + (f" --queries {args.queries}" if args.queries != "all" else ""))
    out.with_suffix(".md").write_text(f"Command: `{command}`\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
