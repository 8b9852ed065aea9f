"""Exports of the retraining dataset into the formats labelling and training tools import.

``export(snapshot, fmt, out)`` stages the files in a local temporary folder, then delivers them to ``out`` (a
folder or an S3 prefix): images first (those already there are kept: they are named by frame id and never
change), the format's main file last, each write atomic, so a reader sees the previous export or the new one.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from objret import storage
from objret.dataset.exports import coco, cvat, fiftyone_dataset, label_studio, yolo
from objret.dataset.exports.snapshot import Snapshot, take_snapshot
from objret.errors import ObjretError, StoreError

FORMATS = {"coco": coco, "yolo": yolo, "label-studio": label_studio, "cvat": cvat, "fiftyone": fiftyone_dataset}

__all__ = ["FORMATS", "ExportResult", "export", "take_snapshot"]


@dataclass
class ExportResult:
    format: str
    out: str
    main_uri: str         # the file a tool opens: annotations.json, data.yaml, tasks.json, the CVAT zip, ...
    frames: int
    boxes: int
    hard_negatives: int
    rejected_left_out: int
    files_written: int
    version: dict


def export(snapshot: Snapshot, fmt: str, out: str, endpoint_url: str | None = None) -> ExportResult:
    if fmt not in FORMATS:
        raise ObjretError(f"unknown export format {fmt!r}: one of {', '.join(FORMATS)}")
    writer = FORMATS[fmt]
    with tempfile.TemporaryDirectory(prefix="objret-export-") as staging:
        folder = Path(staging)
        (folder / "images").mkdir()
        for image in snapshot.images:
            (folder / image.file_name).write_bytes(snapshot.image_bytes(image))
        files = writer.write(snapshot, folder, out)
        images = [image.file_name for image in snapshot.images] if writer.SHIPS_IMAGES else []
        written = _deliver(folder, images, files, out, endpoint_url)
    boxes = [box for image in snapshot.images for box in image.boxes]
    return ExportResult(fmt, out, storage.join(out, files[-1]), len(snapshot.images),
                        sum(not b.hard_negative for b in boxes), sum(b.hard_negative for b in boxes),
                        snapshot.rejected_left_out, written, snapshot.version)


def _deliver(folder: Path, images: list[str], files: list[str], out: str, endpoint_url: str | None) -> int:
    """Copy the staged files to ``out``: images it lacks, then the format's files in order (its main file last)."""
    written = 0
    try:   # one listing, not a request an image
        present = set(storage.list_uris(storage.join(out, "images"), endpoint_url))
    except StoreError:
        if storage.is_s3(out):
            raise
        present = set()   # a local folder not made yet
    for name in images:
        target = storage.join(out, name)
        if target not in present:
            storage.write_bytes(target, (folder / name).read_bytes(), endpoint_url)
            written += 1
    for name in files:
        storage.write_bytes(storage.join(out, name), (folder / name).read_bytes(), endpoint_url)
        written += 1
    return written
