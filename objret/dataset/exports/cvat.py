"""CVAT export: a "COCO 1.0" archive (annotations/instances_default.json + images/default/), the format CVAT's
"Upload annotations" and "Import dataset" read. Each box's score, rank, report id and evidence ride in the
annotation's ``attributes`` (CVAT keeps those it finds on the task's labels); hard negatives are boxes of a
``hard_negative`` label whose ``not_class`` attribute names the class they are not.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from objret.dataset.exports.coco import coco_dict
from objret.dataset.exports.snapshot import Snapshot

SHIPS_IMAGES = False   # the images travel inside the archive
MAIN_FILE = "cvat_coco_1.0.zip"
HARD_NEGATIVE_LABEL = "hard_negative"


def cvat_coco(snapshot: Snapshot) -> dict:
    coco = coco_dict(snapshot, file_name=lambda image: f"{image.frame_id}.jpg")
    hard_negatives = coco.pop("hard_negatives")
    if hard_negatives:
        label_id = len(coco["categories"]) + 1
        coco["categories"].append({"id": label_id, "name": HARD_NEGATIVE_LABEL, "supercategory": ""})
        first = len(coco["annotations"]) + 1
        for offset, entry in enumerate(hard_negatives):
            not_class = entry.pop("not_class")
            coco["annotations"].append({**entry, "id": first + offset, "category_id": label_id,
                                        "attributes": {**entry["attributes"], "not_class": not_class}})
    for entry in coco["annotations"]:
        # CVAT's attributes are scalars: the evidence dict goes in as JSON text.
        attributes = entry["attributes"]
        attributes["evidence"] = json.dumps(attributes["evidence"], sort_keys=True)
        attributes.setdefault("occluded", False)
    return coco


def write(snapshot: Snapshot, folder: Path, out: str) -> list[str]:
    with zipfile.ZipFile(folder / MAIN_FILE, "w", zipfile.ZIP_STORED) as archive:   # JPEGs do not compress
        archive.writestr("annotations/instances_default.json", json.dumps(cvat_coco(snapshot), ensure_ascii=False))
        for image in snapshot.images:
            archive.write(folder / image.file_name, f"images/default/{image.frame_id}.jpg")
    return [MAIN_FILE]
