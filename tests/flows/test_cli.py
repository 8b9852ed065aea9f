"""The objret command: report validation and `objret eval` on a bench-format folder made of real images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from flows.cli import main
from tasks.demo_data import SAMPLE_REPORT
from tests.helpers.chance import chance_map

SMALL = ["--set", "features.backbone=efficientnet_lite0", "--set", "mining.scales=[0.75,1.0,1.5]"]


def test_report_validate_accepts_the_sample_and_names_each_problem(tmp_path, capsys):
    assert main(["report", "validate", str(SAMPLE_REPORT)]) == 0
    assert "valid report pets-demo-0001" in capsys.readouterr().out
    bad = json.loads(SAMPLE_REPORT.read_text())
    bad["box"] = [10, 10, 0, 5]
    bad["failure_kind"] = "crash"
    del bad["detector"]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    assert main(["report", "validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "box[2]" in err and "failure_kind" in err and "detector" in err


def _subset_bench(bench_dir: Path, root: Path) -> Path:
    """A bench-format folder: the test bench's tud_campus (its 27 frames, its 2 instance queries) + 40 of its
    coco_mini images (6 class queries whose image is among them), queries re-targeted to these sets."""
    queries = json.loads((bench_dir / "queries.json").read_text())["queries"]
    coco = json.loads((bench_dir / "coco_mini" / "annotations.json").read_text())
    coco_ids = {img["id"] for img in coco["images"][:40]}
    for name, keep in (("tud_campus", None), ("coco_mini", coco_ids)):
        ann = json.loads((bench_dir / name / "annotations.json").read_text())
        if keep is not None:
            ann["images"] = [i for i in ann["images"] if i["id"] in keep]
            ann["annotations"] = [a for a in ann["annotations"] if a["image_id"] in keep]
        (root / name / "images").mkdir(parents=True)
        for image in ann["images"]:
            shutil.copy(bench_dir / name / image["file_name"], root / name / image["file_name"])
        (root / name / "annotations.json").write_text(json.dumps(ann))
    chosen = [q for q in queries if q["set"] == "tud_campus"]
    chosen += [q for q in queries if q["set"] == "coco_mini" and q["image_id"] in coco_ids][:6]
    for q in chosen:
        q.pop("num_positives", None)  # positives change with the subset; the loader recomputes them
    (root / "queries.json").write_text(json.dumps({"version": 1, "queries": chosen}))
    return root


@pytest.mark.usefixtures("prefect_server")
def test_eval_ranks_every_gallery_image_with_a_box_and_scores_both_methods(bench_dir, tmp_path, capsys,
                                                                           monkeypatch):
    import flows.evaluate
    from objret.eval.bench import load_bench

    drawn, real_draw = {}, flows.evaluate.draw   # what each plot is drawn from

    def draw(name: str, data: dict) -> bytes:
        drawn[name] = data
        return real_draw(name, data)

    monkeypatch.setattr(flows.evaluate, "draw", draw)
    bench_root = _subset_bench(bench_dir, tmp_path / "bench")
    out = tmp_path / "out" / "results.json"
    code = main(["eval", "--bench", str(bench_root), "--results", str(out), "--methods", "dtm,gem",
                 "--workdir", str(tmp_path / "work"), *SMALL,
                 "--held-out", "--set", "eval.tune={mining.mirror: [true, false]}", "--review-round", "3"])
    assert code == 0
    bench = load_bench(bench_root)
    for path in (out, out.with_name("results.gem.json")):
        results = json.loads(path.read_text())
        assert set(results) == {q.id for q in bench.queries}
        for q in bench.queries:
            ranked = results[q.id]
            assert {(e["set"], e["image_id"]) for e in ranked} == set(bench.gallery_keys(q))
            assert all(len(e["bbox"]) == 4 for e in ranked)
            scores = [e["score"] for e in ranked]
            assert scores == sorted(scores, reverse=True)
    metrics = json.loads(out.with_suffix(".metrics.json").read_text())
    assert metrics["method"] == "dtm"
    table = capsys.readouterr().out
    assert "class/all" in table and "instance/video tud_campus" in table and "dtm" in table and "gem" in table
    # --held-out: dtm ranked again without the mirror; each set's queries ranked as the other set chose.
    held = json.loads(out.with_name("results.heldout.json").read_text())
    assert held["settings"] == [{"mining.mirror": True}, {"mining.mirror": False}]
    assert set(held["chosen"]) == {"tud_campus", "coco_mini"} and "leave-one-set-out" in table
    default = json.loads(out.read_text())
    assert set(held["results"]) == set(default)
    for q in bench.queries:
        if held["chosen"][q.set] == 0:   # the candidate that is params as given: the run above, not ranked again
            assert held["results"][q.id] == default[q.id]
    assert {g["name"] for g in held["held_out"]} >= {"class/all", "instance/all"}
    # --review-round 3: each query mined again after its first 3 frames were judged; those are not ranked again.
    review = json.loads(out.with_name("results.review.json").read_text())
    assert review["method"] == "dtm" and review["judged"] == 3 and "one review round" in table
    assert review["results"] and {g["name"] for g in review["before"]} == {g["name"] for g in review["after"]}
    for qid, again in review["results"].items():
        judged = {(e["set"], e["image_id"]) for e in default[qid][:3]}
        accepted, rejected = review["verdicts"][qid]
        assert accepted + rejected == 3 and not judged & {(e["set"], e["image_id"]) for e in again}
    # The TUD pedestrians are found far above chance by template matching: the expected mAP of random rankings of
    # these galleries is 0.63 (persons 2 and 7, each gallery with frames without them); measured 0.87 (gem 0.59).
    video = [g for g in metrics["groups"] if g["name"] == "instance/video-sets"][0]
    chance = chance_map(bench, [q for q in bench.queries if q.kind == "instance"])
    assert video["mAP"] >= chance + 0.15, (video["mAP"], chance)

    # The plots: PNGs beside the results and in the MLflow run, drawn from these very numbers.
    from PIL import Image

    for name in ("recall_at_k", "map_by_size", "ap_scatter"):
        path = out.with_name(f"results.{name}.png")
        assert f"plot {name}: {path}" in table and Image.open(path).format == "PNG"
        assert list((tmp_path / "work" / "mlartifacts").glob(f"**/plots/results.{name}.png"))   # logged to MLflow
    curve = [line.split(",") for line in out.with_name("results.recall_at_k.csv").read_text().split()[1:]]
    assert [[k, round(r, 6)] for k, r in drawn["recall_at_k"]["methods"]["dtm"]] == \
        [[int(k), float(r)] for k, m, r in curve if m == "dtm"]
    gem = json.loads(out.with_name("results.gem.metrics.json").read_text())
    by_name = {g["name"]: g["mAP"] for g in gem["groups"]}
    assert drawn["map_by_size"]["kinds"]["class"]["gem"] == [by_name.get(f"class/{b}")
                                                             for b in drawn["map_by_size"]["buckets"]]
    ap = {q["id"]: q["ap"] for q in metrics["queries"]}
    ap_gem = {q["id"]: q["ap"] for q in gem["queries"]}
    points = drawn["ap_scatter"]["points"]
    assert drawn["ap_scatter"]["x_method"] == "dtm" and len(points) == len(bench.queries)
    assert all(p["x"] == ap[p["id"]] and p["y"] == ap_gem[p["id"]] for p in points)


@pytest.mark.usefixtures("prefect_server")
def test_demo_builds_a_lake_from_a_video_and_mines_a_report(bench_dir, tmp_path, capsys):
    import cv2

    video = tmp_path / "walkway.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 7, (768, 576))
    for n in range(101, 141, 2):  # 20 real PETS frames
        writer.write(cv2.imread(str(bench_dir / "pets09_s2l1" / "images" / f"{n:06d}.jpg")))
    writer.release()
    ann = json.loads((bench_dir / "pets09_s2l1" / "annotations.json").read_text())
    box = next(a["bbox"] for a in ann["annotations"] if a["image_id"] == 121 and a["track_id"] == 19)
    report = json.loads(SAMPLE_REPORT.read_text())
    report.update(frame={"uri": "walkway.avi", "frame_index": 10}, box=box, report_id="demo-test")
    report_path = tmp_path / "report.json"
    report_path.write_text(json.dumps(report))

    workdir = tmp_path / "work"
    assert main(["demo", str(video), "--report", str(report_path), "--workdir", str(workdir), *SMALL,
                 "--set", "lake.video_every_n=1", "--set", "mining.top_k=8"]) == 0
    out = capsys.readouterr().out
    assert "mined 8 frames for report demo-test" in out
    sheet = workdir / "runs" / "mine-demo-test" / "contact_sheet.png"
    assert f"contact sheet      : {sheet}" in out and sheet.is_file()
    page = workdir / "datasets" / "reviews" / "demo-test.html"
    assert f"review page        : {page}" in out and page.is_file()
    assert str(workdir / "datasets" / "retraining") in out and "MLflow run" in out
    coco = json.loads((workdir / "datasets" / "retraining" / "annotations.json").read_text())
    assert len(coco["annotations"]) == 8
    # The export commands it ends with run as printed (here into tmp_path), and so does the FiftyOne one-liner's.
    args = next(line for line in out.splitlines() if "--format coco" in line).split()[1:]
    args[args.index("--out") + 1] = str(tmp_path / "exported")
    assert main(args) == 0 and len(json.loads((tmp_path / "exported" / "annotations.json").read_text())["images"]) == 8
    assert "objret fiftyone demo-test --workdir" in out and "fiftyone app launch objret-mine-demo-test" in out

    # Reports the lake cannot honestly answer are refused before any flow starts: one message naming the field
    # and the frame, exit status 2, no traceback, the dataset untouched.
    capsys.readouterr()
    for name, change, message in (
            ("past-the-edge", {"box": [760, 570, 50, 50]}, "box: [760, 570, 50, 50] leaves the 768x576 frame"),
            ("one-pixel", {"box": [300, 200, 1, 1]}, "box: [300, 200, 1, 1] covers less than one"),
            ("outside", {"frame": {"uri": "/etc/hosts"}}, "frame.uri: '/etc/hosts' is not in the lake")):
        bad = dict(report, report_id=f"bad-{name}", **change)
        bad_path = tmp_path / f"{name}.json"
        bad_path.write_text(json.dumps(bad))
        assert main(["mine", str(bad_path), "--workdir", str(workdir), *SMALL]) == 2, name
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
        assert not (workdir / "runs" / f"mine-bad-{name}").exists()
    assert len(json.loads((workdir / "datasets" / "retraining" / "annotations.json").read_text())["annotations"]) == 8
