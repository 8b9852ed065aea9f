"""The ledger of submitted failure reports: each report id is mined once, whoever submits it and however often.

One folder per report id under ``root``::

    <report_id>/report.json   the report as submitted (written once, atomically)
    <report_id>/state.json    {"state": submitted | running | mined | failed, "history": [...], ...}

A report moves submitted -> running -> mined | failed. Submitting an id that is submitted, running or mined
changes nothing (the caller says so); a failed report may be submitted again. Transitions hold a file lock,
so two submitters (CLI, folder watcher) or two mining runs of the same id cannot both win.

A running report is held by a lease: its run renews ``lease_until`` while it mines (``LeaseKeeper``). A run
killed outright (SIGKILL, a lost machine) stops renewing; once the lease lapses ``requeue_expired`` puts the
report back to submitted, and the next run takes it (``attempt`` counts them; the history keeps each). A run
that outlives its lease and finishes after another took over is recorded as stale and changes nothing.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import threading
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


def _lease_until(lease_s: float) -> str:
    return (dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=lease_s)).isoformat(timespec="milliseconds")


def _lapsed(entry: dict) -> bool:
    """A running entry whose lease has run out (one written before leases existed has none: lapsed)."""
    until = entry.get("lease_until")
    return until is None or dt.datetime.fromisoformat(until) < dt.datetime.now(dt.timezone.utc)


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
        entry["history"].append({"state": state, "at": _now(),
                                 **{k: v for k, v in info.items() if k not in ("result", "lease_until")}})
        self._store(report_id, entry)
        return entry

    def _store(self, report_id: str, entry: dict) -> None:
        storage.write_bytes(str(self._dir(report_id) / "state.json"), (json.dumps(entry, indent=1) + "\n").encode())

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

    def claim(self, report_id: str, run_id: str, lease_s: float) -> tuple[bool, str]:
        """Move a submitted (or failed, or never submitted) report to running, held by ``run_id`` for ``lease_s``
        seconds. (False, state) when it is mined, or running under a live lease: the caller must not mine it."""
        with self._lock(report_id):
            entry = self.state(report_id)
            if entry is not None and (entry["state"] == MINED or entry["state"] == RUNNING and not _lapsed(entry)):
                return False, entry["state"]
            attempt = (entry or {}).get("attempt", 0) + 1
            self._write_state(report_id, RUNNING, run_id=run_id, attempt=attempt, lease_until=_lease_until(lease_s),
                              host=socket.gethostname(), pid=os.getpid())
            return True, RUNNING

    def renew(self, report_id: str, run_id: str, lease_s: float) -> bool:
        """Extend ``run_id``'s lease; False when the report is no longer running under it (taken over)."""
        with self._lock(report_id):
            entry = self.state(report_id)
            if entry is None or entry["state"] != RUNNING or entry.get("run_id") != run_id:
                return False
            entry["lease_until"] = _lease_until(lease_s)   # not a transition: no history line
            self._store(report_id, entry)
            return True

    def finish(self, report_id: str, ok: bool, run_id: str | None = None, **info) -> dict:
        """Record a run's outcome. A run that no longer holds the report (its lease lapsed and another run took
        it) is written into the history as stale and changes nothing else."""
        with self._lock(report_id):
            entry = self.state(report_id)
            if run_id is not None and entry is not None and entry.get("run_id") != run_id:
                entry["history"].append({"state": "stale", "at": _now(), "run_id": run_id, "ok": ok})
                self._store(report_id, entry)
                return entry
            return self._write_state(report_id, MINED if ok else FAILED, **info)

    def requeue_expired(self) -> list[str]:
        """Put every running report whose lease lapsed back to submitted; their ids, for the caller to send
        again."""
        requeued = []
        for candidate in self.entries():
            if candidate["state"] != RUNNING or not _lapsed(candidate):
                continue
            with self._lock(candidate["report_id"]):
                entry = self.state(candidate["report_id"])   # again, under the lock
                if entry["state"] == RUNNING and _lapsed(entry):
                    self._write_state(entry["report_id"], SUBMITTED, source=f"lease of run {entry.get('run_id')} "
                                      f"(attempt {entry.get('attempt', 1)}) lapsed")
                    requeued.append(entry["report_id"])
        return requeued

    def entries(self) -> list[dict]:
        out = []
        for path in sorted(self.root.glob("*/state.json")):
            entry = self.state(path.parent.name)
            if entry is not None:
                out.append(entry)
        return out


class LeaseKeeper:
    """``with LeaseKeeper(ledger, report_id, run_id, lease_s):`` renews the run's lease every quarter lease on a
    background thread while the block runs, so a run stays the holder for as long as its process lives."""

    def __init__(self, ledger: ReportLedger, report_id: str, run_id: str, lease_s: float):
        self.ledger, self.report_id, self.run_id, self.lease_s = ledger, report_id, run_id, lease_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name=f"lease-{report_id}", daemon=True)

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            try:
                if not self.ledger.renew(self.report_id, self.run_id, self.lease_s):
                    return   # taken over: finish() will record this run as stale
            except Exception:   # a full disk or a lock timeout: try again next beat, the lease has slack
                continue

    def __enter__(self) -> "LeaseKeeper":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
