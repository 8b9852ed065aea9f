"""The report ledger: each report id is mined once, however often and by whom it is submitted."""

from __future__ import annotations

import json
import threading
import time

import pytest

from objret.errors import ObjretError
from objret.mining.report import parse_report
from tasks.report_ledger import LeaseKeeper, ReportLedger

LEASE = 120.0


def report(report_id: str = "rep-1"):
    return parse_report({"report_id": report_id, "detector": {"name": "det", "version": "1"},
                         "frame": {"uri": "cam/000001.jpg"}, "box": [10, 20, 30, 40], "class_name": "person",
                         "failure_kind": "false_negative"})


def test_a_report_is_submitted_once_and_mined_once(tmp_path):
    ledger = ReportLedger(tmp_path)
    first = ledger.submit(report(), "a.json")
    again = ledger.submit(report(), "b.json")
    assert (first.accepted, first.state) == (True, "submitted")
    assert (again.accepted, again.state) == (False, "submitted")
    assert json.loads(open(first.report_uri).read())["report_id"] == "rep-1"

    assert ledger.claim("rep-1", "run-1", LEASE) == (True, "running")
    assert ledger.claim("rep-1", "run-2", LEASE) == (False, "running")   # a second run of the same id does nothing
    assert ledger.submit(report(), "c.json").accepted is False
    ledger.finish("rep-1", ok=True, run_id="run-1", dataset_version="abc")
    assert ledger.claim("rep-1", "run-3", LEASE) == (False, "mined")
    assert ledger.submit(report(), "d.json").state == "mined"

    entry = ledger.state("rep-1")
    assert entry["state"] == "mined" and entry["dataset_version"] == "abc"
    assert [h["state"] for h in entry["history"]] == ["submitted", "running", "mined"]
    assert entry["history"][0]["source"] == "a.json"


def test_a_failed_report_may_be_submitted_again_and_again_forces_a_re_mine(tmp_path):
    ledger = ReportLedger(tmp_path)
    ledger.submit(report(), "a.json")
    ledger.claim("rep-1", "run-1", LEASE)
    ledger.finish("rep-1", ok=False, run_id="run-1", error="StoreError: cannot read frame")
    assert ledger.state("rep-1")["error"].startswith("StoreError")
    assert ledger.submit(report(), "a.json").accepted
    ledger.claim("rep-1", "run-2", LEASE)
    ledger.finish("rep-1", ok=True, run_id="run-2")
    assert not ledger.submit(report(), "a.json").accepted
    forced = ledger.submit(report(), "a.json", again=True)
    assert forced.accepted and forced.state == "submitted"
    assert [e["report_id"] for e in ledger.entries()] == ["rep-1"]


def test_concurrent_claims_of_one_report_let_exactly_one_run_mine_it(tmp_path):
    ledger = ReportLedger(tmp_path)
    ledger.submit(report(), "a.json")
    wins = []
    barrier = threading.Barrier(8)

    def claim(i):
        barrier.wait()
        wins.append(ReportLedger(tmp_path).claim("rep-1", f"run-{i}", LEASE)[0])

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins) == [False] * 7 + [True]


def test_a_killed_run_s_report_is_taken_again_once_its_lease_lapses(tmp_path):
    ledger = ReportLedger(tmp_path)
    ledger.submit(report(), "a.json")
    assert ledger.claim("rep-1", "run-1", 1.0)[0]
    assert ledger.requeue_expired() == []                     # the lease still runs
    assert ledger.claim("rep-1", "run-2", LEASE) == (False, "running")
    time.sleep(1.1)                                           # run-1 was killed: nobody renewed
    assert ledger.requeue_expired() == ["rep-1"] and ledger.state("rep-1")["state"] == "submitted"
    assert ledger.requeue_expired() == []                     # once
    assert ledger.claim("rep-1", "run-2", LEASE) == (True, "running")
    assert ledger.renew("rep-1", "run-1", LEASE) is False     # the old holder cannot take it back
    ledger.finish("rep-1", ok=True, run_id="run-2", mined=3)
    entry = ledger.state("rep-1")
    assert entry["state"] == "mined" and entry["attempt"] == 2 and entry["run_id"] == "run-2"
    runs = [(h["state"], h.get("run_id"), h.get("attempt")) for h in entry["history"]]
    assert runs == [("submitted", None, None), ("running", "run-1", 1), ("submitted", None, None),
                    ("running", "run-2", 2), ("mined", None, None)]
    assert "lease of run run-1 (attempt 1) lapsed" in entry["history"][2]["source"]


def test_a_run_that_outlives_its_lease_finishes_as_stale_and_changes_nothing(tmp_path):
    ledger = ReportLedger(tmp_path)
    ledger.submit(report(), "a.json")
    ledger.claim("rep-1", "run-1", 0.1)
    time.sleep(0.2)
    ledger.requeue_expired()
    ledger.claim("rep-1", "run-2", LEASE)
    ledger.finish("rep-1", ok=False, run_id="run-1", error="late")   # the paused run wakes up and fails
    entry = ledger.state("rep-1")
    assert entry["state"] == "running" and entry["run_id"] == "run-2" and "error" not in entry
    assert entry["history"][-1] == {**entry["history"][-1], "state": "stale", "run_id": "run-1", "ok": False}


def test_a_living_run_keeps_its_lease_and_stops_renewing_once_taken_over(tmp_path):
    ledger = ReportLedger(tmp_path)
    ledger.submit(report(), "a.json")
    ledger.claim("rep-1", "run-1", 1.0)
    with LeaseKeeper(ledger, "rep-1", "run-1", 1.0) as keeper:
        time.sleep(2.5)                                       # 2.5 leases: renewed every 0.25 s
        assert ledger.requeue_expired() == []
        ledger.submit(report(), "again.json", again=True)     # forced: the next claim takes it over
        ledger.claim("rep-1", "run-2", LEASE)
        time.sleep(0.8)
        assert not keeper._thread.is_alive()                   # it saw the takeover and stopped
    assert ledger.state("rep-1")["run_id"] == "run-2"


def test_a_running_entry_written_before_leases_is_requeued(tmp_path):
    ledger = ReportLedger(tmp_path)
    ledger.submit(report(), "a.json")
    ledger.claim("rep-1", "run-1", LEASE)
    entry = ledger.state("rep-1")
    del entry["lease_until"]
    (tmp_path / "rep-1" / "state.json").write_text(json.dumps(entry))
    assert ledger.requeue_expired() == ["rep-1"]


@pytest.mark.parametrize("bad", ["", ".hidden", "../x", "a/b"])
def test_ids_that_are_not_file_names_are_refused(tmp_path, bad):
    with pytest.raises(ObjretError, match="cannot name a ledger entry"):
        ReportLedger(tmp_path).state(bad)
