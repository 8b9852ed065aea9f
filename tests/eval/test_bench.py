"""objret.eval.bench: the real bench loads with the published positives; a hand-made bench pins the rules."""

import copy
import json
from pathlib import Path

import pytest
from PIL import Image

from objret.eval.bench import load_bench
from objret.errors import ObjretError



# --- the real bench -------------------------------------------------------------------------------


def test_real_bench_counts(real_bench):
    """tests/data/bench: the real subset of the bench made by scripts/make_test_bench.py (tests/data/README.md)."""
    assert len(real_bench.queries) == 79
    assert sum(q.kind == "class" for q in real_bench.queries) == 56
    assert sum(q.kind == "instance" for q in real_bench.queries) == 23
    assert real_bench.sets == ["coco_mini", "kitti_0005", "paste_visible", "pets09_s2l1",
                               "tud_campus", "tud_stadtmitte"]
    assert len(real_bench.images) == 44 + 4 + 18 + 31 + 27 + 12


def test_real_bench_positives_match_num_positives(real_bench):
    mismatched = {q.id: (len(real_bench.positives(q)), q.num_positives)
                  for q in real_bench.queries if len(real_bench.positives(q)) != q.num_positives}
    assert mismatched == {}


def test_real_bench_gallery_and_boxes(real_bench):
    for q in real_bench.queries:
        gallery = real_bench.gallery_keys(q)
        assert len(gallery) == len(set(gallery))
        assert real_bench.positives(q) <= set(gallery)
        assert q.key not in gallery and not (q.junk & set(gallery))
        assert q.bbox in real_bench.gt_boxes(q, q.key)  # the query box is one of its object's boxes
    paste = [q for q in real_bench.queries if q.set == "paste_visible"]
    assert len(paste) == 13
    for q in paste:  # the whole lake minus the query image and the cut-out's source image
        assert len(real_bench.gallery_keys(q)) == len(real_bench.images) - 2
        assert len(q.junk) == 1 and next(iter(q.junk))[0] == "coco_mini"
    video = [q for q in real_bench.queries if q.kind == "instance" and q.set != "paste_visible"]
    assert len(video) == 10
    assert all(real_bench.is_video_set(q.set) and q.key in q.junk for q in video)


# --- a tiny hand-made bench ----------------------------------------------------------------------
#
# street: a video set, image id = frame + 1 (as in KITTI); track 1 (person) in ids 2..8,
#         track 2 (car) in ids 3, 4.
# photos: still images 101..105; person in 101, crowd person + car in 102, car in 103,
#         dog track 9 in 101, 104, 105. Its car has category id 5 (street: 3): matched by name.

STREET_IDS = range(1, 9)
PHOTO_IDS = range(101, 106)
CROP = (64, 48)


def _ann(ann_id, image_id, category_id, bbox, track_id=None, iscrowd=0):
    ann = {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox,
           "area": bbox[2] * bbox[3], "iscrowd": iscrowd}
    if track_id is not None:
        ann["track_id"] = track_id
    return ann


def tiny_bench_json() -> dict:
    """Everything the tiny bench holds, as {relative path: json content}."""
    street = {
        "images": [{"id": i, "file_name": f"images/{i:06d}.jpg", "width": CROP[0], "height": CROP[1],
                    "frame": i - 1} for i in STREET_IDS],
        "annotations": [_ann(i, i, 1, [10, 5, 12, 30], track_id=1) for i in range(2, 9)]
        + [_ann(100 + i, i, 3, [30, 20, 20, 10], track_id=2) for i in (3, 4)],
        "categories": [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}],
    }
    photos = {
        "images": [{"id": i, "file_name": f"images/{i}.jpg", "width": CROP[0], "height": CROP[1]}
                   for i in PHOTO_IDS],
        "annotations": [
            _ann(1, 101, 1, [1, 1, 20, 40]),
            _ann(2, 102, 1, [0, 0, 64, 48], iscrowd=1),
            _ann(3, 102, 5, [5, 5, 10, 10]),
            _ann(4, 103, 5, [30, 10, 25, 15]),
            _ann(5, 101, 18, [40, 20, 16, 16], track_id=9),
            _ann(6, 104, 18, [2, 2, 16, 16], track_id=9),
            _ann(7, 105, 18, [8, 8, 16, 16], track_id=9),
        ],
        "categories": [{"id": 1, "name": "person"}, {"id": 5, "name": "car"}, {"id": 18, "name": "dog"}],
    }

    def query(qid, set_name, image_id, bbox, category, kind, gallery, num_positives, track_id=None,
              junk_frames=None, junk_images=None):
        return {"id": qid, "set": set_name, "image_id": image_id, "file": "", "bbox": bbox,
                "category": category, "kind": kind, "track_id": track_id,
                "area_frac": bbox[2] * bbox[3] / (CROP[0] * CROP[1]), "gallery": gallery,
                "junk_frames": junk_frames, "junk_images": junk_images, "num_positives": num_positives}

    queries = [
        query("qc_person", "photos", 101, [1, 1, 20, 40], "person", "class", ["photos"], 1),
        query("qc_car", "photos", 103, [30, 10, 25, 15], "car", "class", ["photos", "street"], 3),
        query("qi_track", "street", 4, [10, 5, 12, 30], "person", "instance", ["street"], 4,
              track_id=1, junk_frames=[2, 4]),
        query("qp_dog", "photos", 104, [2, 2, 16, 16], "dog", "instance", ["photos", "street"], 1,
              track_id=9, junk_images=[{"set": "photos", "image_id": 105}]),
        # junk_frames on a class query: junk is removed from the positives too (README rule).
        query("qc_street_person", "street", 2, [10, 5, 12, 30], "person", "class", ["street"], 5,
              junk_frames=[0, 2]),
    ]
    return {"street/annotations.json": street, "photos/annotations.json": photos,
            "queries.json": {"version": 1, "queries": queries}}


def write_bench(root: Path, content: dict) -> Path:
    for rel, data in content.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(data if isinstance(data, str) else json.dumps(data))
    return root


@pytest.fixture
def tiny_root(tmp_path, bench_dir):
    """The tiny bench with real JPEG crops of test-bench images."""
    root = write_bench(tmp_path / "tiny", tiny_bench_json())
    sources = sorted((bench_dir / "pets09_s2l1" / "images").glob("*.jpg"))[:8] + \
        sorted((bench_dir / "coco_mini" / "images").glob("*.jpg"))[:5]
    targets = [root / "street" / "images" / f"{i:06d}.jpg" for i in STREET_IDS] + \
        [root / "photos" / "images" / f"{i}.jpg" for i in PHOTO_IDS]
    for n, target in enumerate(targets):
        target.parent.mkdir(parents=True, exist_ok=True)
        if n < len(sources):
            with Image.open(sources[n]) as im:
                crop = im.crop((100, 100, 100 + CROP[0], 100 + CROP[1]))
        else:
            crop = Image.new("RGB", CROP, (128, 128, 128))
        crop.save(target, quality=90)
    return root


def test_tiny_bench_loads(tiny_root):
    bench = load_bench(tiny_root)
    assert bench.sets == ["photos", "street"]
    assert len(bench.images) == 13
    image = bench.images[("street", 4)]
    assert image.frame == 3 and image.path == tiny_root / "street" / "images" / "000004.jpg"
    assert image.path.is_file() and bench.images[("photos", 101)].frame is None
    assert bench.is_video_set("street") and not bench.is_video_set("photos")
    assert [q.id for q in bench.queries] == ["qc_person", "qc_car", "qi_track", "qp_dog", "qc_street_person"]


def test_tiny_bench_class_positives_match_by_name_and_count_crowd(tiny_root):
    bench = load_bench(tiny_root)
    person, car = bench.query("qc_person"), bench.query("qc_car")
    assert bench.positives(person) == {("photos", 102)}  # a crowd box counts
    assert bench.gallery_keys(person) == [("photos", i) for i in (102, 103, 104, 105)]
    assert bench.positives(car) == {("photos", 102), ("street", 3), ("street", 4)}
    assert set(bench.gallery_keys(car)) == ({("photos", i) for i in (101, 102, 104, 105)}
                                            | {("street", i) for i in STREET_IDS})
    assert bench.gt_boxes(car, ("street", 3)) == [(30.0, 20.0, 20.0, 10.0)]
    assert bench.gt_boxes(car, ("photos", 101)) == []


def test_tiny_bench_junk_frames_use_frame_numbers(tiny_root):
    bench = load_bench(tiny_root)
    q = bench.query("qi_track")
    assert q.gallery == ("street",) and q.track_id == 1
    assert q.junk == {("street", 3), ("street", 4), ("street", 5)}  # frames 2, 3, 4
    assert bench.positives(q) == {("street", 2), ("street", 6), ("street", 7), ("street", 8)}
    assert bench.gallery_keys(q) == [("street", i) for i in (1, 2, 6, 7, 8)]
    assert bench.gt_boxes(q, ("street", 6)) == [(10.0, 5.0, 12.0, 30.0)]
    assert bench.gt_boxes(q, ("street", 1)) == []


def test_tiny_bench_junk_images_and_whole_lake_gallery(tiny_root):
    bench = load_bench(tiny_root)
    q = bench.query("qp_dog")
    assert q.junk == {("photos", 105)}
    assert bench.positives(q) == {("photos", 101)}
    assert set(bench.gallery_keys(q)) == ({("photos", i) for i in (101, 102, 103)}
                                          | {("street", i) for i in STREET_IDS})
    # track ids belong to their set: no street image holds "track 9"
    assert bench.gt_boxes(q, ("photos", 101)) == [(40.0, 20.0, 16.0, 16.0)]
    assert bench.gt_boxes(q, ("street", 2)) == []


def test_tiny_bench_class_query_with_junk_frames(tiny_root):
    bench = load_bench(tiny_root)
    q = bench.query("qc_street_person")
    assert q.junk == {("street", 1), ("street", 2), ("street", 3)}
    assert bench.positives(q) == {("street", i) for i in range(4, 9)}
    assert all(len(bench.positives(q)) == q.num_positives for q in bench.queries)


def test_query_without_gallery_uses_its_own_set(tmp_path):
    content = tiny_bench_json()
    for q in content["queries.json"]["queries"]:
        q.pop("gallery")
    bench = load_bench(write_bench(tmp_path, content))
    assert bench.query("qc_car").gallery == ("photos",)
    assert bench.positives(bench.query("qc_car")) == {("photos", 102)}


def test_bare_query_list_is_accepted(tmp_path):
    content = tiny_bench_json()
    content["queries.json"] = content["queries.json"]["queries"]
    assert len(load_bench(write_bench(tmp_path, content)).queries) == 5


# --- malformed input -----------------------------------------------------------------------------


def _broken(tmp_path, edit):
    content = copy.deepcopy(tiny_bench_json())
    edit(content)
    return write_bench(tmp_path / "broken", content)


def _expect_error(root, *fragments):
    with pytest.raises(ObjretError) as info:
        load_bench(root)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_missing_folder_or_sets(tmp_path):
    _expect_error(tmp_path / "nowhere", "nowhere")
    (tmp_path / "empty").mkdir()
    _expect_error(tmp_path / "empty", "annotations.json")


def test_missing_queries_json(tmp_path):
    root = _broken(tmp_path, lambda c: c.pop("queries.json"))
    _expect_error(root, str(root / "queries.json"))


def test_unparsable_json_names_the_file(tmp_path):
    root = _broken(tmp_path, lambda c: c.update({"street/annotations.json": "{not json"}))
    _expect_error(root, str(root / "street" / "annotations.json"))
    root = _broken(tmp_path, lambda c: c.update({"queries.json": "[1, 2"}))
    _expect_error(root, str(root / "queries.json"))


def test_annotations_missing_a_field(tmp_path):
    root = _broken(tmp_path, lambda c: c["photos/annotations.json"].pop("images"))
    _expect_error(root, str(root / "photos" / "annotations.json"), "images")


def test_annotation_with_unknown_image(tmp_path):
    root = _broken(tmp_path, lambda c: c["photos/annotations.json"]["annotations"][0].update(image_id=999))
    _expect_error(root, str(root / "photos" / "annotations.json"), "999")


def test_queries_not_a_list(tmp_path):
    root = _broken(tmp_path, lambda c: c.update({"queries.json": {"queries": "none"}}))
    _expect_error(root, str(root / "queries.json"))


@pytest.mark.parametrize("field, value, fragment", [
    ("set", "nowhere", "nowhere"),
    ("image_id", 999, "999"),
    ("gallery", ["photos", "attic"], "attic"),
    ("junk_images", [{"set": "photos", "image_id": 998}], "998"),
    ("kind", "scene", "scene"),
])
def test_query_naming_unknown_things(tmp_path, field, value, fragment):
    root = _broken(tmp_path, lambda c: c["queries.json"]["queries"][1].update({field: value}))
    _expect_error(root, str(root / "queries.json"), "qc_car", fragment)


def test_query_missing_bbox(tmp_path):
    root = _broken(tmp_path, lambda c: c["queries.json"]["queries"][0].pop("bbox"))
    _expect_error(root, str(root / "queries.json"), "qc_person", "bbox")


def test_duplicate_query_id(tmp_path):
    root = _broken(tmp_path, lambda c: c["queries.json"]["queries"][1].update(id="qc_person"))
    _expect_error(root, "duplicate query id qc_person")
