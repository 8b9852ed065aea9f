"""``objret serve``: the deployments a team runs every day, served by one process against a Prefect server.

- ``mine``: a ``mine-report`` run for each ``objret.report.submitted`` event (DeploymentEventTrigger), at most
  ``service.mine_concurrency`` at once; more reports wait for a slot.
- ``requeue-reports``: every ``service.lease_s / 2`` seconds, sends again the reports whose mining run stopped
  renewing its lease (killed outright), so each is mined once in the end.
- ``refresh-index``: ``build-index`` on the lake sources on ``service.refresh_cron``: only new frames are
  ingested and cached, the index grows, whitening and graph are refitted as their growth policies say.
- ``watch-reports`` (when ``service.watch.sources`` is set): scans the folders / S3 prefixes for report files
  every ``service.watch.interval_s`` seconds and submits the new ones.
"""

from __future__ import annotations

from pathlib import Path

from prefect import serve
from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger
from prefect.types.entrypoint import EntrypointType

from flows.build_index import build_index_flow
from flows.triggers import (REPORT_SUBMITTED, RESOURCE_PREFIX, mine_report_flow, requeue_reports_flow,
                            watch_reports_flow)
from objret.config import DEFAULT_PARAMS, load_params, params_file
from objret.steps.workspace import Workspace


def deployments(params_path: str | None = None, overrides: list[str] | None = None, workdir: str | None = None):
    params = load_params(params_path, overrides)
    ws = Workspace(params, workdir)
    service = params.service
    # Every run reads the same parameters and work folder as this process, wherever the runner starts it.
    # Runs load the flows by module (objret is installed), so `objret serve` works from any folder.
    by_module = {"entrypoint_type": EntrypointType.MODULE_PATH}
    common = {"params_path": str(Path(params_file(params_path) or DEFAULT_PARAMS).resolve()),
              "overrides": list(overrides or []), "workdir": str(ws.root)}
    concurrency = service.mine_concurrency   # at least 1 (objret.config)
    trigger = DeploymentEventTrigger(
        name="objret report submitted",
        expect={REPORT_SUBMITTED},
        match={"prefect.resource.id": RESOURCE_PREFIX + "*"},
        parameters={"report": "{{ event.payload.report }}", **common},
    )
    out = [mine_report_flow.to_deployment(name="mine", triggers=[trigger], concurrency_limit=concurrency,
                                          parameters=common, description="mine one submitted report", **by_module)]
    out.append(requeue_reports_flow.to_deployment(
        name="requeue-reports", interval=service.lease_s / 2, parameters=common,
        description="send again the reports whose mining run's lease lapsed", **by_module))
    cron = service.refresh_cron
    if cron:
        out.append(build_index_flow.to_deployment(name="refresh-index", cron=cron, parameters=common,
                                                  description="build-index on lake.sources: new frames only",
                                                  **by_module))
    sources = list(service.watch.sources)
    if sources:
        out.append(watch_reports_flow.to_deployment(
            name="watch-reports", interval=service.watch.interval_s, parameters={"sources": sources, **common},
            description="scan for new report files and submit them", **by_module))
    return out, concurrency


def serve_deployments(params_path: str | None = None, overrides: list[str] | None = None,
                      workdir: str | None = None) -> None:
    found, concurrency = deployments(params_path, overrides, workdir)
    # The process runs the mining slots plus one refresh, one scan and one requeue beside them.
    serve(*found, limit=concurrency + 3)
