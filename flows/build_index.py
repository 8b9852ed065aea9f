"""Flow ``build-index``: ingest the lake sources -> cache dense features -> regions -> whitening -> region index
-> region graph -> OS.EGM discovery (graph.discovery.enabled); flow ``graph``: the region graph (and its OS.EGM
discovery) alone, for an index already built."""

from __future__ import annotations

import mlflow
from prefect import flow

from objret.config import load_params
from objret.workspace import Workspace
from tasks import steps
from tasks.tracking import mlflow_run


@flow(name="build-index", log_prints=True)
def build_index_flow(sources: list[str] | None = None, params_path: str | None = None,
                     overrides: list[str] | None = None, workdir: str | None = None) -> dict:
    ws = Workspace(load_params(params_path, overrides), workdir)
    sources = sources or list(ws.params.section("lake").get("sources") or [])
    with mlflow_run(ws, "build-index", {"flow": "build-index"}) as run:
        ingested = steps.ingest(ws, sources)
        cached = steps.features(ws)
        found = steps.regions(ws)
        whitening = steps.whitening(ws)
        indexed = steps.index(ws)
        mlflow.set_tags({"index_version": indexed["version"], "whitening_version": whitening or "none"})
        graphed = steps.graph(ws) if ws.params.section("graph").get("enabled", True) else None
        discovered = steps.discovery(ws) if graphed is not None and discovery_enabled(ws) else None
        return {"ingest": ingested, "features": cached, "regions": found, "whitening": whitening,
                "index": indexed, "graph": graphed, "discovery": discovered, "mlflow_run_id": run.info.run_id,
                "workdir": str(ws.root)}


@flow(name="graph", log_prints=True)
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
    return bool((ws.params.section("graph").get("discovery") or {}).get("enabled", False))
