"""objret.dataset.coco: pushes of mined bench frames give a valid COCO dataset, idempotent and crash-safe."""

import hashlib
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from objret import storage
from objret.dataset.coco import MinedFrame, load_dataset, push, remove_frames, report_boxes
from objret.errors import ObjretError, StoreError
from objret.mining.report import parse_report

PROVENANCE = {"backbone": "efficientnet_lite2", "index_version": "idx-0001", "method": "dtm"}


@pytest.fixture
def frame_paths(bench_dir) -> list[Path]:
    """Eight real frames of the test bench's tud_campus set (640x480 JPEGs)."""
    paths = sorted((bench_dir / "tud_campus" / "images").glob("*.jpg"))[:8]
    assert len(paths) == 8, f"tud_campus frames missing under {bench_dir}"
    return paths


def make_report(report_id="rep-1", class_name="person", failure_kind="false_negative", **extra):
    return parse_report(
        {
            "report_id": report_id,
            "detector": {"name": "yolov8n", "version": "1.0"},
            "frame": {"uri": "lake/cam1/000001.jpg"},
            "box": [10, 20, 30, 60],
            "class_name": class_name,
            "failure_kind": failure_kind,
            **extra,
        }
    )


def mined(paths, first_rank=1, score=0.9) -> list[MinedFrame]:
    frames = []
    for i, path in enumerate(paths):
        with Image.open(path) as image:
            width, height = image.size
        frames.append(
            MinedFrame(
                frame_id=hashlib.sha256(path.read_bytes()).hexdigest(),
                uri=str(path),
                image_uri=str(path),
                width=width,
                height=height,
                score=round(score - 0.01 * i, 4),
                # The last box runs past the right edge: the dataset keeps the part inside the frame.
                box=(50.0 + 10 * i, 40.0, 60.0, 120.0) if i < len(paths) - 1 else (width - 30.0, 10, 60, 50),
                rank=first_rank + i,
                frame_index=i,
                time_s=i / 25,
                evidence={"template": 0.7, "scale": 1.0},
            )
        )
    return frames


def check_valid_coco(coco: dict) -> None:
    images = {image["id"]: image for image in coco["images"]}
    categories = {category["id"] for category in coco["categories"]}
    assert len(images) == len(coco["images"]), "image ids must be unique"
    assert len({ann["id"] for ann in coco["annotations"]}) == len(coco["annotations"]), "annotation ids unique"
    assert len({image["frame_id"] for image in coco["images"]}) == len(images), "one image per frame"
    for ann in coco["annotations"]:
        image = images[ann["image_id"]]
        assert ann["category_id"] in categories
        x, y, w, h = ann["bbox"]
        assert x >= 0 and y >= 0 and w > 0 and h > 0
        assert x + w <= image["width"] and y + h <= image["height"]
        assert ann["area"] == pytest.approx(w * h, abs=0.01)
        assert ann["iscrowd"] == 0
    keys = [(ann["objret"]["report_id"], images[ann["image_id"]]["frame_id"]) for ann in coco["annotations"]]
    assert len(set(keys)) == len(keys), "one annotation per (report, frame)"


def test_push_creates_images_and_a_valid_coco_dataset(tmp_path, frame_paths):
    root = tmp_path / "ds"
    frames = mined(frame_paths[:5])
    result = push(str(root), make_report(), frames, PROVENANCE)

    data = (root / "annotations.json").read_bytes()
    assert (result.added, result.unchanged, result.changed) == (5, 0, True)
    assert result.annotations_uri == str(root / "annotations.json")
    assert result.version == hashlib.sha256(data).hexdigest()[:12]

    coco = json.loads(data)
    check_valid_coco(coco)
    assert [c["name"] for c in coco["categories"]] == ["person"]
    assert len(coco["images"]) == len(coco["annotations"]) == 5
    for frame, image in zip(frames, coco["images"]):
        assert image["file_name"] == f"images/{frame.frame_id}.jpg"
        assert (root / image["file_name"]).read_bytes() == Path(frame.image_uri).read_bytes()
        assert (image["width"], image["height"]) == (640, 480)
        assert (image["source_uri"], image["frame_index"]) == (frame.uri, frame.frame_index)
        assert image["time_s"] == pytest.approx(frame.time_s)

    first, last = coco["annotations"][0], coco["annotations"][-1]
    assert first["bbox"] == [50.0, 40.0, 60.0, 120.0]
    assert last["bbox"] == [610.0, 10.0, 30.0, 50.0]  # clipped to the frame
    assert first["objret"] == {
        **PROVENANCE,
        "report_id": "rep-1",
        "failure_kind": "false_negative",
        "detector": {"name": "yolov8n", "version": "1.0"},
        "rank": 1,
        "score": 0.9,
        "evidence": {"template": 0.7, "scale": 1.0},
    }
    assert coco["info"]["pushes"] == [
        {"report_id": "rep-1", "frames": 5, "added": 5, "updated": 0, "parent_version": None}
    ]
    assert load_dataset(str(root)) == coco


def test_pushing_the_same_report_twice_changes_nothing(tmp_path, frame_paths):
    root = tmp_path / "ds"
    first = push(str(root), make_report(), mined(frame_paths[:5]), PROVENANCE)
    before = (root / "annotations.json").read_bytes()
    files_before = sorted(p.name for p in (root / "images").iterdir())

    again = push(str(root), make_report(), mined(frame_paths[:5]), PROVENANCE)

    assert (again.added, again.unchanged, again.updated, again.changed) == (0, 5, 0, False)
    assert again.version == first.version
    assert (root / "annotations.json").read_bytes() == before
    assert sorted(p.name for p in (root / "images").iterdir()) == files_before


def test_second_report_adds_annotations_to_existing_images(tmp_path, frame_paths):
    root = tmp_path / "ds"
    first = push(str(root), make_report("rep-1"), mined(frame_paths[:5]), PROVENANCE)
    # Frames 3 and 4 are mined by both reports; the second report is about another class.
    second = push(str(root), make_report("rep-2", class_name="bicycle"), mined(frame_paths[3:8]), PROVENANCE)

    assert (second.added, second.unchanged, second.changed) == (5, 0, True)
    coco = load_dataset(str(root))
    check_valid_coco(coco)
    assert len(coco["images"]) == 8
    assert len(coco["annotations"]) == 10
    assert [(c["id"], c["name"]) for c in coco["categories"]] == [(1, "person"), (2, "bicycle")]
    shared = {image["id"] for image in coco["images"] if image["source_uri"] in map(str, frame_paths[3:5])}
    for image_id in shared:
        reports = sorted(a["objret"]["report_id"] for a in coco["annotations"] if a["image_id"] == image_id)
        assert reports == ["rep-1", "rep-2"]
    assert [p["parent_version"] for p in coco["info"]["pushes"]] == [None, first.version]
    assert len(list((root / "images").iterdir())) == 8


def test_new_values_for_a_known_report_and_frame_update_it_in_place(tmp_path, frame_paths):
    root = tmp_path / "ds"
    push(str(root), make_report(), mined(frame_paths[:3]), PROVENANCE)
    ids_before = [a["id"] for a in load_dataset(str(root))["annotations"]]

    result = push(str(root), make_report(), mined(frame_paths[:3], score=0.5), PROVENANCE)

    assert (result.added, result.updated, result.changed) == (0, 3, True)
    coco = load_dataset(str(root))
    assert [a["id"] for a in coco["annotations"]] == ids_before
    assert coco["annotations"][0]["objret"]["score"] == 0.5


def test_without_copying_images_reference_their_source(tmp_path, frame_paths):
    root = tmp_path / "ds"
    frames = mined(frame_paths[:3])
    push(str(root), make_report(), frames, PROVENANCE, copy_frames=False)

    assert not (root / "images").exists()
    coco = load_dataset(str(root))
    check_valid_coco(coco)
    for frame, image in zip(frames, coco["images"]):
        assert image["file_name"] == image["coco_url"] == frame.image_uri
        assert Path(image["coco_url"]).is_file()


def test_a_failed_copy_leaves_the_previous_dataset_intact(tmp_path, frame_paths):
    root = tmp_path / "ds"
    first = push(str(root), make_report("rep-1"), mined(frame_paths[:2]), PROVENANCE)
    before = (root / "annotations.json").read_bytes()

    reads = []

    def failing_on_third_read(uri):
        reads.append(uri)
        if len(reads) == 3 and not failed:
            failed.append(uri)
            raise OSError("connection reset")
        return Path(uri).read_bytes()

    failed = []

    second_frames = mined(frame_paths[2:7])
    with pytest.raises(StoreError, match="connection reset"):
        push(str(root), make_report("rep-2"), second_frames, PROVENANCE, read_image=failing_on_third_read)
    assert (root / "annotations.json").read_bytes() == before
    assert load_dataset(str(root))["info"]["pushes"][-1]["report_id"] == "rep-1"

    # The retry reads only the frames not copied yet: the two copied before the failure are reused.
    reads.clear()
    retry = push(str(root), make_report("rep-2"), second_frames, PROVENANCE, read_image=failing_on_third_read)
    assert (retry.added, retry.changed) == (5, True)
    assert reads == [f.image_uri for f in second_frames[2:]]
    coco = load_dataset(str(root))
    check_valid_coco(coco)
    assert len(coco["annotations"]) == 7
    assert coco["info"]["pushes"][-1]["parent_version"] == first.version
    for image in coco["images"]:
        assert (root / image["file_name"]).read_bytes() == Path(image["source_uri"]).read_bytes()


def test_a_frame_that_is_not_a_jpeg_is_stored_as_one(tmp_path, frame_paths):
    png = tmp_path / "frame.png"
    Image.open(frame_paths[0]).save(png)
    frame = mined([png])[0]
    push(str(tmp_path / "ds"), make_report(), [frame], PROVENANCE)
    with Image.open(tmp_path / "ds" / "images" / f"{frame.frame_id}.jpg") as stored:
        assert (stored.format, stored.size) == ("JPEG", (640, 480))


def test_bad_mined_frames_are_rejected_before_anything_is_written(tmp_path, frame_paths):
    root = tmp_path / "ds"
    good = mined(frame_paths[:1])[0]
    outside = MinedFrame(**{**vars(good), "frame_id": "f" * 64, "rank": 2, "box": (700.0, 10.0, 20.0, 20.0)})
    with pytest.raises(ObjretError, match="lies outside the 640x480 frame"):
        push(str(root), make_report(), [good, outside], PROVENANCE)
    unsafe = MinedFrame(**{**vars(good), "frame_id": "../escape"})
    with pytest.raises(ObjretError, match="cannot be a file name"):
        push(str(root), make_report(), [unsafe], PROVENANCE)
    assert not root.exists()


def test_an_empty_root_loads_as_an_empty_dataset(tmp_path):
    coco = load_dataset(str(tmp_path / "nothing-yet"))
    assert coco["images"] == coco["annotations"] == coco["categories"] == []
    assert coco["info"]["pushes"] == []


def test_push_and_read_back_on_s3(request, frame_paths):
    try:
        store = request.getfixturevalue("s3_store")
    except pytest.FixtureLookupError:
        pytest.skip("no s3_store fixture (tests/conftest.py)")
    endpoint = store.endpoint_url
    client = storage.s3_client(endpoint)
    bucket = "objret-dataset-test"
    if bucket not in [b["Name"] for b in client.list_buckets().get("Buckets", [])]:
        client.create_bucket(Bucket=bucket)
    root = f"s3://{bucket}/ds"

    frames = mined(frame_paths[:3])
    first = push(root, make_report(), frames, PROVENANCE, endpoint_url=endpoint)
    again = push(root, make_report(), frames, PROVENANCE, endpoint_url=endpoint)

    assert first.annotations_uri == f"{root}/annotations.json"
    assert (first.added, again.changed, again.version) == (3, False, first.version)
    coco = load_dataset(root, endpoint_url=endpoint)
    check_valid_coco(coco)
    assert len(coco["annotations"]) == 3
    stored = storage.list_uris(root, endpoint_url=endpoint)
    assert stored == sorted([f"{root}/annotations.json"] + [f"{root}/images/{f.frame_id}.jpg" for f in frames])
    image_bytes = storage.read_bytes(f"{root}/images/{frames[0].frame_id}.jpg", endpoint_url=endpoint)
    assert image_bytes == Path(frames[0].image_uri).read_bytes()
    assert Image.open(io.BytesIO(image_bytes)).size == (640, 480)


# --- failure kinds keep their meaning (objret.dataset.labels) ------------------------------------------------


def test_a_false_positives_frames_go_in_as_hard_negatives_never_under_its_class(tmp_path, frame_paths):
    """A stroller taken for a person: the frames mined for it must not teach 'person' on strollers."""
    root = tmp_path / "ds"
    push(str(root), make_report("missed", "person"), mined(frame_paths[:2]), PROVENANCE)
    frames = mined(frame_paths[1:4])
    push(str(root), make_report("stroller", "person", "false_positive"), frames, PROVENANCE)

    coco = load_dataset(str(root))
    check_valid_coco(coco)
    assert [a["objret"]["report_id"] for a in coco["annotations"]] == ["missed", "missed"]   # none of the stroller
    negatives = coco["hard_negatives"]
    assert [n["objret"]["report_id"] for n in negatives] == ["stroller"] * 3
    images = {image["id"]: image for image in coco["images"]}
    assert [images[n["image_id"]]["frame_id"] for n in negatives] == [f.frame_id for f in frames]
    for frame, negative in zip(frames, negatives):
        assert "category_id" not in negative and negative["not_class"] == "person"
        assert negative["objret"]["failure_kind"] == "false_positive" and negative["objret"]["rank"] == frame.rank
    assert negatives[0]["bbox"] == [50.0, 40.0, 60.0, 120.0]
    # COCO's own reader takes the dataset as it is (the hard negatives' frames are images without a box).
    pycocotools = pytest.importorskip("pycocotools.coco")
    api = pycocotools.COCO(str(root / "annotations.json"))
    person = api.getCatIds(catNms=["person"])
    assert sorted(api.getImgIds(catIds=person)) == sorted({a["image_id"] for a in coco["annotations"]})
    assert len(api.getImgIds()) == 4

    # The labeller's verdicts and a review's feedback see them like annotations.
    assert set(report_boxes(str(root), "stroller")) == {f.frame_id for f in frames}
    removed = remove_frames(str(root), "stroller", [frames[2].frame_id])
    assert (removed.removed, removed.images_removed, removed.kept) == (1, 1, 2)
    assert len(load_dataset(str(root))["hard_negatives"]) == 2


def test_a_misclassification_is_boxed_under_the_true_class_with_what_the_detector_said(tmp_path, frame_paths):
    root = tmp_path / "ds"
    report = make_report("bike", "bicycle", "misclassification", predicted_class="motorcycle")
    push(str(root), report, mined(frame_paths[:3]), PROVENANCE)
    coco = load_dataset(str(root))
    check_valid_coco(coco)
    assert [c["name"] for c in coco["categories"]] == ["bicycle"]
    assert {a["objret"]["predicted_class"] for a in coco["annotations"]} == {"motorcycle"}
    assert "hard_negatives" not in coco   # plain COCO when there are none
    older = make_report("old-bike", "bicycle", "misclassification")   # written before predicted_class
    push(str(root), older, mined(frame_paths[:1]), PROVENANCE)
    assert "predicted_class" not in load_dataset(str(root))["annotations"][-1]["objret"]


def test_a_false_positive_boxed_under_its_class_before_moves_to_the_hard_negatives(tmp_path, frame_paths):
    """Datasets written by an objret that boxed false positives under their class are mended by the next push."""
    root = tmp_path / "ds"
    frames = mined(frame_paths[:2])
    push(str(root), make_report("stroller", "person"), frames, PROVENANCE)   # as the old rule wrote it
    coco = load_dataset(str(root))
    for ann in coco["annotations"]:
        ann["objret"]["failure_kind"] = "false_positive"
    (root / "annotations.json").write_text(json.dumps(coco))

    result = push(str(root), make_report("stroller", "person", "false_positive"), frames, PROVENANCE)
    assert (result.added, result.updated) == (0, 2)
    coco = load_dataset(str(root))
    assert coco["annotations"] == [] and len(coco["hard_negatives"]) == 2
    assert push(str(root), make_report("stroller", "person", "false_positive"), frames, PROVENANCE).changed is False
