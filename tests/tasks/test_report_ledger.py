"""The report ledger: each report id is mined once, however often and by whom it is submitted."""

from __future__ import annotations

import json
import threading

import pytest

from objret.errors import ObjretError
from objret.mining.report import parse_report
from tasks.report_ledger import ReportLedger


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

    assert ledger.claim("rep-1", "run-1") == (True, "running")
    assert ledger.claim("rep-1", "run-2") == (False, "running")   # a second run of the same id does nothing
    assert ledger.submit(report(), "c.json").accepted is False
    ledger.finish("rep-1", ok=True, dataset_version="abc")
    assert ledger.claim("rep-1", "run-3") == (False, "mined")
    assert ledger.submit(report(), "d.json").state == "mined"

    entry = ledger.state("rep-1")
    assert entry["state"] == "mined" and entry["dataset_version"] == "abc"
    assert [h["state"] for h in entry["history"]] == ["submitted", "running", "mined"]
    assert entry["history"][0]["source"] == "a.json"


def test_a_failed_report_may_be_submitted_again_and_again_forces_a_re_mine(tmp_path):
    ledger = ReportLedger(tmp_path)
    ledger.submit(report(), "a.json")
    ledger.claim("rep-1")
    ledger.finish("rep-1", ok=False, error="StoreError: cannot read frame")
    assert ledger.state("rep-1")["error"].startswith("StoreError")
    assert ledger.submit(report(), "a.json").accepted
    ledger.claim("rep-1")
    ledger.finish("rep-1", ok=True)
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
        wins.append(ReportLedger(tmp_path).claim("rep-1", f"run-{i}")[0])

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins) == [False] * 7 + [True]


@pytest.mark.parametrize("bad", ["", ".hidden", "../x", "a/b"])
def test_ids_that_are_not_file_names_are_refused(tmp_path, bad):
    with pytest.raises(ObjretError, match="cannot name a ledger entry"):
        ReportLedger(tmp_path).state(bad)
