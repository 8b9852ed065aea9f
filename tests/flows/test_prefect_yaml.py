"""prefect.yaml: the deployments `objret serve` runs, declared for a process work pool. Checked against serve's own
definitions and params.yaml, and run the way Prefect users run it: `prefect deploy --all` and
`prefect worker start --pool objret` against a real `prefect server start`, a submitted report mined by the worker."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from flows.serve import deployments
from objret.config import load_params
from tests.helpers.polling import wait_until
from tasks.report_ledger import ReportLedger
from tests.fixtures.services import stop_group

REPO = Path(__file__).resolve().parents[2]
FRAMES = [101, 103, 105, 107]   # PETS 2009 frames of the lake


def _declared() -> dict:
    return {d["name"]: d for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]}


def test_prefect_yaml_declares_what_serve_runs_with_params_yaml_defaults():
    served, concurrency = deployments(overrides=["service.watch.sources=[reports]"])
    declared = _declared()
    service = load_params().service
    assert {d.name for d in served} == set(declared)
    for deployment in served:
        entry = declared[deployment.name]
        assert entry["entrypoint"] == deployment.entrypoint   # the same flow, loaded from the installed package
        assert entry["work_pool"]["name"] == "objret"
    assert declared["mine"]["concurrency_limit"] == concurrency == service.mine_concurrency
    [served_trigger] = next(d for d in served if d.name == "mine").triggers
    [trigger] = declared["mine"]["triggers"]
    assert set(trigger["expect"]) == served_trigger.expect
    assert trigger["match"] == served_trigger.match.model_dump()
    assert trigger["parameters"]["report"] == served_trigger.parameters["report"]
    assert declared["refresh-index"]["schedules"][0]["cron"] == service.refresh_cron
    assert declared["watch-reports"]["schedules"][0]["interval"] == service.watch.interval_s
    assert declared["requeue-reports"]["schedules"][0]["interval"] == service.lease_s / 2


def _run(*args: str, env: dict, cwd: Path | None = None) -> str:
    result = subprocess.run([sys.executable, "-m", *args], env=env, cwd=cwd, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.mark.slow
def test_deploy_all_and_a_process_worker_mine_a_submitted_report(prefect_api, bench_dir, tmp_path):
    lake, work = tmp_path / "lake", tmp_path / "work"
    lake.mkdir()
    images = bench_dir / "pets09_s2l1" / "images"
    for n in FRAMES:
        shutil.copy(images / f"{n:06d}.jpg", lake)
    # What a team would put in its own parameter file; the worker's runs find it through OBJRET_PARAMS.
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "workdir": str(work), "lake": {"sources": [str(lake)]},
        "features": {"backbone": "efficientnet_lite0", "max_side": 320},
        "mining": {"top_k": 3, "scales": [0.75, 1.0, 1.5]}}))
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PREFECT_HOME": str(tmp_path / "client-home"),
           "OBJRET_PARAMS": str(params)}
    _run("flows.cli", "build-index", env=env)
    ann = json.loads((bench_dir / "pets09_s2l1" / "annotations.json").read_text())["annotations"]
    report = tmp_path / "report.json"
    report.write_text(json.dumps({
        "report_id": "pool-1", "detector": {"name": "det", "version": "1"}, "frame": {"uri": str(lake / "000105.jpg")},
        "box": next(a["bbox"] for a in ann if a["image_id"] == 105), "class_name": "person",
        "failure_kind": "false_negative"}))

    _run("prefect", "work-pool", "create", "objret", "--type", "process", env=env)
    _run("prefect", "--no-prompt", "deploy", "--all", env=env, cwd=REPO)
    log = tmp_path / "worker.out"
    with open(log, "wb") as out:
        worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", "objret"],
                                  env={**env, "PREFECT_WORKER_QUERY_SECONDS": "2"}, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    api = httpx.Client(base_url=prefect_api, timeout=10)
    deployed: dict = {}
    try:
        deployed |= {name: api.get(f"/deployments/name/{name}").json()
                    for name in ("mine-report/mine", "build-index/refresh-index", "watch-reports/watch-reports",
                                 "requeue-reports/requeue-reports")}
        assert {d["work_pool_name"] for d in deployed.values()} == {"objret"}
        assert deployed["mine-report/mine"]["global_concurrency_limit"]["limit"] == 2
        [refresh] = deployed["build-index/refresh-index"]["schedules"]
        assert refresh["schedule"]["cron"] == "0 * * * *" and refresh["active"]
        [watch] = deployed["watch-reports/watch-reports"]["schedules"]
        assert watch["schedule"]["interval"] == 60 and not watch["active"]   # off until sources are set
        [requeue] = deployed["requeue-reports/requeue-reports"]["schedules"]
        assert requeue["schedule"]["interval"] == 60 and requeue["active"]

        assert "submitted report pool-1" in _run("flows.cli", "report", "submit", str(report), env=env)
        ledger = ReportLedger(work / "reports")
        deadline = time.monotonic() + 300
        while (entry := next(iter(ledger.entries()), {})).get("state") not in ("mined", "failed"):
            assert time.monotonic() < deadline, f"no run mined the report; worker log:\n{log.read_text()[-6000:]}"
            time.sleep(2)
        assert entry["state"] == "mined" and entry["mined"] == 3, entry

        def ended():   # the run that claimed the report; the ledger says mined a moment before the run ends
            run = api.get(f"/flow_runs/{entry['run_id']}").json()
            return run if run["state_type"] not in ("PENDING", "RUNNING") else None

        run = wait_until(ended, 60, 1)
        assert run and run["state_type"] == "COMPLETED", run
        assert run["deployment_id"] == deployed["mine-report/mine"]["id"] and run["work_pool_name"] == "objret"
        assert run["parameters"]["report"]["report_id"] == "pool-1"
    finally:
        stop_group(worker)
        # The session's server is shared: leave no deployments, automations or pool behind for other tests.
        for deployment in deployed.values():
            api.delete(f"/deployments/{deployment['id']}")
        api.delete("/work_pools/objret")
        api.close()
