"""The ledger of submitted failure reports: each report id is mined once, whoever submits it and however often.

One folder per report id under ``root``::

    <report_id>/report.json   the report as submitted (written once, atomically)
    <report_id>/state.json    {"state": submitted | running | mined | failed, "history": [...], ...}

A report moves submitted -> running -> mined | failed. Submitting an id that is submitted, running or mined
changes nothing (the caller says so); a failed report may be submitted again. Transitions hold a file lock,
so two submitters (CLI, folder watcher) or two mining runs of the same id cannot both win.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from objret import storage
from objret.errors import ObjretError
from objret.mining.report import FailureReport

SUBMITTED, RUNNING, MINED, FAILED = "submitted", "running", "mined", "failed"
ACTIVE = (SUBMITTED, RUNNING, MINED)  # states in which a new submission is a no-op


@dataclass
class Submission:
    report_id: str
    accepted: bool    # False: the id was already submitted, running or mined; nothing was done
    state: str        # the report's state after this call
    report_uri: str   # the stored copy of the report


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class ReportLedger:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _dir(self, report_id: str) -> Path:
        # Report ids are schema-checked file names; refuse anything else rather than build a path from it.
        if not report_id or report_id.startswith(".") or "/" in report_id or "\\" in report_id or "\0" in report_id:
            raise ObjretError(f"report id {report_id!r} cannot name a ledger entry")
        return self.root / report_id

    def _lock(self, report_id: str) -> FileLock:
        return FileLock(str(self.root / f".{report_id}.lock"), timeout=60)

    def state(self, report_id: str) -> dict | None:
        path = self._dir(report_id) / "state.json"
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError) as exc:
            raise ObjretError(f"ledger entry {path} is unreadable: {exc}") from exc

    def _write_state(self, report_id: str, state: str, **info) -> dict:
        entry = self.state(report_id) or {"report_id": report_id, "history": []}
        entry.update(info)
        entry["state"] = state
        entry["history"].append({"state": state, "at": _now(), **{k: v for k, v in info.items() if k != "result"}})
        storage.write_bytes(str(self._dir(report_id) / "state.json"), (json.dumps(entry, indent=1) + "\n").encode())
        return entry

    def report_uri(self, report_id: str) -> str:
        return str(self._dir(report_id) / "report.json")

    def submit(self, report: FailureReport, source: str, again: bool = False) -> Submission:
        """Record ``report`` (from ``source``: a file, a watched prefix, ...) unless its id is already active;
        ``again``: record it whatever its state (to re-mine on purpose, or after a run that was killed)."""
        with self._lock(report.report_id):
            entry = self.state(report.report_id)
            if entry is not None and entry["state"] in ACTIVE and not again:
                return Submission(report.report_id, False, entry["state"], self.report_uri(report.report_id))
            storage.write_bytes(self.report_uri(report.report_id),
                                (json.dumps(report.to_dict(), indent=1, sort_keys=True) + "\n").encode())
            self._write_state(report.report_id, SUBMITTED, source=source)
            return Submission(report.report_id, True, SUBMITTED, self.report_uri(report.report_id))

    def claim(self, report_id: str, run_id: str | None = None) -> tuple[bool, str]:
        """Move a submitted (or failed, or never submitted) report to running. (False, state) when it is already
        running or mined: the caller must not mine it again."""
        with self._lock(report_id):
            entry = self.state(report_id)
            if entry is not None and entry["state"] in (RUNNING, MINED):
                return False, entry["state"]
            self._write_state(report_id, RUNNING, run_id=run_id)
            return True, RUNNING

    def finish(self, report_id: str, ok: bool, **info) -> dict:
        with self._lock(report_id):
            return self._write_state(report_id, MINED if ok else FAILED, **info)

    def entries(self) -> list[dict]:
        out = []
        for path in sorted(self.root.glob("*/state.json")):
            entry = self.state(path.parent.name)
            if entry is not None:
                out.append(entry)
        return out
