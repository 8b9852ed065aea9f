"""The review page as HTML (self-contained, escaped) and review decisions applied to a real dataset: rejected
frames leave it as a new DVC version and are not pushed again by a re-mine; malformed decisions name the field.
(The page in a real browser: tests/test_review_page.py.)"""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flows.cli import main

PETS_FRAMES = [101, 103, 105, 107, 109, 111]


class _Elements(HTMLParser):
    """Every start tag with its attributes, and the text of each <script>."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.scripts: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "svg":
            self._svg = attrs.get("class")
        if tag == "rect":
            attrs["svg_class"] = self._svg   # "box" on a mined frame's thumbnail
        self.tags.append((tag, attrs))
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.scripts.append(data)


def _pets_items(bench_dir: Path, tmp_path: Path) -> list[dict]:
    """Mined items over real PETS frames (as mined.json holds them), each with a heat map file."""
    ann = json.loads((bench_dir / "pets09_s2l1" / "annotations.json").read_text())
    items = []
    for rank, mot in enumerate(PETS_FRAMES, start=1):
        box = next(a["bbox"] for a in ann["annotations"] if a["image_id"] == mot)
        heat = tmp_path / "heatmaps" / f"{mot}.png"
        heat.parent.mkdir(exist_ok=True)
        ys, xs = np.mgrid[0:576, 0:768]
        Image.fromarray((200 * np.exp(-((xs - box[0]) ** 2 + (ys - box[1]) ** 2) / 5000)).astype(np.uint8)).save(heat)
        items.append({"frame_id": f"pets{mot:06d}", "uri": f"pets.avi#frame={rank}",
                      "image_uri": str(bench_dir / "pets09_s2l1" / "images" / f"{mot:06d}.jpg"), "source": "pets.avi",
                      "width": 768, "height": 576, "score": 1.0 - rank / 10, "box": box, "rank": rank,
                      "frame_index": rank, "time_s": rank / 7, "heatmap": str(heat),
                      "evidence": {"region": 0.9 - rank / 20, "template": 0.5 + rank / 20, "global": 0.99},
                      "duplicates": [], "duplicate_frames": []})
    return items


def _report(report_id: str = "rv-1", **extra) -> dict:
    return {"report_id": report_id, "detector": {"name": "det", "version": "1"},
            "frame": {"uri": "pets.avi", "frame_index": 10}, "box": [516, 213, 26, 83], "class_name": "person",
            "failure_kind": "false_negative", **extra}


def test_the_page_holds_everything_and_escapes_the_report(bench_dir, tmp_path):
    from objret.dataset.review_page import THUMB_WIDTH, review_page

    items = _pets_items(bench_dir, tmp_path)
    items[0]["duplicates"] = ["pets000102"]
    items[0]["duplicate_frames"] = [{**{k: items[1][k] for k in ("image_uri", "frame_index", "time_s", "width",
                                                                   "height", "score", "box")}, "frame_id": "pets000102"}]
    evil = "</script><script>alert(1)</script><img src=http://example.com/x onerror=alert(2)>"
    mined = {"report": _report(notes=evil, detector={"name": evil, "version": "1"}),
             "query": {"uri": "pets.avi", "frame_id": None, "width": 768, "height": 576, "box": [516, 213, 26, 83],
                       "image_uri": str(bench_dir / "pets09_s2l1" / "images" / "000121.jpg")},
             "method": "fused", "provenance": {"index_version": "abc"}, "mined": items}
    html = review_page(mined, {"mlflow_run_id": evil})

    page = _Elements()
    page.feed(html)
    assert "alert(1)</script>" not in html and "<img src=http" not in html
    assert [t for t, _ in page.tags].count("script") == 2   # the page's own two: data and code
    # Nothing to fetch: every image is a data URI, no link, no external script or style.
    for tag, attrs in page.tags:
        for name in ("src", "data-src", "href"):
            assert name not in attrs or attrs[name].startswith("data:image/"), (tag, name, attrs[name][:40])
        assert tag not in ("link", "iframe", "object")
    assert any(t == "meta" and a.get("http-equiv") == "Content-Security-Policy" for t, a in page.tags)
    # The data the page's script reads survives the escaping as it was.
    info = json.loads(next(s for s in page.scripts if s.strip().startswith("{")))
    assert info["report_id"] == "rv-1" and info["run"]["mlflow_run_id"] == evil

    cards = [a for t, a in page.tags if t == "article"]
    assert [c["data-frame-id"] for c in cards] == [i["frame_id"] for i in items]
    rects = [a for t, a in page.tags if t == "rect" and a["svg_class"] == "box"]
    scale = THUMB_WIDTH / 768
    assert len(rects) == len(items)
    for item, rect in zip(items, rects):
        assert float(rect["x"]) == pytest.approx(item["box"][0] * scale, abs=0.06)
        assert float(rect["width"]) == pytest.approx(item["box"][2] * scale, abs=0.06)
    heat = [a for t, a in page.tags if t == "img" and a.get("class") == "heat"]
    assert len(heat) == len(items) and all(a["data-src"].startswith("data:image/png;base64,") for a in heat)
    assert html.count("<details class=\"dups\">") == 1 and 'data-frame-id="pets000102"' in html
    assert "region match" in html and "template match" in html


@pytest.mark.parametrize("kind, extra, expected", [
    ("false_negative", {}, "boxes of person"),
    ("false_positive", {}, "hard negatives: not person (no box under person)"),
    ("misclassification", {"predicted_class": "bicycle"}, "boxes of person (the detector said bicycle)"),
])
def test_the_page_says_what_accepted_frames_become_per_failure_kind(bench_dir, tmp_path, kind, extra, expected):
    from objret.dataset.review_page import review_page

    mined = {"report": _report(failure_kind=kind, **extra),
             "query": {"uri": "pets.avi", "frame_id": None, "width": 768, "height": 576, "box": [516, 213, 26, 83],
                       "image_uri": str(bench_dir / "pets09_s2l1" / "images" / "000121.jpg")},
             "method": "fused", "provenance": {}, "mined": _pets_items(bench_dir, tmp_path)[:1]}
    html = review_page(mined)
    assert f"<dt>accepted frames go in as</dt><dd>{expected}</dd>" in html
    assert ("<dt>detector said</dt><dd>bicycle</dd>" in html) == (kind == "misclassification")


def test_malformed_decisions_are_refused_naming_the_field(tmp_path, capsys):
    from objret.dataset.decisions import DecisionsError, parse_decisions

    def problems(doc) -> str:
        with pytest.raises(DecisionsError) as err:
            parse_decisions(doc if isinstance(doc, str) else json.dumps(doc))
        return str(err.value)

    assert "not valid JSON" in problems("{nope")
    text = problems({"decisions": [{"frame_id": "a", "decision": "maybe"}, {"frame": "b", "decision": "reject"}]})
    assert "report_id" in text and "decisions[0].decision" in text and "'maybe'" in text
    assert "decisions[1]: 'frame_id' is a required property" in text and "'frame' was unexpected" in text
    assert "decisions: " in problems({"report_id": "r", "decisions": {"a": "reject"}})
    assert "report_id" in problems({"report_id": "../x", "decisions": []})
    text = problems({"report_id": "r", "decisions": [{"frame_id": "a", "decision": "accept"},
                                                     {"frame_id": "a", "decision": "reject"}]})
    assert "decisions[1].frame_id: 'a' is both accepted and rejected" in text
    ok = parse_decisions(json.dumps({"report_id": "r", "decisions": [{"frame_id": "a", "decision": "reject"},
                                                                     {"frame_id": "b", "decision": "accept"}]}))
    assert ok.rejected == ("a",) and ok.accepted == ("b",)

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"report_id": "r", "decisions": [{"frame_id": "a", "decision": "drop"}]}))
    assert main(["review", "apply", str(bad), "--workdir", str(tmp_path / "work")]) == 2
    assert "decisions[0].decision" in capsys.readouterr().err


def test_apply_removes_rejected_frames_as_a_new_version_and_a_re_mine_skips_them(bench_dir, tmp_path, capsys):
    from objret.config import load_params
    from objret.steps.mine import MiningOutcome
    from objret.steps.dataset import push_mined
    from objret.mining.report import parse_report
    from objret.steps.workspace import Workspace

    published = tmp_path / "published"
    overrides = [f"dataset.root={published}"]
    ws = Workspace(load_params(None, overrides), tmp_path / "work")
    report = parse_report(_report())
    items = _pets_items(bench_dir, tmp_path)
    outcome = MiningOutcome("rv-1", {}, items, {"method": "fused", "index_version": "abc"}, str(tmp_path), "", "")
    first = push_mined(ws, report, outcome)
    assert first.added == 6 and first.dvc_version == 1
    # Another report's annotation on a frame this review rejects: it stays, and so does the image.
    push_mined(ws, parse_report(_report("rv-2")), MiningOutcome("rv-2", {}, items[:1], {}, str(tmp_path), "", ""))

    rejected, accepted = [items[0]["frame_id"], items[2]["frame_id"], items[3]["frame_id"]], [items[1]["frame_id"]]
    decisions = tmp_path / "decisions-rv-1.json"
    decisions.write_text(json.dumps({"format": "objret-review-decisions/1", "report_id": "rv-1", "run": {},
                                     "decisions": [{"frame_id": f, "decision": "reject"} for f in rejected]
                                     + [{"frame_id": f, "decision": "accept"} for f in accepted]}))
    assert main(["review", "apply", str(decisions), "--workdir", str(ws.root), "--set", overrides[0]]) == 0
    out = capsys.readouterr().out
    assert "3 rejected, 1 accepted" in out and "3 annotations, 2 images" in out and "dataset version    : 3" in out

    dataset = ws.dataset_registry.dataset_dir
    coco = json.loads((dataset / "annotations.json").read_text())
    frame_of = {i["id"]: i["frame_id"] for i in coco["images"]}
    left = {(a["objret"]["report_id"], frame_of[a["image_id"]]) for a in coco["annotations"]}
    assert left == {("rv-1", i["frame_id"]) for i in items if i["frame_id"] not in rejected} | \
        {("rv-2", items[0]["frame_id"])}
    files = {p.name for p in (dataset / "images").iterdir()}
    assert files == {f"{i['frame_id']}.jpg" for i in items if i["frame_id"] not in rejected[1:]}
    assert json.loads((dataset / "rejections.json").read_text()) == {"rv-1": sorted(rejected)}
    assert json.loads((dataset / "acceptances.json").read_text()) == {"rv-1": accepted}
    # What the report's next mine learns from (objret.mining.feedback): the accepted frame with its box in the
    # dataset, the rejected frames; another report has no verdicts.
    from objret.dataset.decisions import review_feedback
    feedback = review_feedback(str(dataset), "rv-1")
    assert feedback.rejected == set(rejected) and list(feedback.accepted) == accepted
    assert feedback.accepted[accepted[0]] == pytest.approx(items[1]["box"], abs=0.01)
    assert not review_feedback(str(dataset), "rv-2")
    assert json.loads((published / "annotations.json").read_text()) == coco   # published like a push
    versions = ws.dataset_registry.versions()
    assert len(versions) == 3 and versions[-1]["review"] == {"accepted": 1, "rejected": 3, "removed": 3}

    # A re-mine of the report pushes the same frames: the rejected ones are skipped, nothing changes.
    again = push_mined(ws, report, outcome)
    assert again.rejected == 3 and again.added == 0 and not again.changed and again.dvc_version == 3
    # The same decisions again: nothing to do, no new version.
    assert main(["review", "apply", str(decisions), "--workdir", str(ws.root), "--set", overrides[0]]) == 0
    assert "unchanged" in capsys.readouterr().out and len(ws.dataset_registry.versions()) == 3

    # Accepting a rejected frame later forgets its rejection: the next push brings it back.
    decisions.write_text(json.dumps({"report_id": "rv-1", "decisions": [{"frame_id": rejected[1],
                                                                         "decision": "accept"}]}))
    assert main(["review", "apply", str(decisions), "--workdir", str(ws.root), "--set", overrides[0]]) == 0
    back = push_mined(ws, report, outcome)
    assert back.added == 1 and back.rejected == 2 and back.dvc_version == 5
    feedback = review_feedback(str(dataset), "rv-1")
    assert set(feedback.accepted) == {accepted[0], rejected[1]} and feedback.rejected == {rejected[0], rejected[2]}
    assert feedback.accepted[rejected[1]] == pytest.approx(items[2]["box"], abs=0.01)


def test_apply_needs_a_dataset(tmp_path, capsys):
    decisions = tmp_path / "d.json"
    decisions.write_text(json.dumps({"report_id": "r", "decisions": [{"frame_id": "a", "decision": "reject"}]}))
    assert main(["review", "apply", str(decisions), "--workdir", str(tmp_path / "work")]) == 1
    assert "no retraining dataset" in capsys.readouterr().err


def test_the_page_goes_beside_an_s3_dataset(bench_dir, tmp_path, s3_store):
    from objret import storage
    from objret.config import load_params
    from objret.steps.mine import MiningOutcome
    from objret.steps.dataset import review_page
    from objret.steps.workspace import Workspace

    client = storage.s3_client(s3_store.endpoint_url)
    if "objret-review-test" not in [b["Name"] for b in client.list_buckets().get("Buckets", [])]:
        client.create_bucket(Bucket="objret-review-test")
    ws = Workspace(load_params(None, ["dataset.root=s3://objret-review-test/ds"]), tmp_path / "work")
    mined_json = tmp_path / "mined.json"
    items = _pets_items(bench_dir, tmp_path)
    mined_json.write_text(json.dumps({"report": _report(), "method": "fused", "provenance": {}, "mined": items,
                                      "query": {"uri": "pets.avi", "frame_id": None, "width": 768, "height": 576,
                                                "box": [516, 213, 26, 83], "image_uri": items[0]["image_uri"]}}))
    outcome = MiningOutcome("rv-1", {}, items, {}, str(tmp_path), "", str(mined_json))
    local, beside = review_page(ws, outcome, {"mlflow_run_id": "r"})
    assert beside == "s3://objret-review-test/ds/reviews/rv-1.html"
    assert storage.read_bytes(beside, s3_store.endpoint_url) == Path(local).read_bytes()
    assert Path(local) == tmp_path / "review.html"
