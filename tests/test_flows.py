"""The Prefect flows end to end on a small real lake: build-index, then mine a report into a dataset,
recorded in MLflow and as a Prefect artifact."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import mlflow
import pytest

SMALL = ["features.backbone=efficientnet_lite0", "features.max_side=640", "mining.top_k=5",
         "mining.scales=[0.75,1.0,1.5]", "lake.video_every_n=1"]


@pytest.fixture(scope="module")
def pets_video(bench_dir, tmp_path_factory) -> Path:
    """24 real PETS 2009 frames (MOT frames 101..147, every 2nd) as an MJPG video."""
    path = tmp_path_factory.mktemp("video") / "pets.avi"
    frames = [cv2.imread(str(bench_dir / "pets09_s2l1" / "images" / f"{n:06d}.jpg")) for n in range(101, 149, 2)]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 7, (768, 576))
    for frame in frames:
        writer.write(frame)
    writer.release()
    return path


def pedestrian_box(bench_dir: Path, mot_frame: int, track_id: int) -> list[float]:
    ann = json.loads((bench_dir / "pets09_s2l1" / "annotations.json").read_text())
    return next(a["bbox"] for a in ann["annotations"] if a["image_id"] == mot_frame and a["track_id"] == track_id)


@pytest.fixture(scope="module")
def built(prefect_server, pets_video, tmp_path_factory):
    from flows.build_index import build_index_flow

    workdir = tmp_path_factory.mktemp("work")
    result = build_index_flow(sources=[str(pets_video)], overrides=SMALL, workdir=str(workdir))
    return workdir, result


def test_build_index_flow_ingests_caches_and_indexes(built, pets_video):
    workdir, result = built
    assert result["ingest"][0]["added"] == 24
    assert result["features"]["computed"] == 24
    assert result["index"]["frames"] == 24
    assert list((workdir / "features").glob("*/shard-*.safetensors"))

    from flows.build_index import build_index_flow

    again = build_index_flow(sources=[str(pets_video)], overrides=SMALL, workdir=str(workdir))
    assert again["ingest"][0]["added"] == 0 and again["features"]["computed"] == 0  # nothing recomputed
    assert again["index"]["version"] == result["index"]["version"]


def test_mine_flow_pushes_boxes_and_records_the_run(built, bench_dir, tmp_path):
    from flows.mine import mine_flow
    from prefect.client.orchestration import get_client

    workdir, _ = built
    # Frame index 10 of the test video is MOT frame 121; track 19 walks through the whole clip.
    report = {"report_id": "flow-test-1", "detector": {"name": "det", "version": "1"},
              "frame": {"uri": "pets.avi", "frame_index": 10}, "box": pedestrian_box(bench_dir, 121, 19),
              "class_name": "person", "failure_kind": "false_negative"}
    report_path = tmp_path / "report.json"
    report_path.write_text(json.dumps(report))

    result = mine_flow(report_path=str(report_path), overrides=SMALL, workdir=str(workdir))
    coco = json.loads((workdir / "retraining" / "annotations.json").read_text())
    assert result["mined"] == len(coco["annotations"]) == 5
    assert [c["name"] for c in coco["categories"]] == ["person"]
    for image, ann in zip(coco["images"], coco["annotations"]):
        x, y, w, h = ann["bbox"]
        assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= image["width"] and y + h <= image["height"]
        assert ann["objret"]["report_id"] == "flow-test-1"
        assert (workdir / "retraining" / image["file_name"]).is_file()
    # The query's own frame is never mined; the other frames of the pedestrian are found with boxes on people.
    gt = json.loads((bench_dir / "pets09_s2l1" / "annotations.json").read_text())["annotations"]
    mined = json.loads(Path(result["mined_json"]).read_text())["mined"]
    on_a_person = 0
    for item in mined:
        mot_frame = 101 + 2 * item["frame_index"]
        boxes = [a["bbox"] for a in gt if a["image_id"] == mot_frame]
        from objret.metrics import iou_xywh
        on_a_person += max(iou_xywh(item["box"], b) for b in boxes) >= 0.3
    assert on_a_person >= 4

    client = mlflow.tracking.MlflowClient(result["tracking_uri"])
    run = client.get_run(result["mlflow_run_id"])
    assert run.data.params["mining.top_k"] == "5"
    assert run.data.metrics["mined"] == 5
    assert run.data.tags["dataset_version"] == result["dataset"]["version"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"contact_sheet.png", "mined.json", "report.json"} <= artifacts

    import asyncio

    async def markdown_artifacts():
        async with get_client() as prefect:
            return await prefect.read_artifacts()

    assert any("flow-test-1" in (a.data or "") for a in asyncio.run(markdown_artifacts()))

    # Pushing the same report again changes nothing.
    again = mine_flow(report_path=str(report_path), overrides=SMALL, workdir=str(workdir))
    assert again["dataset"]["version"] == result["dataset"]["version"]
    assert again["dataset"]["added"] == 0 and not again["dataset"]["changed"]


def test_mine_flow_rejects_a_malformed_report_before_any_work(built, tmp_path):
    from flows.mine import mine_flow
    from objret.errors import ReportError

    workdir, _ = built
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"report_id": "x", "box": [1, 2, -3, float("nan")], "failure_kind": "oops"}))
    with pytest.raises(ReportError) as err:
        mine_flow(report_path=str(bad), overrides=SMALL, workdir=str(workdir))
    text = str(err.value)
    assert "failure_kind" in text and "box" in text and "detector" in text


@pytest.fixture(scope="module")
def pets_video_2(bench_dir, tmp_path_factory) -> Path:
    """4 other real PETS 2009 frames (MOT frames 301, 303, 305, 307) as a second MJPG video."""
    path = tmp_path_factory.mktemp("video2") / "pets2.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 7, (768, 576))
    for n in range(301, 309, 2):
        writer.write(cv2.imread(str(bench_dir / "pets09_s2l1" / "images" / f"{n:06d}.jpg")))
    writer.release()
    return path


def test_a_second_build_adds_only_the_new_frames_and_mining_still_works(built, pets_video, pets_video_2, bench_dir,
                                                                         tmp_path):
    import shutil

    import numpy as np

    from flows.build_index import build_index_flow
    from flows.mine import mine_flow
    from objret.config import load_params
    from objret.metrics import iou_xywh
    from objret.region_index import RegionIndex
    from objret.workspace import Workspace

    # A copy of the built work folder (lake, features, regions, index), so the other tests' folder is untouched.
    first_dir, first = built
    workdir = tmp_path / "work"
    shutil.copytree(first_dir, workdir, ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts", "runs", "retraining"))
    ws = Workspace(load_params(None, SMALL), workdir)
    before = RegionIndex.load(ws.current_index_dir())
    old_ids = list(before.frame_ids)
    assert len(old_ids) == 24 and len(before) == first["index"]["regions"]
    # Queries: a few of the index's own region vectors (a person, the whole frame, ...), searched before and after.
    probes = before.index.reconstruct_batch(np.arange(0, len(before), max(1, len(before) // 7)))
    old_vectors = before.index.reconstruct_batch(np.arange(len(before)))
    scores_before = [before.frame_scores(q, old_ids) for q in probes]
    hits_before = [[(h.frame_id, h.score, h.region_id) for h in before.best_frames(q, 24)] for q in probes]

    # A process mining many reports loads the index and the maps once ...
    from objret.search import LakeSearch

    search = LakeSearch.open(ws)
    assert LakeSearch.open(ws) is search and len(search.frame_ids) == 24
    assert len(search.maps.stack) == 24 and search.maps.stack.maps.shape[1] > 0

    result = build_index_flow(sources=[str(pets_video), str(pets_video_2)], overrides=SMALL, workdir=str(workdir))
    assert [r["added"] for r in result["ingest"]] == [0, 4]
    # ... and again once the index has a new version.
    grown = LakeSearch.open(ws)
    assert grown is not search and len(grown.frame_ids) == 28 and len(grown.maps.stack) == 28
    assert result["features"]["computed"] == 4 and result["features"]["already_cached"] == 24
    assert result["regions"]["extracted"] == 4 and result["regions"]["already_stored"] == 24
    new_ids = [f.frame_id for f in ws.lake.frames() if f.source.endswith("pets2.avi")]
    assert len(new_ids) == 4 and not set(new_ids) & set(old_ids)
    new_regions = len(ws.region_store.load(new_ids))
    assert result["index"]["frames"] == 28
    assert result["index"]["regions"] == first["index"]["regions"] + new_regions
    assert result["index"]["version"] != first["index"]["version"]

    after = RegionIndex.load(ws.current_index_dir())
    assert result["index"]["directory"] == str(ws.current_index_dir())
    # The old frames and their regions are untouched (same ids, owners, boxes, vectors); the new come after them.
    assert after.frame_ids[:24] == old_ids and set(after.frame_ids[24:]) == set(new_ids)
    n_old = len(before)
    np.testing.assert_array_equal(after.owner[:n_old], before.owner)
    np.testing.assert_array_equal(after.boxes[:n_old], before.boxes)
    np.testing.assert_array_equal(after.index.reconstruct_batch(np.arange(n_old)), old_vectors)
    assert set(np.asarray(after.region_frames(np.arange(n_old, len(after))))) == set(new_ids)
    for q, scores, hits in zip(probes, scores_before, hits_before):
        np.testing.assert_array_equal(after.frame_scores(q, old_ids), scores)
        again = [(h.frame_id, h.score, h.region_id) for h in after.best_frames(q, 28) if h.frame_id in set(old_ids)]
        assert again == hits
    # A third build with nothing new changes nothing.
    same = build_index_flow(sources=[str(pets_video_2)], overrides=SMALL, workdir=str(workdir))
    assert same["ingest"][0]["added"] == 0 and same["features"]["computed"] == 0
    assert same["regions"]["extracted"] == 0 and same["index"] == result["index"]

    # Mining on the grown index: a pedestrian of the new video (frame index 1 = MOT frame 303, track 14).
    box = pedestrian_box(bench_dir, 303, 14)
    report = {"report_id": "flow-test-incremental", "detector": {"name": "det", "version": "1"},
              "frame": {"uri": "pets2.avi", "frame_index": 1}, "box": box,
              "class_name": "person", "failure_kind": "false_negative"}
    report_path = tmp_path / "report.json"
    report_path.write_text(json.dumps(report))
    mined_result = mine_flow(report_path=str(report_path), overrides=SMALL, workdir=str(workdir))
    assert mined_result["mined"] == 5
    mined = json.loads(Path(mined_result["mined_json"]).read_text())["mined"]
    query_id = next(f.frame_id for f in ws.lake.frames() if f.source.endswith("pets2.avi") and f.frame_index == 1)
    assert all(m["frame_id"] != query_id for m in mined)
    # The best frames are the new video's own neighbours (the same person a few frames away), collapsed into one
    # item whose box is on that person.
    top = mined[0]
    assert top["source"].endswith("pets2.avi") and top["frame_id"] in new_ids
    assert set(top["duplicates"]) <= set(new_ids)
    assert iou_xywh(top["box"], pedestrian_box(bench_dir, 301 + 2 * top["frame_index"], 14)) >= 0.3
    client = mlflow.tracking.MlflowClient(mined_result["tracking_uri"])
    assert client.get_run(mined_result["mlflow_run_id"]).data.tags["index_version"] == result["index"]["version"]
