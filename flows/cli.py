"""The ``objret`` command: build the index, mine failure reports, evaluate on a bench, open the MLflow UI."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# Telemetry off and a start-up timeout that a loaded 2-core machine meets; before Prefect/MLflow are imported.
for _key, _value in {"DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true",
                     "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DVC_NO_ANALYTICS": "1", "DVC_STUDIO_OFFLINE": "1",
                     "FIFTYONE_DO_NOT_TRACK": "true", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}.items():
    os.environ.setdefault(_key, _value)

from objret.errors import ObjretError, ReportError  # noqa: E402
from objret.dataset.exports import FORMATS as EXPORT_FORMATS  # noqa: E402  (no heavy imports: the CLI starts fast)


def _frames_judged(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"frames judged per query must be a whole number >= 0, not {text!r}")
    return value


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", help="parameter file laid over params.yaml (default: $OBJRET_PARAMS, "
                        "else params.yaml alone)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one parameter (repeatable), e.g. --set mining.top_k=20")
    parser.add_argument("--workdir", help="work folder for lake, cache, index, runs (default: params workdir)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="objret", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("build-index", help="ingest lake sources, cache features, build the index (Prefect flow)")
    p.add_argument("sources", nargs="*", help="folders, video files or s3:// prefixes (default: lake.sources)")
    p.add_argument("--only", help="comma-separated steps to run (DVC runs one a stage): ingest, features, regions, "
                                  "whitening, index, store, graph (default: all)")
    p.add_argument("--demo-if-empty", action="store_true",
                   help="when neither SOURCES nor lake.sources name anything, ingest the PETS 2009 demo video (as "
                        "`objret demo` does; DVC's ingest stage uses this, so `dvc repro` builds a lake out of the box)")
    _common(p)

    p = sub.add_parser("graph", help="build or refresh the region graph of the index build-index made, and its OS.EGM "
                                      "descriptors (graph.discovery.enabled) (Prefect flow)")
    _common(p)

    p = sub.add_parser("mine", help="mine the lake for a failure report and push to the retraining dataset")
    p.add_argument("report", help="failure report JSON file")
    _common(p)

    p = sub.add_parser("eval", help="evaluate mining methods on a bench folder")
    p.add_argument("--bench", required=True, help="folder in the bench format (queries.json + sets)")
    p.add_argument("--results", required=True, help="where to write the default method's ranked results (JSON)")
    p.add_argument("--methods", default=None, help="comma-separated methods (fused, regions, dtm, gem, rmac); the first is the default (default: mining.method,gem)")
    p.add_argument("--summary", help="every method's aggregates in one JSON (default: RESULTS.summary.json)")
    p.add_argument("--recall-curve", help="every method's mean Recall@K, CSV k,method,recall "
                                          "(default: RESULTS.recall_at_k.csv)")
    p.add_argument("--held-out", action="store_true",
                   help="also choose eval.tune's parameters leave-one-set-out and print the held-out figures beside "
                        "the in-sample ones (one more ranking of every query per candidate setting)")
    p.add_argument("--review-round", type=_frames_judged, default=0, metavar="N",
                   help="also simulate one review of each query's first N frames (positives accepted, the rest "
                        "rejected), mine again with the verdicts and print mAP before and after (one more ranking "
                        "of every query)")
    _common(p)

    p = sub.add_parser("demo", help="the main job: PETS 2009 video (or SOURCE) -> index -> mine the sample report")
    p.add_argument("source", nargs="?", help="a folder, video file or s3:// prefix instead of the PETS video")
    p.add_argument("--report", help="failure report to mine (default: the shipped PETS pedestrian report)")
    _common(p)

    p = sub.add_parser("report", help="failure report tools")
    report_sub = p.add_subparsers(dest="report_command", required=True)
    v = report_sub.add_parser("validate", help="check a report against the JSON Schema")
    v.add_argument("report")
    v = report_sub.add_parser("submit", help="validate reports and trigger their mining (the `mine` deployment of "
                                               "`objret serve`, through a Prefect event); each report id is mined once")
    v.add_argument("reports", nargs="+", help="failure report JSON files")
    v.add_argument("--again", action="store_true", help="submit even if the report id was submitted or mined before")
    _common(v)
    v = report_sub.add_parser("status", help="the submitted reports and their state (submitted, running, mined, "
                                               "failed)")
    _common(v)

    p = sub.add_parser("dataset", help="versions of the retraining dataset (a DVC repository)")
    dataset_sub = p.add_subparsers(dest="dataset_command", required=True)
    v = dataset_sub.add_parser("versions", help="list the dataset's versions")
    _common(v)
    v = dataset_sub.add_parser("checkout", help="bring the dataset folder back to a version (from the DVC remote "
                                                  "when it is not in the local cache)")
    v.add_argument("md5", help="the version's DVC md5 (a unique prefix is enough)")
    _common(v)
    v = dataset_sub.add_parser("export", help="write a dataset version in a labelling or training tool's import "
                                                "format (frames rejected in review are left out)")
    v.add_argument("--format", required=True, choices=list(EXPORT_FORMATS),
                   help="coco: annotations.json + images/; yolo: data.yaml, images/, labels/; label-studio: "
                        "tasks.json with predictions + label_config.xml; cvat: a COCO 1.0 archive; fiftyone: a "
                        "FiftyOne dataset folder (needs objret[fiftyone])")
    v.add_argument("--out", required=True, help="a folder or an s3:// prefix")
    v.add_argument("--version", help="the version's number or DVC md5 prefix (default: the current one)")
    _common(v)

    p = sub.add_parser("fiftyone", help="load a report's mining run (query, mined frames, boxes, heat maps) into a "
                                         "FiftyOne dataset and say how to open it in the App (needs objret[fiftyone])")
    p.add_argument("report_id", help="the report whose last mining run to load")
    _common(p)

    p = sub.add_parser("review", help="reviews of mining runs (the review page each run writes)")
    review_sub = p.add_subparsers(dest="review_command", required=True)
    v = review_sub.add_parser("apply", help="apply a review page's exported decisions to the retraining dataset: "
                                              "rejected frames removed (and never pushed again), the rest kept; "
                                              "a new dataset version")
    v.add_argument("decisions", help="the DECISIONS.json the review page exported")
    _common(v)

    p = sub.add_parser("serve", help="serve the deployments: report-triggered mining, scheduled index refresh, "
                                      "report folder watch (needs a Prefect server: PREFECT_API_URL)")
    _common(p)

    p = sub.add_parser("ui", help="open the MLflow UI on the run store")
    p.add_argument("--port", type=int, default=5000)
    _common(p)

    p = sub.add_parser("tracking-server", help="run an MLflow tracking server (runs in SQLite, artifacts proxied) "
                                               "to name in tracking.mlflow_uri or MLFLOW_TRACKING_URI")
    p.add_argument("--backend-store-uri", help="run store (default: sqlite:///<workdir>/mlflow.db)")
    p.add_argument("--artifacts-destination", help="where the server keeps artifacts: a folder or an s3:// prefix "
                                                   "(default: <workdir>/mlartifacts)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=5000)
    _common(p)
    return parser


def _flow_kwargs(args) -> dict:
    return {"params_path": args.params, "overrides": args.overrides, "workdir": args.workdir}


def cmd_build_index(args) -> int:
    from objret.features.cache import use_huge_page_buffers

    use_huge_page_buffers()   # before torch allocates; Dask workers of a scale-out build inherit it
    from flows.build_index import build_index_flow

    only = [s.strip() for s in args.only.split(",")] if args.only else None
    sources = args.sources
    if args.demo_if_empty and not sources and (only is None or "ingest" in only):
        from objret.config import load_params
        from tasks.demo_data import pets_video

        params = load_params(args.params, args.overrides)
        if not params.lake.sources:
            sources = [str(pets_video(Path(args.workdir or params.workdir) / "data"))]
            print(f"lake.sources is empty: ingesting the demo video {sources[0]}")
    result = build_index_flow(sources=sources, only=only, **_flow_kwargs(args))
    print(json.dumps({step: result[step] for step in only} if only else result["index"], default=str))
    return 0


def cmd_graph(args) -> int:
    from flows.build_index import graph_flow

    result = graph_flow(**_flow_kwargs(args))
    print(json.dumps({k: v for k, v in result["graph"].items() if k != "samples"}))
    if result.get("discovery"):
        print(json.dumps({"discovery": result["discovery"]}))
    return 0


def cmd_mine(args) -> int:
    from flows.mine import mine_flow

    _print_mining(mine_flow(report_path=str(Path(args.report).resolve()), **_flow_kwargs(args)))
    return 0


def check_report_file(args, path: str) -> None:
    """The report read and its box checked on its frame here, before a flow starts: a bad report is one line and
    exit status 2 (main), not a failed flow run's tracebacks."""
    from objret.config import load_params
    from objret.mining.report import load_report
    from objret.steps.mine import check_report
    from objret.steps.workspace import Workspace

    check_report(Workspace(load_params(args.params, args.overrides), args.workdir), load_report(path))


def _print_mining(result: dict) -> None:
    ds = result["dataset"]
    print(f"\nmined {result['mined']} frames for report {result['report_id']}")
    print(f"  retraining dataset : {ds['root']}  ({ds['added']} added, {ds['unchanged']} unchanged)")
    print(f"  dataset version    : {ds['dvc_version']} (DVC md5 {ds['dvc_md5']}"
          f"{', sent to the DVC remote' if ds['dvc_pushed'] else ''}; objret dataset versions)")
    print(f"  COCO annotations   : {ds['annotations_uri']}")
    print(f"  contact sheet      : {result['contact_sheet']}")
    print(f"  mined list         : {result['mined_json']}")
    print(f"  review page        : {result['review_page']}  (open it in a browser; also in the MLflow run)")
    print(f"  MLflow run         : {result['mlflow_run_id']} (experiment {result['mlflow_experiment_id']}) in "
          f"{result['tracking_uri']}")
    if result["tracking_uri"].startswith(("http://", "https://")):   # a tracking server serves its own UI
        print(f"  open the UI at     : {result['tracking_uri']}")
    else:
        print(f"  open the UI with   : objret ui   (or: mlflow ui --backend-store-uri {result['tracking_uri']})")


def cmd_demo(args) -> int:
    from objret.features.cache import use_huge_page_buffers

    use_huge_page_buffers()   # the main job caches the video's features, as build-index does
    from flows.build_index import build_index_flow
    from flows.mine import mine_flow
    from objret.config import load_params
    from objret.steps.workspace import Workspace
    from tasks.demo_data import SAMPLE_REPORT, pets_video

    ws = Workspace(load_params(args.params, args.overrides), args.workdir)
    source = args.source or str(pets_video(ws.root / "data"))
    print(f"lake source: {source}")
    build_index_flow(sources=[source], **_flow_kwargs(args))
    report = args.report or str(SAMPLE_REPORT)
    result = mine_flow(report_path=str(Path(report).resolve()), **_flow_kwargs(args))
    _print_mining(result)
    where = f" --workdir {args.workdir}" if args.workdir else ""
    print("\nhand the dataset to labellers and trainers (objret dataset export --help):")
    for fmt in EXPORT_FORMATS:
        print(f"  objret dataset export --format {fmt} --out exports/{fmt}{where}")
    print(f"open the run in FiftyOne (pip install 'objret[fiftyone]'): objret fiftyone {result['report_id']}{where}"
          f" && fiftyone app launch objret-mine-{result['report_id']}")
    return 0


def cmd_eval(args) -> int:
    from flows.evaluate import evaluate_flow

    methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
    result = evaluate_flow(bench_dir=str(Path(args.bench).resolve()), results=str(Path(args.results).resolve()),
                           methods=methods, summary_json=args.summary, curve_csv=args.recall_curve,
                           held_out=args.held_out, review=args.review_round, **_flow_kwargs(args))
    print(result["table"])
    if "held_out" in result:
        print("\nleave-one-set-out (eval.tune)\n" + result["held_out"])
    if "review" in result:
        print("\n" + result["review"])
    for method, info in result["methods"].items():
        print(f"{method}: {info['seconds_per_query'] * 1000:.0f} ms per query, results in {info['results']}")
    for name, path in result["plots"].items():
        print(f"plot {name}: {path}")
    return 0


def cmd_report(args) -> int:
    if args.report_command == "submit":
        return _submit_reports(args)
    if args.report_command == "status":
        return _report_status(args)
    from objret.dataset.labels import dataset_label
    from objret.mining.report import load_report

    report = load_report(Path(args.report))
    print(f"{args.report}: valid report {report.report_id} ({report.class_name}, {report.failure_kind}): mined frames "
          f"go in as {dataset_label(report).describe()}")
    return 0


def _workspace(args):
    from objret.config import load_params
    from objret.steps.workspace import Workspace

    return Workspace(load_params(args.params, args.overrides), args.workdir)


def _submit_reports(args) -> int:
    """Each file on its own: a bad one is reported and the others still go (exit 2 if any was refused)."""
    from flows.triggers import submit

    ws, refused = _workspace(args), 0
    for path in args.reports:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            print(f"objret: {path}: cannot read: {exc.strerror or exc}", file=sys.stderr)
            refused += 1
            continue
        try:
            submission = submit(ws, data, str(Path(path).resolve()), again=args.again)
        except ReportError as exc:
            print(f"objret: {path}: {exc}", file=sys.stderr)
            refused += 1
            continue
        if submission.accepted:
            print(f"{path}: submitted report {submission.report_id}: the mine deployment will mine it")
        else:
            print(f"{path}: report {submission.report_id} is already {submission.state}: not submitted again "
                  "(--again to re-mine it)")
    return 2 if refused else 0


def _report_status(args) -> int:
    from flows.triggers import ledger

    for entry in ledger(_workspace(args)).entries():
        last = entry["history"][-1]
        extra = entry.get("error") if entry["state"] == "failed" else entry.get("dataset_version", "")
        if entry["state"] == "running":   # who holds it, until when
            extra = f"run {entry.get('run_id')} on {entry.get('host')} (pid {entry.get('pid')}), lease until " \
                    f"{entry.get('lease_until')}"
        attempts = f"attempt {entry['attempt']}" if entry.get("attempt", 1) > 1 else ""
        print(f"{entry['report_id']:<40} {entry['state']:<10} {last['at']}  {' '.join(filter(None, [attempts, extra]))}")
    return 0


def cmd_dataset(args) -> int:
    if args.dataset_command == "export":
        return _export_dataset(args)
    registry = _workspace(args).dataset_registry
    if args.dataset_command == "checkout":
        print(f"dataset version {args.md5} checked out in {registry.checkout(args.md5)}")
        return 0
    for v in registry.versions():
        print(f"{v['number']:>5}  {v['md5']}  {v['at']}  report {v.get('report_id', '')}")
    return 0


# How each export is opened by the tool it is for (printed after the export).
EXPORT_HOW_TO = {
    "coco": "COCO readers (pycocotools, torchvision, Detectron2) open {main}; images/ beside it",
    "yolo": "train on it: yolo detect train data={main}",
    "label-studio": "Label Studio: create a project with label_config.xml as its labelling interface, import {main}; "
                    "local images are served with LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true "
                    "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT={out}",
    "cvat": "CVAT: Import dataset (or Upload annotations) with format COCO 1.0: {main}",
    "fiftyone": "python -c \"import fiftyone as fo; ds = fo.Dataset.from_dir('{folder}', "
                "dataset_type=fo.types.FiftyOneDataset); fo.launch_app(ds).wait()\"",
}


def _export_dataset(args) -> int:
    from objret import storage
    from objret.steps.dataset import export_dataset

    out = args.out if storage.is_s3(args.out) else str(Path(args.out).resolve())
    r = export_dataset(_workspace(args), args.format, out, args.version)
    print(f"exported dataset version {r.version['number']} ({r.version['md5']}) as {r.format}: {r.frames} frames, "
          f"{r.boxes} boxes, {r.hard_negatives} hard negatives"
          + (f"; {r.rejected_left_out} boxes left out (rejected in review)" if r.rejected_left_out else ""))
    print(f"  {r.main_uri}")
    print("  " + EXPORT_HOW_TO[r.format].format(main=r.main_uri, out=out, folder=r.main_uri.rsplit("/", 1)[0]))
    return 0


def cmd_fiftyone(args) -> int:
    from objret.steps.dataset import mining_run_in_fiftyone

    dataset = mining_run_in_fiftyone(_workspace(args), args.report_id)
    print(f"FiftyOne dataset {dataset.name}: the query and {len(dataset) - 1} mined frames, with boxes "
          f"(field mined{', hard negatives: hard_negatives' if dataset.count('hard_negatives.detections') else ''}) "
          f"and heat maps (field heatmap)")
    print(f"  open it: fiftyone app launch {dataset.name}")
    return 0


def cmd_review(args) -> int:
    from objret.dataset.decisions import DecisionsError, load_decisions
    from objret.steps.dataset import apply_review

    try:
        decisions = load_decisions(args.decisions)
    except DecisionsError as exc:
        print(f"objret: {exc}", file=sys.stderr)
        return 2
    r = apply_review(_workspace(args), decisions)
    print(f"review of report {r.report_id} applied: {r.rejected} rejected, {r.accepted} accepted")
    print(f"  removed            : {r.removed} annotations, {r.images_removed} images"
          + (f" ({len(r.not_in_dataset)} rejected frames were not in the dataset)" if r.not_in_dataset else ""))
    print(f"  kept               : {r.kept} annotations of the report")
    print(f"  remembered         : {r.remembered} frames rejected for the report (a re-mine does not push them)")
    print(f"  retraining dataset : {r.root}")
    print(f"  dataset version    : {r.dvc_version} (DVC md5 {r.dvc_md5}"
          f"{', sent to the DVC remote' if r.dvc_pushed else ''}{'' if r.changed else '; unchanged'})")
    return 0


def cmd_serve(args) -> int:
    from prefect.settings import PREFECT_API_URL

    from flows.serve import serve_deployments

    if not PREFECT_API_URL.value():
        raise ObjretError("`objret serve` needs a Prefect server: start one with `prefect server start` and set "
                          "PREFECT_API_URL=http://127.0.0.1:4200/api (see the README)")
    serve_deployments(**_flow_kwargs(args))
    return 0


def cmd_ui(args) -> int:
    from objret.config import load_params
    from objret.steps.workspace import Workspace

    ws = Workspace(load_params(args.params, args.overrides), args.workdir)
    if ws.tracking_uri.startswith(("http://", "https://")):   # a tracking server serves its own UI
        print(f"the runs are on the tracking server: open {ui_url(ws, ws.tracking_uri)}")
        return 0
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", ws.tracking_uri,
               "--host", "127.0.0.1", "--port", str(args.port), "--workers", "1"]
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")   # as for tracking-server
    print(" ".join(command))
    print(f"open {ui_url(ws, f'http://127.0.0.1:{args.port}')}", flush=True)
    os.execv(sys.executable, command)
    return 0


def ui_url(ws, base: str) -> str:
    """Where the UI shows the experiment's runs with objret's columns (tasks.tracking.runs_view); the UI's home
    until a flow has made the experiment."""
    import mlflow

    from tasks.tracking import runs_view_url

    # One quick try: a server that does not answer gets its home URL, not a minute of retries. Only for this
    # lookup: the environment goes on to the `mlflow ui` this process becomes.
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    before = {key: os.environ.get(key) for key in quick}
    os.environ.update({k: v for k, v in quick.items() if before[k] is None})
    try:
        experiment = mlflow.MlflowClient(ws.tracking_uri).get_experiment_by_name(ws.params.tracking.experiment)
    except Exception:   # unreachable or refusing: the UI's home still opens
        experiment = None
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
    return runs_view_url(base, experiment.experiment_id) if experiment else base


def tracking_server_command(args) -> tuple[list[str], str]:
    """The `mlflow server` command line and the tracking URI it serves."""
    import socket

    ws = _workspace(args)
    destination = args.artifacts_destination or str(ws.root / "mlartifacts")
    if "://" not in destination:
        destination = str(Path(destination).resolve())   # the server may run from another folder
    command = [sys.executable, "-m", "mlflow", "server",
               "--backend-store-uri", args.backend_store_uri or f"sqlite:///{ws.root / 'mlflow.db'}",
               "--artifacts-destination", destination, "--host", args.host, "--port", str(args.port),
               "--workers", "1"]
    # Bound to every interface: other machines reach it by this machine's name.
    host = socket.getfqdn() if args.host in ("0.0.0.0", "::") else args.host
    return command, f"http://{host}:{args.port}"


def cmd_tracking_server(args) -> int:
    command, uri = tracking_server_command(args)
    # No job runner (GenAI evaluation jobs objret does not use): it spawns ~10 processes and ~1.5 GB.
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    print(" ".join(command))
    print(f"tracking URI: {uri}  (set tracking.mlflow_uri: {uri}, or MLFLOW_TRACKING_URI={uri}; UI: {uri})",
          flush=True)   # before exec replaces this process and its unflushed buffers
    os.execv(sys.executable, command)
    return 0


COMMANDS = {"build-index": cmd_build_index, "graph": cmd_graph, "mine": cmd_mine, "eval": cmd_eval, "demo": cmd_demo,
            "report": cmd_report, "ui": cmd_ui, "tracking-server": cmd_tracking_server, "serve": cmd_serve,
            "dataset": cmd_dataset, "review": cmd_review, "fiftyone": cmd_fiftyone}


RUN_FLOWS = {"build-index", "graph", "mine", "demo", "eval"}   # on a temporary Prefect server without PREFECT_API_URL


def main(argv: list[str] | None = None) -> int:
    from flows.redaction import keep_credentials_out_of_parameters, redact_console

    args = build_parser().parse_args(argv)
    redact_console()
    if hasattr(args, "overrides"):
        args.overrides = keep_credentials_out_of_parameters(args.overrides)
    try:
        if args.command not in RUN_FLOWS:
            return COMMANDS[args.command](args)
        if args.command == "mine":
            check_report_file(args, args.report)   # a bad report: one line, before any server or flow starts
        from flows.temporary_server import temporary_prefect_server

        with temporary_prefect_server():
            return COMMANDS[args.command](args)
    except ReportError as exc:
        print(f"objret: {exc}", file=sys.stderr)
        return 2
    except ObjretError as exc:
        print(f"objret: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
