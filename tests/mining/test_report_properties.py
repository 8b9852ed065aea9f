"""Property tests over failure reports (issue 7, item 4): 1,200 generated reports, valid, malformed and hostile
(wrong types, huge numbers, NaN, bad boxes, bad strings, unknown and missing fields, path traversal, broken JSON).

Each is either rejected with ReportError whose problems name the offending field, or accepted and valid: it
round-trips, its box is finite and positive, its id is a plain file name, and its frame URI resolves under the
configured roots or nowhere (objret.ingest.roots). Derandomized: CI draws the same reports every run.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from objret.errors import ReportError
from objret.mining.report import FAILURE_KINDS, _field_path, check_box_in_frame, load_report, parse_report
from tasks.report_ledger import ReportLedger
from objret.ingest.roots import resolve_under

EXAMPLES = 1200
SAFE_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
HUGE = "__huge_integer__"   # replaced by 5,000 digits in the JSON text (Python cannot even print such an int)

# ---- valid reports -------------------------------------------------------------------------------------------

printable = st.characters(blacklist_categories=("Cc", "Cs"))
segment = st.one_of(st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,15}", fullmatch=True),
                    st.text(st.characters(blacklist_categories=("Cc", "Cs"), blacklist_characters="/\\"),
                            min_size=1, max_size=8).filter(lambda s: s not in (".", "..") and "://" not in s))
local_uri = st.builds(lambda lead, parts, ext: lead + "/".join(parts) + ext, st.sampled_from(["", "/", "./"]),
                      st.lists(segment, min_size=1, max_size=4), st.sampled_from([".jpg", ".png", ".mp4", ""]))
s3_uri = st.builds(lambda bucket, parts: f"s3://{bucket}/" + "/".join(parts),
                   st.from_regex(r"[a-z0-9][a-z0-9.-]{2,20}", fullmatch=True),
                   st.lists(st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,15}", fullmatch=True), min_size=1,
                            max_size=4))
frame_id = st.from_regex(r"[0-9a-fA-F]{64}", fullmatch=True)
frame = st.one_of(st.fixed_dictionaries({"frame_id": frame_id}),
                  st.fixed_dictionaries({"uri": local_uri | s3_uri}),
                  st.fixed_dictionaries({"uri": local_uri | s3_uri,
                                         "frame_index": st.integers(0, 2**63 - 1)}),
                  st.fixed_dictionaries({"frame_id": frame_id, "uri": local_uri | s3_uri}))
coordinate = st.floats(0, 1e308) | st.integers(0, 10**6)
extent = st.floats(0, 1e308, exclude_min=True) | st.integers(1, 10**6)
created_at = st.builds(
    lambda moment, offset, zulu: (moment.replace(tzinfo=timezone.utc).isoformat().replace("+00:00", "Z") if zulu
                                  else moment.replace(tzinfo=timezone(timedelta(minutes=offset))).isoformat()),
    st.datetimes(datetime(1970, 1, 1), datetime(2100, 1, 1)), st.integers(-12 * 60, 14 * 60), st.booleans())


@st.composite
def valid_reports(draw) -> dict:
    report = {
        "report_id": draw(st.from_regex(SAFE_ID, fullmatch=True)),
        "detector": {"name": draw(st.text(printable, min_size=1, max_size=30)),
                     "version": draw(st.text(printable, min_size=1, max_size=10))},
        "frame": draw(frame),
        "box": [draw(coordinate), draw(coordinate), draw(extent), draw(extent)],
        "class_name": draw(st.text(printable, min_size=1, max_size=100)),
        "failure_kind": draw(st.sampled_from(FAILURE_KINDS)),
    }
    optional = {"notes": st.text(printable | st.sampled_from("\t\n\r"), max_size=200), "created_at": created_at,
                "mining": st.fixed_dictionaries({"diffusion": st.booleans()})}
    for key in sorted(draw(st.sets(st.sampled_from(sorted(optional))))):   # sorted: a set's order varies by run
        report[key] = draw(optional[key])
    if report["failure_kind"] == "misclassification" and draw(st.booleans()):   # the class the detector gave
        report["predicted_class"] = draw(st.text(printable, min_size=1, max_size=100)
                                         .filter(lambda name: name != report["class_name"]))
    return report


# ---- mutations: (category, JSON data or raw bytes, the field a rejection must name) --------------------------

FIELDS = ["report_id", "detector", "detector.name", "detector.version", "frame", "frame.frame_id", "frame.uri",
          "frame.frame_index", "box", "box[0]", "box[1]", "box[2]", "box[3]", "class_name", "predicted_class",
          "failure_kind", "notes", "created_at", "mining", "mining.diffusion"]
TEXT_LIMITS = {"report_id": 128, "detector.name": 200, "detector.version": 200, "frame.uri": 2048,
               "class_name": 100, "predicted_class": 100, "notes": 10000, "frame.frame_id": 64, "created_at": 40,
               "failure_kind": 20}
HOSTILE_PATHS = ["../../etc/passwd", "/etc/passwd", "file:///etc/passwd", "s3://other-bucket/../x",
                 "\\\\server\\share", "a\x00b.jpg", "/etc/passwd\x00.jpg", "images/../../etc/shadow",
                 "s3://lake/cams/../../secret.jpg", "s3://lake/./x.jpg", "s3:///etc/passwd", "s3://", "s3://bucket",
                 "http://evil.example/x.jpg", "~/.ssh/id_rsa", "/proc/self/environ", "C:\\Windows\\win.ini",
                 "%2e%2e/%2e%2e/etc/passwd", "..", ".", "./x/../../y", "....//....//etc/passwd", "/dev/zero",
                 "\u2025/etc/passwd", "..%2f..%2fetc%2fpasswd", "/", "//server/share/x.jpg", "x/..", "a/b/../c",
                 "/tmp/../etc/passwd", "\x1b[2J/etc/passwd", "\u202egpj.exe", "\ud800/x.jpg"]
WRONG_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=False),
                         st.text(max_size=5), st.lists(st.integers(), max_size=3),
                         st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
HUGE_NUMBERS = [1e308, -1e308, 1.7976931348623157e308, 5e-324, 10**400, -(10**400), 2**63, 2**64, 10**30, HUGE]
NON_FINITE = [float("nan"), float("inf"), float("-inf")]
CONTROL_STRINGS = ["\x00", "a\x00b", "\x1b[31mred\x1b[0m", "line\nbreak", "cr\r", "\x7f", "\u0085", "tab\t",
                   "ok\n", "\ud800", "x\udfff"]
UNICODE_STRINGS = ["Fußgänger", "歩行者", "\u202eevil", "e\u0301", "🚶\u200d♂️", "ﷺ", "\u00a0", " ",
                   "Ω" * 100]


def _get(data: dict, field: str):
    node = data
    for part in re.findall(r"[^.\[\]]+", field):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def _set(data: dict, field: str, value) -> dict:
    """A copy of ``data`` with ``field`` (e.g. "frame.uri", "box[2]") set, creating its parent when absent."""
    data = json.loads(json.dumps(data))
    parts = re.findall(r"[^.\[\]]+", field)
    node = data
    for part in parts[:-1]:
        if isinstance(node, list):
            node = node[int(part)]
        else:
            # A list is descended into ("box[2]" sets the box's third number), not replaced by a dict: that made
            # every box-element mutation a mere "box is not a list" and left the element checks untested.
            if not isinstance(node.get(part), (dict, list)):
                node[part] = {}
            node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return data


def _delete(data: dict, field: str) -> dict:
    data = json.loads(json.dumps(data))
    *parents, last = field.split(".")
    node = data
    for part in parents:
        node = node[part]
    del node[last]
    return data


@st.composite
def mutated_reports(draw, category: str) -> tuple[str, object, list[str]]:
    base = draw(valid_reports())
    if category == "valid":
        return category, base, []
    if category == "wrong_type":
        field = draw(st.sampled_from(FIELDS))
        return category, _set(base, field, draw(WRONG_VALUES)), [field]
    if category == "huge_number":
        field = draw(st.sampled_from(["box[0]", "box[1]", "box[2]", "box[3]", "frame.frame_index"]))
        data = _set(base, field, draw(st.sampled_from(HUGE_NUMBERS)))
        if field == "frame.frame_index" and "uri" not in data["frame"]:
            data["frame"]["uri"] = "clip.mp4"
        return category, data, [field]
    if category == "non_finite":
        field = draw(st.sampled_from(["box[0]", "box[1]", "box[2]", "box[3]", "frame.frame_index", "notes",
                                      "class_name", "mining.diffusion", "extra"]))
        return category, _set(base, field, draw(st.sampled_from(NON_FINITE))), [field]
    if category == "bad_box":
        x, y = draw(st.floats(-1e6, 1e6) | st.integers(-10**6, 10**6)), draw(st.floats(-1e6, 1e6))
        w, h = draw(st.floats(-1e6, 1e6)), draw(st.floats(-1e6, 1e6) | st.just(0))
        box = draw(st.sampled_from([
            [x, y, w, h],                       # negative, zero, inverted, anywhere
            [1e9, 1e9, 10, 10],                 # far outside any frame: check_box_in_frame refuses it
            [x, y, w],                          # too short
            [x, y, w, h, 1],                    # too long
            [],
            [[x], y, w, h],
            {"x": x, "y": y, "w": w, "h": h},
        ]))
        return category, _set(base, "box", box), ["box"]
    if category == "strings":
        field = draw(st.sampled_from(sorted(TEXT_LIMITS)))
        value = draw(st.sampled_from(["", "x" * (TEXT_LIMITS[field] + 1), "x" * 100_000, *CONTROL_STRINGS,
                                      *UNICODE_STRINGS]))
        data = _set(base, field, value)
        if field == "frame.frame_id":
            data["frame"].pop("frame_index", None)
        return category, data, [field]
    if category == "unknown_field":
        parent = draw(st.sampled_from(["", "detector.", "frame.", "mining."]))
        key = draw(st.sampled_from(["extra", "__proto__", "constructor", "", "\x00", "\x1b[31m", "a: b", "ünïcode",
                                    "uri ", "Box", "../x"]))
        data = _set(base, parent + "x", 1) if parent == "mining." else json.loads(json.dumps(base))
        node = data
        for part in filter(None, parent.split(".")):
            node = node[part]
        node.pop("x", None)
        node[key] = draw(WRONG_VALUES)
        return category, data, [(parent[:-1] + "." if parent else "") + _field_path([key])]
    if category == "missing_field":
        field = draw(st.sampled_from(["report_id", "detector", "detector.name", "detector.version", "frame",
                                      "box", "class_name", "failure_kind", "frame.uri+frame_id"]))
        if field == "frame.uri+frame_id":
            data = _set(base, "frame", {"frame_index": 3})
            return category, data, ["frame"]
        return category, _delete(base, field), [field]
    if category == "path_traversal":
        field = draw(st.sampled_from(["frame.uri", "frame.uri", "frame.uri", "report_id", "frame.frame_id"]))
        value = draw(st.sampled_from(HOSTILE_PATHS))
        data = _set(base, field, value)
        if field == "frame.frame_id":
            data["frame"].pop("frame_index", None)
        return category, data, [field]
    # bad_json: damage to the text itself; the whole report is named
    text = json.dumps(base)
    damage = draw(st.sampled_from(["truncate", "garbage", "not_utf8", "deep", "not_object", "empty", "bom",
                                   "trailing"]))
    if damage == "truncate":
        raw = text[: draw(st.integers(0, len(text) - 1))].encode()
    elif damage == "garbage":
        at = draw(st.integers(0, len(text)))   # inside a string it changes that field, which is then named
        raw = (text[:at] + draw(st.sampled_from(["}", "{", ",", "'", "\x00", "NaN", "]"])) + text[at:]).encode()
        return category, raw, ["*"]
    elif damage == "not_utf8":
        raw = text.encode("utf-16") if draw(st.booleans()) else text.encode()[:-1] + b"\xff\xfe}"
    elif damage == "deep":
        depth = draw(st.sampled_from([20, 500, 100_000]))   # the deepest does not even parse
        return category, ('{"report_id": ' + "[" * depth + "]" * depth + "}").encode(), ["report", "report_id"]
    elif damage == "not_object":
        raw = draw(st.sampled_from([b"[]", b"null", b"42", b'"report"', b"true", b"[1, 2]", b"NaN"]))
    elif damage == "empty":
        raw = draw(st.sampled_from([b"", b"   ", b"\n"]))
    elif damage == "bom":   # a UTF-8 BOM is allowed: the report stays valid
        return category, b"\xef\xbb\xbf" + text.encode(), []
    else:
        raw = (text + draw(st.sampled_from([" x", "{}", " 1"]))).encode()
    return category, raw, ["report"]


CATEGORIES = ["valid", "wrong_type", "huge_number", "non_finite", "bad_box", "strings", "unknown_field",
              "missing_field", "path_traversal", "bad_json"]


# ---- the property ----------------------------------------------------------------------------------------------

def to_json_bytes(data) -> bytes:
    text = json.dumps(data, allow_nan=True)   # NaN / Infinity as the JSON constants a careless writer emits
    return text.replace(f'"{HUGE}"', "9" * 5000).encode()


def names_a_field(problem: str, expected: list[str]) -> bool:
    """The problem line names one of ``expected`` fields, a field inside it or the field that holds it."""
    for field in expected:
        if field == "*":
            return re.match(r"[^\s:]+: ", problem) is not None
        parts = [m.start() for m in re.finditer(r"[.\[]", field)]
        ancestors = [field[:i] for i in parts]
        if problem.startswith((f"{field}:", f"{field}.", f"{field}[")) or any(
                problem.startswith(f"{a}:") for a in ancestors):
            return True
    return False


def assert_accepted_and_valid(report, roots: list[str], tmp: Path, ledger: ReportLedger) -> None:
    data = report.to_dict()
    assert parse_report(data) == report
    assert load_report(json.dumps(data, allow_nan=False, ensure_ascii=False).encode("utf-8")) == report
    assert all(isinstance(v, float) and math.isfinite(v) for v in report.box)
    assert report.box[0] >= 0 and report.box[1] >= 0 and report.box[2] > 0 and report.box[3] > 0
    try:   # a box that parses may still lie outside the frame: refused by field then
        clipped = check_box_in_frame(report.box, 640, 480)
        assert 0 <= clipped[0] < 640 and 0 <= clipped[1] < 480 and clipped[2] > 0 and clipped[3] > 0
    except ReportError as exc:
        assert all(p.startswith("box ") for p in exc.problems)
    # The id names run folders, ledger entries and review pages: one plain file name inside its folder.
    assert SAFE_ID.fullmatch(report.report_id) and report.report_id not in (".", "..")
    for name in (f"mine-{report.report_id}", report.report_id, f"{report.report_id}.html"):
        assert (tmp / name).resolve().parent == tmp.resolve()
    assert ledger._dir(report.report_id).parent == ledger.root
    assert report.frame_id is None or re.fullmatch(r"[0-9a-f]{64}", report.frame_id)
    assert report.frame_id is not None or report.frame_uri is not None
    assert report.frame_index is None or (report.frame_uri is not None and 0 <= report.frame_index < 2**63)
    for text in (report.detector_name, report.detector_version, report.class_name, report.frame_uri or ""):
        assert not CONTROL.search(text)
    assert not re.search("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]", report.notes)
    assert 1 <= len(report.class_name) <= 100 and report.failure_kind in FAILURE_KINDS
    if report.frame_uri is not None:
        uri = report.frame_uri
        assert "\\" not in uri and ".." not in uri.split("/")
        assert uri.startswith("s3://") or not re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", uri)
        readable = resolve_under(uri, roots)   # nothing outside the roots can be read
        assert readable is None or any(readable == root or readable.startswith(root.rstrip("/") + "/")
                                       for root in (os.path.realpath(r) for r in roots))


def test_generated_reports_are_rejected_by_field_or_accepted_and_valid(tmp_path, capsys, monkeypatch):
    from hypothesis.internal.conjecture import providers

    # Hypothesis also draws constants found in the project modules loaded so far, so which reports it generates
    # would depend on the other tests run and on every edit to objret/: without them, only on this file.
    if hasattr(providers, "_get_local_constants"):
        monkeypatch.setattr(providers, "_get_local_constants", providers.Constants)
    source, work = tmp_path / "lake_src", tmp_path / "work"
    source.mkdir(), work.mkdir()
    (source / "escape").symlink_to("/etc")   # a link inside a root that points out of it
    roots = [str(source), str(work)]
    ledger = ReportLedger(tmp_path / "ledger")
    outcomes: Counter = Counter()
    named: Counter = Counter()   # field -> rejections whose problems name it

    def check(case):
        category, payload, expected = case
        raw = payload if isinstance(payload, bytes) else to_json_bytes(payload)
        try:
            report = load_report(raw)
        except ReportError as exc:
            outcomes[category, "rejected"] += 1
            assert exc.problems and all(isinstance(p, str) and ": " in p for p in exc.problems)
            assert expected, f"a valid report was rejected: {exc.problems}"
            assert any(names_a_field(p, expected) for p in exc.problems), (expected, exc.problems)
            named.update({p.split(": ", 1)[0] for p in exc.problems})
            str(exc).encode("utf-8")   # printable as it is: no lone surrogate reaches a log or terminal
            if not isinstance(payload, bytes) and HUGE not in json.dumps(payload):   # same verdict from data
                with pytest.raises(ReportError):
                    parse_report(payload)
            return
        outcomes[category, "accepted"] += 1
        assert_accepted_and_valid(report, roots, tmp_path, ledger)
        if not isinstance(payload, bytes):
            assert parse_report(payload) == report

    for category in CATEGORIES:   # the same number of reports of each kind
        settings(max_examples=EXAMPLES // len(CATEGORIES), derandomize=True, database=None, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow])(given(mutated_reports(category))(check))()
    # And each field of a report that has them all, down to each number of the box, set to null (no field is
    # nullable): whatever the draws above hit, every field's own check is exercised.
    full = {"report_id": "r1", "detector": {"name": "d", "version": "1"},
            "frame": {"frame_id": "a" * 64, "uri": "cam/clip.mp4", "frame_index": 3}, "box": [1, 2, 3, 4],
            "class_name": "person", "predicted_class": "bicycle", "failure_kind": "misclassification", "notes": "n",
            "created_at": "2024-05-01T12:00:00Z", "mining": {"diffusion": True}}
    check(("valid", full, []))
    for field in FIELDS:
        check(("wrong_type", _set(full, field, None), [field]))

    total = sum(outcomes.values())
    with capsys.disabled():
        print(f"\n{total} generated failure reports (derandomized):")
        print(f"  {'category':<16} {'accepted':>8} {'rejected':>8}")
        for category in CATEGORIES:
            print(f"  {category:<16} {outcomes[category, 'accepted']:>8} {outcomes[category, 'rejected']:>8}")
        print(f"  {'all':<16} {sum(v for (_, o), v in outcomes.items() if o == 'accepted'):>8} "
              f"{sum(v for (_, o), v in outcomes.items() if o == 'rejected'):>8}")
    assert total >= 1000
    assert all(outcomes[c, "accepted"] + outcomes[c, "rejected"] >= 50 for c in CATEGORIES)
    # Every category did what it is for: valid reports all pass; each kind of damage is refused; the kinds that
    # can only break a report (a required field gone, NaN / Infinity anywhere, a field the schema lacks) never
    # pass; those that also draw harmless values (a huge but finite box, a box outside any frame, a Unicode
    # name, a BOM, a file name with dots) pass some of those too, so the checks are not simply refusing all.
    assert outcomes["valid", "accepted"] == EXAMPLES // len(CATEGORIES) + 1
    assert all(outcomes[c, "rejected"] > 0 for c in CATEGORIES if c != "valid"), outcomes
    assert all(outcomes[c, "accepted"] == 0 for c in ("missing_field", "non_finite", "unknown_field")), outcomes
    assert all(outcomes[c, "accepted"] > 0 for c in ("huge_number", "bad_box", "strings", "path_traversal",
                                                     "bad_json")), outcomes
    # Every field of the schema, down to each number of the box, was named by some rejection: the mutations reach
    # them all (FIELDS is the schema's field list).
    assert schema_fields() == set(FIELDS)
    assert {f for f in FIELDS if not named[f]} == set(), named


def schema_fields() -> set[str]:
    """Every field path of the failure report schema: "detector.name", "box[2]", ..."""
    from objret.mining.report import SCHEMA_PATH

    def walk(node: dict, prefix: str) -> set[str]:
        out = set()
        for key, sub in node.get("properties", {}).items():
            path = f"{prefix}.{key}" if prefix else key
            out |= {path} | walk(sub, path)
        out |= {f"{prefix}[{i}]" for i in range(len(node.get("prefixItems", [])))}
        return out

    return walk(json.loads(SCHEMA_PATH.read_text()), "")


# ---- hostile frame URIs resolve under the roots or nowhere ------------------------------------------------------

@pytest.mark.parametrize("uri", [u for u in HOSTILE_PATHS if "\ud800" not in u])
def test_no_hostile_uri_is_both_accepted_and_readable_outside_the_roots(uri, tmp_path):
    source = tmp_path / "lake_src"
    source.mkdir()
    (source / "escape").symlink_to("/etc")
    base = {"report_id": "r", "detector": {"name": "d", "version": "1"}, "box": [1, 2, 3, 4], "class_name": "c",
            "failure_kind": "false_negative"}
    for candidate in (uri, f"{source}/{uri}", f"{source}/escape/passwd"):
        try:
            report = parse_report({**base, "frame": {"uri": candidate}})
        except ReportError as exc:
            assert all(p.startswith("frame.uri: ") for p in exc.problems), exc.problems
            continue
        readable = resolve_under(report.frame_uri, [str(source)])
        real = os.path.realpath(source)
        assert readable is None or readable == real or readable.startswith(real + "/"), readable
