"""Review decisions: the DECISIONS.json a review page exports (objret.dataset.review_page), checked, and applied to the
retraining dataset (rejected frames removed, the rest kept).

A report's verdicts are remembered in the dataset folder (``rejections.json`` and ``acceptances.json``, so they
are versioned with the dataset): a re-mine of the report does not push rejected frames again
(objret.steps.dataset.push_mined), and learns from both (objret.mining.feedback: accepted boxes become templates,
judged frames are not ranked again). A later decision on a frame replaces the earlier one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from objret import storage
from objret.dataset.coco import dataset_bytes, remove_frames, report_boxes
from objret.errors import ObjretError
from objret.mining.feedback import Feedback

REJECTIONS_FILE = "rejections.json"
ACCEPTANCES_FILE = "acceptances.json"
SCHEMA_PATH = Path(__file__).resolve().parents[1] / "schemas" / "review_decisions.schema.json"


class DecisionsError(ObjretError):
    """A decisions file is invalid; ``problems`` lists one line per problem, each naming its field."""

    def __init__(self, source: str, problems: list[str]):
        self.problems = list(problems)
        super().__init__(f"invalid review decisions in {source}:\n" + "\n".join(f"  - {p}" for p in self.problems))


@dataclass(frozen=True)
class Decisions:
    report_id: str
    accepted: tuple[str, ...]
    rejected: tuple[str, ...]
    run: dict = field(default_factory=dict)   # the mining run the page came from, as the page recorded it


@dataclass
class ApplyResult:
    report_id: str
    accepted: int
    rejected: int
    removed: int               # annotations of the report removed (its rejected frames that the dataset held)
    images_removed: int        # images no annotation used any more, removed with them
    kept: int                  # annotations of the report still in the dataset
    not_in_dataset: list[str]  # rejected frames the dataset held no annotation of (remembered all the same)
    remembered: int            # frames rejected for the report so far: a re-mine skips them
    root: str
    version: str               # sha256[:12] of annotations.json after applying
    changed: bool
    dvc_md5: str | None = None
    dvc_version: int | None = None
    dvc_file: str | None = None
    dvc_pushed: bool = False


@lru_cache(maxsize=1)
def _validator():
    from jsonschema import Draft202012Validator

    schema = json.loads(SCHEMA_PATH.read_text())
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def _field(path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "decisions file"


def parse_decisions(data: bytes | str, source: str = "decisions") -> Decisions:
    """The decisions in ``data`` (the page's export); DecisionsError naming every bad field."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DecisionsError(source, [f"not valid JSON: {exc}"]) from exc
    problems = [f"{_field(e.absolute_path)}: {e.message}"
                for e in sorted(_validator().iter_errors(doc), key=lambda e: [str(p) for p in e.absolute_path])]
    if problems:
        raise DecisionsError(source, problems)
    if doc["report_id"] != doc["report_id"].strip():   # Python's '$' lets a trailing newline through the pattern
        problems.append(f"report_id: {doc['report_id']!r} has surrounding whitespace")
    decided: dict[str, str] = {}
    for i, entry in enumerate(doc["decisions"]):
        fid, decision = entry["frame_id"], entry["decision"]
        if fid != fid.strip():
            problems.append(f"decisions[{i}].frame_id: {fid!r} has surrounding whitespace")
        elif decided.get(fid, decision) != decision:
            problems.append(f"decisions[{i}].frame_id: {fid!r} is both accepted and rejected")
        decided[fid] = decision
    if problems:
        raise DecisionsError(source, problems)
    return Decisions(doc["report_id"], tuple(f for f, d in decided.items() if d == "accept"),
                     tuple(f for f, d in decided.items() if d == "reject"), dict(doc.get("run") or {}))


def load_decisions(path: str, endpoint_url: str | None = None) -> Decisions:
    return parse_decisions(storage.read_bytes(str(path), endpoint_url), str(path))


def rejections(root: str, endpoint_url: str | None = None) -> dict[str, list[str]]:
    """Every report's rejected frames in the dataset at ``root`` (report id -> sorted frame ids)."""
    return _verdicts(root, REJECTIONS_FILE, endpoint_url)


def acceptances(root: str, endpoint_url: str | None = None) -> dict[str, list[str]]:
    """Every report's accepted frames in the dataset at ``root`` (report id -> sorted frame ids)."""
    return _verdicts(root, ACCEPTANCES_FILE, endpoint_url)


def review_feedback(root: str, report_id: str, endpoint_url: str | None = None) -> Feedback:
    """What reviews of ``report_id`` decided, for its next mine: accepted frames with their boxes in the dataset
    (a frame the dataset no longer annotates is left out: its box is unknown), rejected frames."""
    boxes = report_boxes(root, report_id, endpoint_url)
    accepted = {f: boxes[f] for f in acceptances(root, endpoint_url).get(report_id, []) if f in boxes}
    return Feedback(accepted, frozenset(rejected_frames(root, report_id, endpoint_url)))


def _verdicts(root: str, name: str, endpoint_url: str | None = None) -> dict[str, list[str]]:
    uri = storage.join(str(root), name)
    if not storage.exists(uri, endpoint_url):
        return {}
    try:
        data = json.loads(storage.read_bytes(uri, endpoint_url))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ObjretError(f"{uri} is not valid JSON: {exc}") from exc
    return {str(k): [str(f) for f in v] for k, v in data.items()}


def rejected_frames(root: str, report_id: str, endpoint_url: str | None = None) -> set[str]:
    return set(rejections(root, endpoint_url).get(report_id, []))


def apply_decisions(root: str, decisions: Decisions, endpoint_url: str | None = None) -> ApplyResult:
    """Remove the rejected frames' annotations of the report (and images no annotation uses any more) from the
    dataset at ``root`` and remember the rejections there; the accepted and undecided frames stay. Applying the
    same decisions again changes nothing."""
    root = str(root)
    removed = remove_frames(root, decisions.report_id, decisions.rejected, endpoint_url=endpoint_url)
    rejected, wrote_rejected = _remember(root, REJECTIONS_FILE, decisions.report_id, decisions.rejected,
                                         decisions.accepted, endpoint_url)
    _, wrote_accepted = _remember(root, ACCEPTANCES_FILE, decisions.report_id, decisions.accepted,
                                  decisions.rejected, endpoint_url)
    return ApplyResult(decisions.report_id, len(decisions.accepted), len(decisions.rejected), removed.removed,
                       removed.images_removed, removed.kept, removed.not_found, len(rejected), root, removed.version,
                       removed.changed or wrote_rejected or wrote_accepted)


def _remember(root: str, name: str, report_id: str, add, forget, endpoint_url: str | None) -> tuple[set[str], bool]:
    """Add ``add`` to the report's frames in the verdict file ``name`` and drop ``forget``; returns the report's
    frames now and whether the file was written (no file until it has a frame)."""
    every = _verdicts(root, name, endpoint_url)
    frames = (set(every.get(report_id, [])) | set(add)) - set(forget)
    if frames:
        every[report_id] = sorted(frames)
    else:
        every.pop(report_id, None)
    uri = storage.join(root, name)
    data = dataset_bytes(every)
    old = storage.read_bytes(uri, endpoint_url) if storage.exists(uri, endpoint_url) else None
    written = old != data and (old is not None or bool(every))
    if written:
        storage.write_bytes(uri, data, endpoint_url)
    return frames, written
