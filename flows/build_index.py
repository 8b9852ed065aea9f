"""Flow ``build-index``: ingest the lake sources -> cache dense features -> regions -> whitening -> region index."""

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
        return {"ingest": ingested, "features": cached, "regions": found, "whitening": whitening,
                "index": indexed, "mlflow_run_id": run.info.run_id, "workdir": str(ws.root)}
