"""A flood of failure reports into a running `objret serve`, everything real and on 127.0.0.1: `prefect server
start`, `objret tracking-server` (MLflow), `objret serve` on a small PETS 2009 lake, then one `objret report submit`
of VALID reports, MALFORMED ones and DUPLICATE re-submissions of valid ids, all at once.

    .venv/bin/python benchmarks/report_flood.py --valid 500 --malformed 50 --duplicates 50 \\
        --out benchmarks/results/report_flood.json

Checks, and exits 1 naming what failed: every valid report mined exactly once (state `mined`, one mining run that
claimed it, one dataset version each, its frames in the dataset once), every malformed one refused with its
reason, every duplicate refused as already submitted. Records reports/minute (first submission to last report
mined), queue wait p50/p95 (a report's submission to the moment its run claimed it), the serving processes'
peak RSS (serve with its flow-run children, the Prefect server, the MLflow server; sampled every 0.5 s), and
the settings. No backbone weights are fetched: EfficientNet-Lite0 as installed, frames at 320 px.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import httpx
import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))   # the polling helper the tests use (tests.helpers)
from tests.helpers.polling import wait_until  # noqa: E402
BENCH = REPO / "tests" / "data" / "bench" / "pets09_s2l1"
MALFORMATIONS = [   # (what is wrong, how) - each refused by the schema before anything is sent
    ("negative width", lambda r: {**r, "box": [10, 10, -5, 20]}),
    ("unknown failure kind", lambda r: {**r, "failure_kind": "wrong"}),
    ("missing class", lambda r: {k: v for k, v in r.items() if k != "class_name"}),
    ("box of three numbers", lambda r: {**r, "box": [1, 2, 3]}),
    ("unknown field", lambda r: {**r, "surprise": 1}),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(what: str, condition, timeout: float, every: float = 0.5):
    value = wait_until(condition, timeout, every)
    if not value:
        raise SystemExit(f"timed out waiting for {what}")
    return value


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


class PeakRSS:
    """Peak resident memory of process trees, sampled on a thread: the sum over each tree at each sample."""

    def __init__(self, roots: dict[str, int]):
        self.roots, self.peak, self._stop = roots, {name: 0 for name in roots}, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _tree_rss(self, pid: int) -> int:
        try:
            root = psutil.Process(pid)
            return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)] if p.is_running())
        except psutil.Error:
            return 0

    def _sample(self) -> None:
        while not self._stop.wait(0.5):
            for name, pid in self.roots.items():
                self.peak[name] = max(self.peak[name], self._tree_rss(pid))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _reports(lake: Path, valid: int, malformed: int, duplicates: int, rng: random.Random) -> dict[str, list]:
    annotations = json.loads((BENCH / "annotations.json").read_text())["annotations"]
    frames = sorted(p.name for p in lake.iterdir())
    boxes = [(f"{a['image_id']:06d}.jpg", a["bbox"]) for a in annotations
             if f"{a['image_id']:06d}.jpg" in frames and a["bbox"][2] >= 16 and a["bbox"][3] >= 32]
    good = []
    for i in range(valid):
        frame, box = rng.choice(boxes)
        good.append({"report_id": f"flood-{i:04d}", "detector": {"name": "det", "version": "1"},
                     "frame": {"uri": str(lake / frame)}, "box": box, "class_name": "person",
                     "failure_kind": "false_negative"})
    bad = [(MALFORMATIONS[i % len(MALFORMATIONS)][0],
            MALFORMATIONS[i % len(MALFORMATIONS)][1]({**rng.choice(good), "report_id": f"bad-{i:04d}"}))
           for i in range(malformed)]
    again = [rng.choice(good) for _ in range(duplicates)]
    return {"valid": good, "malformed": bad, "duplicates": again}


def _ts(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--valid", type=int, default=500)
    parser.add_argument("--malformed", type=int, default=50)
    parser.add_argument("--duplicates", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=2, help="service.mine_concurrency")
    parser.add_argument("--frames", type=int, default=12, help="PETS frames in the lake")
    parser.add_argument("--timeout", type=float, default=7200, help="seconds to wait for the reports to be mined")
    parser.add_argument("--out", default=None, help="write the figures here (JSON)")
    args = parser.parse_args()
    rng = random.Random(0)
    home = Path(tempfile.mkdtemp(prefix="objret-flood-"))
    lake, work, files = home / "lake", home / "work", home / "reports"
    for folder in (lake, work, files):
        folder.mkdir()
    for image in sorted((BENCH / "images").glob("*.jpg"))[:args.frames]:
        shutil.copy(image, lake)
    prefect_port, mlflow_port = _free_port(), _free_port()
    api = f"http://127.0.0.1:{prefect_port}/api"
    params = home / "params.yaml"
    params.write_text(yaml.safe_dump({
        "workdir": str(work), "lake": {"sources": [str(lake)]},
        "features": {"backbone": "efficientnet_lite0", "max_side": 320},
        "mining": {"top_k": 5, "scales": [0.75, 1.0, 1.5]},
        "tracking": {"mlflow_uri": f"http://127.0.0.1:{mlflow_port}"},
        "service": {"mine_concurrency": args.concurrency, "refresh_cron": None}}))
    env = {**os.environ, "OBJRET_PARAMS": str(params), "PREFECT_HOME": str(home / "prefect"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "true"}
    env.pop("PREFECT_API_URL", None)
    objret = [sys.executable, "-m", "flows.cli"]
    started = []

    def start(name: str, command: list[str], extra: dict | None = None) -> subprocess.Popen:
        log = open(home / f"{name}.log", "wb")
        process = subprocess.Popen(command, env={**env, **(extra or {})}, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        started.append(process)
        return process

    try:
        prefect = start("prefect", [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                    "--port", str(prefect_port)])
        mlflow = start("mlflow", [*objret, "tracking-server", "--host", "127.0.0.1", "--port", str(mlflow_port)])
        _wait("the Prefect server", lambda: _answers(f"{api}/health"), 180)
        _wait("the MLflow server", lambda: _answers(f"http://127.0.0.1:{mlflow_port}/health"), 180)
        client_env = {**env, "PREFECT_API_URL": api}
        subprocess.run([*objret, "build-index"], env=client_env, check=True, capture_output=True)
        serve = start("serve", [*objret, "serve"], {"PREFECT_API_URL": api})
        _wait("the mine deployment", lambda: _answers(f"{api}/deployments/name/mine-report/mine"), 180)

        reports = _reports(lake, args.valid, args.malformed, args.duplicates, rng)
        paths = []
        for report in reports["valid"]:
            paths.append(files / f"{report['report_id']}.json")
            paths[-1].write_text(json.dumps(report))
        for reason, report in reports["malformed"]:
            paths.append(files / f"{report['report_id']}.json")
            paths[-1].write_text(json.dumps(report))
        for i, report in enumerate(reports["duplicates"]):
            paths.append(files / f"again-{i:04d}.json")
            paths[-1].write_text(json.dumps(report))
        rng.shuffle(paths)

        with PeakRSS({"serve": serve.pid, "prefect_server": prefect.pid, "mlflow_server": mlflow.pid}) as rss:
            t0 = time.time()
            submitted = subprocess.run([*objret, "report", "submit", *map(str, paths)], env=client_env,
                                       capture_output=True, text=True)
            submit_s = time.time() - t0
            states = home / "work" / "reports"

            def settled():
                done = [json.loads(p.read_text()) for p in states.glob("flood-*/state.json")]
                return done if sum(e["state"] in ("mined", "failed") for e in done) == args.valid else None

            entries = _wait("every valid report to be mined", settled, args.timeout, every=2)
        figures = _figures(args, entries, submitted, submit_s, rss.peak, work)
    finally:
        for process in reversed(started):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGINT if process is started[-1] else signal.SIGTERM)
        for process in started:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
    print(json.dumps(figures, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=1, sort_keys=True) + "\n")
    shutil.rmtree(home, ignore_errors=True)
    return 0 if not figures["problems"] else 1


def _figures(args, entries: list[dict], submitted, submit_s: float, peak: dict, work: Path) -> dict:
    problems = []
    mined = [e for e in entries if e["state"] == "mined"]
    if len(mined) != args.valid:
        problems.append(f"{args.valid - len(mined)} valid reports not mined: "
                        f"{[e.get('error') for e in entries if e['state'] != 'mined'][:3]}")
    claims = [sum(h["state"] == "running" for h in e["history"]) for e in entries]
    if any(n != 1 for n in claims):
        problems.append(f"{sum(n != 1 for n in claims)} reports claimed by more than one run")
    versions = [json.loads(line) for line in (work / "datasets" / "versions.jsonl").read_text().splitlines()]
    per_report = {}
    for v in versions:
        per_report[v.get("report_id")] = per_report.get(v.get("report_id"), 0) + 1
    if sorted(per_report) != sorted(e["report_id"] for e in mined) or set(per_report.values()) != {1}:
        problems.append("not one dataset version per mined report")
    coco = json.loads((work / "datasets" / "retraining" / "annotations.json").read_text())
    frame_of = {image["id"]: image["frame_id"] for image in coco["images"]}
    pairs = [(a["objret"]["report_id"], frame_of[a["image_id"]]) for a in coco["annotations"]]
    if len(pairs) != len(set(pairs)) or len(pairs) != sum(e["mined"] for e in mined):
        problems.append("a (report, frame) annotation missing or twice in the dataset")
    refused = [line for line in submitted.stderr.splitlines() if line.startswith("objret: ")]
    if len(refused) != args.malformed or submitted.returncode != (2 if args.malformed else 0):
        problems.append(f"{len(refused)} files refused (exit {submitted.returncode}), {args.malformed} malformed")
    already = submitted.stdout.count("is already")
    if already != args.duplicates:
        problems.append(f"{already} re-submissions refused as already submitted, {args.duplicates} sent")
    waits = sorted(_ts(e["history"][1]["at"]) - _ts(e["history"][0]["at"]) for e in mined)
    first = min(_ts(e["history"][0]["at"]) for e in entries)
    last = max(_ts(e["history"][-1]["at"]) for e in entries)
    return {
        "settings": {"valid": args.valid, "malformed": args.malformed, "duplicates": args.duplicates,
                     "mine_concurrency": args.concurrency, "lake_frames": args.frames,
                     "backbone": "efficientnet_lite0", "max_side": 320, "machine_cpus": os.cpu_count()},
        "submit_s": round(submit_s, 1),
        "reports_per_minute": round(len(mined) / max(last - first, 1e-9) * 60, 1),
        "queue_wait_s": {"p50": round(statistics.median(waits), 1),
                         "p95": round(waits[min(len(waits) - 1, int(0.95 * len(waits)))], 1),
                         "max": round(waits[-1], 1)},
        "peak_rss_mb": {name: round(value / 2**20) for name, value in peak.items()},
        "mined": len(mined), "refused_malformed": len(refused), "refused_duplicates": already,
        "annotations": len(pairs), "dataset_versions": len(versions),
        "problems": problems,
    }


if __name__ == "__main__":
    sys.exit(main())
