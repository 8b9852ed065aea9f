"""Feature caching and region extraction on a Dask cluster through Prefect's Dask task runner (prefect-dask).

``scale_out`` in params.yaml: a running scheduler (``address``) or a local cluster started for the run, one
worker process per GPU where there are GPUs. The lake's frames are cut into chunks of whole feature shards /
region batches (objret.steps.chunks); a task per chunk, features first, then regions. Workers read and write the work
folder themselves, so on a real cluster it must be on a filesystem every worker sees at the same path.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from dataclasses import asdict

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner
from prefect_dask import DaskTaskRunner

from objret.config import ScaleOutParams
from objret.errors import ObjretError
from objret.steps import chunks
from objret.steps import shards as shards_step
from objret.steps.workspace import Workspace
from tasks.tracking import log_metrics

STEPS = ("features", "regions", "shards")


def enabled(ws: Workspace) -> bool:
    return ws.params.scale_out.enabled


def features_and_regions(ws: Workspace, steps=STEPS) -> tuple[dict | None, dict | None]:
    """build-index's features and regions steps (those of ``steps``) on the cluster: their results as the steps
    return them (None: not run), with each chunk's worker under ``chunks``; metrics logged as the steps log them."""
    out = run(ws, steps)
    ws.__dict__.pop("cache", None)   # its shard index predates the workers' shards: read them again when used
    feats, found = out["features"], out["regions"]
    metrics = {"scale_out_workers": len(workers([c for r in (feats, found) if r for c in r["chunks"]]))}
    if feats is not None:
        metrics.update(features_computed=feats["computed"], features_cached_before=feats["already_cached"],
                       features_failed=len(feats["failed"]), features_seconds=feats["seconds"],
                       features_frames_per_s=feats["computed"] / feats["seconds"] if feats["seconds"] > 0 else 0.0)
    if found is not None:
        metrics.update(regions_frames_extracted=found["extracted"], regions_extracted=found["regions"])
    log_metrics(metrics)
    return feats, found


def run(ws: Workspace, steps=STEPS) -> dict:
    """The scale-out flow over this work folder, on the cluster ``scale_out`` names (none when every frame has
    its maps and regions already: a cluster takes a while to start)."""
    steps = [s for s in STEPS if s in steps]
    chunk_frames = ws.params.scale_out.chunk_frames
    busy = (("features" in steps and chunks.feature_chunks(ws, chunk_frames))
            or ("regions" in steps and chunks.region_chunks(ws, chunk_frames))
            or ("shards" in steps and chunks.shard_chunks(ws, chunk_frames)))
    with _api_for_workers(), local_cluster_environ():
        runner = task_runner(ws.params.scale_out) if busy else ThreadPoolTaskRunner()
        # Workers get the parameters as a plain dict (picklable, a Prefect parameter) and validate them again.
        return scale_out_flow.with_options(task_runner=runner)(ws.params.to_dict(), str(ws.root), steps)


def _api_for_workers():
    """Without PREFECT_API_URL Prefect serves its API from a temporary server of this process, and each worker
    process would start a server of its own (tens of seconds, task runs recorded elsewhere): give them this one.
    A worker on another machine cannot reach it: a real cluster needs a PREFECT_API_URL (see the README)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        return contextlib.nullcontext()
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()   # the one Prefect's client starts here (the same instance)
    server.start()
    return temporary_settings({PREFECT_API_URL: server.api_url})


@contextlib.contextmanager
def local_cluster_environ():
    """Worker processes of a local cluster without Dask's MALLOC_TRIM_THRESHOLD_=65536: a fixed threshold turns off
    glibc's adaptive mmap threshold, every large torch tensor is then mapped and faulted in afresh, and feature
    caching ran 1.5x slower (2-core CPU). This process's environment is put back afterwards: Dask's nannies set
    their workers' variables (OMP_NUM_THREADS=1, ...) in the process that starts them too."""
    import dask

    before = dict(os.environ)
    env = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}))
    env.pop("MALLOC_TRIM_THRESHOLD_", None)
    try:
        with dask.config.set({"distributed.nanny.pre-spawn-environ": env}):
            yield
    finally:
        os.environ.clear()
        os.environ.update(before)


def task_runner(so: ScaleOutParams) -> DaskTaskRunner:
    """The Dask task runner ``scale_out`` asks for: the scheduler at ``address``, else a local cluster of worker
    processes, one per GPU (each seeing only its own) where there are GPUs."""
    if so.address:
        return DaskTaskRunner(address=so.address)
    threads = so.threads_per_worker
    n_workers = so.n_workers
    gpus = visible_gpus()
    if gpus:
        n = int(n_workers or len(gpus))
        return DaskTaskRunner(cluster_class=gpu_cluster, cluster_kwargs={
            "gpus": [gpus[i % len(gpus)] for i in range(n)], "threads_per_worker": threads})
    n = int(n_workers or max(1, (os.cpu_count() or 1) // threads))
    return DaskTaskRunner(cluster_kwargs={"n_workers": n, "threads_per_worker": threads, "processes": True,
                                          "dashboard_address": ":0"})


def visible_gpus() -> list[str]:
    """This machine's CUDA devices as CUDA_VISIBLE_DEVICES names them (none without CUDA)."""
    import torch

    count = torch.cuda.device_count()
    named = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return named[:count] if named else [str(i) for i in range(count)]


def gpu_cluster(gpus: list[str], threads_per_worker: int = 1):
    """A local Dask cluster with a worker process per entry of ``gpus``, each seeing only that GPU (its cuda:0,
    the device objret picks), as dask-cuda's LocalCUDACluster does."""
    from distributed import Nanny, Scheduler, SpecCluster

    workers = {i: {"cls": Nanny, "options": {"nthreads": threads_per_worker, "env": {"CUDA_VISIBLE_DEVICES": gpu}}}
               for i, gpu in enumerate(gpus)}
    return SpecCluster(workers=workers, scheduler={"cls": Scheduler, "options": {"dashboard_address": ":0"}})


@flow(name="scale-out", log_prints=True, persist_result=False)
def scale_out_flow(params: dict, workdir: str, steps: list[str] = list(STEPS)) -> dict:
    """Features, then regions, of the frames that lack them, then index shards of the frames in none (the
    store, cell and region index of a chunk: objret.steps.shards), a task per chunk of frames on the cluster."""
    ws = chunks.workspace(params, workdir)
    chunk_frames = ws.params.scale_out.chunk_frames
    uris = {f.frame_id: f.image_uri for f in ws.lake.frames()}
    feats = found = None

    if "features" in steps:
        start = time.perf_counter()
        plan = chunks.feature_chunks(ws, chunk_frames)
        done = _run_chunks("features", features_chunk, plan, params, workdir, uris)
        feats = {"computed": sum(c["computed"] for c in done), "already_cached": len(uris) - sum(map(len, plan)),
                 "failed": [f for c in done for f in c["failed"]], "seconds": time.perf_counter() - start,
                 "chunks": done}

    if "regions" in steps:
        stored_before = len(ws.region_store.stored_ids())
        plan = chunks.region_chunks(ws, chunk_frames)
        done = _run_chunks("regions", regions_chunk, plan, params, workdir, uris)
        found = {"extracted": sum(c["extracted"] for c in done), "already_stored": stored_before,
                 "regions": sum(c["regions"] for c in done), "directory": str(ws.region_store.dir), "chunks": done}
    sharded = None
    if "shards" in steps:
        plan = chunks.shard_chunks(ws, chunk_frames)
        if plan:
            shards_step.prepare(ws, [f for c in plan for f in c])   # the codebooks every shard encodes with
        done = _run_chunks("shards", shard_chunk, plan, params, workdir, uris, first=shards_step.next_number(ws))
        sharded = {"built": len(done), "frames": sum(c["frames"] for c in done),
                   "shards": len(shards_step.saved_shards(ws)), "directory": str(shards_step.shards_dir(ws)),
                   "chunks": done}
    return {"features": feats, "regions": found, "shards": sharded}


@task(name="shard-chunk", task_run_name="shard-chunk-{chunk}", cache_policy=NO_CACHE, persist_result=False)
def shard_chunk(params: dict, workdir: str, chunk: int, frame_ids: list[str]) -> dict:
    result = chunks.shard_chunk(params, workdir, chunk, frame_ids)
    get_run_logger().info("index shard %s: %d frames, %d regions, %d cells", result.name, result.frames,
                          result.regions, result.cells)
    return {**asdict(result), **where_it_ran()}


@task(name="features-chunk", task_run_name="features-chunk-{chunk}", cache_policy=NO_CACHE, persist_result=False)
def features_chunk(params: dict, workdir: str, chunk: int, frame_ids: list[str]) -> dict:
    result = chunks.features_chunk(params, workdir, frame_ids)
    get_run_logger().info("features chunk %d: %d computed (%.2f frames/s), %d cached before, %d failed",
                          chunk, result.computed, result.frames_per_second, result.already_cached, len(result.failed))
    return {**asdict(result), **where_it_ran()}


@task(name="regions-chunk", task_run_name="regions-chunk-{chunk}", cache_policy=NO_CACHE, persist_result=False)
def regions_chunk(params: dict, workdir: str, chunk: int, frame_ids: list[str]) -> dict:
    result = chunks.regions_chunk(params, workdir, frame_ids)
    get_run_logger().info("regions chunk %d: %d frames extracted (%d regions)", chunk, result.extracted,
                          result.regions)
    return {**asdict(result), **where_it_ran()}


def where_it_ran() -> dict:
    """The Dask worker, process, host and device a chunk ran on."""
    from distributed import get_worker

    from objret.features.backbone import pick_device

    try:
        worker = str(get_worker().name)
    except ValueError:   # not on a Dask worker
        worker = None
    return {"worker": worker, "pid": os.getpid(), "host": socket.gethostname(), "device": str(pick_device()),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}


def workers(done: list[dict]) -> set[tuple[str, int]]:
    return {(c["host"], c["pid"]) for c in done}


def _run_chunks(step: str, chunk_task, plan: list[list[str]], params: dict, workdir: str,
                uris: dict[str, str], first: int = 0) -> list[dict]:
    """Every chunk as a task on the cluster (numbered from ``first``); a failed chunk fails the step, naming its
    frames, after the others finished (their frames stay cached: a re-run does only what is missing)."""
    logger = get_run_logger()
    futures = [chunk_task.submit(params, workdir, first + i, ids) for i, ids in enumerate(plan)]
    done, failed = [], []
    for i, (ids, future) in enumerate(zip(plan, futures)):
        try:
            result = future.result()
        except Exception as exc:   # the task's own error, or the cluster's (a worker lost)
            failed.append(f"chunk {i} ({len(ids)} frames, {uris.get(ids[0])} .. {uris.get(ids[-1])}): "
                          f"{type(exc).__name__}: {exc}")
            continue
        done.append({"chunk": i, "frames": len(ids), **result})
        logger.info("%s: chunk %d/%d (%d frames) done on worker %s (pid %d on %s, %s)", step, i + 1, len(plan),
                    len(ids), result["worker"], result["pid"], result["host"], result["device"])
    if failed:
        raise ObjretError(f"{step}: {len(failed)} of {len(plan)} chunks failed (the other chunks are stored; a "
                          "re-run does only the frames still missing):\n  " + "\n  ".join(failed))
    return done
