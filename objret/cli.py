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
                     "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}.items():
    os.environ.setdefault(_key, _value)

from objret.errors import ObjretError, ReportError  # noqa: E402


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", help="parameter file (default: the repository's params.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one parameter (repeatable), e.g. --set mining.top_k=20")
    parser.add_argument("--workdir", help="work folder for lake, cache, index, runs (default: params workdir)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="objret", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("build-index", help="ingest lake sources, cache features, build the index (Prefect flow)")
    p.add_argument("sources", nargs="*", help="folders, video files or s3:// prefixes (default: lake.sources)")
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
    _common(p)

    p = sub.add_parser("demo", help="the main job: PETS 2009 video (or SOURCE) -> index -> mine the sample report")
    p.add_argument("source", nargs="?", help="a folder, video file or s3:// prefix instead of the PETS video")
    p.add_argument("--report", help="failure report to mine (default: the shipped PETS pedestrian report)")
    _common(p)

    p = sub.add_parser("report", help="failure report tools")
    report_sub = p.add_subparsers(dest="report_command", required=True)
    v = report_sub.add_parser("validate", help="check a report against the JSON Schema")
    v.add_argument("report")

    p = sub.add_parser("ui", help="open the MLflow UI on the run store")
    p.add_argument("--port", type=int, default=5000)
    _common(p)
    return parser


def _flow_kwargs(args) -> dict:
    return {"params_path": args.params, "overrides": args.overrides, "workdir": args.workdir}


def cmd_build_index(args) -> int:
    from flows.build_index import build_index_flow

    result = build_index_flow(sources=args.sources, **_flow_kwargs(args))
    print(json.dumps(result["index"]))
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


def _print_mining(result: dict) -> None:
    ds = result["dataset"]
    print(f"\nmined {result['mined']} frames for report {result['report_id']}")
    print(f"  retraining dataset : {ds['root']}  (version {ds['version']}, {ds['added']} added, "
          f"{ds['unchanged']} unchanged)")
    print(f"  COCO annotations   : {ds['annotations_uri']}")
    print(f"  contact sheet      : {result['contact_sheet']}")
    print(f"  mined list         : {result['mined_json']}")
    print(f"  MLflow run         : {result['mlflow_run_id']} (experiment {result['mlflow_experiment_id']}) in "
          f"{result['tracking_uri']}")
    print(f"  open the UI with   : objret ui   (or: mlflow ui --backend-store-uri {result['tracking_uri']})")


def cmd_demo(args) -> int:
    from flows.build_index import build_index_flow
    from flows.mine import mine_flow
    from objret.config import load_params
    from objret.sample_data import SAMPLE_REPORT, pets_video
    from objret.workspace import Workspace

    ws = Workspace(load_params(args.params, args.overrides), args.workdir)
    source = args.source or str(pets_video(ws.root / "data"))
    print(f"lake source: {source}")
    build_index_flow(sources=[source], **_flow_kwargs(args))
    report = args.report or str(SAMPLE_REPORT)
    _print_mining(mine_flow(report_path=str(Path(report).resolve()), **_flow_kwargs(args)))
    return 0


def cmd_eval(args) -> int:
    from flows.evaluate import evaluate_flow

    methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
    result = evaluate_flow(bench_dir=str(Path(args.bench).resolve()), results=str(Path(args.results).resolve()),
                           methods=methods, **_flow_kwargs(args))
    print(result["table"])
    for method, info in result["methods"].items():
        print(f"{method}: {info['seconds_per_query'] * 1000:.0f} ms per query, results in {info['results']}")
    return 0


def cmd_report(args) -> int:
    from objret.report import load_report

    report = load_report(Path(args.report))
    print(f"{args.report}: valid report {report.report_id} ({report.class_name}, {report.failure_kind})")
    return 0


def cmd_ui(args) -> int:
    from objret.config import load_params
    from objret.workspace import Workspace

    ws = Workspace(load_params(args.params, args.overrides), args.workdir)
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", ws.tracking_uri,
               "--host", "127.0.0.1", "--port", str(args.port), "--workers", "1"]
    print(" ".join(command))
    os.execv(sys.executable, command)
    return 0


COMMANDS = {"build-index": cmd_build_index, "graph": cmd_graph, "mine": cmd_mine, "eval": cmd_eval, "demo": cmd_demo,
            "report": cmd_report, "ui": cmd_ui}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ReportError as exc:
        print(f"objret: {exc}", file=sys.stderr)
        return 2
    except ObjretError as exc:
        print(f"objret: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
