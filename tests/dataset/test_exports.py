"""objret dataset export: every format is read back by its tool's own reader, honours the failure kinds, and
never holds a frame a review rejected, whatever version is exported."""

from __future__ import annotations

import io
import json
import shutil
import zipfile
from pathlib import Path

import pytest
import yaml
from PIL import Image

from flows.cli import main
from objret import storage
from objret.config import load_params
from objret.dataset.coco import push
from objret.dataset.decisions import Decisions
from objret.steps.dataset import apply_review, export_dataset
from objret.steps.workspace import Workspace
from tests.dataset.test_coco import PROVENANCE, frame_paths, make_report, mined  # noqa: F401 (frame_paths: a fixture)


class Lake:
    """A registry with three reports' pushes and one review: what every export test reads."""

    def __init__(self, ws: Workspace, frames):
        self.ws, self.frames = ws, frames
        self.ids = [f.frame_id for f in frames]

    @property
    def rejected(self) -> str:
        return self.ids[1]   # rep-fn's box on it was rejected in review (after version 2 was made)


@pytest.fixture
def lake(tmp_path, frame_paths) -> Lake:
    """rep-fn (false negative, person) on frames 0-3; rep-fp (false positive, person) on frames 3-5; rep-mc
    (misclassification: a bicycle the detector called motorcycle) on frames 6-7. Version 1 = rep-fn, version 2 =
    all three, version 3 = after a review rejected rep-fn's frame 1."""
    ws = Workspace(load_params(None, []), tmp_path / "work")
    frames = mined(frame_paths)
    registry = ws.dataset_registry
    pushes = [(make_report("rep-fn"), frames[0:4]),
              (make_report("rep-fp", failure_kind="false_positive"), frames[3:6]),
              (make_report("rep-mc", class_name="bicycle", failure_kind="misclassification",
                           predicted_class="motorcycle"), frames[6:8])]
    for number, (report, chunk) in enumerate(pushes):
        with registry.lock():
            push(str(registry.dataset_dir), report, chunk, PROVENANCE)
            if number != 1:   # rep-fp and rep-mc land in one version
                registry.commit({"report_id": report.report_id})
    result = apply_review(ws, Decisions("rep-fn", accepted=(), rejected=(frames[1].frame_id,)))
    assert result.dvc_version == 3 and result.removed == 1
    return Lake(ws, frames)


def _box_of(frame) -> tuple[float, ...]:
    x, y, w, h = frame.box
    right = min(x + w, frame.width)   # the dataset keeps the part inside the frame
    return (x, y, right - x, h)


@pytest.mark.parametrize("version", [None, "2"])
def test_coco_export_reads_back_in_pycocotools_with_failure_kinds_and_no_rejected_frame(lake, tmp_path, version):
    from pycocotools.coco import COCO

    out = tmp_path / "coco"
    result = export_dataset(lake.ws, "coco", str(out), version)
    coco = COCO(str(out / "annotations.json"))
    # Version 2 still held rep-fn's box on the rejected frame: the review's verdict leaves it out all the same.
    assert result.rejected_left_out == (1 if version == "2" else 0)
    frame_of = {i["id"]: i["frame_id"] for i in coco.dataset["images"]}
    assert set(frame_of.values()) == set(lake.ids) - {lake.rejected}
    names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    assert sorted(names.values()) == ["bicycle", "person"]   # no category for the false positive's "person"
    boxed = {(frame_of[a["image_id"]], names[a["category_id"]], a["attributes"]["report_id"])
             for a in coco.loadAnns(coco.getAnnIds())}
    assert boxed == {(lake.ids[i], "person", "rep-fn") for i in (0, 2, 3)} | \
        {(lake.ids[i], "bicycle", "rep-mc") for i in (6, 7)}
    hard = {(frame_of[h["image_id"]], h["not_class"]) for h in coco.dataset["hard_negatives"]}
    assert hard == {(lake.ids[i], "person") for i in (3, 4, 5)}
    for ann in coco.loadAnns(coco.getAnnIds()):
        frame = lake.frames[lake.ids.index(frame_of[ann["image_id"]])]
        assert ann["bbox"] == pytest.approx(_box_of(frame), abs=0.01)
        assert ann["attributes"]["score"] == pytest.approx(frame.score) and ann["attributes"]["rank"] == frame.rank
        assert ann["attributes"].get("predicted_class") == ("motorcycle" if ann["attributes"]["report_id"] == "rep-mc"
                                                            else None)
    for image in coco.dataset["images"]:   # the frames themselves, decodable, at their size
        with Image.open(out / image["file_name"]) as frame:
            assert frame.size == (image["width"], image["height"])
    assert result.version["number"] == (3 if version is None else 2)


def test_yolo_export_has_normalised_labels_and_background_frames_for_hard_negatives(lake, tmp_path):
    out = tmp_path / "yolo"
    export_dataset(lake.ws, "yolo", str(out))
    data = yaml.safe_load((out / "data.yaml").read_text())
    assert data["names"] == {0: "person", 1: "bicycle"} and "path" not in data
    assert (out / data["train"]).is_dir()
    labels = {p.stem: p.read_text().splitlines() for p in (out / "labels").glob("*.txt")}
    assert set(labels) == set(lake.ids) - {lake.rejected}
    assert {p.stem for p in (out / "images").glob("*.jpg")} == set(labels)   # one label file per image
    for i in (4, 5):   # only the false positive's regions: background, no box under person
        assert labels[lake.ids[i]] == []
    for i, expected_class in ((0, 0), (2, 0), (3, 0), (6, 1), (7, 1)):
        frame = lake.frames[i]
        [line] = labels[frame.frame_id]
        cls, cx, cy, w, h = line.split()
        assert int(cls) == expected_class
        x, y, bw, bh = _box_of(frame)
        assert (float(cx), float(cy), float(w), float(h)) == pytest.approx(
            ((x + bw / 2) / frame.width, (y + bh / 2) / frame.height, bw / frame.width, bh / frame.height), abs=1e-5)


def test_label_studio_tasks_validate_against_their_config_in_the_label_studio_sdk(lake, tmp_path):
    from label_studio_sdk.label_interface import LabelInterface

    out = tmp_path / "ls"
    export_dataset(lake.ws, "label-studio", str(out))
    interface = LabelInterface((out / "label_config.xml").read_text())
    tasks = json.loads((out / "tasks.json").read_text())
    assert {t["data"]["frame_id"] for t in tasks} == set(lake.ids) - {lake.rejected}
    regions = {}
    for task in tasks:
        assert interface.validate_task({"data": task["data"]})   # the SDK's task check cannot take predictions
        assert task["data"]["image"] == f"/data/local-files/?d=images/{task['data']['frame_id']}.jpg"
        assert (out / "images" / f"{task['data']['frame_id']}.jpg").is_file()
        for prediction in task["predictions"]:
            assert interface.validate_prediction(prediction, return_errors=True) == []
            assert prediction["model_version"] == "objret dtm index idx-0001"
            assert prediction["score"] == max(r["score"] for r in prediction["result"])
            for r in prediction["result"]:
                regions[task["data"]["frame_id"], r["from_name"], r["value"]["rectanglelabels"][0]] = r
    assert set(regions) == {(lake.ids[i], "label", "person") for i in (0, 2, 3)} | \
        {(lake.ids[i], "label", "bicycle") for i in (6, 7)} | \
        {(lake.ids[i], "hard_negative", "not person") for i in (3, 4, 5)}
    frame = lake.frames[6]   # percent of the frame, back to pixels
    value = regions[frame.frame_id, "label", "bicycle"]["value"]
    assert (value["x"] * frame.width / 100, value["y"] * frame.height / 100, value["width"] * frame.width / 100,
            value["height"] * frame.height / 100) == pytest.approx(_box_of(frame), abs=0.01)
    assert "detector said motorcycle" in regions[frame.frame_id, "label", "bicycle"]["meta"]["text"][0]


def test_cvat_archive_is_coco_1_0_with_attributes_and_its_images(lake, tmp_path):
    from pycocotools.coco import COCO

    out = tmp_path / "cvat"
    result = export_dataset(lake.ws, "cvat", str(out))
    with zipfile.ZipFile(result.main_uri) as archive:
        names = set(archive.namelist())
        (tmp_path / "instances.json").write_bytes(archive.read("annotations/instances_default.json"))
        coco = COCO(str(tmp_path / "instances.json"))
        for image in coco.dataset["images"]:
            assert f"images/default/{image['file_name']}" in names
            with Image.open(io.BytesIO(archive.read(f"images/default/{image['file_name']}"))) as frame:
                assert frame.size == (image["width"], image["height"])
    assert {i["file_name"] for i in coco.dataset["images"]} == {f"{f}.jpg" for f in lake.ids if f != lake.rejected}
    by_label: dict[str, list[dict]] = {}
    for ann in coco.loadAnns(coco.getAnnIds()):
        by_label.setdefault(coco.cats[ann["category_id"]]["name"], []).append(ann)
    assert {k: len(v) for k, v in by_label.items()} == {"person": 3, "bicycle": 2, "hard_negative": 3}
    assert all(a["attributes"]["not_class"] == "person" for a in by_label["hard_negative"])
    assert all(isinstance(v, (str, int, float, bool)) for a in coco.dataset["annotations"]
               for v in a["attributes"].values())   # CVAT attributes are scalars
    assert json.loads(by_label["bicycle"][0]["attributes"]["evidence"])["template"] == 0.7


def test_fiftyone_export_loads_back_as_detections_with_their_attributes(lake, tmp_path, fiftyone_db):
    fo = fiftyone_db
    out = tmp_path / "fo"
    export_dataset(lake.ws, "fiftyone", str(out))
    dataset = fo.Dataset.from_dir(str(out / "fiftyone"), dataset_type=fo.types.FiftyOneDataset)
    try:
        assert set(dataset.values("frame_id")) == set(lake.ids) - {lake.rejected}
        sample = dataset.match(fo.ViewField("frame_id") == lake.ids[3]).first()
        [box] = sample.mined.detections
        [hard] = sample.hard_negatives.detections
        frame = lake.frames[3]
        assert (box.label, box.report_id, box.rank, box.failure_kind) == ("person", "rep-fn", frame.rank,
                                                                          "false_negative")
        assert box.confidence == pytest.approx(frame.score) and box.evidence["template"] == 0.7
        x, y, w, h = _box_of(frame)
        assert box.bounding_box == pytest.approx([x / frame.width, y / frame.height, w / frame.width,
                                                  h / frame.height], abs=1e-4)
        assert (hard.label, hard.report_id, hard.hard_negative) == ("not person", "rep-fp", True)
        assert Path(sample.filepath).is_file()
    finally:
        dataset.delete()


def test_export_to_s3_names_images_by_uri_and_holds_every_one(lake, s3_store):
    from tests.dataset.test_registry import _bucket

    _bucket(s3_store, "objret-exports")
    out = "s3://objret-exports/mined/ls"
    result = export_dataset(lake.ws, "label-studio", out)
    tasks = json.loads(storage.read_bytes(result.main_uri))
    assert {t["data"]["image"] for t in tasks} == {f"{out}/images/{f}.jpg" for f in lake.ids if f != lake.rejected}
    assert all(storage.exists(t["data"]["image"]) for t in tasks)


def test_cli_exports_a_version_and_names_bad_ones(lake, tmp_path, capsys):
    workdir = str(lake.ws.root)
    assert main(["dataset", "export", "--format", "yolo", "--out", str(tmp_path / "y1"), "--version", "1",
                 "--workdir", workdir]) == 0
    out = capsys.readouterr().out
    # Version 1 = rep-fn's four frames, less the one rejected since.
    assert "exported dataset version 1" in out and "3 frames, 3 boxes, 0 hard negatives" in out
    assert "1 boxes left out (rejected in review)" in out and "yolo detect train data=" in out
    assert main(["dataset", "export", "--format", "coco", "--out", str(tmp_path / "c"), "--version", "9",
                 "--workdir", workdir]) == 1
    assert "no dataset version matches '9'" in capsys.readouterr().err
    # A version whose files left the cache, with no DVC remote to fetch them from: said so, nothing written.
    shutil.rmtree(lake.ws.dataset_registry.root / ".dvc" / "cache")
    assert main(["dataset", "export", "--format", "coco", "--out", str(tmp_path / "c"), "--workdir", workdir]) == 1
    assert "not in the DVC cache" in capsys.readouterr().err and not (tmp_path / "c").exists()
