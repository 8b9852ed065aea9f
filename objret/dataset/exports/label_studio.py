"""Label Studio export: tasks.json (one task per frame, the mined boxes as ``predictions``) + label_config.xml.

A prediction groups the boxes that one objret method and index version made (its ``model_version``), each a
``rectanglelabels`` region in percent of the frame with its own ``score``; Label Studio shows them as
pre-annotations to accept or fix. Hard negatives are regions of a second control, ``hard_negative``, labelled
"not <class>", so the labeller sees them without them becoming boxes of the class.

Images: an S3 export names them by s3:// URI (Label Studio reads them through an S3 source storage); a local one
by Label Studio's local-files URL, served when LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true and
LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT is the export folder.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from xml.sax.saxutils import quoteattr

from objret import storage
from objret.dataset.exports.snapshot import ExportBox, ExportImage, Snapshot

SHIPS_IMAGES = True   # images/<frame>.jpg beside the main file
MAIN_FILE = "tasks.json"
CONFIG_FILE = "label_config.xml"
IMAGE, BOXES, HARD_NEGATIVES = "image", "label", "hard_negative"   # the config's tag names


def label_config(snapshot: Snapshot) -> str:
    def labels(names) -> str:
        return "".join(f"\n    <Label value={quoteattr(name)}/>" for name in names)

    hard = [f"not {name}" for name in snapshot.hard_negative_classes()]
    config = (f'<View>\n  <Image name="{IMAGE}" value="$image"/>\n'
              f'  <RectangleLabels name="{BOXES}" toName="{IMAGE}">{labels(snapshot.categories)}\n'
              f'  </RectangleLabels>\n')
    if hard:
        config += (f'  <Header value="Hard negatives: regions the detector took for the class (not it)"/>\n'
                   f'  <RectangleLabels name="{HARD_NEGATIVES}" toName="{IMAGE}">{labels(hard)}\n'
                   f'  </RectangleLabels>\n')
    return config + "</View>\n"


def image_url(image: ExportImage, out: str) -> str:
    if storage.is_s3(out):
        return storage.join(out, image.file_name)
    return f"/data/local-files/?d={image.file_name}"   # relative to LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT


def region(image: ExportImage, box: ExportBox, number: int) -> dict:
    x, y, w, h = box.bbox
    return {
        "id": f"{image.frame_id[:40]}-{number}", "type": "rectanglelabels",
        "from_name": HARD_NEGATIVES if box.hard_negative else BOXES, "to_name": IMAGE,
        "original_width": image.width, "original_height": image.height, "image_rotation": 0,
        "value": {"x": 100 * x / image.width, "y": 100 * y / image.height, "width": 100 * w / image.width,
                  "height": 100 * h / image.height, "rotation": 0, "rectanglelabels": [box.label]},
        "score": box.score,
        "meta": {"text": [f"report {box.report_id}, rank {box.rank}, {box.failure_kind}"
                          + (f", detector said {box.predicted_class}" if box.predicted_class else "")]},
    }


def task(image: ExportImage, out: str) -> dict:
    by_model: dict[str, list[ExportBox]] = defaultdict(list)
    for box in image.boxes:
        by_model[box.model_version].append(box)
    predictions, number = [], 0
    for model_version, boxes in by_model.items():
        regions = []
        for box in boxes:
            number += 1
            regions.append(region(image, box, number))
        predictions.append({"model_version": model_version, "score": max(b.score for b in boxes), "result": regions})
    return {"data": {"image": image_url(image, out), "frame_id": image.frame_id, "source_uri": image.source_uri,
                     "reports": sorted({b.report_id for b in image.boxes})},
            "predictions": predictions}


def write(snapshot: Snapshot, folder: Path, out: str) -> list[str]:
    (folder / CONFIG_FILE).write_text(label_config(snapshot))
    tasks = [task(image, out) for image in snapshot.images]
    (folder / MAIN_FILE).write_text(json.dumps(tasks, indent=1, ensure_ascii=False))
    return [CONFIG_FILE, MAIN_FILE]
