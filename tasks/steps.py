"""The pipeline steps as Prefect tasks. I/O steps retry; results are logged to the flow run and MLflow."""

from __future__ import annotations

from dataclasses import asdict

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from objret.dataset.labels import dataset_label
from objret.mining.report import FailureReport
from objret.steps import dataset as dataset_step
from objret.steps import discovery as discovery_step
from objret.steps import features as features_step
from objret.steps import graph as graph_step
from objret.steps import index as index_step
from objret.steps import ingest as ingest_step
from objret.steps import mine as mine_step
from objret.steps import regions as regions_step
from objret.steps import store as store_step
from objret.steps import whitening as whitening_step
from objret.steps.workspace import Workspace
from tasks import shard_serving
from tasks.tracking import log_artifacts, log_metrics, set_tags

# Inputs hold models and open stores, so Prefect's input-hash caching is off; objret caches by content itself.
# Results are never persisted: Prefect would pickle them (reports, arrays) into its result storage.
IO_TASK = dict(retries=2, retry_delay_seconds=[2, 10], cache_policy=NO_CACHE, persist_result=False)


@task(name="ingest", **IO_TASK)
def ingest(ws: Workspace, sources: list[str]) -> list[dict]:
    logger = get_run_logger()
    results = ingest_step.ingest(ws, sources)
    for r in results:
        logger.info("%s: %d new frames, %d already in the lake", r.source, r.added, r.skipped)
        for uri, message in r.errors:
            logger.warning("skipped %s: %s", uri, message)
    log_metrics({"lake_frames": len(ws.lake), "ingest_added": sum(r.added for r in results),
                 "ingest_errors": sum(len(r.errors) for r in results)})
    return [asdict(r) for r in results]


@task(name="features", cache_policy=NO_CACHE, persist_result=False)
def features(ws: Workspace) -> dict:
    result = features_step.features(ws)
    get_run_logger().info("features: %d computed (%.2f frames/s), %d cached before, %d failed",
                          result.computed, result.frames_per_second, result.already_cached, len(result.failed))
    log_metrics({"features_computed": result.computed, "features_cached_before": result.already_cached,
                 "features_failed": len(result.failed), "features_seconds": result.seconds,
                 "features_frames_per_s": result.frames_per_second})
    return asdict(result)


@task(name="regions", cache_policy=NO_CACHE, persist_result=False)
def regions(ws: Workspace) -> dict:
    result = regions_step.regions(ws)
    log_metrics({"regions_frames_extracted": result.extracted, "regions_extracted": result.regions})
    get_run_logger().info("regions: %d frames extracted (%d regions), %d stored before",
                          result.extracted, result.regions, result.already_stored)
    return asdict(result)


@task(name="whitening", cache_policy=NO_CACHE, persist_result=False)
def whitening(ws: Workspace) -> str | None:
    version = whitening_step.whitening(ws)
    get_run_logger().info("whitening: %s", version or "disabled")
    return version


@task(name="index", cache_policy=NO_CACHE, persist_result=False)
def index(ws: Workspace) -> dict:
    result = index_step.build_index(ws)
    log_metrics({"index_frames": result.frames, "index_regions": result.regions,
                 "index_bytes_per_region": result.bytes_per_region})
    get_run_logger().info("index %s: %d frames, %d regions in %s", result.version, result.frames, result.regions,
                          result.directory)
    return asdict(result)


@task(name="store", cache_policy=NO_CACHE, persist_result=False)
def store(ws: Workspace) -> dict:
    """The mining store (compact maps + GeM vectors) and the cell index of the small-object shortlist."""
    stored = store_step.store(ws)
    cells = store_step.cells(ws)
    dropped = store_step.prune_cache(ws)   # features.keep_cache: false
    log_metrics({"store_frames_written": stored.stored, "store_bytes_per_frame": stored.bytes_per_frame,
                 "cells_frames": cells.frames, "cells": cells.cells, "cells_bytes_per_frame": cells.bytes_per_frame,
                 "cache_shards_dropped": dropped})
    get_run_logger().info("mining store: %d frames written (%d before), %.0f bytes a frame; cell index: %d frames, "
                          "%d windows, %.0f bytes a frame", stored.stored, stored.already_stored,
                          stored.bytes_per_frame, cells.frames, cells.cells, cells.bytes_per_frame)
    return {"store": asdict(stored), "cells": asdict(cells), "cache_shards_dropped": dropped}


@task(name="graph", cache_policy=NO_CACHE, persist_result=False)
def graph(ws: Workspace, samples: bool = True) -> dict:
    """Region graph + Katz centrality of the current index (built, refreshed or unchanged); with ``samples``,
    the saliency PNGs of graph.sample_frames frames logged as MLflow artifacts under ``graph/`` (drawn when the
    graph changed: an unchanged graph's were logged by the run that built it)."""
    result = graph_step.graph(ws)
    log_metrics({"graph_nodes": result.nodes, "graph_edges": result.edges, "graph_mean_degree": result.mean_degree,
                 "graph_components": result.components, "graph_isolated": result.isolated,
                 "graph_knn_recall": result.recall, "graph_cg_iterations": result.cg_iterations,
                 "graph_cg_residual": result.cg_residual, "graph_new_nodes": result.new_nodes,
                 "graph_refreshed": float(result.mode == "refresh"), "graph_build_seconds": result.graph_seconds,
                 "graph_katz_seconds": result.katz_seconds, "graph_seconds": result.seconds})
    set_tags({"graph_version": result.version, "graph_mode": result.mode})
    get_run_logger().info("graph %s (%s): %d nodes, %d edges (mean degree %.1f), %d components, %d isolated, "
                          "Katz CG %d iterations (residual %.2e), %.1f s", result.version, result.mode, result.nodes,
                          result.edges, result.mean_degree, result.components, result.isolated,
                          result.cg_iterations, result.cg_residual, result.seconds)
    out = asdict(result)
    if samples and result.mode != "unchanged":
        pngs = graph_step.graph_samples(ws, ws.run_dir(f"graph-{result.version}"))
        log_artifacts(pngs, "graph")
        out["samples"] = pngs
    return out


@task(name="discovery", cache_policy=NO_CACHE, persist_result=False)
def discovery(ws: Workspace) -> dict:
    """OS.EGM regions and the 003 sec. 3.9 descriptor of every indexed frame over the current region graph
    (computed when the graph or the parameters changed, else left as they are)."""
    result = discovery_step.discovery(ws)
    log_metrics({"discovery_frames": result.frames, "discovery_computed": result.computed,
                 "discovery_mean_regions": result.mean_regions,
                 "discovery_frames_without_regions": result.frames_without_regions,
                 "discovery_seconds": result.seconds, "discovery_seconds_per_frame": result.seconds_per_frame})
    set_tags({"discovery_version": result.version})
    get_run_logger().info("discovery %s (%s): %d frames (%d computed, %.3f s a frame), %.1f OS.EGM regions a frame, "
                          "%d frames without one, %.1f s", result.version, result.mode, result.frames, result.computed,
                          result.seconds_per_frame, result.mean_regions, result.frames_without_regions,
                          result.seconds)
    return asdict(result)


@task(name="mine", cache_policy=NO_CACHE, persist_result=False)
def mine(ws: Workspace, report: FailureReport) -> mine_step.MiningOutcome:
    outcome = mine_step.mine(ws, report, served_by=shard_serving.served_by(ws))
    diffusion = outcome.provenance.get("diffusion") or {}
    log_metrics({"candidates": outcome.candidates, "mined": len(outcome.mined),
                 "near_duplicates_collapsed": sum(len(m["duplicates"]) for m in outcome.mined),
                 "diffusion": float(bool(diffusion.get("applied"))),
                 **{f"latency_{k}": v for k, v in outcome.timings.items()}})
    create_markdown_artifact(key=f"mined-{report.report_id.lower().replace('_', '-').replace('.', '-')}"[:60],
                             markdown=mined_table(report, outcome), description="Frames mined for the report")
    return outcome


@task(name="push", **IO_TASK)
def push(ws: Workspace, report: FailureReport, outcome: mine_step.MiningOutcome) -> dict:
    result = dataset_step.push_mined(ws, report, outcome)
    log_metrics({"dataset_added": result.added, "dataset_unchanged": result.unchanged,
                 "dataset_skipped_rejected": result.rejected})
    get_run_logger().info("retraining dataset %s: version %s, %d added, %d unchanged, %d skipped (rejected in a "
                          "review)", result.root, result.version, result.added, result.unchanged, result.rejected)
    return asdict(result)


@task(name="review-page", **IO_TASK)
def review_page(ws: Workspace, outcome: mine_step.MiningOutcome, run: dict) -> dict:
    """The run's review page: in the run folder (logged to MLflow by the flow) and beside the dataset."""
    local, beside = dataset_step.review_page(ws, outcome, run)
    get_run_logger().info("review page: %s", beside)
    return {"path": local, "uri": beside}


def mined_table(report: FailureReport, outcome: mine_step.MiningOutcome, rows: int = 50) -> str:
    lines = [f"### Report `{report.report_id}`: {report.class_name} ({report.failure_kind}; mined frames go in as "
             f"{dataset_label(report).describe()})", "",
             "| rank | score | frame | time (s) | box [x, y, w, h] | near-duplicates |", "|---:|---:|---|---:|---|---:|"]
    for m in outcome.mined[:rows]:
        time_s = f"{m['time_s']:.2f}" if m.get("time_s") is not None else ""
        box = ", ".join(f"{v:.0f}" for v in m["box"])
        lines.append(f"| {m['rank']} | {m['score']:.3f} | `{m['frame_id'][:12]}` {m['uri']} | {time_s} | [{box}] "
                     f"| {len(m['duplicates'])} |")
    return "\n".join(lines)
