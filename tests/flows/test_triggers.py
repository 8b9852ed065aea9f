"""Report submission and the watched folders / S3 prefixes (the event itself is sent for real in
tests/flows/test_serve.py; here it is recorded, to check what is sent when)."""

from __future__ import annotations

import json

import pytest

from flows import triggers
from objret.config import load_params
from objret.errors import ObjretError
from objret.steps.workspace import Workspace


def report(report_id: str) -> dict:
    return {"report_id": report_id, "detector": {"name": "det", "version": "1"}, "frame": {"uri": "cam/1.jpg"},
            "box": [10, 20, 30, 40], "class_name": "cone", "failure_kind": "false_negative"}


@pytest.fixture
def sent(monkeypatch):
    events = []
    monkeypatch.setattr(triggers, "emit_report_event", lambda report, source: events.append((report["report_id"],
                                                                                             source)))
    return events


def test_watched_folder_and_s3_prefix_submit_each_new_report_once(tmp_path, s3_store, sent):
    ws = Workspace(load_params(), tmp_path / "work")
    folder = tmp_path / "inbox"
    (folder / "cam1").mkdir(parents=True)
    (folder / "cam1" / "a.json").write_text(json.dumps(report("a")))
    (folder / "notes.txt").write_text("not a report")
    (folder / "bad.json").write_text(json.dumps({**report("bad"), "box": "wide"}))
    client = s3_store.client()
    client.create_bucket(Bucket="objret-inbox")
    client.put_object(Bucket="objret-inbox", Key="reports/b.json", Body=json.dumps(report("b")).encode())
    client.put_object(Bucket="objret-inbox", Key="reports/a-again.json", Body=json.dumps(report("a")).encode())
    sources = [str(folder), "s3://objret-inbox/reports/"]
    logged = []

    first = triggers.watch_once(ws, sources, log=logged.append)
    assert (first.seen, first.submitted, first.duplicates, first.rejected) == (4, 2, 1, 1)
    assert sorted(rid for rid, _ in sent) == ["a", "b"]
    assert any("bad.json" in line and "box" in line for line in logged)   # names the file and the field

    again = triggers.watch_once(ws, sources, log=logged.append)
    assert (again.known, again.submitted, again.rejected) == (4, 0, 0) and len(sent) == 2

    # A new file and a corrected one are read on the next scan; the bad one, fixed, goes through.
    client.put_object(Bucket="objret-inbox", Key="reports/c.json", Body=json.dumps(report("c")).encode())
    (folder / "bad.json").write_text(json.dumps(report("bad")))
    third = triggers.watch_once(ws, sources, log=logged.append)
    assert (third.submitted, third.known) == (2, 3)
    assert sorted(rid for rid, _ in sent) == ["a", "b", "bad", "c"]
    assert dict(sent)["c"] == "s3://objret-inbox/reports/c.json"


def test_submit_without_a_prefect_server_says_so_and_the_report_can_be_sent_later(tmp_path):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    ws = Workspace(load_params(), tmp_path / "work")
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        with pytest.raises(ObjretError, match="no Prefect server .* PREFECT_API_URL"):
            triggers.submit(ws, json.dumps(report("r1")), "r1.json")
    assert triggers.ledger(ws).state("r1")["state"] == "failed"   # not sent: not "submitted" forever


def test_an_unreachable_watched_prefix_is_a_clear_error(tmp_path, s3_store, sent):
    ws = Workspace(load_params(), tmp_path / "work")
    with pytest.raises(ObjretError, match="s3://no-such-bucket/reports"):
        triggers.watch_once(ws, ["s3://no-such-bucket/reports/"])
    assert sent == []
