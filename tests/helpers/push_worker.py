"""One mining run's push, for tests/dataset/test_concurrent_push.py and tests/test_storage.py: objret.steps.dataset.push_mined
of given frames, in its own process, as the mine flow's push task runs it.

    python tests/helpers/push_worker.py JOB.json    -> one JSON line per target on stdout: the PushResult

JOB: {"report_id", "class_name", "frames": [{"frame_id", "path", "width", "height", "box", "score"}],
"targets": [{"workdir", "overrides"}], "barrier": folder or null, "name"}. With a barrier, the worker writes
<barrier>/ready-<target>-<name> once imported and set up, and starts each target's push when <barrier>/go-<target>
exists, so that all workers push at the same moment.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path


def outcome_of(job: dict, run_dir: str):
    from objret.steps.mine import MiningOutcome

    mined = [{"frame_id": f["frame_id"], "uri": f["path"], "image_uri": f["path"], "width": f["width"],
              "height": f["height"], "score": f["score"], "box": f["box"], "rank": rank, "frame_index": None,
              "time_s": None, "evidence": {"template": f["score"]}, "duplicates": []}
             for rank, f in enumerate(job["frames"], start=1)]
    return MiningOutcome(job["report_id"], {}, mined, {"backbone": "efficientnet_lite0", "index_version": "test",
                                                       "method": "fused"}, run_dir, "", "")


def report_of(job: dict):
    from objret.mining.report import parse_report

    return parse_report({"report_id": job["report_id"], "detector": {"name": "yolov8n", "version": "1.0"},
                         "frame": {"uri": job["frames"][0]["path"]}, "box": [10, 20, 30, 60],
                         "class_name": job.get("class_name", "person"), "failure_kind": "false_negative"})


def main(job_path: str) -> None:
    from objret.steps import dataset as dataset_step
    from objret.config import load_params
    from objret.steps.workspace import Workspace

    job = json.loads(Path(job_path).read_text())
    report = report_of(job)
    barrier = Path(job["barrier"]) if job.get("barrier") else None
    for i, target in enumerate(job["targets"]):
        ws = Workspace(load_params(None, target["overrides"]), target["workdir"])
        outcome = outcome_of(job, str(Path(target["workdir"]) / "runs" / job["report_id"]))
        if barrier is not None:
            (barrier / f"ready-{i}-{job['name']}").touch()
            while not (barrier / f"go-{i}").exists():
                time.sleep(0.01)
        start = time.monotonic()
        try:
            result = asdict(dataset_step.push_mined(ws, report, outcome))
        except Exception as exc:   # reported, not raised: the test reads what each worker got
            result = {"error": f"{type(exc).__name__}: {exc}"}
        result["seconds"] = time.monotonic() - start
        print(json.dumps({"target": i, "report_id": job["report_id"], **result}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
