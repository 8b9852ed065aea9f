"""Concurrent pushes (issue 7, item 2): 8 mining runs, 8 processes, push to one retraining dataset at the same
moment, to a local folder and to one published on S3 (SeaweedFS). The dataset ends with exactly the union of their
frames, every (report, frame) annotation once, a consistent COCO json, one new DVC version per push, and the
published annotations.json equal to the registry's.

The registry's lock (a file lock beside the DVC repository) serialises the pushes of one machine, or of machines
that share its folder. Registries on different machines share no lock: the same 8 processes then push in two
groups of 4, each group to its own registry (two work folders), all publishing to one S3 prefix; the conditional
write of objret.dataset.publish keeps the published annotations the exact union of both.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers.figures import record_figures
from objret import storage
from objret.dataset.registry import DatasetRegistry
from tests.dataset.test_coco import check_valid_coco

pytestmark = pytest.mark.slow

WORKERS = 8
FRAMES_PER_REPORT = 4
BUCKET = "objret-concurrent"
WORKER = Path(__file__).parents[1] / "helpers" / "push_worker.py"


def bench_frames(bench_dir: Path, n: int = 16) -> list[dict]:
    paths = sorted((bench_dir / "tud_campus" / "images").glob("*.jpg"))[:n]
    assert len(paths) == n, f"tud_campus frames missing under {bench_dir}"
    frames = []
    for path in paths:
        with Image.open(path) as image:
            width, height = image.size
        frames.append({"frame_id": hashlib.sha256(path.read_bytes()).hexdigest(), "path": str(path),
                       "width": width, "height": height})
    return frames


def report_frames(frames: list[dict], i: int) -> list[dict]:
    """Report i's mined frames: 4 consecutive ones from 2i, so each report shares 2 frames with the next."""
    picked = [frames[(2 * i + k) % len(frames)] for k in range(FRAMES_PER_REPORT)]
    return [{**f, "box": [40.0 + 10 * i, 30.0 + 5 * k, 80.0, 160.0], "score": round(0.9 - 0.01 * k, 4)}
            for k, f in enumerate(picked)]


def run_workers(base: Path, jobs: list[dict], targets: int) -> list[list[dict]]:
    """Start one process per job; release each target's pushes together once every worker is ready."""
    barrier = base / "barrier"
    barrier.mkdir()
    procs = []
    for job in jobs:
        path = base / f"{job['name']}.json"
        path.write_text(json.dumps({**job, "barrier": str(barrier)}))
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(path)], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}))
    for target in range(targets):
        deadline = time.monotonic() + 240
        while len(list(barrier.glob(f"ready-{target}-*"))) < len(jobs):
            assert all(p.poll() is None for p in procs), [p.communicate()[1][-2000:] for p in procs if p.poll()]
            assert time.monotonic() < deadline, "workers did not get ready"
            time.sleep(0.05)
        (barrier / f"go-{target}").touch()
    results = [[] for _ in range(targets)]
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        for line in out.splitlines():
            if line.startswith("{"):
                result = json.loads(line)
                results[result["target"]].append(result)
    return results


def check_dataset(registry: DatasetRegistry, jobs: list[dict], results: list[dict]) -> dict:
    """The union of the jobs' frames, each (report, frame) annotated once, COCO consistent, a version a push."""
    assert [r.get("error") for r in results] == [None] * len(jobs)
    coco = json.loads((registry.dataset_dir / "annotations.json").read_text())
    check_valid_coco(coco)
    union = {f["frame_id"] for job in jobs for f in job["frames"]}
    frame_of = {image["id"]: image["frame_id"] for image in coco["images"]}
    assert sorted(frame_of.values()) == sorted(union)   # the union, no duplicate image
    assert sorted(p.name for p in (registry.dataset_dir / "images").iterdir()) == sorted(f"{f}.jpg" for f in union)
    pairs = [(a["objret"]["report_id"], frame_of[a["image_id"]]) for a in coco["annotations"]]
    wanted = {(job["report_id"], f["frame_id"]) for job in jobs for f in job["frames"]}
    assert len(pairs) == len(set(pairs)) and set(pairs) == wanted   # every annotation, none twice

    # One version a push, and the pushes form one chain: each built on the version the one before it left.
    versions = registry.versions()
    assert [v["number"] for v in versions] == list(range(1, len(jobs) + 1))
    assert len({v["md5"] for v in versions}) == len(jobs)
    assert sorted(r["dvc_version"] for r in results) == list(range(1, len(jobs) + 1))
    by_number = {v["number"]: v for v in versions}
    assert all(by_number[r["dvc_version"]]["md5"] == r["dvc_md5"] for r in results)
    assert all(r["added"] == FRAMES_PER_REPORT and r["changed"] for r in results)
    parents = [push["parent_version"] for push in coco["info"]["pushes"]]
    made = {r["version"] for r in results}
    assert parents[0] is None and set(parents[1:]) == made - {registry_version(registry)}
    assert registry.current_md5() == by_number[len(jobs)]["md5"]
    return coco


def registry_version(registry: DatasetRegistry) -> str:
    return hashlib.sha256((registry.dataset_dir / "annotations.json").read_bytes()).hexdigest()[:12]


def test_eight_concurrent_pushes_keep_every_frame_and_make_eight_versions(tmp_path, bench_dir, s3_store):
    client = s3_store.client()
    if BUCKET not in [b["Name"] for b in client.list_buckets().get("Buckets", [])]:
        client.create_bucket(Bucket=BUCKET)
    published, shared = f"s3://{BUCKET}/retraining", f"s3://{BUCKET}/shared"
    groups = [tmp_path / "registry_group_a", tmp_path / "registry_group_b"]   # two machines' registries
    frames = bench_frames(bench_dir)
    local_registry, s3_registry = tmp_path / "registry_local", tmp_path / "registry_s3"
    jobs = [{"name": f"w{i}", "report_id": f"rep-{i}", "frames": report_frames(frames, i),
             "targets": [{"workdir": str(tmp_path / f"work{i}"), "overrides": [f"dataset.registry={local_registry}"]},
                         {"workdir": str(tmp_path / f"work{i}"), "overrides": [f"dataset.registry={s3_registry}",
                                                                              f"dataset.root={published}"]},
                         {"workdir": str(tmp_path / f"work{i}"), "overrides": [f"dataset.registry={groups[i % 2]}",
                                                                              f"dataset.root={shared}"]}]}
            for i in range(WORKERS)]
    start = time.monotonic()
    local_results, s3_results, group_results = run_workers(tmp_path, jobs, targets=3)
    wall = time.monotonic() - start

    # Two registries, no shared lock, one published prefix: each registry is whole, the prefix holds both.
    for g, registry_dir in enumerate(groups):
        mine = [r for r in group_results if r["root"] == shared and int(r["report_id"].split("-")[1]) % 2 == g]
        check_dataset(DatasetRegistry(registry_dir), jobs[g::2], mine)
    coco = json.loads(storage.read_bytes(f"{shared}/annotations.json"))
    check_valid_coco(coco)
    frame_of = {image["id"]: image["frame_id"] for image in coco["images"]}
    pairs = [(a["objret"]["report_id"], frame_of[a["image_id"]]) for a in coco["annotations"]]
    assert len(pairs) == len(set(pairs))
    assert set(pairs) == {(job["report_id"], f["frame_id"]) for job in jobs for f in job["frames"]}

    check_dataset(DatasetRegistry(local_registry), jobs, local_results)
    registry = DatasetRegistry(s3_registry)
    check_dataset(registry, jobs, s3_results)
    # Published: the last version, whole, and nothing else.
    local = (registry.dataset_dir / "annotations.json").read_bytes()
    assert storage.read_bytes(f"{published}/annotations.json") == local
    assert sorted(u.rsplit("/", 1)[-1] for u in storage.list_uris(f"{published}/images")) == \
        sorted(p.name for p in (registry.dataset_dir / "images").iterdir())
    assert all(r["root"] == published for r in s3_results)

    def seconds(results):
        return {"slowest_push_s": round(max(r["seconds"] for r in results), 2),
                "mean_push_s": round(sum(r["seconds"] for r in results) / len(results), 2)}

    record_figures("concurrent_push", {
        "workers": WORKERS, "frames_union": len({f["frame_id"] for j in jobs for f in j["frames"]}),
        "annotations": WORKERS * FRAMES_PER_REPORT, "versions_local": len(DatasetRegistry(local_registry).versions()),
        "versions_s3": len(registry.versions()), "local": seconds(local_results), "s3": seconds(s3_results),
        "two_registries_one_prefix": {"registries": len(groups), "published_annotations": len(pairs),
                                      **seconds(group_results)},
        "wall_s_including_8_process_starts": round(wall, 1)})
