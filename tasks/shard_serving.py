"""Index shards served by the Dask workers that hold them (``scale_out.serve_shards``).

Each shard's region and cell indexes are loaded once into the memory of one worker (shard i on worker i mod n,
by the workers' sorted addresses) and searched there; a report's search fans out to every shard at once and the
mining process merges the lists (objret.index.sharded). The mining process keeps memory-mapped copies only for
the rows a shortlist reads. Workers read the shard folders themselves: on a real cluster the work folder must be
on a filesystem every worker sees at the same path, as for the sharded build (tasks/scale_out.py).
"""

from __future__ import annotations

import atexit
import os
import time
from collections import deque
from pathlib import Path

import numpy as np

from objret.config import ScaleOutParams
from objret.errors import ObjretError
from objret.index.region_index import RegionIndex
from objret.index.sharded import ShardSearch
from objret.steps.workspace import Workspace

_held: dict[str, tuple[str, RegionIndex]] = {}   # on a worker: shard folder -> (version, its index in memory)
_clients: dict[str, object] = {}                 # in the mining process: one Dask client per scheduler
CONNECT_TIMEOUT = "30s"                          # Dask retries a scheduler that refuses until then


def search_held(folder: str, recipe: dict, version: str, queries: np.ndarray, k: int, refine: bool) -> dict:
    """On a worker: the k nearest regions of ``queries`` in the shard at ``folder``, loaded on first use (and
    again when the shard's saved version is not the one held)."""
    held = _held.get(folder)
    if held is None or held[0] != version:
        _held.pop(folder, None)   # the old version's memory first
        index = RegionIndex.load(folder, recipe=recipe)
        _held[folder] = held = (version, index)
    if not len(held[1]):
        return {"ids": None, "sims": None, "pid": os.getpid(), "search_s": 0.0}
    start = time.perf_counter()
    ids, sims = held[1].search(queries, k, refine=refine)
    return {"ids": ids, "sims": sims, "pid": os.getpid(), "search_s": time.perf_counter() - start}


def held_shards() -> list[str]:
    """On a worker: the shard folders it holds."""
    return sorted(_held)


class ServedShards:
    """A ShardSearch over ``folders`` that asks the worker holding each shard; ``log`` lists, per search, the
    process that answered each shard and the seconds its search took there."""

    def __init__(self, client, folders: list[Path], recipe: dict):
        workers = sorted(client.scheduler_info()["workers"])
        if not workers:
            raise ObjretError("scale_out.serve_shards: the Dask cluster has no workers")
        self.client, self.recipe = client, recipe
        self.folders = [str(Path(f).resolve()) for f in folders]
        self.versions = [(Path(f) / "CURRENT").read_text().strip() for f in self.folders]
        self.worker_of = {f: workers[i % len(workers)] for i, f in enumerate(self.folders)}
        self.log: deque[list[tuple[int, float]]] = deque(maxlen=1000)

    def __call__(self, queries: np.ndarray, k: int, refine: bool) -> list:
        futures = [self.client.submit(search_held, folder, self.recipe, version, queries, k, refine,
                                      workers=[self.worker_of[folder]], allow_other_workers=False, pure=False)
                   for folder, version in zip(self.folders, self.versions)]
        answers = []
        for folder, future in zip(self.folders, futures):
            try:
                answers.append(future.result())
            except Exception as exc:   # the search's own error, or the cluster's (the worker lost)
                raise ObjretError(f"index shard {folder} (served by worker {self.worker_of[folder]}): "
                                  f"{type(exc).__name__}: {exc}") from exc
        self.log.append([(a["pid"], a["search_s"]) for a in answers])
        return [None if a["ids"] is None else (a["ids"], a["sims"]) for a in answers]


def served_by(ws: Workspace):
    """What ``objret.steps.mine`` searches index shards with: the Dask workers of ``scale_out`` when
    ``scale_out.serve_shards`` is on, else None (this process)."""
    so = ws.params.scale_out
    if not so.serve_shards:
        return None
    client = cluster_client(so)

    def serve(folders: list[Path], recipe: dict) -> ShardSearch:
        return ServedShards(client, folders, recipe)

    return serve


def cluster_client(so: ScaleOutParams):
    """A client of the scheduler at ``scale_out.address``, kept for the process; without one, a local cluster of
    ``scale_out.n_workers`` worker processes (default: cores / threads_per_worker) started on first use and
    closed when the process exits."""
    key = so.address or "local"
    if key not in _clients:
        from distributed import Client, LocalCluster

        from tasks.scale_out import local_cluster_environ

        if so.address:
            try:
                _clients[key] = Client(so.address, timeout=CONNECT_TIMEOUT)
            except OSError as exc:
                raise ObjretError(f"scale_out.address {so.address}: no Dask scheduler answers there ({exc})") from exc
        else:
            n = so.n_workers or max(1, (os.cpu_count() or 1) // so.threads_per_worker)
            with local_cluster_environ():
                cluster = LocalCluster(n_workers=n, threads_per_worker=so.threads_per_worker, processes=True,
                                       dashboard_address=":0")
            _clients[key] = Client(cluster)
            atexit.register(cluster.close)
        atexit.register(_clients[key].close)
    return _clients[key]


def close_clients() -> None:
    """Disconnect from every cluster this process served shards from (before the cluster goes away)."""
    while _clients:
        _clients.popitem()[1].close()
