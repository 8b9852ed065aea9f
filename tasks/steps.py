"""The pipeline steps as Prefect tasks. I/O steps retry; results are logged to the flow run and MLflow."""

from __future__ import annotations

from dataclasses import asdict

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from objret import pipeline
from objret.report import FailureReport
from objret.workspace import Workspace
from tasks.tracking import log_metrics

# Inputs hold models and open stores, so Prefect's input-hash caching is off; objret caches by content itself.
IO_TASK = dict(retries=2, retry_delay_seconds=[2, 10], cache_policy=NO_CACHE)


@task(name="ingest", **IO_TASK)
def ingest(ws: Workspace, sources: list[str]) -> list[dict]:
    logger = get_run_logger()
    results = pipeline.ingest(ws, sources)
    for r in results:
        logger.info("%s: %d new frames, %d already in the lake", r.source, r.added, r.skipped)
        for uri, message in r.errors:
            logger.warning("skipped %s: %s", uri, message)
    log_metrics({"lake_frames": len(ws.lake), "ingest_added": sum(r.added for r in results),
                 "ingest_errors": sum(len(r.errors) for r in results)})
    return [asdict(r) for r in results]


@task(name="features", cache_policy=NO_CACHE)
def features(ws: Workspace) -> dict:
    result = pipeline.features(ws)
    get_run_logger().info("features: %d computed (%.2f frames/s), %d cached before, %d failed",
                          result.computed, result.frames_per_second, result.already_cached, len(result.failed))
    log_metrics({"features_computed": result.computed, "features_cached_before": result.already_cached,
                 "features_failed": len(result.failed), "features_seconds": result.seconds,
                 "features_frames_per_s": result.frames_per_second})
    return asdict(result)


@task(name="regions", cache_policy=NO_CACHE)
def regions(ws: Workspace) -> dict:
    result = pipeline.regions(ws)
    log_metrics({"regions_frames_extracted": result.extracted, "regions_extracted": result.regions})
    get_run_logger().info("regions: %d frames extracted (%d regions), %d stored before",
                          result.extracted, result.regions, result.already_stored)
    return asdict(result)


@task(name="whitening", cache_policy=NO_CACHE)
def whitening(ws: Workspace) -> str | None:
    version = pipeline.whitening(ws)
    get_run_logger().info("whitening: %s", version or "disabled")
    return version


@task(name="index", cache_policy=NO_CACHE)
def index(ws: Workspace) -> dict:
    result = pipeline.build_index(ws)
    log_metrics({"index_frames": result.frames, "index_regions": result.regions,
                 "index_bytes_per_region": result.bytes_per_region})
    get_run_logger().info("index %s: %d frames, %d regions in %s", result.version, result.frames, result.regions,
                          result.directory)
    return asdict(result)


@task(name="mine", cache_policy=NO_CACHE)
def mine(ws: Workspace, report: FailureReport) -> pipeline.MiningOutcome:
    outcome = pipeline.mine(ws, report)
    log_metrics({"candidates": outcome.candidates, "mined": len(outcome.mined),
                 "near_duplicates_collapsed": sum(len(m["duplicates"]) for m in outcome.mined),
                 **{f"latency_{k}": v for k, v in outcome.timings.items()}})
    create_markdown_artifact(key=f"mined-{report.report_id.lower().replace('_', '-').replace('.', '-')}"[:60],
                             markdown=mined_table(report, outcome), description="Frames mined for the report")
    return outcome


@task(name="push", **IO_TASK)
def push(ws: Workspace, report: FailureReport, outcome: pipeline.MiningOutcome) -> dict:
    result = pipeline.push_mined(ws, report, outcome)
    log_metrics({"dataset_added": result.added, "dataset_unchanged": result.unchanged})
    get_run_logger().info("retraining dataset %s: version %s, %d added, %d unchanged",
                          result.root, result.version, result.added, result.unchanged)
    return asdict(result)


def mined_table(report: FailureReport, outcome: pipeline.MiningOutcome, rows: int = 50) -> str:
    lines = [f"### Report `{report.report_id}`: {report.class_name} ({report.failure_kind})", "",
             "| rank | score | frame | time (s) | box [x, y, w, h] | near-duplicates |", "|---:|---:|---|---:|---|---:|"]
    for m in outcome.mined[:rows]:
        time_s = f"{m['time_s']:.2f}" if m.get("time_s") is not None else ""
        box = ", ".join(f"{v:.0f}" for v in m["box"])
        lines.append(f"| {m['rank']} | {m['score']:.3f} | `{m['frame_id'][:12]}` {m['uri']} | {time_s} | [{box}] "
                     f"| {len(m['duplicates'])} |")
    return "\n".join(lines)
