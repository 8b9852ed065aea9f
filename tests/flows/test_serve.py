"""`objret serve` against a real Prefect server: reports submitted from the CLI and dropped in a watched folder
are mined once each, at most `service.mine_concurrency` at a time, a failing report fails alone, a report whose
run is killed outright is mined again once its lease lapses; the cron deployment refreshes the index with the
frames that landed in the lake folder since the last build."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from tests.fixtures.services import stop_group
from tests.helpers.figures import record_figures
from tests.helpers.polling import wait_until
from tasks.report_ledger import ReportLedger

pytestmark = pytest.mark.slow

LEASE_S = 8   # short, so that the killed run's report is taken again within the test
FRAMES = [101, 103, 105, 107, 109, 111, 113, 115]   # PETS 2009 frames in the lake at first
LATER = [117, 119]                                   # frames that land in the lake folder while serving
SETTINGS = ["features.backbone=efficientnet_lite0", "features.max_side=320", "mining.top_k=3",
            "mining.scales=[0.75,1.0,1.5]"]


def _objret(*args: str, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "flows.cli", *args], env=env, capture_output=True, text=True,
                            timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"objret {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def _report(report_id: str, frame_uri: str, box: list[float]) -> dict:
    return {"report_id": report_id, "detector": {"name": "det", "version": "1"}, "frame": {"uri": frame_uri},
            "box": box, "class_name": "person", "failure_kind": "false_negative"}


def _wait(what: str, condition, timeout: float, log: Path, every: float = 2.0):
    value = wait_until(condition, timeout, every)
    if not value:
        raise AssertionError(f"timed out waiting for {what}; serve log:\n{log.read_text(errors='replace')[-6000:]}")
    return value


def _flow_runs(api: str, deployment: str) -> list[dict]:
    dep = httpx.get(f"{api}/deployments/name/{deployment}", timeout=10).json()
    return httpx.post(f"{api}/flow_runs/filter", json={"deployments": {"id": {"any_": [dep["id"]]}}},
                      timeout=10).json()


def _ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def _slot_window(api: str, run_id: str) -> tuple[float, float]:
    """When a flow run held a slot of its deployment's concurrency limit: from its PENDING state (the server grants
    the slot there) to its first state past PENDING / RUNNING (the slot goes back there)."""
    states = sorted(httpx.get(f"{api}/flow_run_states/", params={"flow_run_id": run_id}, timeout=10).json(),
                    key=lambda state: _ts(state["timestamp"]))
    held = next(_ts(s["timestamp"]) for s in states if s["type"] == "PENDING")
    return held, next(_ts(s["timestamp"]) for s in states
                      if _ts(s["timestamp"]) >= held and s["type"] not in ("PENDING", "RUNNING", "CANCELLING"))


def _peak(windows: list[tuple[float, float]]) -> int:
    """The most windows open at one moment (one that ends as another starts does not overlap it)."""
    events = sorted([(start, 1) for start, _ in windows] + [(end, -1) for _, end in windows])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


def test_served_deployments_mine_submitted_and_dropped_reports_and_refresh_on_schedule(
        prefect_api, bench_dir, tmp_path):
    images = bench_dir / "pets09_s2l1" / "images"
    lake, watch, work = tmp_path / "lake", tmp_path / "watch", tmp_path / "work"
    lake.mkdir(), watch.mkdir()
    for n in FRAMES:
        shutil.copy(images / f"{n:06d}.jpg", lake)
    settings = [*SETTINGS, f"lake.sources=[{lake}]"]
    sets = [arg for s in settings for arg in ("--set", s)]
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PREFECT_HOME": str(tmp_path / "client-home")}
    _objret("build-index", "--workdir", str(work), *sets, env=env)

    ann = json.loads((bench_dir / "pets09_s2l1" / "annotations.json").read_text())["annotations"]
    box = next(a["bbox"] for a in ann if a["image_id"] == 105)
    reports = {rid: _report(rid, str(lake / f"{n:06d}.jpg"), box)
               for rid, n in [("r1", 105), ("r2", 113)]}
    reports["no-frame"] = _report("no-frame", str(tmp_path / "missing.jpg"), box)   # valid, fails when mined
    killed = _report("k1", str(lake / "000107.jpg"), box)   # its first run is killed with SIGKILL
    for rid, report in reports.items():
        (tmp_path / f"{rid}.json").write_text(json.dumps(report))
    (tmp_path / "malformed.json").write_text(json.dumps({**reports["r1"], "report_id": "m1", "box": [1, 2, -3, 4]}))

    serve_log = tmp_path / "serve.out"
    with open(serve_log, "wb") as out:
        serve = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "serve", "--workdir", str(work), *sets,
             "--set", "service.refresh_cron=* * * * *", "--set", "service.mine_concurrency=2",
             "--set", f"service.watch.sources=[{watch}]", "--set", "service.watch.interval_s=15",
             "--set", f"service.lease_s={LEASE_S}"],
            env={**env, "PREFECT_RUNNER_POLL_FREQUENCY": "2"},   # runs picked up within 2 s, not 10 s
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait("the deployments", lambda: httpx.get(f"{prefect_api}/deployments/name/mine-report/mine",
                                                   timeout=5).status_code == 200, 120, serve_log)
        for n in LATER:   # land while the service runs: the next scheduled refresh picks them up
            shutil.copy(images / f"{n:06d}.jpg", lake)
        ledger = ReportLedger(work / "reports")

        (tmp_path / "k1.json").write_text(json.dumps(killed))
        _objret("report", "submit", str(tmp_path / "k1.json"), "--workdir", str(work), *sets, env=env)
        # 300 s: the runner may be at capacity with the every-minute refresh runs first (a CI run on a slow day
        # waited over 120 s here).
        first = _wait("k1's first run to hold it", lambda: (ledger.state("k1") or {}).get("pid"), 300, serve_log,
                      every=0.2)
        os.kill(first, signal.SIGKILL)   # mid-way: claimed, not finished; its lease is no longer renewed

        submitted = _objret("report", "submit", *[str(tmp_path / f"{r}.json") for r in [*reports, "malformed"]],
                            "--workdir", str(work), *sets, env=env, check=False)
        assert submitted.returncode == 2   # one file refused, the others sent
        assert "m1" not in submitted.stdout and "box" in submitted.stderr and "malformed.json" in submitted.stderr
        assert submitted.stdout.count("submitted report") == 3
        again = _objret("report", "submit", str(tmp_path / "r1.json"), "--workdir", str(work), *sets, env=env)
        assert "already" in again.stdout
        (watch / "dropped.json").write_text(json.dumps({**reports["r2"], "report_id": "w1"}))
        (watch / "duplicate.json").write_text(json.dumps(reports["r2"]))   # an id submitted from the CLI

        expected = {"r1": "mined", "r2": "mined", "w1": "mined", "no-frame": "failed", "k1": "mined"}

        def settled():
            states = {e["report_id"]: e["state"] for e in ledger.entries()}
            return states if states == expected else None

        _wait("the reports to be mined", settled, 420, serve_log)

        def refreshed():
            runs = _flow_runs(prefect_api, "build-index/refresh-index")
            return any(r["state_type"] == "COMPLETED" for r in runs) and len(LATER) in _build_metrics(work)["ingest_added"]

        _wait("a scheduled refresh run with the new frames", refreshed, 200, serve_log)
    finally:
        serve.send_signal(signal.SIGINT)
        try:
            serve.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        stop_group(serve)

    # One mining run per accepted report, two for the killed one: re-submission and the watched duplicate started
    # none.
    runs = _flow_runs(prefect_api, "mine-report/mine")
    assert sorted(r["parameters"]["report"]["report_id"] for r in runs) == ["k1", "k1", "no-frame", "r1", "r2", "w1"]
    states = sorted((r["parameters"]["report"]["report_id"], r["state_type"]) for r in runs)
    assert states == [("k1", "COMPLETED"), ("k1", "CRASHED"), ("no-frame", "FAILED"), ("r1", "COMPLETED"),
                      ("r2", "COMPLETED"), ("w1", "COMPLETED")]
    # Bounded concurrency, and used to the bound: r1, r2 and no-frame were queued at once, more than the limit of 2,
    # so 2 mining runs held a slot together (a service that mined one report at a time peaks at 1), never 3. A slot
    # is held from the run's PENDING state (where the server grants it) to its end, the window that covers the run's
    # process start as well; running at once (RUNNING to end) never exceeds 2 either.
    slots = _peak([_slot_window(prefect_api, r["id"]) for r in runs])
    running = _peak([(_ts(r["start_time"]), _ts(r["end_time"])) for r in runs])
    print(f"mining runs: {slots} holding a slot at once, {running} running at once")
    assert slots == 2 and 1 <= running <= 2, (slots, running)
    assert "missing.jpg" in ledger.state("no-frame")["error"]

    # The killed report: taken again once its lease lapsed, by a second run, and mined once.
    entry = ledger.state("k1")
    attempts = [h for h in entry["history"] if h["state"] == "running"]
    assert entry["attempt"] == 2 and len({h["run_id"] for h in attempts}) == 2 and attempts[0]["pid"] == first
    assert [h["state"] for h in entry["history"]] == ["submitted", "running", "submitted", "running", "mined"]
    assert "lapsed" in entry["history"][2]["source"]
    at = [_ts(h["at"]) for h in entry["history"]]
    record_figures("report_lease", {
        "lease_s": LEASE_S, "requeue_interval_s": LEASE_S / 2, "attempts": entry["attempt"],
        "sent_again_after_claim_s": round(at[2] - at[1], 1), "claimed_again_after_s": round(at[3] - at[2], 1),
        "mined_after_second_claim_s": round(at[4] - at[3], 1), "frames_in_dataset_once": True,
        "killed_run_state": "CRASHED"})

    # Every mined report is in the retraining dataset, each frame once; the failed one left nothing there.
    coco = json.loads((work / "datasets" / "retraining" / "annotations.json").read_text())
    assert {a["objret"]["report_id"] for a in coco["annotations"]} == {"r1", "r2", "w1", "k1"}
    k1_frames = [a["image_id"] for a in coco["annotations"] if a["objret"]["report_id"] == "k1"]
    assert len(k1_frames) == len(set(k1_frames)) == entry["mined"]
    versions = [json.loads(line) for line in (work / "datasets" / "versions.jsonl").read_text().splitlines()]
    assert sorted(v["report_id"] for v in versions) == ["k1", "r1", "r2", "w1"]   # one version per mined report

    # The scheduled refresh ingested only the frames that landed later, and indexed them.
    metrics = _build_metrics(work)
    assert metrics["ingest_added"][0] == len(FRAMES) and set(metrics["ingest_added"][1:]) <= {0, len(LATER)}
    assert max(metrics["index_frames"]) == len(FRAMES) + len(LATER)


def _build_metrics(work: Path) -> dict[str, list[float]]:
    """The metrics of the build-index runs in the work folder's MLflow store, oldest run first."""
    with sqlite3.connect(work / "mlflow.db") as db:
        rows = db.execute("SELECT m.key, m.value FROM metrics m JOIN tags t ON t.run_uuid = m.run_uuid JOIN runs r "
                          "ON r.run_uuid = m.run_uuid WHERE t.key = 'flow' AND t.value = 'build-index' "
                          "ORDER BY r.start_time, m.timestamp").fetchall()
    out: dict[str, list[float]] = {}
    for key, value in rows:
        out.setdefault(key, []).append(value)
    return out
