"""YOLO detection export (Ultralytics layout): data.yaml, images/<frame>.jpg, labels/<frame>.txt.

Each label line is ``class x_center y_center width height``, normalised to the frame. A frame with only hard
negatives gets an empty label file: YOLO trainers read that as a background image, which is what a false
positive's frames are for.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from objret.dataset.exports.snapshot import Snapshot

SHIPS_IMAGES = True   # images/<frame>.jpg beside the main file
MAIN_FILE = "data.yaml"
LABELS_FOLDER = "labels"


def label_lines(image, class_ids: dict[str, int]) -> list[str]:
    lines = []
    for box in image.boxes:
        if box.hard_negative:
            continue
        x, y, w, h = box.bbox
        lines.append(f"{class_ids[box.class_name]} {(x + w / 2) / image.width:.6f} {(y + h / 2) / image.height:.6f} "
                     f"{w / image.width:.6f} {h / image.height:.6f}")
    return lines


def write(snapshot: Snapshot, folder: Path, out: str) -> list[str]:
    (folder / LABELS_FOLDER).mkdir(exist_ok=True)
    written, class_ids = [], {name: i for i, name in enumerate(snapshot.categories)}
    for image in snapshot.images:
        name = f"{LABELS_FOLDER}/{image.frame_id}.txt"
        lines = label_lines(image, class_ids)
        (folder / name).write_text("".join(line + "\n" for line in lines))
        written.append(name)
    # No `path` key: trainers then resolve images/ against the folder data.yaml is in, wherever it is moved.
    data = {"train": "images", "val": "images", "names": dict(enumerate(snapshot.categories)),
            "objret_dataset_version": snapshot.version}
    (folder / MAIN_FILE).write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return written + [MAIN_FILE]
