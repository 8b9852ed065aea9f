"""Failure reports: parse and validate the JSON a detector's user files when the detector gets a box wrong.

The shape is defined once, in ``schemas/failure_report.schema.json`` (JSON Schema draft 2020-12). This
module validates against it and turns every schema error into one readable line that names the field,
e.g. ``box[2]: -3 is not > 0``, so a user can fix all problems of a report in one go.
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from objret import storage
from objret.errors import ReportError

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "schemas" / "failure_report.schema.json"

FAILURE_KINDS = ("false_negative", "false_positive", "misclassification")

MAX_REPORT_BYTES = 1 << 20  # a valid report is a few kB (notes: 10,000 characters at most)
MAX_DEPTH = 16  # a valid report nests 3 levels; deeper data is refused before it can exhaust the stack
_MAX_INT_DIGITS = 400  # Python refuses to convert integers of over 4,300 digits; 400 is beyond any float already

# The free-form text fields (the others have a pattern, enum or format), and whether each is one line (no control
# characters) or free text (tab, newline and CR allowed).
_TEXT_FIELDS = {("detector", "name"): True, ("detector", "version"): True, ("frame", "uri"): True,
                ("class_name",): True, ("predicted_class",): True, ("notes",): False}
_URI_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")

# What a pattern means, for the fields that have one (a regex is no help to the user).
_PATTERN_HINTS = {
    "report_id": "may hold only letters, digits, '.', '_' and '-', and must not start with '.'",
    "frame.frame_id": "is not a frame id (64 hexadecimal characters)",
}

_JSON_TYPE_NAMES = {
    "object": "an object",
    "array": "a list",
    "string": "a string",
    "number": "a number",
    "integer": "an integer",
    "boolean": "true/false",
    "null": "null",
}


@dataclass(frozen=True)
class FailureReport:
    report_id: str
    detector_name: str
    detector_version: str
    frame_id: str | None
    frame_uri: str | None
    frame_index: int | None
    box: tuple[float, float, float, float]  # x, y, w, h in frame pixels
    class_name: str   # false_negative: the missed object's class; false_positive: the class the detector wrongly
    failure_kind: str  # gave it; misclassification: its true class (objret.dataset.labels)
    notes: str = ""
    created_at: str | None = None
    diffusion: bool | None = None  # the report's "mining": {"diffusion": ...}; None: params.yaml decides
    predicted_class: str | None = None  # misclassification: the class the detector gave (None in older reports)

    def to_dict(self) -> dict:
        """The report as schema-valid JSON data (``parse_report(r.to_dict()) == r``)."""
        frame = {key: value for key, value in (("frame_id", self.frame_id), ("uri", self.frame_uri),
                                                ("frame_index", self.frame_index)) if value is not None}
        data: dict[str, Any] = {
            "report_id": self.report_id,
            "detector": {"name": self.detector_name, "version": self.detector_version},
            "frame": frame, "box": list(self.box), "class_name": self.class_name, "failure_kind": self.failure_kind,
        }
        optional = {"predicted_class": self.predicted_class, "notes": self.notes or None,
                    "created_at": self.created_at,
                    "mining": None if self.diffusion is None else {"diffusion": self.diffusion}}
        data.update({key: value for key, value in optional.items() if value is not None})
        return data


@lru_cache(maxsize=1)
def _validator():
    from jsonschema import Draft202012Validator, FormatChecker

    schema = json.loads(SCHEMA_PATH.read_text())
    Draft202012Validator.check_schema(schema)
    # jsonschema only checks date-time when an optional package is installed: check it ourselves.
    format_checker = FormatChecker(formats=())
    format_checker.checks("date-time")(_is_rfc3339_datetime)
    return Draft202012Validator(schema, format_checker=format_checker)


def _is_rfc3339_datetime(value: object) -> bool:
    if not isinstance(value, str):
        return True  # the type keyword reports non-strings
    if len(value) < 20 or value[10] not in "Tt":
        return False
    try:
        parsed = datetime.fromisoformat(value.replace("z", "Z"))
    except ValueError:
        return False
    return parsed.tzinfo is not None  # RFC 3339 requires the offset (Z or +hh:mm)


class _JsonConstant(float):
    """NaN / Infinity / -Infinity as written in the JSON text, so the message can quote it."""

    def __new__(cls, name: str):
        obj = super().__new__(cls, float(name.replace("Infinity", "inf")))
        obj.name = name
        return obj

    def __repr__(self) -> str:
        return self.name


def _field_path(parts) -> str:
    out = ""
    for part in parts:
        if isinstance(part, str) and not _is_plain_key(part):
            part = repr(part)  # an unknown field named with control characters must not reach a terminal raw
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "report"


def _is_plain_key(key: str) -> bool:
    return bool(key) and _bad_char(key, one_line=True) is None


# Control characters would reach logs and terminals raw; a lone surrogate cannot even be written out as UTF-8.
_BAD_ONE_LINE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_BAD_FREE_TEXT = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")  # tab, newline, CR allowed


def _bad_char(text: str, one_line: bool) -> str | None:
    """Why ``text`` may not stand in a report, or None."""
    found = (_BAD_ONE_LINE if one_line else _BAD_FREE_TEXT).search(text)
    if found is None:
        return None
    return "invalid Unicode (a lone surrogate)" if 0xD800 <= ord(found.group()) <= 0xDFFF else "a control character"


class _HugeNumber(float):
    """A JSON integer of too many digits to convert (Python refuses over 4,300): kept as infinity, shown short."""

    def __new__(cls, digits: str):
        obj = super().__new__(cls, float("-inf" if digits.startswith("-") else "inf"))
        obj.digits = len(digits.lstrip("-"))
        return obj

    def __repr__(self) -> str:
        return f"an integer of {self.digits} digits"


def _parse_int(text: str) -> int | float:
    return int(text) if len(text) <= _MAX_INT_DIGITS else _HugeNumber(text)


def _show(value: Any) -> str:
    text = repr(value) if not isinstance(value, (dict, list)) else json.dumps(value, default=repr)
    return text if len(text) <= 60 else text[:57] + "..."


def _walk(data: Any):
    """(path, value) of every value in the data, depth first, without recursion; nothing below MAX_DEPTH."""
    stack = [((), data)]
    while stack:
        path, value = stack.pop()
        yield path, value
        if len(path) >= MAX_DEPTH:
            continue
        if isinstance(value, dict):
            stack += [((*path, key), item) for key, item in reversed(value.items())]
        elif isinstance(value, (list, tuple)):
            stack += [((*path, i), item) for i, item in reversed(list(enumerate(value)))]


def _too_deep(data: Any) -> list[tuple[list, str]]:
    hits = {path[:1] for path, value in _walk(data) if len(path) >= MAX_DEPTH and isinstance(value, (dict, list))}
    return [(list(field), f"nested more than {MAX_DEPTH} levels deep") for field in sorted(hits, key=str)]


def _number_problems(data: Any) -> list[tuple[tuple, str]]:
    """NaN/Infinity and numbers beyond a double anywhere in the data (JSON Schema cannot forbid them)."""
    problems = []
    for path, value in _walk(data):
        if isinstance(value, _HugeNumber) or (isinstance(value, int) and not isinstance(value, bool)
                                              and abs(value) > sys.float_info.max):
            problems.append((path, f"{_show(value)} is too large"))
        elif isinstance(value, float) and not math.isfinite(value):
            problems.append((path, f"{_show(value)} is not allowed (numbers must be finite)"))
    return problems


def _text_problems(data: Any) -> list[tuple[list, str]]:
    """Control characters and lone surrogates in the report's text fields."""
    problems = []
    for path, one_line in _TEXT_FIELDS.items():
        value = data
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        why = _bad_char(value, one_line) if isinstance(value, str) else None
        if why:
            problems.append((list(path), f"{_show(value)} holds {why}"))
    return problems


def _kind_problems(data: Any) -> list[tuple[list, str]]:
    """predicted_class belongs to a misclassification (the class the detector gave instead of class_name)."""
    if not isinstance(data, dict) or not isinstance(data.get("predicted_class"), str):
        return []
    kind, predicted = data.get("failure_kind"), data["predicted_class"]
    if kind in ("false_negative", "false_positive"):
        what = "a missed object has none" if kind == "false_negative" else "a false positive's is class_name"
        return [(["predicted_class"], f"is only for a misclassification report ({what})")]
    if kind == "misclassification" and predicted == data.get("class_name"):
        return [(["predicted_class"], f"{_show(predicted)} is class_name too: a misclassification names two classes")]
    return []


def _uri_problems(data: Any) -> list[tuple[list, str]]:
    """frame.uri must be a local path or s3://bucket/key without '..' (objret.ingest.roots then keeps it in the lake)."""
    frame = data.get("frame") if isinstance(data, dict) else None
    uri = frame.get("uri") if isinstance(frame, dict) else None
    if not isinstance(uri, str) or not uri:
        return []
    problem = None
    if "\\" in uri:
        problem = "holds a backslash (paths use '/')"
    elif uri.startswith("s3://"):
        bucket, _, key = uri[len("s3://"):].partition("/")
        if not bucket or not key:
            problem = "is not an S3 object URI (s3://bucket/key)"
        elif {".", ".."} & set(key.split("/")):
            problem = "holds a '.' or '..' segment"
    elif _URI_SCHEME.match(uri):
        problem = "is neither a local path nor an s3:// URI"
    elif ".." in uri.split("/"):
        problem = "holds a '..' segment"
    return [(["frame", "uri"], f"{_show(uri)} {problem}")] if problem else []


def _error_messages(error) -> list[tuple[list, str]]:
    """(field path, one-line message) for each problem one jsonschema error stands for."""
    path = list(error.absolute_path)
    kind, expected, value = error.validator, error.validator_value, error.instance

    if kind == "required":
        return [([*path, name], "missing (required)") for name in expected if name not in value]
    if kind == "additionalProperties":
        known = error.schema.get("properties", {})
        return [([*path, name], "unknown field") for name in value if name not in known]
    if kind == "dependentRequired":
        if path == ["frame"] and not ({"frame_id", "uri"} & set(value)):
            return []  # "frame: needs frame_id or uri" already says it
        return [
            ([*path, name], f"only allowed together with {', '.join(needs)}")
            for name, needs in expected.items()
            if name in value and any(need not in value for need in needs)
        ]
    if kind == "anyOf" and path == ["frame"]:
        message = "needs frame_id or uri"
    elif kind == "type":
        message = f"{_show(value)} is not {_JSON_TYPE_NAMES.get(expected, expected)}"
    elif kind == "enum":
        message = f"{_show(value)} is not one of {', '.join(map(str, expected))}"
    elif kind == "minimum":
        message = f"{_show(value)} is not >= {expected}"
    elif kind == "maximum":
        message = f"{_show(value)} is not <= {expected}"
    elif kind == "exclusiveMinimum":
        message = f"{_show(value)} is not > {expected}"
    elif kind == "minLength":
        message = "must not be empty" if expected == 1 else f"shorter than {expected} characters"
    elif kind == "maxLength":
        message = f"{len(value)} characters, at most {expected} allowed"
    elif kind == "pattern":
        if value == "":
            return []  # minLength already says "must not be empty"
        hint = _PATTERN_HINTS.get(_field_path([p for p in path if not isinstance(p, int)]))
        message = f"{_show(value)} {hint or 'does not match ' + expected}"
    elif kind in ("minItems", "maxItems") and path == ["box"]:
        message = f"needs 4 numbers [x, y, w, h], got {len(value)}"
    elif kind == "format":
        message = f"{_show(value)} is not a {expected} (RFC 3339, e.g. 2024-05-01T12:00:00Z)"
    else:
        message = error.message
    return [(path, message)]


def _path_sort_key(path) -> tuple:
    # Paths mix keys and list indexes; compare them as text so sorting never compares str with int.
    return tuple(f"{p:08d}" if isinstance(p, int) else p for p in path)


def _trailing_newline_problems(data: Any) -> list[tuple[list, str]]:
    # Python's re lets '$' match before a final newline, so the schema patterns alone would accept
    # "abc\n" as a report id (and later as a file name).
    if not isinstance(data, dict):
        return []
    fields = {"report_id": data.get("report_id")}
    if isinstance(data.get("frame"), dict):
        fields["frame.frame_id"] = data["frame"].get("frame_id")
    return [
        (name.split("."), f"{_show(value)} {_PATTERN_HINTS[name]}")
        for name, value in fields.items()
        if isinstance(value, str) and value.endswith("\n")
    ]


def validation_problems(data: Any) -> list[str]:
    """Every problem of a report as one line each, ordered by field; empty when the report is valid."""
    problems = _too_deep(data)
    if problems:  # the schema and the messages would recurse through it
        return [f"{_field_path(path)}: {message}" for path, message in problems]
    numbers = _number_problems(data)
    problems = [(list(path), message) for path, message in numbers]
    skip = {path for path, _ in numbers}  # the schema would only repeat these
    for error in _validator().iter_errors(data):
        if tuple(error.absolute_path) not in skip:
            problems += _error_messages(error)
    problems += _trailing_newline_problems(data) + _text_problems(data) + _uri_problems(data) + _kind_problems(data)
    problems.sort(key=lambda problem: _path_sort_key(problem[0]))  # stable: same field keeps schema order
    lines = [f"{_field_path(path)}: {message}" for path, message in problems]
    return list(dict.fromkeys(lines))  # one line per problem


def parse_report(data: dict) -> FailureReport:
    """Validate report data (parsed JSON) and return it as a FailureReport; ReportError lists every problem."""
    problems = validation_problems(data)
    if problems:
        raise ReportError(problems)
    frame = data["frame"]
    return FailureReport(
        report_id=data["report_id"],
        detector_name=data["detector"]["name"],
        detector_version=data["detector"]["version"],
        frame_id=frame["frame_id"].lower() if "frame_id" in frame else None,
        frame_uri=frame.get("uri"),
        frame_index=int(frame["frame_index"]) if "frame_index" in frame else None,
        box=tuple(float(v) for v in data["box"]),
        class_name=data["class_name"],
        failure_kind=data["failure_kind"],
        notes=data.get("notes", ""),
        created_at=data.get("created_at"),
        diffusion=data.get("mining", {}).get("diffusion"),
        predicted_class=data.get("predicted_class"),
    )


def load_report(path_or_text: str | Path | bytes) -> FailureReport:
    """Load a report from a file (local path or s3:// URI) or from JSON text.

    A str that starts with '{' or '[' or spans several lines is JSON text, any other str a location.
    """
    if isinstance(path_or_text, (bytes, bytearray)):
        raw = bytes(path_or_text)
    elif isinstance(path_or_text, str) and (path_or_text.lstrip()[:1] in ("{", "[") or "\n" in path_or_text):
        raw = path_or_text.encode("utf-8", "surrogatepass")  # a lone surrogate is then reported, not raised
    else:
        location = str(path_or_text)
        local = not storage.is_s3(location) and Path(location).is_file()
        if local and Path(location).stat().st_size > MAX_REPORT_BYTES:  # not even read
            raise ReportError([f"report: {location} is larger than {MAX_REPORT_BYTES} bytes"])
        raw = storage.read_bytes(location)
    if len(raw) > MAX_REPORT_BYTES:
        raise ReportError([f"report: {len(raw)} bytes, at most {MAX_REPORT_BYTES} allowed"])
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ReportError([f"report: not UTF-8 text ({exc.reason} at byte {exc.start})"]) from exc
    try:
        # json accepts NaN and Infinity; keep them as marked numbers so validation rejects them by field (and
        # integers too long to convert likewise).
        data = json.loads(text, parse_constant=_JsonConstant, parse_int=_parse_int)
    except json.JSONDecodeError as exc:
        raise ReportError([f"report: not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"]) from exc
    except RecursionError as exc:
        raise ReportError([f"report: not valid JSON: nested too deeply (at most {MAX_DEPTH} levels)"]) from exc
    return parse_report(data)


BOX_TOLERANCE_PX = 2.0   # a box may pass its frame's edge by this much (rounding where it was drawn)


def check_report_box(box, width: int, height: int, cell: tuple[float, float]) -> tuple[float, float, float, float]:
    """A report's box on its ``width`` x ``height`` frame, clipped to it; ReportError naming the field when the box
    leaves the frame by more than BOX_TOLERANCE_PX, or covers less than one ``cell`` (width, height in pixels of
    one cell of the map templates are matched on): mining a guessed or unresolvable object pushes wrong boxes."""
    x, y, w, h = (float(v) for v in box)
    shown = ", ".join(f"{v:g}" for v in (x, y, w, h))
    tol = BOX_TOLERANCE_PX
    if x < -tol or y < -tol or x + w > width + tol or y + h > height + tol:
        raise ReportError([f"box: [{shown}] leaves the {width}x{height} frame (x + width must be <= {width}, "
                           f"y + height <= {height})"])
    clipped = check_box_in_frame(box, width, height)
    if clipped[2] * clipped[3] < cell[0] * cell[1]:
        raise ReportError([f"box: [{shown}] covers less than one {cell[0]:.3g}x{cell[1]:.3g} px cell of the map "
                           f"templates are matched on (mining.layer) in the {width}x{height} frame: too small to mine"])
    return clipped


def check_box_in_frame(box: tuple[float, float, float, float], width: int, height: int) -> tuple[float, ...]:
    """The box clipped to a width x height frame; ReportError when no part of it lies inside."""
    x, y, w, h = (float(v) for v in box)
    left, top = max(x, 0.0), max(y, 0.0)
    right, bottom = min(x + w, float(width)), min(y + h, float(height))
    if right <= left or bottom <= top:
        shown = ", ".join(f"{v:g}" for v in (x, y, w, h))
        raise ReportError([f"box [{shown}] lies outside the {width}x{height} frame"])
    return (left, top, right - left, bottom - top)
