"""COCO detection export: annotations.json + images/ (read by pycocotools, torchvision, Detectron2, MMDetection).

Hard negatives (false positive reports) are no category: they are listed under ``hard_negatives`` beside
``annotations``, which COCO readers ignore, so training sees those frames as background.
"""

from __future__ import annotations

import json
from pathlib import Path

from objret.dataset.coco import HARD_NEGATIVES
from objret.dataset.exports.snapshot import Snapshot

SHIPS_IMAGES = True   # images/<frame>.jpg beside the main file
MAIN_FILE = "annotations.json"


def coco_dict(snapshot: Snapshot, file_name=lambda image: image.file_name) -> dict:
    """The snapshot as one COCO dict; ``file_name`` says how an image entry names its file."""
    category_ids = {name: number for number, name in enumerate(snapshot.categories, start=1)}
    coco = {"info": {"description": "objret retraining dataset export", "dataset_version": snapshot.version},
            "images": [], "annotations": [], HARD_NEGATIVES: [],
            "categories": [{"id": i, "name": name, "supercategory": name} for name, i in category_ids.items()]}
    for image_id, image in enumerate(snapshot.images, start=1):
        coco["images"].append({"id": image_id, "file_name": file_name(image), "width": image.width,
                               "height": image.height, "frame_id": image.frame_id, "source_uri": image.source_uri})
        for box in image.boxes:
            entry = {"image_id": image_id, "bbox": list(box.bbox), "area": round(box.bbox[2] * box.bbox[3], 2),
                     "iscrowd": 0, "score": box.score, "attributes": box.attributes()}
            if box.hard_negative:
                coco[HARD_NEGATIVES].append({**entry, "id": len(coco[HARD_NEGATIVES]) + 1, "not_class": box.class_name})
            else:
                coco["annotations"].append({**entry, "id": len(coco["annotations"]) + 1,
                                            "category_id": category_ids[box.class_name]})
    return coco


def write(snapshot: Snapshot, folder: Path, out: str) -> list[str]:
    (folder / MAIN_FILE).write_text(json.dumps(coco_dict(snapshot), indent=1, ensure_ascii=False))
    return [MAIN_FILE]
