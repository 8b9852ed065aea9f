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
    coco = json.loads((workdir / "datasets" / "retraining" / "annotations.json").read_text())
    assert result["mined"] == len(coco["annotations"]) == 5
    assert [c["name"] for c in coco["categories"]] == ["person"]
    for image, ann in zip(coco["images"], coco["annotations"]):
        x, y, w, h = ann["bbox"]
        assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= image["width"] and y + h <= image["height"]
        assert ann["objret"]["report_id"] == "flow-test-1"
        assert (workdir / "datasets" / "retraining" / image["file_name"]).is_file()
    # The query's own frame is never mined; the other frames of the pedestrian are found with boxes on people.
    gt = json.loads((bench_dir / "pets09_s2l1" / "annotations.json").read_text())["annotations"]
    mined = json.loads(Path(result["mined_json"]).read_text())["mined"]
    on_a_person = 0
    for item in mined:
        mot_frame = 101 + 2 * item["frame_index"]
        boxes = [a["bbox"] for a in gt if a["image_id"] == mot_frame]
        from objret.boxes import iou_xywh
        on_a_person += max(iou_xywh(item["box"], b) for b in boxes) >= 0.3
    assert on_a_person >= 4

    client = mlflow.tracking.MlflowClient(result["tracking_uri"])
    run = client.get_run(result["mlflow_run_id"])
    assert run.data.params["mining.top_k"] == "5"
    assert run.data.metrics["mined"] == 5
    assert run.data.tags["dataset_version"] == result["dataset"]["version"]
    # The push is a DVC version of the dataset: its md5 in the run, its .dvc file an artifact.
    registry = workdir / "datasets"
    assert run.data.tags["dataset_dvc_md5"] == result["dataset"]["dvc_md5"] == \
        json.loads((registry / "versions.jsonl").read_text().splitlines()[-1])["md5"]
    assert result["dataset"]["dvc_md5"] in (registry / "retraining.dvc").read_text()
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"contact_sheet.png", "mined.json", "report.json", "dataset", "review.html"} <= artifacts
    assert Path(result["review_page"]) == registry / "reviews" / "flow-test-1.html"   # beside the dataset

    import asyncio

    async def markdown_artifacts():
        async with get_client() as prefect:
            return await prefect.read_artifacts()

    assert any("flow-test-1" in (a.data or "") for a in asyncio.run(markdown_artifacts()))

    # Pushing the same report again changes nothing.
    again = mine_flow(report_path=str(report_path), overrides=SMALL, workdir=str(workdir))
    assert again["dataset"]["version"] == result["dataset"]["version"]
    assert again["dataset"]["added"] == 0 and not again["dataset"]["changed"]
    assert again["dataset"]["dvc_md5"] == result["dataset"]["dvc_md5"]   # no new version


def test_a_mining_run_opens_in_fiftyone_with_query_boxes_and_heat_maps(built, bench_dir, tmp_path, fiftyone_db,
                                                                       capsys):
    from flows.cli import main

    fo = fiftyone_db
    workdir, _ = built
    mined_json = workdir / "runs" / "mine-flow-test-1" / "mined.json"
    if not mined_json.is_file():   # run on its own: mine the report first
        test_mine_flow_pushes_boxes_and_records_the_run(built, bench_dir, tmp_path)
    run = json.loads(mined_json.read_text())
    args = ["--workdir", str(workdir), *[a for o in SMALL for a in ("--set", o)]]
    assert main(["fiftyone", "flow-test-1", *args]) == 0
    out = capsys.readouterr().out
    assert "FiftyOne dataset objret-mine-flow-test-1: the query and 5 mined frames" in out
    assert "fiftyone app launch objret-mine-flow-test-1" in out

    dataset = fo.load_dataset("objret-mine-flow-test-1")   # read back through the FiftyOne API
    query = dataset.match_tags("query").first()
    [query_box] = query.mined.detections
    assert query_box.label == "person" and query.filepath == run["query"]["image_uri"]
    mined = dataset.match_tags("mined").sort_by("rank")
    assert len(mined) == 5 and mined.values("frame_id") == [m["frame_id"] for m in run["mined"]]
    for sample, item in zip(mined, run["mined"]):
        [box] = sample.mined.detections
        x, y, w, h = item["box"]
        assert box.bounding_box == pytest.approx([x / item["width"], y / item["height"], w / item["width"],
                                                  h / item["height"]])
        assert (box.rank, box.report_id, box.confidence) == (item["rank"], "flow-test-1", pytest.approx(item["score"]))
        assert sample.heatmap.map_path == item["heatmap"] and Path(sample.heatmap.map_path).is_file()
    # Loading again replaces the dataset, never duplicates it.
    assert main(["fiftyone", "flow-test-1", *args]) == 0
    assert len(fo.load_dataset("objret-mine-flow-test-1")) == 6
    assert main(["fiftyone", "no-such-report", *args]) == 1
    assert "no mining run of report 'no-such-report'" in capsys.readouterr().err


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
    from objret.boxes import iou_xywh
    from objret.index.region_index import RegionIndex
    from objret.steps.workspace import Workspace

    # A copy of the built work folder (lake, features, regions, index), so the other tests' folder is untouched.
    first_dir, first = built
    workdir = tmp_path / "work"
    shutil.copytree(first_dir, workdir, ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts", "runs", "datasets"))
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
    from objret.steps.mine import open_search

    search = open_search(ws)
    assert open_search(ws) is search and len(search.frame_ids) == 24
    assert len(search.lake_maps(search.rows())) == 24 and search.lake_maps(search.rows()).stack.maps.shape[1] > 0
    assert search.cells is not None and sorted(search.cells.frame_ids) == sorted(search.frame_ids)   # small objects

    result = build_index_flow(sources=[str(pets_video), str(pets_video_2)], overrides=SMALL, workdir=str(workdir))
    assert [r["added"] for r in result["ingest"]] == [0, 4]
    # ... and again once the index has a new version.
    grown = open_search(ws)
    assert grown is not search and len(grown.frame_ids) == 28 and grown.cells.n_frames == 28   # cells added
    assert result["store"]["store"]["stored"] == 4 and result["store"]["store"]["already_stored"] == 24
    assert result["features"]["computed"] == 4 and result["features"]["already_cached"] == 24
    assert result["regions"]["extracted"] == 4 and result["regions"]["already_stored"] == 24
    new_ids = [f.frame_id for f in ws.lake.frames() if f.source.endswith("pets2.avi")]
    assert len(new_ids) == 4 and not set(new_ids) & set(old_ids)
    new_regions = len(ws.region_store.load(new_ids))
    assert result["index"]["frames"] == 28
    assert result["index"]["regions"] == first["index"]["regions"] + new_regions
    assert result["index"]["version"] != first["index"]["version"]
    # The region graph is refreshed, not rebuilt: it grows by exactly the new regions, as a full build would.
    graph = result["graph"]
    assert graph["mode"] == "refresh" and graph["new_nodes"] == new_regions
    assert graph["nodes"] == first["graph"]["nodes"] + new_regions == result["index"]["regions"]
    from objret.steps import graph as graph_step
    from objret.graph.store import load_graph
    from objret.graph.knn import build_region_graph

    stored = load_graph(ws.graph_dir())
    vectors, _, _ = graph_step.graph_nodes(ws, RegionIndex.load(ws.current_index_dir()))
    full = build_region_graph(vectors, k=stored.knn.k)
    # The same lists (as sets: regions with identical descriptors tie exactly and may come in either order) ...
    same_lists = (np.sort(stored.knn.neighbors, axis=1) == np.sort(full.knn.neighbors, axis=1)).all(axis=1)
    assert same_lists.mean() > 0.99, same_lists.mean()
    # ... hence the same graph.
    assert abs(stored.matrix - full.matrix).max() < 1e-5

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
    assert same["graph"]["mode"] == "unchanged" and same["graph"]["version"] == result["graph"]["version"]

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


# ---- the region graph (003 sec. 3.6-3.8) and diffusion at mining time ---------------------------------------

def test_build_index_flow_builds_the_region_graph_and_logs_it(built):
    import numpy as np
    from PIL import Image

    from objret.steps import graph as graph_step
    from objret.config import load_params
    from objret.dataset.contact_sheet import CAPTION_HEIGHT, PAD, TITLE_HEIGHT
    from objret.errors import ObjretError
    from objret.graph.store import load_graph, open_diffusion
    from objret.index.region_index import RegionIndex
    from objret.steps.workspace import Workspace

    workdir, result = built
    graph = result["graph"]
    ws = Workspace(load_params(None, SMALL), workdir)
    index = RegionIndex.load(ws.current_index_dir())
    # One node per region of the index, built from scratch the first time.
    assert graph["mode"] == "full" and graph["nodes"] == result["index"]["regions"] == len(index) > 50
    assert graph["new_nodes"] == graph["nodes"] and graph["kind"] == "exact" and graph["k"] == 50
    assert graph["edges"] > 0 and graph["mean_degree"] == pytest.approx(2 * graph["edges"] / graph["nodes"])
    assert 1 <= graph["components"] <= graph["nodes"] and graph["cg_converged"] and graph["cg_iterations"] > 1
    stored = load_graph(ws.graph_dir())
    assert stored.version == graph["version"] and stored.manifest["index"]["current"] == (
        ws.current_index_dir() / "CURRENT").read_text().strip()
    S = stored.matrix
    assert S.shape == (len(index), len(index)) and (S != S.T).nnz == 0 and not S.diagonal().any()
    assert len(stored.centrality) == len(index) and (stored.centrality > 0).all()
    # Node i is region i: its k-NN similarities are the index's own vectors' inner products.
    knn = stored.knn
    for i in (0, len(index) // 2, len(index) - 1):
        j = knn.neighbors[i, :3]
        sims = index.index.reconstruct_batch(j) @ index.index.reconstruct(int(i))
        np.testing.assert_allclose(sims, knn.similarities[i, :3], atol=1e-5)
    # Nothing new: nothing done.
    again = graph_step.graph(ws)
    assert again.mode == "unchanged" and again.version == graph["version"] and again.new_nodes == 0

    client = mlflow.tracking.MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    run = client.get_run(result["mlflow_run_id"])
    metrics = run.data.metrics
    assert metrics["graph_nodes"] == graph["nodes"] and metrics["graph_edges"] == graph["edges"]
    assert metrics["graph_mean_degree"] == pytest.approx(graph["mean_degree"])
    assert metrics["graph_components"] == graph["components"]
    assert metrics["graph_cg_iterations"] == graph["cg_iterations"] > 1
    assert metrics["graph_cg_residual"] == pytest.approx(graph["cg_residual"]) and metrics["graph_seconds"] > 0
    assert run.data.tags["graph_version"] == graph["version"] and run.data.tags["graph_mode"] == "full"
    pngs = [a.path for a in client.list_artifacts(run.info.run_id, "graph")]
    assert len(pngs) == 3 and all(p.endswith(".png") for p in pngs)   # graph.sample_frames
    local = client.download_artifacts(run.info.run_id, pngs[0], str(workdir / "downloaded"))
    with Image.open(local) as png:
        assert png.format == "PNG"
        assert png.size == (3 * (320 + PAD) + PAD, TITLE_HEIGHT + 320 + CAPTION_HEIGHT + 2 * PAD)

    # Diffusion refuses a graph folder with no graph in it, saying what to run.
    with pytest.raises(ObjretError, match="run build-index"):
        d = ws.params.mining.diffusion
        open_diffusion(workdir / "no-graph", ws.current_index_dir(), index, k=d.k, alpha=d.alpha, max_iter=d.max_iter)


def _report(tmp_path, bench_dir, report_id: str, **extra) -> Path:
    # Frame index 10 of the test video is MOT frame 121; track 19 walks through the whole clip.
    report = {"report_id": report_id, "detector": {"name": "det", "version": "1"},
              "frame": {"uri": "pets.avi", "frame_index": 10}, "box": pedestrian_box(bench_dir, 121, 19),
              "class_name": "person", "failure_kind": "false_negative", **extra}
    path = tmp_path / f"{report_id}.json"
    path.write_text(json.dumps(report))
    return path


def test_mine_flow_fuses_diffusion_when_the_report_asks_for_it(built, bench_dir, tmp_path):
    from flows.mine import mine_flow
    from objret.steps import mine as mine_step
    from objret.config import load_params
    from objret.mining.report import load_report
    from objret.steps.workspace import Workspace

    workdir, first = built
    path = _report(tmp_path, bench_dir, "flow-test-diffusion", mining={"diffusion": True})
    result = mine_flow(report_path=str(path), overrides=SMALL, workdir=str(workdir))   # params: diffusion off
    mined = json.loads(Path(result["mined_json"]).read_text())
    diffusion = mined["diffusion"]
    assert diffusion["enabled"] and diffusion["applied"] and diffusion["source"] == "report"
    assert diffusion["graph_version"] == first["graph"]["version"] and diffusion["k"] == 10
    assert 1 <= diffusion["cg"]["iterations"] <= 20 and diffusion["cg"]["residual"] >= 0
    assert mined["provenance"]["diffusion"]["applied"] and mined["report"]["mining"] == {"diffusion": True}
    assert result["mined"] == len(mined["mined"]) == 5
    assert all(m["evidence"]["diffusion"] > 0 for m in mined["mined"])   # the query's neighbourhood reaches them
    coco = json.loads((workdir / "datasets" / "retraining" / "annotations.json").read_text())
    ours = [a["objret"] for a in coco["annotations"] if a["objret"]["report_id"] == "flow-test-diffusion"]
    assert len(ours) == 5 and all(o["diffusion"]["applied"] and "diffusion" in o["evidence"] for o in ours)
    client = mlflow.tracking.MlflowClient(result["tracking_uri"])
    assert client.get_run(result["mlflow_run_id"]).data.metrics["diffusion"] == 1

    # The same report without the field follows params.yaml (off): no diffusion evidence, other scores.
    ws = Workspace(load_params(None, SMALL), workdir)
    plain = mine_step.mine(ws, load_report(_report(tmp_path, bench_dir, "flow-test-no-diffusion")), progress=False)
    assert plain.provenance["diffusion"] == {"enabled": False, "source": "params", "applied": False}
    assert all("diffusion" not in m["evidence"] for m in plain.mined)
    with_diffusion = {m["frame_id"]: m["score"] for m in mined["mined"]}
    without = {m["frame_id"]: m["score"] for m in plain.mined}
    shared = set(with_diffusion) & set(without)
    assert shared and any(abs(with_diffusion[f] - without[f]) > 1e-3 for f in shared)
    # ... and params.yaml can turn it on for every report.
    on = mine_step.mine(Workspace(load_params(None, SMALL + ["mining.diffusion.enabled=true"]), workdir),
                       load_report(_report(tmp_path, bench_dir, "flow-test-params-diffusion")), progress=False)
    assert on.provenance["diffusion"]["source"] == "params" and on.provenance["diffusion"]["applied"]
    assert {m["frame_id"]: round(m["score"], 5) for m in on.mined} == {
        f: round(s, 5) for f, s in with_diffusion.items()}


def test_mine_flow_rejects_a_malformed_mining_field(built, bench_dir, tmp_path):
    from flows.mine import mine_flow
    from objret.errors import ReportError

    workdir, _ = built
    path = _report(tmp_path, bench_dir, "flow-test-bad-mining", mining={"diffusion": "yes", "top_k": 3})
    with pytest.raises(ReportError) as err:
        mine_flow(report_path=str(path), overrides=SMALL, workdir=str(workdir))
    text = str(err.value)
    assert "mining.diffusion: 'yes' is not true/false" in text and "mining.top_k: unknown field" in text
    assert not (workdir / "runs" / "mine-flow-test-bad-mining").exists()   # rejected before any work
    path = _report(tmp_path, bench_dir, "flow-test-bad-mining-2", mining=True)
    with pytest.raises(ReportError, match="mining: True is not an object"):
        mine_flow(report_path=str(path), overrides=SMALL, workdir=str(workdir))


@pytest.fixture(scope="module")
def tiny_bench(tud_campus_bench, tmp_path_factory) -> Path:
    """A bench-format folder: 24 TUD-Campus frames (ids 16..35, 52, 57, 64, 69) and the 2 instance queries among
    them (persons 2 and 7 at frames 28 and 57; each gallery holds frames without the person)."""
    root = tud_campus_bench(tmp_path_factory.mktemp("tiny-bench"), set(range(16, 36)) | {52, 57, 64, 69})
    assert len(json.loads((root / "queries.json").read_text())["queries"]) == 2
    return root


def test_eval_with_diffusion_builds_the_graph_and_fuses_it(prefect_server, tiny_bench, tmp_path):
    from flows.evaluate import evaluate_flow
    from objret.eval.bench import load_bench
    from objret.config import load_params
    from objret.graph.store import load_graph
    from objret.steps.workspace import Workspace

    workdir = tmp_path / "eval"
    on = evaluate_flow(bench_dir=str(tiny_bench), results=str(tmp_path / "on.json"), methods=["fused"],
                       overrides=SMALL + ["mining.diffusion.enabled=true"], workdir=str(workdir))
    ws = Workspace(load_params(None, SMALL), workdir)
    stored = load_graph(ws.graph_dir())
    assert stored is not None and stored.nodes > 24 * 10          # every region of the 24 frames
    off = evaluate_flow(bench_dir=str(tiny_bench), results=str(tmp_path / "off.json"), methods=["fused"],
                        overrides=SMALL, workdir=str(workdir))
    results_on = json.loads((tmp_path / "on.json").read_text())
    results_off = json.loads((tmp_path / "off.json").read_text())
    bench = load_bench(tiny_bench)
    assert set(results_on) == set(results_off) == {q.id for q in bench.queries} and len(results_on) == 2
    for q in bench.queries:   # every gallery image ranked, with and without diffusion
        assert len(results_on[q.id]) == len(results_off[q.id]) == len(bench.gallery_keys(q)) > 0
    scores = lambda r: {(e["set"], e["image_id"]): e["score"] for q in r.values() for e in q}
    assert scores(results_on) != scores(results_off)                 # the diffusion evidence changed the scores
    assert on["methods"]["fused"]["metrics"] and off["methods"]["fused"]["metrics"]
    client = mlflow.tracking.MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    runs = client.search_runs(client.get_experiment_by_name("objret").experiment_id)
    assert sorted(r.data.tags["diffusion"] for r in runs) == ["false", "true"]
    assert any(r.data.metrics.get("graph_nodes") == stored.nodes for r in runs)


def test_refresh_policies_refit_whitening_and_rebuild_the_graph_once_the_lake_has_grown(built, pets_video,
                                                                                      pets_video_2, tmp_path):
    """regions.whitening.refit_growth and graph.rebuild_growth: what a refresh refits after new frames (4 on 24:
    grown by 1/6, less than the default 1.0, more than 0.1). The default (refresh, keep the fit) is the test above."""
    import shutil

    from flows.build_index import build_index_flow
    from objret.steps import whitening as whitening_step
    from objret.config import load_params
    from objret.steps.workspace import Workspace

    first_dir, _ = built

    def copy(name):
        workdir = tmp_path / name
        shutil.copytree(first_dir, workdir, ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts", "runs",
                                                                          "datasets"))
        return workdir

    both = [str(pets_video), str(pets_video_2)]
    graph_policy = build_index_flow(sources=both, overrides=[*SMALL, "graph.rebuild_growth=0.1"],
                                    workdir=str(copy("graph")))
    assert graph_policy["graph"]["mode"] == "full" and graph_policy["graph"]["new_nodes"] == \
        graph_policy["index"]["regions"]

    workdir = copy("whitening")
    whitened = [*SMALL, "regions.whitening.enabled=true", "regions.whitening.dim=64",
                "regions.whitening.refit_growth=0.1"]
    before = build_index_flow(sources=[str(pets_video)], overrides=whitened, workdir=str(workdir))
    after = build_index_flow(sources=both, overrides=whitened, workdir=str(workdir))
    assert before["index"]["frames"] == 24 and after["index"]["frames"] == 28
    assert after["whitening"] != before["whitening"]   # refitted on the 28 frames: a new index beside the old
    assert after["index"]["directory"] != before["index"]["directory"]
    assert after["graph"]["mode"] == "full" and after["graph"]["nodes"] == after["index"]["regions"]
    # No growth since the refit: the fit is kept.
    assert whitening_step.whitening(Workspace(load_params(None, whitened), workdir)) == after["whitening"]
