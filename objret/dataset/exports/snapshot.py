"""What an export writes: one dataset version's frames with their boxes and hard negatives, rejected frames left out.

Every format reads this one view, so they agree on which frames go out and what each box is
(objret.dataset.labels: boxes under a class, or hard negatives that are not it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from objret.dataset.coco import HARD_NEGATIVES, IMAGES_FOLDER
from objret.errors import ObjretError


@dataclass(frozen=True)
class ExportBox:
    class_name: str        # the category; for a hard negative, the class the region is not
    hard_negative: bool
    bbox: tuple[float, float, float, float]   # x, y, w, h in frame pixels
    score: float
    rank: int
    report_id: str
    failure_kind: str
    method: str
    index_version: str
    evidence: dict = field(default_factory=dict)
    predicted_class: str | None = None   # misclassification: the class the detector gave

    @property
    def label(self) -> str:
        """What a labelling tool shows: the class, or "not <class>" for a hard negative."""
        return f"not {self.class_name}" if self.hard_negative else self.class_name

    @property
    def model_version(self) -> str:
        """The pre-annotation's origin, as labelling tools name it: objret method + index version."""
        return f"objret {self.method} index {self.index_version}"

    def attributes(self) -> dict:
        """Everything a labeller may want beside the box (flat: tools store attributes as scalars or dicts)."""
        extra = {"predicted_class": self.predicted_class} if self.predicted_class else {}
        return {"score": self.score, "rank": self.rank, "report_id": self.report_id,
                "failure_kind": self.failure_kind, "hard_negative": self.hard_negative,
                "model_version": self.model_version, "evidence": self.evidence, **extra}


@dataclass(frozen=True)
class ExportImage:
    frame_id: str
    width: int
    height: int
    source_uri: str                # the lake's file the frame came from
    boxes: tuple[ExportBox, ...]   # best rank first

    @property
    def file_name(self) -> str:
        return f"{IMAGES_FOLDER}/{self.frame_id}.jpg"   # where every export puts the frame


@dataclass(frozen=True)
class Snapshot:
    images: tuple[ExportImage, ...]
    categories: tuple[str, ...]   # the classes boxed, in the dataset's category order
    version: dict                 # {"number": n, "md5": ...} of the dataset version exported
    read_image: Callable[[dict], bytes]   # a dataset image entry -> its JPEG bytes
    image_entries: dict                   # frame_id -> the dataset's image entry (for read_image)
    rejected_left_out: int                # boxes left out because a review rejected their frame

    def image_bytes(self, image: ExportImage) -> bytes:
        return self.read_image(self.image_entries[image.frame_id])

    def hard_negative_classes(self) -> tuple[str, ...]:
        return tuple(sorted({b.class_name for i in self.images for b in i.boxes if b.hard_negative}))


def take_snapshot(coco: dict, version: dict, rejected: dict[str, list[str]],
                  read_image: Callable[[dict], bytes]) -> Snapshot:
    """The export view of a dataset's COCO dict; ``rejected`` (report id -> frame ids, the review's verdicts as
    they stand now) are left out, whatever version is exported."""
    categories = {c["id"]: c["name"] for c in coco.get("categories", [])}
    rejected_pairs = {(report, frame) for report, frames in rejected.items() for frame in frames}
    entries_by_image: dict[int, list[tuple[bool, dict]]] = {}
    for hard_negative, key in ((False, "annotations"), (True, HARD_NEGATIVES)):
        for entry in coco.get(key, []):
            entries_by_image.setdefault(entry["image_id"], []).append((hard_negative, entry))

    images, entries, left_out = [], {}, 0
    for image in coco.get("images", []):
        frame_id = image.get("frame_id")
        if not frame_id:
            raise ObjretError(f"dataset image {image.get('id')} has no frame_id: not an objret dataset")
        boxes = []
        for hard_negative, entry in entries_by_image.get(image["id"], []):
            meta = entry.get("objret") or {}
            if (meta.get("report_id"), frame_id) in rejected_pairs:
                left_out += 1
                continue
            name = entry["not_class"] if hard_negative else categories[entry["category_id"]]
            boxes.append(ExportBox(
                class_name=name, hard_negative=hard_negative, bbox=tuple(float(v) for v in entry["bbox"]),
                score=float(meta.get("score", 0.0)), rank=int(meta.get("rank", 0)),
                report_id=str(meta.get("report_id", "")), failure_kind=str(meta.get("failure_kind", "")),
                method=str(meta.get("method", "")), index_version=str(meta.get("index_version", "")),
                evidence=dict(meta.get("evidence") or {}), predicted_class=meta.get("predicted_class")))
        if boxes:   # a frame whose every box was rejected is not exported at all
            boxes.sort(key=lambda b: (b.rank, b.report_id))
            images.append(ExportImage(frame_id, int(image["width"]), int(image["height"]),
                                      str(image.get("source_uri", "")), tuple(boxes)))
            entries[frame_id] = image
    boxed = {b.class_name for i in images for b in i.boxes if not b.hard_negative}
    ordered = tuple(name for _, name in sorted(categories.items()) if name in boxed)
    return Snapshot(tuple(images), ordered, dict(version), read_image, entries, left_out)
