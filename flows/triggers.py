"""Report-triggered mining: a submitted failure report becomes a Prefect event, the ``mine`` deployment's
trigger turns each event into a ``mine-report`` flow run.

- ``submit``: validate, record in the report ledger (each id once), emit ``objret.report.submitted``.
- ``mine_report_flow``: what the deployment runs: claim the report in the ledger, mine it under a lease, record
  the outcome.
- ``requeue_reports_flow``: send again the reports whose run's lease lapsed (the run was killed).
- ``watch_reports_flow``: scan folders or S3 prefixes for report files and submit the new ones.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict, dataclass

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from objret import storage
from objret.config import load_params
from objret.errors import ObjretError, ReportError
from objret.mining.report import load_report, parse_report
from objret.steps.workspace import Workspace
from tasks.report_ledger import LeaseKeeper, ReportLedger, Submission

REPORT_SUBMITTED = "objret.report.submitted"
RESOURCE_PREFIX = "objret.mining.report."


def ledger(ws: Workspace) -> ReportLedger:
    return ReportLedger(ws.root / "reports")


def emit_report_event(report: dict, source: str) -> None:
    """Send one ``objret.report.submitted`` event to the Prefect server and wait for it to be acknowledged."""
    from prefect.events import Event
    from prefect.events.clients import PrefectEventsClient
    from prefect.settings import PREFECT_API_URL
    from prefect.utilities.asyncutils import run_coro_as_sync

    if not PREFECT_API_URL.value():
        raise ObjretError("no Prefect server to send the report to: start one (`prefect server start`), serve the "
                          "deployments (`objret serve`) and set PREFECT_API_URL; or mine it directly with "
                          "`objret mine REPORT.json`")
    event = Event(event=REPORT_SUBMITTED,
                  resource={"prefect.resource.id": RESOURCE_PREFIX + report["report_id"],
                            "prefect.resource.name": report["report_id"]},
                  payload={"report": report, "source": source})

    async def send() -> None:
        async with PrefectEventsClient(checkpoint_every=1) as client:  # checkpoint: the server has it
            await client.emit(event)

    try:
        run_coro_as_sync(send())
    except Exception as exc:  # websockets/httpx raise many types; name the server, not a stack trace
        raise ObjretError(f"cannot send the report event to the Prefect server at {PREFECT_API_URL.value()}: "
                          f"{type(exc).__name__}: {exc}") from exc


def submit(ws: Workspace, report_text: bytes | str, source: str, again: bool = False) -> Submission:
    """Validate a report and, unless its id was already submitted (or mined), record it and emit its event."""
    report = load_report(report_text if isinstance(report_text, bytes) else report_text.encode())
    submission = ledger(ws).submit(report, source, again=again)
    if submission.accepted:
        try:
            emit_report_event(report.to_dict(), source)
        except ObjretError as exc:
            ledger(ws).finish(report.report_id, ok=False, error=str(exc))  # not sent: may be submitted again
            raise
    return submission


@flow(name="mine-report", log_prints=True, persist_result=False)
def mine_report_flow(report: dict, params_path: str | None = None, overrides: list[str] | None = None,
                     workdir: str | None = None) -> dict:
    """Mine one submitted report once: a report already mined (or being mined) is skipped and says so."""
    from flows.mine import mine_flow

    ws = Workspace(load_params(params_path, overrides), workdir)
    parsed = parse_report(report)  # a malformed payload fails here, naming each problem
    reports, run_id, lease_s = ledger(ws), str(flow_run.get_id() or uuid.uuid4()), ws.params.service.lease_s
    claimed, state = reports.claim(parsed.report_id, run_id, lease_s)
    if not claimed:
        get_run_logger().info("report %s is already %s: nothing to do", parsed.report_id, state)
        return {"report_id": parsed.report_id, "skipped": True, "state": state}
    try:
        with LeaseKeeper(reports, parsed.report_id, run_id, lease_s):
            # The ledger's copy: the mine flow reads the report as a file, like `objret mine`.
            result = mine_flow(report_path=reports.report_uri(parsed.report_id), params_path=params_path,
                               overrides=overrides, workdir=workdir)
    except BaseException as exc:
        reports.finish(parsed.report_id, ok=False, run_id=run_id, error=f"{type(exc).__name__}: {exc}"[:2000])
        raise
    reports.finish(parsed.report_id, ok=True, run_id=run_id, mlflow_run_id=result["mlflow_run_id"],
                   dataset_version=result["dataset"]["version"], mined=result["mined"])
    return {"report_id": parsed.report_id, "skipped": False, "mined": result["mined"],
            "dataset_version": result["dataset"]["version"], "mlflow_run_id": result["mlflow_run_id"]}


@flow(name="requeue-reports", log_prints=True, persist_result=False)
def requeue_reports_flow(params_path: str | None = None, overrides: list[str] | None = None,
                         workdir: str | None = None) -> list[str]:
    """Send again every report whose mining run stopped renewing its lease (killed, machine lost)."""
    ws = Workspace(load_params(params_path, overrides), workdir)
    requeued, unsent = ledger(ws).requeue_expired(), []
    for report_id in requeued:
        report = json.loads(storage.read_bytes(ledger(ws).report_uri(report_id)))
        try:
            emit_report_event(report, source="lease lapsed")
        except ObjretError as exc:   # not sent: failed, so that it may be submitted again
            ledger(ws).finish(report_id, ok=False, error=str(exc))
            unsent.append(f"{report_id}: {exc}")
            continue
        get_run_logger().info("report %s: its run's lease lapsed; sent again", report_id)
    if unsent:
        raise ObjretError(f"{len(unsent)} of {len(requeued)} lapsed reports could not be sent again (marked "
                          f"failed; submit them again): {unsent[0]}")
    return requeued


@dataclass
class WatchResult:
    seen: int = 0         # report files found
    submitted: int = 0    # new reports sent
    known: int = 0        # files already handled by an earlier scan
    duplicates: int = 0   # new files whose report id was already submitted
    rejected: int = 0     # files that are not valid reports (logged, remembered, not retried)


def _scan_state_uri(ws: Workspace) -> str:
    return str(ws.root / "reports" / ".watched.json")


def watch_once(ws: Workspace, sources: list[str], endpoint_url: str | None = None, log=print) -> WatchResult:
    """Submit every report file (``*.json``) under ``sources`` not handled by an earlier scan. A file is
    remembered by its URI and content hash, so a rewritten file is read again."""
    import hashlib

    state_uri = _scan_state_uri(ws)
    handled: dict = json.loads(storage.read_bytes(state_uri)) if storage.exists(state_uri) else {}
    result = WatchResult()
    for source in sources:
        for uri in storage.list_uris(source, endpoint_url):
            if not uri.endswith(".json"):
                continue
            result.seen += 1
            try:
                data = storage.read_bytes(uri, endpoint_url)
            except ObjretError as exc:   # vanished or unreadable: tried again next scan
                log(f"cannot read {uri}: {exc}")
                continue
            digest = hashlib.sha256(data).hexdigest()[:16]
            if handled.get(uri) == digest:
                result.known += 1
                continue
            try:
                submission = submit(ws, data, uri)
            except ReportError as exc:
                log(f"rejected {uri}: {exc}")
                result.rejected += 1
            else:
                if submission.accepted:
                    result.submitted += 1
                    log(f"submitted {submission.report_id} from {uri}")
                else:
                    result.duplicates += 1
                    log(f"{uri}: report {submission.report_id} is already {submission.state}: not submitted again")
            handled[uri] = digest
            storage.write_bytes(state_uri, json.dumps(handled, indent=1, sort_keys=True).encode())
    return result


@flow(name="watch-reports", log_prints=True, persist_result=False)
def watch_reports_flow(sources: list[str] | None = None, params_path: str | None = None,
                       overrides: list[str] | None = None, workdir: str | None = None) -> dict:
    """One scan of the watched folders / S3 prefixes (default: service.watch.sources); the deployment runs it on
    an interval."""
    ws = Workspace(load_params(params_path, overrides), workdir)
    logger = get_run_logger()
    sources = list(sources or ws.params.service.watch.sources)
    if not sources:
        raise ObjretError("nothing to watch: set service.watch.sources to report folders or s3:// prefixes")
    result = watch_once(ws, sources, ws.s3_endpoint_url, log=logger.info)
    logger.info("watched %d report files: %d submitted, %d seen before, %d already submitted, %d rejected",
                result.seen, result.submitted, result.known, result.duplicates, result.rejected)
    return asdict(result)
