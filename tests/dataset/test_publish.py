"""Publishing to a root that registries on several machines share: merged by report, guarded by a conditional
write. Checked on a local folder and on SeaweedFS (whose If-Match / If-None-Match PUTs answer 412 when the ETag
moved on), with the race made to happen: another registry publishes between a publisher's read and its write."""

from __future__ import annotations

import json

import pytest

from objret import storage
from objret.dataset import publish as publishing
from objret.dataset.coco import push, remove_frames
from objret.dataset.publish import merge_published, publish
from objret.errors import StoreError
from tests.dataset.test_coco import PROVENANCE, check_valid_coco, frame_paths, make_report, mined  # noqa: F401

BUCKET = "objret-shared"


@pytest.fixture(params=["folder", "s3"])
def shared_root(request, tmp_path):
    if request.param == "folder":
        return str(tmp_path / "published")
    store = request.getfixturevalue("s3_store")
    client = store.client()
    if BUCKET not in [b["Name"] for b in client.list_buckets().get("Buckets", [])]:
        client.create_bucket(Bucket=BUCKET)
    return f"s3://{BUCKET}/{request.node.name}"


def _pairs(root: str) -> set[tuple[str, str]]:
    """(report, frame) of every entry published at ``root``, checked to be one consistent COCO dataset."""
    coco = json.loads(storage.read_bytes(f"{root}/annotations.json"))
    check_valid_coco(coco)
    frame_of = {image["id"]: image["frame_id"] for image in coco["images"]}
    pairs = [(e["objret"]["report_id"], frame_of[e["image_id"]]) for e in coco["annotations"]]
    assert len(pairs) == len(set(pairs))
    images = {uri.rsplit("/", 1)[-1] for uri in storage.list_uris(f"{root}/images")}
    assert {f"{frame}.jpg" for _, frame in pairs} <= images   # every frame's image is there
    return set(pairs)


def _registry(tmp_path, name: str, reports: dict, frame_paths) -> tuple[str, set]:
    """A registry's dataset folder with ``reports`` ({report_id: frame indexes}) pushed; its (report, frame)s."""
    root = str(tmp_path / name)
    pairs = set()
    for report_id, picked in reports.items():
        frames = mined([frame_paths[i] for i in picked])
        push(root, make_report(report_id), frames, PROVENANCE)
        pairs |= {(report_id, f.frame_id) for f in frames}
    return root, pairs


def test_two_registries_publish_the_union_by_report_and_a_review_s_removal_reaches_it(
        tmp_path, frame_paths, shared_root):
    a, a_pairs = _registry(tmp_path, "a", {"rep-a1": [0, 1, 2], "rep-a2": [2, 3]}, frame_paths)
    b, b_pairs = _registry(tmp_path, "b", {"rep-b1": [3, 4, 5]}, frame_paths)   # frame 3 in both
    assert publish(a, shared_root) == 5                 # 4 images + annotations.json
    assert publish(b, shared_root) == 3                 # the 2 images A lacked + the merged annotations
    assert _pairs(shared_root) == a_pairs | b_pairs
    assert publish(a, shared_root) == 0 and publish(b, shared_root) == 0   # nothing new: nothing written

    dropped = sorted(b_pairs)[0][1]
    remove_frames(b, "rep-b1", [dropped])               # a review on B's machine
    publish(b, shared_root)
    assert _pairs(shared_root) == a_pairs | (b_pairs - {("rep-b1", dropped)})


def test_one_registry_alone_publishes_its_own_bytes(tmp_path, frame_paths, shared_root):
    a, _ = _registry(tmp_path, "a", {"rep-a1": [0, 1]}, frame_paths)
    publish(a, shared_root)
    assert storage.read_bytes(f"{shared_root}/annotations.json") == (tmp_path / "a" / "annotations.json").read_bytes()
    local = json.loads((tmp_path / "a" / "annotations.json").read_text())
    assert merge_published(None, local) is local and merge_published(local, local) is local


@pytest.mark.parametrize("guard", [True, False], ids=["guarded", "unguarded"])
def test_a_publish_racing_another_loses_nothing_only_with_the_guard(tmp_path, frame_paths, shared_root,
                                                                    monkeypatch, guard):
    a, a_pairs = _registry(tmp_path, "a", {"rep-a1": [0, 1]}, frame_paths)
    b, b_pairs = _registry(tmp_path, "b", {"rep-b1": [2, 3]}, frame_paths)
    real_read = storage.read_versioned
    raced = []

    def read_then_b_publishes(uri, endpoint_url=None):
        found = real_read(uri, endpoint_url)
        if not raced:   # B publishes between A's read and A's write
            raced.append(True)
            monkeypatch.setattr(publishing.storage, "read_versioned", real_read)
            publish(b, shared_root, guard=guard)
        return found

    monkeypatch.setattr(publishing.storage, "read_versioned", read_then_b_publishes)
    publish(a, shared_root, guard=guard)
    published = _pairs(shared_root)
    if guard:   # A's conditional write failed on B's version, A read again and merged B's report in
        assert published == a_pairs | b_pairs
    else:       # A overwrote B's publish with a merge of what it read before: B's frames are lost
        assert published == a_pairs


def test_the_write_is_conditional_on_the_version_read(tmp_path, shared_root):
    uri = f"{shared_root}/annotations.json"
    assert storage.read_versioned(uri) == (None, None)
    assert storage.write_if_unchanged(uri, b"v1", None)
    assert not storage.write_if_unchanged(uri, b"v1 again", None)   # something is there now
    data, token = storage.read_versioned(uri)
    assert data == b"v1"
    assert storage.write_if_unchanged(uri, b"v2", token)
    assert not storage.write_if_unchanged(uri, b"v3", token)         # stale: v2 is there
    assert storage.read_bytes(uri) == b"v2"


def test_a_published_file_that_is_not_a_dataset_of_objret_is_named_and_left_alone(tmp_path, frame_paths):
    a, _ = _registry(tmp_path, "a", {"rep-a1": [0, 1]}, frame_paths)
    shared = tmp_path / "published"
    shared.mkdir()
    foreign = {"images": [{"id": 1, "file_name": "x.jpg"}], "categories": [],
               "annotations": [{"id": 1, "image_id": 7, "objret": {"report_id": "other"}}]}   # image 7: none
    (shared / "annotations.json").write_text(json.dumps(foreign))
    with pytest.raises(StoreError, match=rf"{shared / 'annotations.json'} cannot be merged into: .*7.*left as it is"):
        publish(a, str(shared))
    assert json.loads((shared / "annotations.json").read_text()) == foreign
