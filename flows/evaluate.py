"""Flow ``evaluate``: every query of a bench folder through the mining methods over the bench as one lake."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
from prefect import flow, get_run_logger
from tqdm import tqdm

from objret import storage
from objret.config import load_params
from objret.eval.bench import bench_digest, load_bench
from objret.eval.heldout import as_overrides, held_out_table, leave_one_set_out, tune_grid
from objret.eval.metrics import compare_table, flat_metrics, format_table, recall_curve, summary_metrics
from objret.eval.plots import draw, plot_data
from objret.eval.review_round import review_round, review_table
from objret.eval.run import bench_frame_ids, evaluate_methods, gallery_entries
from objret.steps.mine import load_search, query_ranker
from objret.steps.workspace import Workspace
from tasks import steps
from tasks.tracking import log_dataset_input, log_metrics, mlflow_run


def beside(results: str, suffix: str) -> str:
    """A file beside the results: RESULTS.<suffix> (results.json -> results.summary.json)."""
    path = Path(results)
    return str(path.with_name(f"{path.stem}.{suffix}"))


def results_path_for(results: str, method: str, first: bool) -> str:
    """The default (first) method's results go to the named file, others beside it as NAME.<method>.json."""
    if first:
        return results
    path = Path(results)
    return str(path.with_name(f"{path.stem}.{method}{path.suffix or '.json'}"))


@flow(name="evaluate", log_prints=True, persist_result=False)
def evaluate_flow(bench_dir: str, results: str, methods: list[str] | None = None, params_path: str | None = None,
                  overrides: list[str] | None = None, workdir: str | None = None,
                  summary_json: str | None = None, curve_csv: str | None = None, held_out: bool = False,
                  review: int = 0) -> dict:
    """Besides each method's results and metrics: ``summary_json`` (default RESULTS.summary.json), every method's
    aggregates in one JSON, and ``curve_csv`` (default RESULTS.recall_at_k.csv), every method's mean Recall@K
    (columns k, method, recall): the DVC stage's metrics and plots files. ``held_out``: the default method's
    figures with ``eval.tune``'s parameters chosen leave-one-set-out beside the in-sample ones
    (objret.eval.heldout; RESULTS.heldout.json), each candidate setting ranking every query once. ``review``: one
    simulated review round of that many frames a query (objret.eval.review_round; RESULTS.review.json), the
    default method's figures before and after it."""
    ws = Workspace(load_params(params_path, overrides), workdir)
    bench = load_bench(bench_dir)
    methods = methods or [ws.params.mining.method, "gem"]
    with mlflow_run(ws, f"eval {Path(bench_dir).name}", {"flow": "evaluate", "bench": str(bench_dir)}):
        # Lineage: the bench these figures were scored on.
        log_dataset_input(Path(bench_dir).resolve().name, bench_digest(bench), str(Path(bench_dir).resolve()),
                          "evaluation", {"queries": len(bench.queries), "sets": ",".join(bench.sets)})
        steps.ingest(ws, [str(Path(bench_dir, s).resolve()) for s in bench.sets])
        steps.features(ws)
        steps.regions(ws)
        steps.whitening(ws)
        mlflow.set_tags({"index_version": steps.index(ws)["version"]})   # the bench's own region index
        steps.store(ws)
        with_diffusion = "fused" in methods and ws.params.mining.diffusion.enabled
        if with_diffusion or "discovery" in methods:
            # Diffusion and OS.EGM need the region graph: built (or refreshed) here, and only then (whatever
            # graph.enabled and graph.discovery.enabled say).
            steps.graph(ws, samples=False)
        if "discovery" in methods:
            steps.discovery(ws)
        mlflow.set_tags({"diffusion": str(with_diffusion).lower()})
        # Every query through the path `objret mine` takes (candidate selection, small-box rule, rerank, method).
        search = load_search(ws, methods)
        frame_of = bench_frame_ids(bench, ws.lake)

        runs = evaluate_methods(bench, frame_of, methods, query_ranker(ws, search, frame_of))
        summary = {}
        aggregates, curve, curves = {}, ["k,method,recall"], {}
        for i, run in enumerate(runs):
            out = results_path_for(results, run.method, i == 0)
            storage.write_bytes(out, json.dumps(run.results).encode())
            flat = flat_metrics(run.report)
            log_metrics({f"{run.method}.{k}": v for k, v in flat.items()}
                        | {f"{run.method}.seconds_per_query": run.seconds_per_query})
            metrics_file = Path(out).with_suffix(".metrics.json")
            storage.write_bytes(str(metrics_file), json.dumps(
                {"method": run.method, "seconds_per_query": run.seconds_per_query, **run.report.to_dict()},
                indent=1).encode())
            mlflow.log_artifact(str(metrics_file))
            summary[run.method] = {"results": out, "metrics": flat, "seconds_per_query": run.seconds_per_query}
            aggregates[run.method] = {"seconds_per_query": run.seconds_per_query, **summary_metrics(run.report)}
            curves[run.method] = recall_curve(bench, run.results)
            curve += [f"{k},{run.method},{r:.6f}" for k, r in curves[run.method]]
        summary_json = summary_json or beside(results, "summary.json")
        curve_csv = curve_csv or beside(results, "recall_at_k.csv")
        storage.write_bytes(summary_json, json.dumps(aggregates, indent=1).encode())
        storage.write_bytes(curve_csv, ("\n".join(curve) + "\n").encode())
        mlflow.log_artifact(curve_csv)
        plots = {}
        for name, data in plot_data({run.method: run.report for run in runs}, curves).items():
            plots[name] = beside(results, f"{name}.png")
            storage.write_bytes(plots[name], draw(name, data))
            mlflow.log_artifact(plots[name], "plots")
        table = compare_table({run.method: run.report for run in runs})
        mlflow.log_text(table, "eval_table.txt")
        details = "\n\n".join(f"{run.method}  ({run.seconds_per_query * 1000:.0f} ms per query)\n"
                                f"{format_table(run.report, details=True)}" for run in runs)
        mlflow.log_text(details, "eval_details.txt")
        get_run_logger().info("\n%s", table)
        out = {"table": table, "details": details, "methods": summary, "plots": plots}
        if held_out:
            out["held_out"] = _held_out(ws, bench, frame_of, runs[0], results)
            get_run_logger().info("\n%s", out["held_out"])
        if review:
            out["review"] = _review_round(ws, bench, frame_of, search, runs[0], results, review)
            get_run_logger().info("\n%s", out["review"])
        return out


def _review_round(ws: Workspace, bench, frame_of: dict, search, default_run, results: str, judged: int) -> str:
    """The default method mined again after a simulated review of its first ``judged`` frames a query; writes
    RESULTS.review.json, logs the figures before and after; the table."""
    rank_with = query_ranker(ws, search, frame_of)

    def rank_again(q, feedback):
        return gallery_entries(bench, q, frame_of, rank_with(default_run.method, q, feedback))

    done = review_round(bench, frame_of, default_run.results, rank_again, judged,
                        progress=lambda qs: tqdm(qs, desc="review round", unit="query", dynamic_ncols=True))
    table = review_table(done)
    storage.write_bytes(beside(results, "review.json"), json.dumps({
        "method": default_run.method, "judged": judged, "feedback": ws.params.mining.feedback.model_dump(),
        "before": done.before.to_dict()["groups"], "after": done.after.to_dict()["groups"],
        "verdicts": done.verdicts, "results": done.results}, indent=1).encode())
    log_metrics({f"review.before.{k}": v for k, v in flat_metrics(done.before).items()}
                | {f"review.after.{k}": v for k, v in flat_metrics(done.after).items()})
    mlflow.log_text(table, "eval_review.txt")
    return table


def _held_out(ws: Workspace, bench, frame_of: dict, default_run, results: str) -> str:
    """Rank the bench with every eval.tune candidate (the run already made where a candidate is params as they
    are), choose leave-one-set-out, write RESULTS.heldout.json and log both sides' figures; the table."""
    settings = tune_grid(ws.params.eval.tune)
    rankings = []
    for setting in settings:
        params = ws.params.replace(*as_overrides(setting))
        if params.mining == ws.params.mining:
            rankings.append(default_run.results)
            continue
        tuned = Workspace(params, str(ws.root))
        search = load_search(tuned, [default_run.method])
        rankings.append(evaluate_methods(bench, frame_of, [default_run.method],
                                         query_ranker(tuned, search, frame_of))[0].results)
    chosen = leave_one_set_out(bench, rankings, settings)
    table = held_out_table(chosen)
    storage.write_bytes(beside(results, "heldout.json"), json.dumps({
        "method": default_run.method, "settings": settings, "chosen": chosen.chosen, "in_sample": chosen.in_sample,
        "held_out": chosen.held_out_report.to_dict()["groups"],
        "in_sample_groups": chosen.in_sample_report.to_dict()["groups"],
        "results": chosen.held_out_results}, indent=1).encode())
    log_metrics({f"heldout.{k}": v for k, v in flat_metrics(chosen.held_out_report).items()}
                | {f"insample.{k}": v for k, v in flat_metrics(chosen.in_sample_report).items()})
    mlflow.log_text(table, "eval_heldout.txt")
    return table
