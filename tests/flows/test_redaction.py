"""Credentials inside URLs reach neither the console, nor logs, nor Prefect's flow parameters, while the flows still
get the real values (objret.config.load_params applies OBJRET_SECRET_OVERRIDES last)."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
import sys

import httpx
import pytest

from flows.redaction import RedactingStream, keep_credentials_out_of_parameters
from objret.config import SECRET_OVERRIDES_ENV, load_params

SECRET = "s3cr3t-Pa55word"


def test_overrides_with_credentials_go_to_the_environment_and_the_flows_get_them(monkeypatch):
    monkeypatch.setenv(SECRET_OVERRIDES_ENV, "[]")   # restored (removed) after the test
    given = [f"lake.s3_endpoint_url=http://AKIAEXAMPLE:{SECRET}@127.0.0.1:9000", "mining.top_k=7"]
    shown = keep_credentials_out_of_parameters(given)
    assert shown == ["lake.s3_endpoint_url=http://***@127.0.0.1:9000", "mining.top_k=7"]
    assert json.loads(os.environ[SECRET_OVERRIDES_ENV]) == given[:1]
    params = load_params(None, shown)   # what a flow does with its parameters
    assert params.lake.s3_endpoint_url == f"http://AKIAEXAMPLE:{SECRET}@127.0.0.1:9000" and params.mining.top_k == 7


def test_the_console_and_log_records_show_no_credentials(caplog):
    out = io.StringIO()
    RedactingStream(out).write(f"open https://bob:{SECRET}@mlflow.example/#/x and s3://bucket/key\n")
    assert out.getvalue() == "open https://***@mlflow.example/#/x and s3://bucket/key\n"
    with caplog.at_level(logging.INFO):
        logging.getLogger("objret.test").info("endpoint %s", f"http://AKIA:{SECRET}@127.0.0.1:9000")
    assert caplog.records[-1].getMessage() == "endpoint http://***@127.0.0.1:9000"


@pytest.mark.slow
def test_a_flow_command_shows_prefect_no_credentials(prefect_api, bench_dir, tmp_path):
    lake = tmp_path / "lake"
    lake.mkdir()
    for image in sorted((bench_dir / "pets09_s2l1" / "images").glob("*.jpg"))[:3]:
        shutil.copy(image, lake)
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    env.pop(SECRET_OVERRIDES_ENV, None)
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "build-index", str(lake), "--workdir", str(tmp_path / "work"),
         "--set", "features.backbone=efficientnet_lite0", "--set", "features.max_side=320",
         "--set", f"lake.s3_endpoint_url=http://AKIAEXAMPLE:{SECRET}@127.0.0.1:9"],
        env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert SECRET not in done.stdout + done.stderr
    runs = httpx.post(f"{prefect_api}/flow_runs/filter", timeout=10, json={"sort": "START_TIME_DESC", "limit": 50}).json()
    mine = [r for r in runs if r["parameters"].get("workdir") == str(tmp_path / "work")]
    assert mine and all(SECRET not in json.dumps(r["parameters"]) for r in mine)
    assert "lake.s3_endpoint_url=http://***@127.0.0.1:9" in mine[0]["parameters"]["overrides"]
    logs = httpx.post(f"{prefect_api}/logs/filter", timeout=10, json={
        "logs": {"flow_run_id": {"any_": [r["id"] for r in mine]}}, "limit": 200}).json()
    assert logs and not any(SECRET in entry["message"] for entry in logs)


def test_an_objret_error_is_logged_without_its_traceback_and_a_bug_with_it(caplog):
    from objret.errors import StoreError

    logger = logging.getLogger("objret.test_log_records")
    for exc in (StoreError("cannot write x: No space left on device"), RuntimeError("a bug")):
        try:
            raise exc
        except Exception:
            logger.error("failed", exc_info=True)
    assert [record.exc_info is None for record in caplog.records] == [True, False]
    assert "Traceback" not in caplog.records[0].getMessage() and "RuntimeError" in caplog.text
