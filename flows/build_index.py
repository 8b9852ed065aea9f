"""Flow ``build-index``: ingest the lake sources -> cache dense features -> regions -> whitening -> region index
-> mining store and cell index -> region graph -> OS.EGM discovery (graph.discovery.enabled); flow ``graph``: the region graph (and its OS.EGM
discovery) alone, for an index already built. DVC runs build-index's steps one a stage (``only``)."""

from __future__ import annotations

import mlflow
from prefect import flow

from objret.config import load_params
from objret.errors import ObjretError
from objret.steps.workspace import Workspace
from tasks import scale_out, steps
from tasks.tracking import mlflow_run

STEPS = ("ingest", "features", "regions", "whitening", "index", "store", "graph")   # in the order they run


@flow(name="build-index", log_prints=True, persist_result=False)
def build_index_flow(sources: list[str] | None = None, params_path: str | None = None,
                     overrides: list[str] | None = None, workdir: str | None = None,
                     only: list[str] | None = None) -> dict:
    """All steps (the graph when graph.enabled), or only the named ones (e.g. ["features"]: a DVC stage) in one
    flow run and MLflow run; a step not run is None in the result."""
    ws = Workspace(load_params(params_path, overrides), workdir)
    sources = sources or list(ws.params.lake.sources)
    graph_on = ws.params.graph.enabled
    todo = set(only) if only else {step for step in STEPS if step != "graph" or graph_on}
    if todo - set(STEPS):
        raise ObjretError(f"unknown build-index step(s) {', '.join(sorted(todo - set(STEPS)))}: "
                          f"choose among {', '.join(STEPS)}")
    if ws.params.scale_out.index_shards and "graph" in todo:
        raise ObjretError("scale_out.index_shards builds no single region index for the region graph: "
                          "set graph.enabled: false with it")
    tags = {"flow": "build-index", "steps": ",".join(step for step in STEPS if step in todo)}
    with mlflow_run(ws, f"build-index {tags['steps']}" if only else "build-index", tags) as run:
        ingested = steps.ingest(ws, sources) if "ingest" in todo else None
        if scale_out.enabled(ws) and {"features", "regions"} & todo:   # as tasks on a Dask cluster (scale_out)
            cached, found = scale_out.features_and_regions(ws, todo)
        else:
            cached = steps.features(ws) if "features" in todo else None
            found = steps.regions(ws) if "regions" in todo else None
        whitening = steps.whitening(ws) if "whitening" in todo else None
        if ws.params.scale_out.index_shards:   # the store and both indexes as shards, on the cluster
            indexed = stored = scale_out.run(ws, ["shards"])["shards"] if {"index", "store"} & todo else None
        else:
            indexed = steps.index(ws) if "index" in todo else None
            stored = steps.store(ws) if "store" in todo else None
        if "whitening" in todo:
            mlflow.set_tags({"whitening_version": whitening or "none"})
        if indexed is not None and "version" in indexed:
            mlflow.set_tags({"index_version": indexed["version"]})
        graphed = steps.graph(ws) if "graph" in todo else None
        discovered = steps.discovery(ws) if graphed is not None and discovery_enabled(ws) else None
        return {"ingest": ingested, "features": cached, "regions": found, "whitening": whitening,
                "index": indexed, "store": stored, "graph": graphed, "discovery": discovered, "mlflow_run_id": run.info.run_id,
                "workdir": str(ws.root)}


@flow(name="graph", log_prints=True, persist_result=False)
def graph_flow(params_path: str | None = None, overrides: list[str] | None = None,
               workdir: str | None = None) -> dict:
    """The region graph of an index build-index made (its DVC stage): built, refreshed or left as it is."""
    ws = Workspace(load_params(params_path, overrides), workdir)
    with mlflow_run(ws, "graph", {"flow": "graph"}) as run:
        graphed = steps.graph(ws)
        mlflow.set_tags({"index_version": graphed["index_version"]})
        discovered = steps.discovery(ws) if discovery_enabled(ws) else None
        return {"graph": graphed, "discovery": discovered, "mlflow_run_id": run.info.run_id, "workdir": str(ws.root)}


def discovery_enabled(ws: Workspace) -> bool:
    return ws.params.graph.discovery.enabled
