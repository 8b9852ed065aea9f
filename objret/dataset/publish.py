"""Publishing a registry's dataset to ``dataset.root``, a folder or S3 prefix that registries on other machines may
publish to as well.

The images go first (named by frame id, they never change), annotations.json last: readers see one version or
the next, never half of one. Several registries share one published annotations.json by report: a registry's
publish replaces the entries of the reports it holds (frames added, updated, or removed by a review) and keeps
every other report's entries as they are there. The read-merge-write is guarded by a conditional write
(``storage.write_if_unchanged``: S3 If-Match / If-None-Match on the ETag): a publisher whose read went stale
while it merged writes nothing, reads again and merges again, so no registry's frames are lost.
"""

from __future__ import annotations

import copy
import json
import os
import random
import time

from objret import storage
from objret.dataset.coco import (ANNOTATIONS_FILE, HARD_NEGATIVES, IMAGES_FOLDER, dataset_bytes, parse_annotations,
                                 report_entries)
from objret.errors import StoreError

PUBLISH_ATTEMPTS = 50   # conditional writes lost to other publishers before giving up (each reads again)


def _reports(coco: dict) -> set[str]:
    """The reports a dataset holds: those with entries, and those pushed (a review may have removed every frame)."""
    return ({entry["objret"]["report_id"] for entry in report_entries(coco) if isinstance(entry.get("objret"), dict)}
            | {push["report_id"] for push in coco["info"].get("pushes", []) if "report_id" in push})


def _frame(image: dict) -> str:
    return image.get("frame_id") or image["file_name"]


def merge_published(published: dict | None, local: dict) -> dict:
    """What the shared annotations.json becomes when ``local`` is published over ``published``: the entries of
    ``local``'s reports as ``local`` has them, every other report's as ``published`` has them. Alone at the root,
    ``local`` itself; else one canonical form (ids by frame, category name and report), so that any registry
    publishing the same union writes the same bytes."""
    mine = _reports(local)
    if published is None or _reports(published) <= mine:
        return local
    picked = []   # (list, entry, its image, its category's name)
    for coco, whose in ((local, None), (published, mine)):
        image_of = {image["id"]: image for image in coco["images"]}
        name_of = {category["id"]: category["name"] for category in coco["categories"]}
        for key in ("annotations", HARD_NEGATIVES):
            for entry in coco.get(key, []):
                if whose is None or entry.get("objret", {}).get("report_id") not in whose:
                    picked.append((key, entry, image_of[entry["image_id"]], name_of.get(entry.get("category_id"))))
    # A frame both hold keeps the image entry already published (its frame index, source, ...): stable bytes.
    images = {_frame(image): image for image in published["images"]}
    images = {_frame(image): images.get(_frame(image), image) for _, _, image, _ in picked}
    image_id = {frame: n for n, frame in enumerate(sorted(images), start=1)}
    names = sorted({name for *_, name in picked if name is not None})
    category_id = {name: n for n, name in enumerate(names, start=1)}
    merged = {**local, "info": {**local["info"], "pushes": sorted(
                  [p for p in published["info"].get("pushes", []) if p.get("report_id") not in mine]
                  + local["info"].get("pushes", []), key=lambda p: json.dumps(p, sort_keys=True))},
              "images": [{**images[frame], "id": image_id[frame]} for frame in sorted(images)],
              "categories": [{"id": category_id[name], "name": name, "supercategory": name} for name in names],
              "annotations": [], HARD_NEGATIVES: []}

    def order(item):
        key, entry, image, _ = item
        return key, str(entry.get("objret", {}).get("report_id")), _frame(image)

    for key, entry, image, name in sorted(picked, key=order):
        entry = {**copy.deepcopy(entry), "image_id": image_id[_frame(image)], "id": len(merged[key]) + 1}
        if name is not None:
            entry["category_id"] = category_id[name]
        merged[key].append(entry)
    return merged


def _copy_missing_images(source_root: str, dest_root: str, endpoint_url: str | None) -> int:
    source_images = storage.join(source_root, IMAGES_FOLDER)
    local = storage.list_uris(source_images) if os.path.isdir(source_images) else []
    dest_images = storage.join(dest_root, IMAGES_FOLDER)
    try:
        present = {uri.rsplit("/", 1)[-1] for uri in storage.list_uris(dest_images, endpoint_url)}
    except StoreError:
        if storage.is_s3(dest_root):
            raise
        present = set()   # a local destination not made yet
    written = 0
    for uri in local:
        name = os.path.basename(uri)
        if name not in present:   # images are named by frame id and never change
            storage.write_bytes(storage.join(dest_images, name), storage.read_bytes(uri), endpoint_url)
            written += 1
    return written


def publish(source_root: str, dest_root: str, endpoint_url: str | None = None, guard: bool = True) -> int:
    """Publish the dataset at ``source_root`` (a folder) to ``dest_root`` (a folder or S3 prefix), merged with
    what other registries published there (see the module's docstring). A publish that failed (store down) is
    completed by the next. ``guard=False``: a plain overwrite of the merge, for a store without conditional
    writes, where one registry alone may publish. Returns the number of files written."""
    written = _copy_missing_images(source_root, dest_root, endpoint_url)
    local_bytes = storage.read_bytes(storage.join(source_root, ANNOTATIONS_FILE))
    local = parse_annotations(local_bytes, storage.join(source_root, ANNOTATIONS_FILE))
    dest = storage.join(dest_root, ANNOTATIONS_FILE)
    for attempt in range(PUBLISH_ATTEMPTS):
        data, token = storage.read_versioned(dest, endpoint_url)
        try:
            merged = merge_published(parse_annotations(data, dest) if data is not None else None, local)
        except (KeyError, TypeError, AttributeError) as exc:   # valid JSON, but not a dataset objret published
            raise StoreError(f"{dest} cannot be merged into: an entry lacks or misnames {exc}; it was left as it is "
                             "(move it aside to publish afresh)") from exc
        merged_bytes = local_bytes if merged is local else dataset_bytes(merged)
        if merged_bytes == data:
            return written
        if not guard:
            storage.write_bytes(dest, merged_bytes, endpoint_url)   # the commit point
            return written + 1
        if storage.write_if_unchanged(dest, merged_bytes, token, endpoint_url):   # the commit point
            return written + 1
        time.sleep(random.uniform(0.01, 0.05) * min(attempt + 1, 10))   # another publisher won: read again
    raise StoreError(f"cannot publish to {dest}: other publishers changed it {PUBLISH_ATTEMPTS} times in a row")
