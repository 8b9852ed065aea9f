"""Tracking-server mode: flows log to a real `objret tracking-server` (MLflow server, SQLite runs, proxied
artifacts); every run is read back through the server's REST API, its tags leading back to the exact code,
parameters, index and DVC outputs. AWS credentials never reach MLflow, Prefect's logs, the console or the review
page."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import cv2
import pytest

from flows.cli import build_parser, main, tracking_server_command

REPO = Path(__file__).resolve().parents[2]
SMALL = ["features.backbone=efficientnet_lite0", "features.max_side=320", "regions.sources=[whole,uniform,egm]",
         "mining.top_k=3", "mining.scales=[1.0]", "lake.video_every_n=1", "graph.sample_frames=1"]


def rest(server_uri: str, endpoint: str, **query) -> dict:
    url = f"{server_uri}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(query)}"
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


def download(server_uri: str, run: dict, path: str) -> bytes:
    """An artifact of the run, through the server's artifact proxy."""
    info = run["info"]
    assert info["artifact_uri"] == f"mlflow-artifacts:/{info['experiment_id']}/{info['run_id']}/artifacts"
    url = f"{server_uri}/api/2.0/mlflow-artifacts/artifacts/{info['experiment_id']}/{info['run_id']}/artifacts/{path}"
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()


def artifact_paths(server_uri: str, run_id: str, path: str = "") -> list[str]:
    files = rest(server_uri, "artifacts/list", run_id=run_id, path=path).get("files", [])
    out = []
    for f in files:
        out += artifact_paths(server_uri, run_id, f["path"]) if f["is_dir"] else [f["path"]]
    return out


def get_run(server_uri: str, run_id: str) -> tuple[dict, dict, dict, dict]:
    """The run, its tags, params and metrics as dicts."""
    run = rest(server_uri, "runs/get", run_id=run_id)["run"]
    data = run["data"]
    as_dict = lambda items: {i["key"]: i["value"] for i in data.get(items, [])}  # noqa: E731
    return run, as_dict("tags"), as_dict("params"), as_dict("metrics")


def expected_tags(overrides: list[str]) -> dict:
    from objret.config import load_params

    lock = REPO / "dvc.lock"
    return {"git_commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                         check=True).stdout.strip(),
            "params_hash": load_params(None, overrides).digest(),
            "dvc_lock_hash": hashlib.sha256(lock.read_bytes()).hexdigest()[:12] if lock.is_file() else "none"}


def pets_frame(bench_dir: Path, mot_frame: int) -> Path:
    return bench_dir / "pets09_s2l1" / "images" / f"{mot_frame:06d}.jpg"


def pedestrian_box(bench_dir: Path, mot_frame: int, track_id: int) -> list[float]:
    ann = json.loads((bench_dir / "pets09_s2l1" / "annotations.json").read_text())
    return next(a["bbox"] for a in ann["annotations"] if a["image_id"] == mot_frame and a["track_id"] == track_id)


def write_report(path: Path, bench_dir: Path, report_id: str, frame: dict, mot_frame: int) -> Path:
    # Track 19 walks through the whole PETS clip.
    path.write_text(json.dumps({"report_id": report_id, "detector": {"name": "det", "version": "1"}, "frame": frame,
                                "box": pedestrian_box(bench_dir, mot_frame, 19), "class_name": "person",
                                "failure_kind": "false_negative"}))
    return path


# ---- the command and the URI precedence (no server) ----------------------------------------------------------

def test_tracking_server_command_serves_the_work_folder_or_the_given_stores(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(["tracking-server", "--workdir", "work", "--port", "5123"])
    command, uri = tracking_server_command(args)
    work = tmp_path / "work"
    assert command[1:4] == ["-m", "mlflow", "server"] and uri == "http://127.0.0.1:5123"
    options = dict(zip(command[4::2], command[5::2]))
    assert options == {"--backend-store-uri": f"sqlite:///{work / 'mlflow.db'}",
                       "--artifacts-destination": str(work / "mlartifacts"), "--host": "127.0.0.1",
                       "--port": "5123", "--workers": "1"}
    args = build_parser().parse_args(["tracking-server", "--workdir", "work", "--backend-store-uri",
                                      "postgresql://db/mlflow", "--artifacts-destination", "s3://bucket/mlflow"])
    options = dict(zip(*[iter(tracking_server_command(args)[0][4:])] * 2))
    assert options["--backend-store-uri"] == "postgresql://db/mlflow"
    assert options["--artifacts-destination"] == "s3://bucket/mlflow" and options["--port"] == "5000"
    args = build_parser().parse_args(["tracking-server", "--workdir", "work", "--artifacts-destination", "arts"])
    assert dict(zip(*[iter(tracking_server_command(args)[0][4:])] * 2))["--artifacts-destination"] == str(
        tmp_path / "arts")   # absolute: the server may run elsewhere


def test_tracking_uri_params_then_environment_then_the_work_folder(tmp_path, monkeypatch, capsys):
    from objret.config import load_params
    from objret.steps.workspace import Workspace

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert Workspace(load_params(None, []), tmp_path).tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert Workspace(load_params(None, []), tmp_path).tracking_uri == "http://tracking.example:5000"
    params = load_params(None, ["tracking.mlflow_uri=http://other:5001"])
    assert Workspace(params, tmp_path).tracking_uri == "http://other:5001"
    # `objret ui` names the server's own UI instead of starting one.
    assert main(["ui", "--workdir", str(tmp_path)]) == 0
    assert "open http://tracking.example:5000" in capsys.readouterr().out


def test_a_run_leaves_the_environment_s_tracking_uri_as_it_was(tmp_path, monkeypatch):
    from objret.config import load_params
    from objret.steps.workspace import Workspace
    from tasks.tracking import mlflow_run

    # mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI: without a reset, the second work folder's run
    # would go to the first one's store.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for name in ("a", "b"):
        ws = Workspace(load_params(None, []), tmp_path / name)
        with mlflow_run(ws, "probe") as run:
            assert run.data.tags["index_version"] == "none" and run.data.tags["params_hash"] == ws.params.digest()
        assert "MLFLOW_TRACKING_URI" not in os.environ
        assert (tmp_path / name / "mlflow.db").is_file()


def test_dvc_lock_hash_names_the_lock_file(tmp_path):
    from tasks.tracking import dvc_lock_hash

    assert dvc_lock_hash(tmp_path) == "none"
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\n")
    assert dvc_lock_hash(tmp_path) == hashlib.sha256(b"schema: '2.0'\n").hexdigest()[:12]


# ---- the real server ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pets_video(bench_dir, tmp_path_factory) -> Path:
    """6 real PETS 2009 frames (MOT frames 101..111, every 2nd) as an MJPG video."""
    path = tmp_path_factory.mktemp("video") / "pets.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 7, (768, 576))
    for n in range(101, 113, 2):
        writer.write(cv2.imread(str(pets_frame(bench_dir, n))))
    writer.release()
    return path


@pytest.mark.slow
def test_flows_log_to_the_tracking_server_and_read_back_through_its_rest_api(
        mlflow_server, prefect_server, pets_video, bench_dir, tud_campus_bench, tmp_path, capsys):
    from flows.build_index import build_index_flow, graph_flow
    from flows.evaluate import evaluate_flow
    from flows.mine import mine_flow
    from objret.config import load_params
    from objret.index.region_index import index_version
    from objret.index.region_index import RegionIndex
    from objret.steps.workspace import Workspace

    uri = mlflow_server.uri
    overrides = SMALL + [f"tracking.mlflow_uri={uri}", "tracking.experiment=server-test"]
    workdir = tmp_path / "work"
    built = build_index_flow(sources=[str(pets_video)], overrides=overrides, workdir=str(workdir))
    graphed = graph_flow(overrides=overrides, workdir=str(workdir))
    report = write_report(tmp_path / "report.json", bench_dir, "server-test-1", {"uri": "pets.avi", "frame_index": 2},
                          105)
    mined = mine_flow(report_path=str(report), overrides=overrides, workdir=str(workdir))
    assert mined["tracking_uri"] == uri and built["index"]["frames"] == 6

    tags = expected_tags(overrides) | {"index_version": built["index"]["version"]}
    runs = {name: get_run(uri, run_id) for name, run_id in (
        ("build-index", built["mlflow_run_id"]), ("graph", graphed["mlflow_run_id"]), ("mine", mined["mlflow_run_id"]))}
    for name, (run, run_tags, params, _) in runs.items():
        assert {k: run_tags.get(k) for k in tags} == tags, name
        assert run_tags["flow"] == name and params["tracking.experiment"] == "server-test"
        assert run["info"]["status"] == "FINISHED"
    experiment = rest(uri, "experiments/get-by-name", experiment_name="server-test")["experiment"]
    assert experiment["artifact_location"] == f"mlflow-artifacts:/{experiment['experiment_id']}"   # proxied
    # A model-training experiment: MLflow's UI opens it on its runs, not on the GenAI traces overview.
    experiment_tags = {t["key"]: t["value"] for t in experiment["tags"]}
    assert experiment_tags["mlflow.experimentKind"] == "custom_model_development"
    # The runs table's view (the UI's shared-view tag) puts the key figures and the dataset beside each run, and
    # `objret ui` names it.
    columns = json.loads(experiment_tags["mlflow.sharedViewState.objret"])["selectedColumns"]
    assert {"attributes.`Dataset`", "metrics.`mined`", "metrics.`fused.class_mAP`"} <= set(columns)
    from flows.cli import main

    assert main(["ui", "--workdir", str(workdir), *[a for o in overrides for a in ("--set", o)]]) == 0
    assert f"open {uri}/#/experiments/{experiment['experiment_id']}/runs?viewStateShareKey=objret" in \
        capsys.readouterr().out
    # Lineage: the mining run's input is the dataset version it made, by DVC md5, with where DVC keeps it.
    [mine_input] = runs["mine"][0]["inputs"]["dataset_inputs"]
    dataset = mine_input["dataset"]
    assert (dataset["name"], dataset["digest"]) == ("retraining", mined["dataset"]["dvc_md5"])
    assert json.loads(dataset["source"])["uri"] == str((workdir / "datasets").resolve())
    input_tags = {t["key"]: t["value"] for t in mine_input["tags"]}
    assert input_tags["mlflow.data.context"] == "mined_into" and input_tags["dvc_version"] == "1"

    # Metrics as the flows logged them; artifacts through the server's proxy, byte for byte.
    run, _, _, metrics = runs["build-index"]
    assert metrics["index_frames"] == 6 and metrics["index_regions"] == built["index"]["regions"]
    assert metrics["graph_nodes"] == built["graph"]["nodes"]
    [png] = artifact_paths(uri, run["info"]["run_id"], "graph")   # graph.sample_frames=1
    assert download(uri, run, png) == Path(built["graph"]["samples"][0]).read_bytes()
    run, _, _, metrics = runs["mine"]
    assert metrics["mined"] == mined["mined"] == 3
    assert {"mined.json", "contact_sheet.png", "report.json"} <= set(artifact_paths(uri, run["info"]["run_id"]))
    assert download(uri, run, "mined.json") == Path(mined["mined_json"]).read_bytes()
    assert json.loads(download(uri, run, "report.json"))["report_id"] == "server-test-1"
    # The artifacts went to the server's store, nothing to the work folder's own.
    assert list((mlflow_server.home / "mlartifacts").rglob("mined.json"))
    assert not (workdir / "mlflow.db").exists() and not (workdir / "mlartifacts").exists()

    # eval: its own bench index (built for diffusion) tags the run; without one, "none".
    bench = tud_campus_bench(tmp_path / "bench", {17, 18, 19, 20, 28})
    eval_dir = tmp_path / "eval"
    with_index = overrides + ["mining.diffusion.enabled=true"]
    on = evaluate_flow(bench_dir=str(bench), results=str(tmp_path / "on.json"), methods=["fused"],
                       overrides=with_index, workdir=str(eval_dir))
    off = evaluate_flow(bench_dir=str(bench), results=str(tmp_path / "off.json"), methods=["gem"],
                        overrides=overrides, workdir=str(eval_dir))
    assert on["methods"]["fused"]["metrics"] and off["methods"]["gem"]["metrics"]
    ws = Workspace(load_params(None, with_index), eval_dir)
    bench_index = index_version(sorted(RegionIndex.load(ws.current_index_dir()).frame_ids))
    found = search_runs(uri, experiment["experiment_id"], "tags.flow = 'evaluate'")   # newest first
    newest, oldest = [{t["key"]: t["value"] for t in run["data"]["tags"]} for run in found]
    # Every eval ranks through the bench's own region index (the production path), with or without diffusion.
    assert oldest["index_version"] == newest["index_version"] == bench_index
    assert oldest["params_hash"] == load_params(None, with_index).digest()
    assert {k: newest[k] for k in ("git_commit", "params_hash", "dvc_lock_hash")} == expected_tags(overrides)
    metrics = {m["key"] for m in found[0]["data"]["metrics"]}
    assert "gem.seconds_per_query" in metrics and any(k.startswith("gem.") and k.endswith("_mAP") for k in metrics)
    # Each eval run names the bench it scored as its input: the same bench, the same digest.
    from objret.eval.bench import bench_digest, load_bench

    for run in found:
        [bench_input] = run["inputs"]["dataset_inputs"]
        assert (bench_input["dataset"]["name"], bench_input["dataset"]["digest"]) == \
            (bench.name, bench_digest(load_bench(bench)))
        assert json.loads(bench_input["dataset"]["source"])["uri"] == str(bench.resolve())


def search_runs(uri: str, experiment_id: str, filter_string: str) -> list[dict]:
    request = urllib.request.Request(f"{uri}/api/2.0/mlflow/runs/search", method="POST",
                                     headers={"Content-Type": "application/json"},
                                     data=json.dumps({"experiment_ids": [experiment_id], "filter": filter_string,
                                                      "order_by": ["attributes.start_time DESC"]}).encode())
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response).get("runs", [])


@pytest.mark.slow
def test_aws_credentials_reach_neither_mlflow_nor_logs_nor_the_console(
        s3_store, prefect_server, start_tracking_server, bench_dir, tmp_path, capfd):
    """The lake, the retraining dataset and the server's artifact store on S3, credentials from the AWS
    environment: the keys appear in no MLflow record or artifact, no Prefect log, no console output and no review
    page (beside the dataset on S3, in the run folder, as an MLflow artifact)."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.logging.handlers import APILogHandler

    from flows.build_index import build_index_flow
    from flows.mine import mine_flow

    secrets = [s3_store.secret_key, s3_store.access_key]
    s3 = s3_store.client()
    s3.create_bucket(Bucket="objret-creds")
    for n in (101, 103, 105, 107):
        s3.upload_file(str(pets_frame(bench_dir, n)), "objret-creds", f"cams/{n:06d}.jpg")
    (tmp_path / "server").mkdir()
    with start_tracking_server(tmp_path / "server", "s3://objret-creds/mlflow") as server:
        overrides = SMALL + [f"tracking.mlflow_uri={server.uri}", "tracking.experiment=creds-test",
                             "dataset.root=s3://objret-creds/retraining", "dataset.dvc_remote=s3://objret-creds/dvc",
                             f"lake.s3_endpoint_url={s3_store.endpoint_url}", "graph.enabled=false"]
        workdir = tmp_path / "work"
        built = build_index_flow(sources=["s3://objret-creds/cams"], overrides=overrides, workdir=str(workdir))
        report = write_report(tmp_path / "report.json", bench_dir, "creds-test-1", {"uri": "000103.jpg"}, 103)
        mined = mine_flow(report_path=str(report), overrides=overrides, workdir=str(workdir))
        assert built["index"]["frames"] == 4 and mined["mined"] == 3
        assert mined["dataset"]["root"] == "s3://objret-creds/retraining"
        # The dataset version is on the S3 DVC remote and published under the S3 prefix.
        assert mined["dataset"]["dvc_pushed"] and mined["dataset"]["dvc_version"] == 1
        assert s3.list_objects_v2(Bucket="objret-creds", Prefix="dvc/").get("KeyCount", 0) > 0
        published = s3.get_object(Bucket="objret-creds", Key="retraining/annotations.json")["Body"].read()
        assert published == (workdir / "datasets" / "retraining" / "annotations.json").read_bytes()

        # MLflow: every param, tag and metric of both runs, and every artifact (downloaded through the
        # server, which keeps them on S3).
        records = []
        for run_id in (built["mlflow_run_id"], mined["mlflow_run_id"]):
            run = rest(server.uri, "runs/get", run_id=run_id)["run"]
            records.append(json.dumps(run))
            paths = artifact_paths(server.uri, run_id)
            assert run_id == built["mlflow_run_id"] or "mined.json" in paths
            records += [download(server.uri, run, path).decode("latin-1") for path in paths]
        stored = [o["Key"] for o in s3.list_objects_v2(Bucket="objret-creds", Prefix="mlflow/").get("Contents", [])]
        assert any(key.endswith("/artifacts/mined.json") for key in stored)
        assert any(key.endswith("/artifacts/review.html") for key in stored)   # the review page, grepped above
        # The review page itself: the copy beside the dataset on S3 and the one in the run folder.
        assert mined["review_page"] == "s3://objret-creds/retraining/reviews/creds-test-1.html"
        pages = [s3.get_object(Bucket="objret-creds", Key="retraining/reviews/creds-test-1.html")["Body"].read(),
                 Path(mined["review_page_run"]).read_bytes()]
        pages = [page.decode("utf-8") for page in pages]
        assert all("creds-test-1" in page and "<html" in page.lower() for page in pages)
        # ... and the server's whole run store and log.
        records += [(server.home / "mlflow.db").read_bytes().decode("latin-1"),
                    (server.home / "server.out").read_text(errors="replace")]

    # Prefect: every log of the session's flow runs (sent to the API in the background: flushed first) and
    # the parameters the runs were created with.
    APILogHandler().flush()

    async def every(read) -> list:   # the API answers in pages
        out = []
        while page := await read(limit=200, offset=len(out)):
            out += page
        return out

    async def prefect_records():
        async with get_client() as client:
            logs = await every(client.read_logs)
            runs = await every(client.read_flow_runs)
            return [log.message for log in logs], [json.dumps(r.parameters, default=str) for r in runs]

    logs, parameters = asyncio.run(prefect_records())
    assert any("s3://objret-creds/cams" in message for message in logs)   # this test's runs did log
    console = capfd.readouterr()
    local = [p.read_bytes().decode("latin-1") for p in workdir.rglob("*") if p.is_file()]
    for secret in secrets:
        for where, texts in (("MLflow", records), ("Prefect logs", logs), ("Prefect parameters", parameters),
                             ("stdout", [console.out]), ("stderr", [console.err]), ("work folder", local),
                             ("review page", pages)):
            assert not any(secret in text for text in texts), f"{secret!r} in {where}"
