"""A disk that fills up mid-write (issue 17 point 4), on a real small filesystem: a tmpfs mounted for the test with
a ballast file that leaves a few kilobytes free. The write stops with an error naming the path and the cause,
the previous version stays current and readable, nothing half-written is left, and once the ballast is removed
the next run completes. Covered: a versioned save (region index, graph: objret.versions), `objret build-index`
from the command line (exit 1, one line, no traceback) and a push to the retraining dataset (DVC)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from objret.config import load_params
from objret.errors import StoreError
from objret.index.region_index import RegionIndex
from objret.steps.workspace import Workspace
from tests.helpers.crash_driver import run_steps
from tests.helpers.figures import record_figures
from tests.steps.test_crash_safety import BENCH_FILES, OVERRIDES

pytestmark = pytest.mark.usefixtures("one_faiss_thread")


@pytest.fixture
def small_disk(tmp_path):
    """A 48 MB tmpfs at tmp_path/small (mounting needs root or CAP_SYS_ADMIN: skipped, with the reason, without)."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip()}): the disk-full tests need one")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path, leave: int) -> Path:
    """A ballast file that leaves ``leave`` bytes free on ``disk``."""
    st = os.statvfs(disk)
    ballast = disk / "ballast"
    ballast.write_bytes(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))
    return ballast


def unit_rows(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, 32)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".verified-"))


def test_a_version_that_does_not_fit_leaves_the_previous_one_current(small_disk):
    directory = small_disk / "index"
    index = RegionIndex(32, kind="flat", use_gpu=False)
    index.add([f"{i:064x}" for i in range(100)], unit_rows(100, 0))
    index.save(directory)
    first = visible(directory)
    index.add([f"{i:064x}" for i in range(100, 20100)], unit_rows(20000, 1))   # 2.6 MB more
    ballast = fill(small_disk, leave=64 * 1024)
    with pytest.raises(StoreError, match=rf"cannot write a new version in {directory} \(No space left on device.*"
                                         rf"the current version \(v-\d+-\d+\) is unchanged") as error:
        index.save(directory)
    assert visible(directory) == first   # no half-written version, no temporary folder left
    assert len(RegionIndex.load(directory)) == 100 and len(RegionIndex.load(directory, mapped=True)) == 100

    ballast.unlink()
    index.save(directory)
    assert len(RegionIndex.load(directory)) == 20100 and len(visible(directory)) == 2   # CURRENT + one version
    record_figures("disk_full_version_save", {
        "filesystem": "tmpfs 48 MB, ballast leaving 64 kB", "error": str(error.value).replace(str(small_disk), "<disk>"),
        "previous_version_loads": True, "left_behind": 0, "saved_after_freeing": True})


def test_build_index_on_a_full_disk_stops_clearly_and_the_next_run_completes(small_disk, tmp_path, bench_dir,
                                                                            prefect_api):
    source = tmp_path / "lake_src"
    source.mkdir()
    for i, name in enumerate(BENCH_FILES[:10]):
        shutil.copy(bench_dir / name, source / f"{i:02d}_{Path(name).name}")
    workdir = small_disk / "work"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PREFECT_HOME": str(tmp_path / "prefect"),
           "PREFECT_API_URL": prefect_api,   # the session's server: no temporary one per run
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}   # the runs' records: another disk

    def build_index() -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "flows.cli", "build-index", str(source), "--workdir", str(workdir),
                   *[arg for override in OVERRIDES for arg in ("--set", override)]]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)

    def indexed_frames() -> int:
        ws = Workspace(load_params(None, OVERRIDES), workdir)
        return RegionIndex.load(ws.current_index_dir(), mapped=True).n_frames

    # The first build in this process (the steps the flow runs), to keep the test short; the next two as a user.
    run_steps(Workspace(load_params(None, OVERRIDES), workdir), [str(source)], lambda *args, **info: None)
    assert indexed_frames() == 10
    for i, name in enumerate(BENCH_FILES[10:], start=10):   # 4 new frames: ~120 kB of maps each
        shutil.copy(bench_dir / name, source / f"{i:02d}_{Path(name).name}")
    ballast = fill(small_disk, leave=96 * 1024)
    start = time.monotonic()
    full = build_index()
    failed_s = time.monotonic() - start
    assert full.returncode == 1, full.stderr[-3000:]
    message = full.stderr.strip().splitlines()[-1]
    assert message.startswith(f"objret: error: cannot write {workdir}/") and "No space left on device" in message
    assert "Traceback" not in full.stderr + full.stdout
    assert indexed_frames() == 10   # the previous index, whole
    assert not [p for p in workdir.rglob(".*.tmp") if p.is_file()]   # no temporary file left behind

    ballast.unlink()
    start = time.monotonic()
    done = build_index()
    assert done.returncode == 0, done.stderr[-3000:]
    assert indexed_frames() == 14
    record_figures("disk_full_build_index", {
        "filesystem": "tmpfs 48 MB, ballast leaving 96 kB", "exit_status": full.returncode,
        "message": message.replace(str(small_disk), "<disk>"), "tracebacks": 0, "index_frames_after_failure": 10,
        "failing_run_s": round(failed_s, 1), "index_frames_after_freeing": 14,
        "completing_run_s": round(time.monotonic() - start, 1)})


def test_a_push_on_a_full_disk_keeps_the_last_dataset_version(small_disk, bench_dir):
    from objret.dataset.coco import push
    from objret.dataset.registry import DatasetRegistry
    from tests.dataset.test_coco import PROVENANCE, make_report, mined

    frames = sorted((bench_dir / "tud_campus" / "images").glob("*.jpg"))[:12]
    registry = DatasetRegistry(small_disk / "datasets")

    def push_report(report_id: str, paths):
        with registry.lock():
            push(str(registry.dataset_dir), make_report(report_id), mined(paths), PROVENANCE)
            return registry.commit({"report_id": report_id})

    v1 = push_report("rep-1", frames[:3])
    v1_annotations = (registry.dataset_dir / "annotations.json").read_bytes()
    # Room for the new images and annotations but not for DVC's copies of them in its cache (DVC logs the failed
    # copies and writes the .dvc file all the same: objret checks the cache and puts the last one back), then
    # room for nothing.
    errors = {}
    for leave, where in ((700 * 1024, "into its cache"), (200 * 1024, "cannot write")):
        ballast = fill(small_disk, leave=leave)
        with pytest.raises(StoreError, match=where) as failed:
            push_report("rep-2", frames[3:12])
        errors[f"{leave // 1024} kB free"] = str(failed.value).replace(str(small_disk), "<disk>")
        assert str(small_disk) in str(failed.value) and ("No space left on device" in str(failed.value)
                                                         or "cache" in str(failed.value))
        assert [v["md5"] for v in registry.versions()] == [v1.md5] and registry.current_md5() == v1.md5
        ballast.unlink()
        registry.checkout(v1.md5)   # the last version comes back whole from the cache
        assert (registry.dataset_dir / "annotations.json").read_bytes() == v1_annotations
        assert len(list((registry.dataset_dir / "images").iterdir())) == 3

    v2 = push_report("rep-2", frames[3:12])
    assert v2.number == 2 and registry.current_md5() == v2.md5
    assert len(list((registry.dataset_dir / "images").iterdir())) == 12
    record_figures("disk_full_push", {"errors": errors, "versions_after_each_failure": 1,
                                      "last_version_checked_out_whole": True, "pushed_after_freeing": True})
