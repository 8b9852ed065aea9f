"""FiftyOne export: a dataset on disk in FiftyOne's own format (``fo.types.FiftyOneDataset``), written by FiftyOne.

Each frame is a sample whose ``mined`` field holds its boxes as ``Detections`` (label, relative box, confidence =
score, and rank, report_id, failure_kind, evidence, model_version as attributes); hard negatives are a separate
``hard_negatives`` field labelled "not <class>". Load it with
``fo.Dataset.from_dir(FOLDER, dataset_type=fo.types.FiftyOneDataset)``. Needs the optional extra
``objret[fiftyone]``.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from objret.dataset.exports.snapshot import ExportBox, ExportImage, Snapshot
from objret.dataset.labels import dataset_label
from objret.errors import ObjretError

SHIPS_IMAGES = False   # FiftyOne copies the media into its own folder
FOLDER = "fiftyone"
MAIN_FILE = f"{FOLDER}/samples.json"
BOXES_FIELD, HARD_NEGATIVES_FIELD = "mined", "hard_negatives"


def import_fiftyone():
    """fiftyone, or an error saying how to install it (it is an optional extra)."""
    try:
        import fiftyone
    except ImportError as exc:
        raise ObjretError("FiftyOne is not installed: pip install 'objret[fiftyone]' "
                          f"(it is an optional extra) [{exc}]") from exc
    return fiftyone


def detection(fo, image: ExportImage, box: ExportBox):
    x, y, w, h = box.bbox
    attributes = box.attributes()
    del attributes["score"]   # the Detection's confidence
    return fo.Detection(label=box.label, bounding_box=[x / image.width, y / image.height, w / image.width,
                                                       h / image.height], confidence=box.score, **attributes)


def sample(fo, image: ExportImage, filepath: str, tags=()):
    def detections(hard: bool):
        return fo.Detections(detections=[detection(fo, image, b) for b in image.boxes if b.hard_negative == hard])

    return fo.Sample(filepath=filepath, tags=list(tags), frame_id=image.frame_id, source_uri=image.source_uri,
                     **{BOXES_FIELD: detections(False), HARD_NEGATIVES_FIELD: detections(True)})


def write(snapshot: Snapshot, folder: Path, out: str) -> list[str]:
    fo = import_fiftyone()
    dataset = fo.Dataset(f"objret-export-{uuid.uuid4().hex[:12]}")   # not persistent: gone when this exits
    try:
        dataset.add_samples([sample(fo, image, str(folder / image.file_name)) for image in snapshot.images])
        dataset.info = {"objret_dataset_version": snapshot.version}
        dataset.save()
        dataset.export(export_dir=str(folder / FOLDER), dataset_type=fo.types.FiftyOneDataset, export_media=True,
                       progress=False)
    finally:
        dataset.delete()
    files = sorted(str(p.relative_to(folder)) for p in (folder / FOLDER).rglob("*") if p.is_file())
    return [name for name in files if name != MAIN_FILE] + [MAIN_FILE]


def mining_run_dataset(run: dict, name: str):
    """A mining run (its mined.json) as the persistent FiftyOne dataset ``name``, replaced when it exists: the
    query frame tagged ``query`` with the report's box, each mined frame tagged ``mined`` with its box as the
    dataset will hold it (objret.dataset.labels), its rank, score and evidence, and its heat map as a
    ``heatmap`` field (FiftyOne's ``Heatmap`` over the frame's 8-bit PNG)."""
    fo = import_fiftyone()
    report, query = run["report"], run["query"]
    label = dataset_label(report)
    provenance = run.get("provenance") or {}

    def box(item: dict, rank: int, score: float, hard_negative: bool, class_name: str) -> ExportBox:
        return ExportBox(class_name=class_name, hard_negative=hard_negative, bbox=tuple(item["box"]), score=score,
                         rank=rank, report_id=report["report_id"], failure_kind=report["failure_kind"],
                         method=str(run.get("method", "")), index_version=str(provenance.get("index_version", "")),
                         evidence=dict(item.get("evidence") or {}), predicted_class=label.predicted_class)

    def frame(item: dict, boxes) -> ExportImage:
        return ExportImage(item.get("frame_id") or "query", int(item["width"]), int(item["height"]),
                           str(item.get("uri", item.get("image_uri", ""))), tuple(boxes))

    query_image = frame(query, [box(query, 0, 1.0, False, report["class_name"])])
    samples = [sample(fo, query_image, query["image_uri"], tags=["query"])]
    for item in run["mined"]:
        mined = sample(fo, frame(item, [box(item, item["rank"], item["score"], label.hard_negative,
                                              label.class_name)]), item["image_uri"], tags=["mined"])
        mined["rank"], mined["score"] = item["rank"], item["score"]
        if item.get("heatmap"):
            mined["heatmap"] = fo.Heatmap(map_path=item["heatmap"], range=[0, 255])
        samples.append(mined)
    if fo.dataset_exists(name):
        fo.delete_dataset(name)
    dataset = fo.Dataset(name, persistent=True)
    dataset.add_samples(samples)
    dataset.info = {"report": report, "method": run.get("method"), "index_version": provenance.get("index_version"),
                    "dataset_label": label.describe()}
    dataset.save()
    return dataset
