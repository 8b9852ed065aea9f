"""Crash safety of build-index (issue 7, item 1): its steps killed with SIGKILL at random moments, 24 times and more,
over a real 14-frame lake with tiny shards and batches (many write points); every next run resumes, nothing
half-written is ever visible, and the final lake, feature cache, region store, whitening, region index and region
graph equal an uninterrupted run's.

The kills run in tests/helpers/crash_driver.py (one process, forked runs). Files are compared by sha256 of their bytes,
except where the bytes legitimately differ between two equal saves: .npz files (a zip whose entries carry the
time they were written) by the sha256 of their arrays; feature shards by that of their tensors and metadata
(safetensors writes its metadata map in hash-map order, which changes from process to process: the tensor
bytes are equal); the graph's manifest without its timings and the name of the index version it was built on (a
version folder is named by its save time).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures.services import stop_group
from tests.helpers.figures import record_figures

pytestmark = pytest.mark.slow

# 10 TUD-Campus frames (640x480) and 4 of other sizes: feature batches of mixed shapes.
BENCH_FILES = [*(f"tud_campus/images/{i:06d}.jpg" for i in range(14, 24)),
               "coco_mini/images/000000000034.jpg", "coco_mini/images/000000000064.jpg",
               "pets09_s2l1/images/000101.jpg", "kitti_0005/images/0000000000.jpg"]
OVERRIDES = [
    "features.backbone=efficientnet_lite0", "features.max_side=320", "features.layers=[stride16, stride32]",
    "features.shard_size=2", "features.batch_size=2",
    "regions.sources=[whole, uniform, egm]", "regions.batch=2",
    "regions.whitening={enabled: true, dim: 32, shrinkage: 0.0, max_samples: 200000, refit_growth: 1.0}",
    "index.region_kind=flat", "graph.k=10", "graph.recall_sample=100",
    "mining.layer=stride16", "index.map_store={pq_m: 8, train_frames: 200, shard_frames: 2}",
]
STEPS = ("ingest", "features", "regions", "whitening", "index", "store", "graph")
# Three rounds of kills aimed at each step in turn (features and regions twice: they hold most write points), one
# of kills at uniformly random moments of the run and two of kills at a rename (a temp written, not renamed):
# 3 x 8 + up to 8 + up to 2 x 6.
TARGETED = ["ingest", "features", "features", "regions", "regions", "whitening", "index", "store", "graph"]
SEED = int(os.environ.get("OBJRET_CRASH_SEED", "7"))   # another seed: another set of kill points


def _array_digest(data: bytes) -> str:
    digest = hashlib.sha256()
    with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
        for name in sorted(arrays.files):
            value = arrays[name]
            digest.update(f"{name}:{value.dtype.str}:{value.shape}".encode())
            digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()


def _shard_digest(path: Path) -> str:
    from safetensors import safe_open

    digest = hashlib.sha256()
    with safe_open(path, framework="numpy") as shard:
        digest.update(json.dumps(shard.metadata(), sort_keys=True).encode())
        for name in sorted(shard.keys()):
            value = shard.get_tensor(name)
            digest.update(f"{name}:{value.dtype.str}:{value.shape}".encode())
            digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()


def _graph_manifest(data: bytes) -> str:
    manifest = json.loads(data)
    manifest["index"].pop("current"), manifest["index"].pop("directory")   # the index version's folder name
    manifest.pop("files")   # sha256 of .npz files, whose zip entries carry the time written (arrays compared apart)
    for key in ("graph_seconds", "katz_seconds", "timings"):
        manifest["stats"].pop(key)
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def fingerprint(root: Path) -> dict[str, str]:
    """{path under root: digest} of every artifact build-index leaves; a version folder shows as CURRENT when
    CURRENT names it, else as ORPHAN-<name> (a version a killed save left behind)."""
    out = {}
    with sqlite3.connect(root / "lake" / "manifest.sqlite") as conn:
        rows = conn.execute("SELECT frame_id, seq, uri, image_uri, width, height FROM frames ORDER BY seq").fetchall()
    out["lake/frames"] = hashlib.sha256(json.dumps(rows).encode()).hexdigest()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root)
        if path.name.startswith(".verified-"):   # which files were checked against their hashes: no artifact
            continue
        if rel.parts[0] not in ("features", "regions", "whitening", "index", "store", "cells", "graph") \
                or path.suffix == ".tmp":
            continue   # the lake is compared by its rows; MLflow's records (a flow run's) are no artifact
        parts = list(rel.parts)
        current = path.parent.parent / "CURRENT"
        if current.is_file():   # a file of a version folder
            parts[-2] = "CURRENT" if current.read_text().strip() == path.parent.name else f"ORPHAN-{parts[-2]}"
        elif path.name == "CURRENT":
            continue
        data = path.read_bytes()
        if path.suffix == ".npz":
            digest = _array_digest(data)
        elif path.suffix == ".safetensors":
            digest = _shard_digest(path)
        elif rel.parts[0] == "graph" and path.name == "manifest.json":
            digest = _graph_manifest(data)
        else:
            digest = hashlib.sha256(data).hexdigest()
        out["/".join(parts)] = digest
    return out


@pytest.fixture(scope="module")
def crash_runs(tmp_path_factory, bench_dir):
    base = tmp_path_factory.mktemp("crash")
    source = base / "lake_src"
    source.mkdir()
    for i, name in enumerate(BENCH_FILES):
        shutil.copy(bench_dir / name, source / f"{i:02d}_{Path(name).name}")
    rounds = [{"dir": str(base / f"round{i}"), "targets": TARGETED} for i in range(3)]
    rounds.append({"dir": str(base / "round_random"), "random": 8})
    rounds += [{"dir": str(base / f"round_renames{i}"), "renames": 6} for i in range(2)]
    plan = {"overrides": OVERRIDES, "sources": [str(source)], "reference": str(base / "reference"),
            "rounds": rounds, "seed": SEED}
    (base / "plan.json").write_text(json.dumps(plan))
    start = time.monotonic()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "helpers" / "crash_driver.py"), str(base / "plan.json")],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    report["wall_s"] = time.monotonic() - start
    return plan, report


def test_every_killed_build_resumes_to_the_uninterrupted_result(crash_runs):
    plan, report = crash_runs
    reference = fingerprint(Path(plan["reference"]))
    assert not any("ORPHAN" in key for key in reference)
    kinds = Counter(key.split("/")[0] for key in reference)
    assert kinds["features"] == 7 and kinds["regions"] == 7   # 14 frames in shards and batches of 2
    assert kinds["index"] >= 4 and kinds["graph"] >= 4 and kinds["whitening"] == 2
    assert kinds["store"] == 1 + 7 and kinds["cells"] >= 4   # codebooks + 7 shards of 2 frames; the cell index

    assert len(report["rounds"]) == len(plan["rounds"])
    kills, landed, identical, resumed, temps = [], Counter(), [], Counter(), []
    for round_ in report["rounds"]:
        runs = [*round_["runs"], round_["final"]]
        kills += [run for run in runs if run["killed"]]
        landed.update(run["landed"] for run in runs if run["killed"])
        temps += [t for run in runs if run["killed"] for t in run["state"]["temp_files"]]
        # The run after a kill resumed from what the killed one left visible: features of the frames it found
        # cached were not computed again, nor regions of the frames it found stored.
        for before, after in zip(runs, runs[1:]):
            marks = {m["step"]: m for m in after["marks"]}
            if "regions" in marks:   # got through the features step
                assert marks["regions"]["already"] == before["state"]["cached"]
                resumed["features"] += marks["regions"]["already"] > 0
            if "whitening" in marks:
                assert marks["whitening"]["already"] == before["state"]["region_frames"]
                resumed["regions"] += marks["whitening"]["already"] > 0
        final_state = round_["final"]["state"]
        assert final_state["temp_files"] == []   # the last run removed what the killed ones left
        assert (final_state["frames"], final_state["cached"], final_state["region_frames"],
                final_state["index_frames"], final_state["stored"], final_state["cell_frames"]) == (14,) * 6
        identical.append(fingerprint(Path(round_["dir"])) == reference)
    assert len(kills) >= 20
    assert set(STEPS) <= set(landed), landed   # kills landed in every step
    assert all(identical), identical
    record_figures("crash_safety", {
        "kills": len(kills), "landed": dict(landed), "kills_at_a_rename": sum(bool(k["at_rename"]) for k in kills),
        "resumed_runs": len(kills), "resumed_with_features_cached": resumed["features"],
        "resumed_with_regions_stored": resumed["regions"], "rounds": len(identical),
        "files_compared_per_round": len(reference), "identical_to_uninterrupted": all(identical),
        "temp_files_left_by_kills": len(temps), "temp_files_after_final_runs": 0,
        "reference_run_s": report["reference"]["seconds"],
        "phase_seconds": {k: round(v, 3) for k, v in report["phase_seconds"].items()},
        "driver_wall_s": round(report["wall_s"], 1)})


def test_the_visible_state_after_each_kill_only_grows(crash_runs):
    _, report = crash_runs
    for round_ in report["rounds"]:
        before = {"frames": 0, "cached": 0, "region_frames": 0, "stored": 0}
        for run in [*round_["runs"], round_["final"]]:
            state = run["state"]
            for key, value in before.items():
                assert state[key] >= value, (key, run)
            before = {key: state[key] for key in before}


def test_the_build_index_flow_killed_by_kill_9_resumes_to_the_same_result(crash_runs, tmp_path):
    """Once with the real thing: `objret build-index` (the Prefect flow with its MLflow run, and Prefect's temporary
    API server as a child process) SIGKILLed, its whole process group, while it caches features; the next
    `objret build-index` completes it, equal to the uninterrupted run."""
    plan, _ = crash_runs
    workdir = tmp_path / "work"
    command = [sys.executable, "-m", "flows.cli", "build-index", *plan["sources"], "--workdir", str(workdir),
               *[arg for override in OVERRIDES for arg in ("--set", override)]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PREFECT_HOME": str(tmp_path / "prefect")}   # 1 thread: same maps
    env.pop("PREFECT_API_URL", None)
    features = workdir / "features"
    start = time.monotonic()
    with open(tmp_path / "killed.out", "wb") as log:
        flow = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while len(list(features.glob("*/shard-*.safetensors"))) < 2:   # features under way
                assert flow.poll() is None, (tmp_path / "killed.out").read_text()[-3000:]
                assert time.monotonic() - start < 300, "no feature shard within 300 s"
                time.sleep(0.02)
            time.sleep(random.Random(SEED).uniform(0.0, 0.2))
            os.killpg(flow.pid, signal.SIGKILL)
            killed_at = time.monotonic() - start
        finally:
            stop_group(flow)
    assert flow.returncode == -signal.SIGKILL
    cached = len(list(features.glob("*/shard-*.safetensors")))
    assert cached < 7   # killed half-way through the features

    start = time.monotonic()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    resume_s = time.monotonic() - start
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["frames"] == 14
    assert fingerprint(workdir) == fingerprint(Path(plan["reference"]))
    assert not list(workdir.rglob("*.tmp"))
    record_figures("crash_safety_cli", {"killed_after_s": round(killed_at, 1), "shards_when_killed": cached,
                                        "resumed_run_s": round(resume_s, 1), "identical_to_uninterrupted": True})
