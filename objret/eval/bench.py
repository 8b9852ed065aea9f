"""Load a retrieval benchmark folder: COCO-style sets plus a fixed query list.

Layout (see the bench README)::

    <root>/queries.json              {"queries": [...]} (or a bare list)
    <root>/<set>/annotations.json    COCO style: images, annotations, categories
    <root>/<set>/images/*.jpg

Every sub-folder holding an ``annotations.json`` is a set. Images are keyed ``(set, image_id)``.
The positives and junk rules follow the README (and ``check_bench.py``, the reference):

* class query: a positive is any gallery image with a box of the query's category (matched by name,
  crowd boxes included);
* instance query: a positive is any image of the query's own set with a box of the query's ``track_id``
  (only when that set is in the gallery);
* junk (``junk_frames`` of the query's set and ``junk_images``) and the query image are never positives
  and are removed from every ranking.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from objret.errors import ObjretError

Key = tuple[str, int]  # (set, image_id)
QUERY_KINDS = ("class", "instance")


@dataclass(frozen=True)
class BenchImage:
    set: str
    image_id: int
    path: Path
    width: int
    height: int
    frame: int | None  # original video frame number; None for still-image sets

    @property
    def key(self) -> Key:
        return (self.set, self.image_id)


@dataclass(frozen=True)
class Query:
    id: str
    set: str
    image_id: int
    bbox: tuple[float, float, float, float]  # x, y, w, h in pixels
    category: str
    kind: str  # "class" or "instance"
    track_id: int | None
    area_frac: float
    gallery: tuple[str, ...]
    junk: frozenset[Key]  # resolved from junk_frames and junk_images
    num_positives: int | None
    raw: dict = field(repr=False, compare=False)

    @property
    def key(self) -> Key:
        return (self.set, self.image_id)


@dataclass
class _SetIndex:
    """Look-ups of one set, built once so positives and boxes are cheap per query."""

    is_video: bool
    category_names: dict[int, str]
    images_by_category: dict[str, set[int]]
    images_by_track: dict[Any, set[int]]
    boxes_by_image: dict[int, list[tuple[str, Any, tuple]]]  # image_id -> [(category, track_id, bbox)]


@dataclass
class Bench:
    root: Path
    sets: list[str]
    images: dict[Key, BenchImage]
    queries: list[Query]
    _index: dict[str, _SetIndex] = field(repr=False)

    def query(self, query_id: str) -> Query:
        for q in self.queries:
            if q.id == query_id:
                return q
        raise ObjretError(f"no query {query_id!r} in {self.root / 'queries.json'}")

    def is_video_set(self, set_name: str) -> bool:
        """A video set's images carry a frame number (paste_visible and coco_mini do not)."""
        return self._index[set_name].is_video

    def positives(self, q: Query) -> set[Key]:
        found: set[Key] = set()
        for set_name in q.gallery:
            index = self._index[set_name]
            if q.kind == "class":
                found.update((set_name, i) for i in index.images_by_category.get(q.category, ()))
            elif set_name == q.set:  # track ids are only meaningful inside their own set
                found.update((set_name, i) for i in index.images_by_track.get(q.track_id, ()))
        found.discard(q.key)
        return found - q.junk

    def gt_boxes(self, q: Query, key: Key) -> list[tuple]:
        """Boxes (x, y, w, h) of the query's object in image ``key``: its track (instance) or any box of
        its category (class)."""
        set_name, image_id = key
        index = self._index.get(set_name)
        if index is None:
            return []
        boxes = index.boxes_by_image.get(image_id, [])
        if q.kind == "instance":
            if set_name != q.set:
                return []
            return [bbox for _, track_id, bbox in boxes if track_id == q.track_id]
        return [bbox for category, _, bbox in boxes if category == q.category]

    def gallery_keys(self, q: Query) -> list[Key]:
        """Every image that is scored for q: its gallery sets, minus junk and the query image."""
        gallery = set(q.gallery)
        return [
            key for key in self.images
            if key[0] in gallery and key != q.key and key not in q.junk
        ]


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise ObjretError(f"missing file: {path}")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ObjretError(f"cannot parse {path}: {exc}") from exc


def _load_set(root: Path, set_name: str, images: dict[Key, BenchImage]) -> _SetIndex:
    path = root / set_name / "annotations.json"
    data = _read_json(path)
    try:
        category_names = {c["id"]: c["name"] for c in data["categories"]}
        set_images = {}
        for im in data["images"]:
            image = BenchImage(
                set=set_name, image_id=im["id"], path=root / set_name / im["file_name"],
                width=int(im["width"]), height=int(im["height"]), frame=im.get("frame"),
            )
            if image.image_id in set_images:
                raise ObjretError(f"{path}: duplicate image id {image.image_id}")
            set_images[image.image_id] = image

        images_by_category: dict[str, set[int]] = {}
        images_by_track: dict[Any, set[int]] = {}
        boxes_by_image: dict[int, list] = {}
        for ann in data["annotations"]:
            image_id = ann["image_id"]
            if image_id not in set_images:
                raise ObjretError(f"{path}: annotation {ann.get('id')} names unknown image {image_id}")
            if ann["category_id"] not in category_names:
                raise ObjretError(f"{path}: annotation {ann.get('id')} has undeclared category "
                                  f"{ann['category_id']}")
            category = category_names[ann["category_id"]]
            track_id = ann.get("track_id")
            bbox = tuple(float(v) for v in ann["bbox"])
            images_by_category.setdefault(category, set()).add(image_id)
            if track_id is not None:
                images_by_track.setdefault(track_id, set()).add(image_id)
            boxes_by_image.setdefault(image_id, []).append((category, track_id, bbox))
    except ObjretError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise ObjretError(f"malformed {path}: {type(exc).__name__}: {exc}") from exc

    for image in set_images.values():
        images[image.key] = image
    return _SetIndex(
        is_video=any(im.frame is not None for im in set_images.values()),
        category_names=category_names,
        images_by_category=images_by_category,
        images_by_track=images_by_track,
        boxes_by_image=boxes_by_image,
    )


def _parse_query(raw: dict, path: Path, images: dict[Key, BenchImage], sets: list[str]) -> Query:
    qid = raw.get("id", "?")
    where = f"{path}: query {qid}"
    try:
        set_name, image_id = raw["set"], raw["image_id"]
        if set_name not in sets:
            raise ObjretError(f"{where} names unknown set {set_name!r}")
        image = images.get((set_name, image_id))
        if image is None:
            raise ObjretError(f"{where} names unknown image {image_id} of set {set_name!r}")
        kind = raw["kind"]
        if kind not in QUERY_KINDS:
            raise ObjretError(f"{where} has kind {kind!r}, expected one of {QUERY_KINDS}")
        track_id = raw.get("track_id")
        if kind == "instance" and track_id is None:
            raise ObjretError(f"{where} is an instance query without track_id")

        gallery = tuple(raw.get("gallery") or [set_name])
        unknown = [g for g in gallery if g not in sets]
        if unknown:
            raise ObjretError(f"{where} has unknown gallery set(s) {unknown}")

        junk: set[Key] = set()
        junk_frames = raw.get("junk_frames")
        if junk_frames:  # a window of original frame numbers of the query's own set, inclusive
            first, last = junk_frames
            junk.update(
                key for key, im in images.items()
                if key[0] == set_name and im.frame is not None and first <= im.frame <= last
            )
        for entry in raw.get("junk_images") or []:
            key = (entry["set"], entry["image_id"])
            if key not in images:
                raise ObjretError(f"{where} has junk_images entry {entry} that names no image of the bench")
            junk.add(key)

        bbox = tuple(float(v) for v in raw["bbox"])
        area_frac = raw.get("area_frac")
        if area_frac is None:
            area_frac = bbox[2] * bbox[3] / (image.width * image.height)
        return Query(
            id=str(qid), set=set_name, image_id=image_id, bbox=bbox, category=raw["category"],
            kind=kind, track_id=track_id, area_frac=float(area_frac), gallery=gallery,
            junk=frozenset(junk), num_positives=raw.get("num_positives"), raw=raw,
        )
    except ObjretError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise ObjretError(f"malformed {where}: {type(exc).__name__}: {exc}") from exc


def load_bench(root: str | Path) -> Bench:
    """Read every set and the query list under ``root``; raise ObjretError naming the bad file."""
    root = Path(root)
    if not root.is_dir():
        raise ObjretError(f"bench folder not found: {root}")
    sets = sorted(p.parent.name for p in root.glob("*/annotations.json"))
    if not sets:
        raise ObjretError(f"no <set>/annotations.json under {root}")

    images: dict[Key, BenchImage] = {}
    index = {name: _load_set(root, name, images) for name in sets}

    queries_path = root / "queries.json"
    data = _read_json(queries_path)
    raw_queries = data.get("queries") if isinstance(data, dict) else data
    if not isinstance(raw_queries, list) or not all(isinstance(q, dict) for q in raw_queries):
        raise ObjretError(f"malformed {queries_path}: expected a list of queries or {{\"queries\": [...]}}")
    queries = [_parse_query(raw, queries_path, images, sets) for raw in raw_queries]
    seen: set[str] = set()
    for q in queries:
        if q.id in seen:
            raise ObjretError(f"{queries_path}: duplicate query id {q.id}")
        seen.add(q.id)
    return Bench(root=root, sets=sets, images=images, queries=queries, _index=index)


def bench_digest(bench: Bench) -> str:
    """A short content hash of what the bench scores against: its query list and each set's annotations
    (the images are named by those files, and hashing them would read the whole bench)."""
    digest = hashlib.sha256()
    for path in [bench.root / "queries.json", *(bench.root / name / "annotations.json" for name in bench.sets)]:
        digest.update(path.relative_to(bench.root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]
