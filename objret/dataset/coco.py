"""The retraining dataset: mined frames with pre-annotation boxes, in COCO format, at a local folder or S3 prefix.

Layout under ``root``::

    annotations.json         COCO: info, images, annotations, categories (+ hard_negatives)
    images/<frame_id>.jpg    the mined frames (only when frames are copied)

A false positive report's frames carry no annotation: their regions are listed in ``hard_negatives`` (entries
shaped like annotations, with the class they are not in ``not_class`` instead of a category; COCO readers ignore
the key), so the frames teach the detector what its class is not (objret.dataset.labels).

A push writes the frame images first and ``annotations.json`` last, in one atomic write, so a push that
dies half-way leaves the previous ``annotations.json`` intact; the images it already copied are reused by
the next push. An annotation is identified by (report_id, frame_id): pushing the same report again
changes nothing, byte for byte.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from objret import storage
from objret.dataset.labels import dataset_label
from objret.errors import BadFrameError, ObjretError, ReportError, StoreError
from objret.mining.report import FailureReport, check_box_in_frame

ANNOTATIONS_FILE = "annotations.json"
IMAGES_FOLDER = "images"
HARD_NEGATIVES = "hard_negatives"   # regions that are *not* their report's class (false positive reports)

_SAFE_FRAME_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")  # frame ids become file names
_JPEG_MAGIC = b"\xff\xd8\xff"


@dataclass
class MinedFrame:
    frame_id: str
    uri: str  # the lake source: an image, or a video file (then frame_index / time_s say which frame)
    image_uri: str  # where the frame can be read as an image
    width: int
    height: int
    score: float
    box: tuple[float, float, float, float]  # x, y, w, h in frame pixels
    rank: int
    frame_index: int | None = None
    time_s: float | None = None
    evidence: dict = field(default_factory=dict)  # e.g. {"template": 0.71}


@dataclass
class PushResult:
    root: str
    version: str  # sha256[:12] of the annotations.json bytes now at root
    added: int  # new annotations
    unchanged: int  # annotations that were already there, identical
    annotations_uri: str
    changed: bool  # whether annotations.json was written
    updated: int = 0  # annotations of (report, frame) already there, refreshed with new values
    dvc_md5: str | None = None      # the DVC version of the dataset after this push (objret.dataset.registry)
    dvc_version: int | None = None  # its number: 1, 2, ...
    dvc_file: str | None = None     # its .dvc file
    dvc_pushed: bool = False        # sent to the DVC remote
    rejected: int = 0               # mined frames not pushed: rejected for the report by a review (objret.dataset.decisions)


def empty_dataset() -> dict:
    return {
        "info": {
            "description": "objret retraining dataset: frames mined from detector failure reports, "
            "with pre-annotation boxes to review",
            "pushes": [],
        },
        "images": [],
        "annotations": [],
        "categories": [],
    }


def dataset_bytes(coco: dict) -> bytes:
    """The one serialization of a dataset: the same content always gives the same bytes."""
    if not coco.get(HARD_NEGATIVES):   # a dataset without hard negatives is plain COCO
        coco = {k: v for k, v in coco.items() if k != HARD_NEGATIVES}
    return (json.dumps(coco, sort_keys=True, indent=1, ensure_ascii=False, allow_nan=False) + "\n").encode()


def report_entries(coco: dict) -> list[dict]:
    """Every entry that holds one report's box on one frame: annotations and hard negatives."""
    return coco["annotations"] + coco.get(HARD_NEGATIVES, [])


def dataset_version(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:12]


def read_annotations(root: str, endpoint_url: str | None) -> bytes | None:
    uri = storage.join(root, ANNOTATIONS_FILE)
    if not storage.exists(uri, endpoint_url):
        return None
    return storage.read_bytes(uri, endpoint_url)


def parse_annotations(data: bytes, uri: str) -> dict:
    try:
        coco = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StoreError(f"{uri} is not valid JSON: {exc}") from exc
    if not isinstance(coco, dict):
        raise StoreError(f"{uri} is not a COCO dataset (a JSON object)")
    skeleton = empty_dataset()
    for key in ("images", "annotations", "categories"):
        coco.setdefault(key, skeleton[key])
    coco.setdefault("info", {}).setdefault("pushes", [])
    return coco


def load_dataset(root: str, endpoint_url: str | None = None) -> dict:
    """The dataset's COCO dict; an empty skeleton when nothing has been pushed to ``root`` yet."""
    data = read_annotations(str(root), endpoint_url)
    if data is None:
        return empty_dataset()
    return parse_annotations(data, storage.join(str(root), ANNOTATIONS_FILE))


def _plain(value: Any, digits: int = 6) -> Any:
    """JSON-ready copy: numpy scalars/arrays to Python, tuples to lists, floats rounded.

    Rounding keeps a re-run that differs only in float noise from counting as a change.
    """
    if hasattr(value, "tolist"):  # numpy scalar or array
        value = value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ObjretError(f"cannot store {value} in the dataset (numbers must be finite)")
        return round(value, digits)
    if isinstance(value, dict):
        return {str(k): _plain(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, digits) for v in value]
    raise ObjretError(f"cannot store {type(value).__name__} value {value!r} in the dataset (not JSON data)")


def _next_id(entries: list[dict]) -> int:
    return max((entry["id"] for entry in entries), default=0) + 1


def _check_frame(frame: MinedFrame) -> tuple[float, float, float, float]:
    """The frame's box clipped to the frame; errors for what would corrupt the dataset."""
    if not _SAFE_FRAME_ID.fullmatch(frame.frame_id or ""):
        raise ObjretError(f"mined frame id {frame.frame_id!r} cannot be a file name")
    if frame.width <= 0 or frame.height <= 0:
        raise ObjretError(f"mined frame {frame.frame_id}: bad size {frame.width}x{frame.height}")
    if not math.isfinite(frame.score):
        raise ObjretError(f"mined frame {frame.frame_id}: score {frame.score} is not a finite number")
    try:
        return check_box_in_frame(frame.box, frame.width, frame.height)
    except ReportError as exc:
        raise ObjretError(f"mined frame {frame.frame_id}: {exc.problems[0]}") from exc


def _rounded_box(box: tuple[float, float, float, float]) -> list[float]:
    # Round the corners, not the size, so a box that ends at the frame's edge still does after rounding.
    x, y, w, h = box
    left, top, right, bottom = (round(v, 2) for v in (x, y, x + w, y + h))
    return [left, top, round(right - left, 2), round(bottom - top, 2)]


def _as_jpeg(data: bytes, source: str) -> bytes:
    """JPEG bytes as they are; any other image format re-encoded, so images/<id>.jpg is always a JPEG."""
    if data.startswith(_JPEG_MAGIC):
        return data
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            out = io.BytesIO()
            image.convert("RGB").save(out, format="JPEG", quality=95)
    except Exception as exc:  # Pillow raises many types for undecodable input
        raise BadFrameError(f"cannot decode the image at {source}: {exc}") from exc
    return out.getvalue()


def _copy_frame(
    frame: MinedFrame, destination: str, endpoint_url: str | None, read_image: Callable[[str], bytes] | None
) -> None:
    if storage.exists(destination, endpoint_url):
        return  # copied by an earlier push that died before writing annotations.json (writes are atomic)
    try:
        data = read_image(frame.image_uri) if read_image else storage.read_bytes(frame.image_uri, endpoint_url)
    except ObjretError:
        raise
    except Exception as exc:  # a caller's read_image may raise anything
        raise StoreError(f"cannot read mined frame {frame.frame_id} from {frame.image_uri}: {exc}") from exc
    storage.write_bytes(destination, _as_jpeg(data, frame.image_uri), endpoint_url)


def _new_image(coco: dict, frame: MinedFrame, copy_frames: bool) -> dict:
    image = {
        "id": _next_id(coco["images"]),
        "width": int(frame.width),
        "height": int(frame.height),
        "frame_id": frame.frame_id,
        "source_uri": frame.uri,
        "frame_index": None if frame.frame_index is None else int(frame.frame_index),
        "time_s": None if frame.time_s is None else _plain(float(frame.time_s)),
    }
    if copy_frames:
        image["file_name"] = f"{IMAGES_FOLDER}/{frame.frame_id}.jpg"  # relative to the dataset root
    else:
        image["file_name"] = frame.image_uri
        image["coco_url"] = frame.image_uri
    return image


def _category_id(coco: dict, name: str) -> int:
    for category in coco["categories"]:
        if category["name"] == name:
            return category["id"]
    category = {"id": _next_id(coco["categories"]), "name": name, "supercategory": name}
    coco["categories"].append(category)
    return category["id"]


def push(
    root: str,
    report: FailureReport,
    mined: list[MinedFrame],
    provenance: dict,
    *,
    copy_frames: bool = True,
    endpoint_url: str | None = None,
    read_image: Callable[[str], bytes] | None = None,
) -> PushResult:
    """Add the frames mined for ``report`` to the dataset at ``root``, one annotation per frame.

    ``provenance`` (backbone, index_version, method, ...) is stored in each annotation's ``objret`` field.
    Frames already in the dataset keep their image entry; a (report, frame) pair already annotated is
    left alone when identical and refreshed in place when the new values differ. Nothing is removed.
    A false positive report's frames go in as hard negatives, under no category (objret.dataset.labels).
    """
    root = str(root)
    annotations_uri = storage.join(root, ANNOTATIONS_FILE)
    old_bytes = read_annotations(root, endpoint_url)
    coco = parse_annotations(old_bytes, annotations_uri) if old_bytes is not None else empty_dataset()

    images_by_frame = {image["frame_id"]: image for image in coco["images"] if "frame_id" in image}
    frame_of_image = {image["id"]: image.get("frame_id") for image in coco["images"]}
    annotations_by_key = {
        (ann["objret"].get("report_id"), frame_of_image.get(ann["image_id"])): ann
        for ann in report_entries(coco)
        if isinstance(ann.get("objret"), dict)
    }
    label = dataset_label(report)
    entries = coco.setdefault(HARD_NEGATIVES, []) if label.hard_negative else coco["annotations"]

    # Best rank first, one entry per frame: ids are assigned in this order, so they are reproducible.
    frames: dict[str, tuple[MinedFrame, tuple]] = {}
    for frame in sorted(mined, key=lambda f: f.rank):
        if frame.frame_id not in frames:
            frames[frame.frame_id] = (frame, _check_frame(frame))

    annotation_provenance = _plain(dict(provenance))
    added = unchanged = updated = 0
    category_id = None
    for frame, box in frames.values():
        image = images_by_frame.get(frame.frame_id)
        if image is None:
            image = _new_image(coco, frame, copy_frames)
            if copy_frames:
                # Images before annotations.json: a crash here leaves the old dataset valid.
                _copy_frame(frame, storage.join(root, image["file_name"]), endpoint_url, read_image)
            coco["images"].append(image)
            images_by_frame[frame.frame_id] = image

        bbox = _rounded_box(box)
        annotation = {"image_id": image["id"], "bbox": bbox, "area": round(bbox[2] * bbox[3], 2), "iscrowd": 0}
        if label.hard_negative:
            annotation["not_class"] = label.class_name
        else:
            if category_id is None:
                category_id = _category_id(coco, label.class_name)
            annotation["category_id"] = category_id
        annotation["objret"] = {
            **annotation_provenance,
            "report_id": report.report_id,
            "failure_kind": report.failure_kind,
            "detector": {"name": report.detector_name, "version": report.detector_version},
            "rank": int(frame.rank),
            "score": _plain(float(frame.score)),
            "evidence": _plain(frame.evidence),
        }
        if label.predicted_class is not None:
            annotation["objret"]["predicted_class"] = label.predicted_class
        existing = annotations_by_key.get((report.report_id, frame.frame_id))
        if existing is None:
            annotation["id"] = _next_id(entries)
            entries.append(annotation)
            added += 1
        elif {k: v for k, v in existing.items() if k != "id"} == annotation:
            unchanged += 1
        elif not any(entry is existing for entry in entries):
            # Pushed under the other list before (a false positive boxed under its class by an older objret):
            # it moves, so the wrong box leaves the class.
            for key in ("annotations", HARD_NEGATIVES):
                coco[key] = [entry for entry in coco.get(key, []) if entry is not existing]
            entries = coco[HARD_NEGATIVES] if label.hard_negative else coco["annotations"]
            annotation["id"] = _next_id(entries)
            entries.append(annotation)
            updated += 1
        else:
            annotation["id"] = existing["id"]  # same (report, frame), new values: keep its id
            existing.clear()
            existing.update(annotation)
            updated += 1

    if added or updated:
        # parent_version: the version this push built on (its own version would have to hash itself).
        coco["info"]["pushes"].append(
            {"report_id": report.report_id, "frames": len(frames), "added": added, "updated": updated,
             "parent_version": dataset_version(old_bytes) if old_bytes is not None else None})

    new_bytes = dataset_bytes(coco)
    changed = new_bytes != old_bytes
    if changed:
        storage.write_bytes(annotations_uri, new_bytes, endpoint_url)  # last: the commit point of the push
    return PushResult(
        root=root,
        version=dataset_version(new_bytes),
        added=added,
        unchanged=unchanged,
        annotations_uri=annotations_uri,
        changed=changed,
        updated=updated,
    )


@dataclass
class RemoveResult:
    root: str
    version: str           # sha256[:12] of the annotations.json bytes now at root
    removed: int           # annotations removed
    images_removed: int    # images no annotation used any more, removed with them
    kept: int              # annotations of the report still there
    not_found: list[str]   # frames the report had no annotation on
    changed: bool          # whether annotations.json was written


def remove_frames(root: str, report_id: str, frame_ids, *, endpoint_url: str | None = None) -> RemoveResult:
    """Remove the annotations of ``report_id`` on ``frame_ids`` from the dataset at ``root``, and the images no
    annotation uses any more (their entry and, for copied frames, their file). Other reports' annotations on the
    same frames stay. annotations.json is written first (the commit point), the freed image files deleted after:
    a removal that dies half-way leaves unused files, never an annotation without its image."""
    root = str(root)
    annotations_uri = storage.join(root, ANNOTATIONS_FILE)
    old_bytes = read_annotations(root, endpoint_url)
    if old_bytes is None:
        raise ObjretError(f"no retraining dataset at {root} ({ANNOTATIONS_FILE} is missing): mine a report first")
    coco = parse_annotations(old_bytes, annotations_uri)
    frame_of_image = {image["id"]: image.get("frame_id") for image in coco["images"]}
    drop = set(frame_ids)

    def reported(ann: dict) -> bool:
        return isinstance(ann.get("objret"), dict) and ann["objret"].get("report_id") == report_id

    removed = [a for a in report_entries(coco) if reported(a) and frame_of_image.get(a["image_id"]) in drop]
    removed_ids = {id(a) for a in removed}
    for key in ("annotations", HARD_NEGATIVES):
        coco[key] = [a for a in coco.get(key, []) if id(a) not in removed_ids]
    used = {a["image_id"] for a in report_entries(coco)}
    freed = [image for image in coco["images"]
             if image["id"] not in used and image["id"] in {a["image_id"] for a in removed}]
    freed_ids = {image["id"] for image in freed}
    coco["images"] = [image for image in coco["images"] if image["id"] not in freed_ids]
    if removed:
        coco["info"].setdefault("reviews", []).append(
            {"report_id": report_id, "removed": len(removed), "images_removed": len(freed),
             "parent_version": dataset_version(old_bytes)})
    new_bytes = dataset_bytes(coco)
    changed = new_bytes != old_bytes
    if changed:
        storage.write_bytes(annotations_uri, new_bytes, endpoint_url)   # the commit point
    for image in freed:
        if image["file_name"].startswith(f"{IMAGES_FOLDER}/"):   # a copied frame (else the lake's own file)
            storage.delete(storage.join(root, image["file_name"]), endpoint_url)
    found = {frame_of_image.get(a["image_id"]) for a in removed}
    return RemoveResult(root, dataset_version(new_bytes), len(removed), len(freed),
                        sum(1 for a in report_entries(coco) if reported(a)), sorted(drop - found), changed)


def report_boxes(root: str, report_id: str, endpoint_url: str | None = None) -> dict[str, tuple[float, ...]]:
    """The boxes of ``report_id``'s annotations in the dataset at ``root``: frame id -> [x, y, w, h] pixels."""
    data = read_annotations(str(root), endpoint_url)
    if data is None:
        return {}
    coco = parse_annotations(data, storage.join(str(root), ANNOTATIONS_FILE))
    frame_of_image = {image["id"]: image.get("frame_id") for image in coco["images"]}
    return {frame_of_image[a["image_id"]]: tuple(float(v) for v in a["bbox"]) for a in report_entries(coco)
            if isinstance(a.get("objret"), dict) and a["objret"].get("report_id") == report_id
            and frame_of_image.get(a["image_id"])}
