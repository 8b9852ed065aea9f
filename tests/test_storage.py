"""Store faults (issue 7, item 3): the S3 store (a SeaweedFS of the test's own) killed, or paused (SIGSTOP), in the
middle of a push to a published retraining dataset or of an ingest from an S3 lake prefix.

A stopped store: the operation retries with backoff (objret.storage: 5 attempts, 3.75-7.5 s of waiting), then
fails with an error that names the object, never the keys; readers of the published dataset still see the previous
version whole (annotations.json, the commit point, is written last), the frames ingested so far stay in the lake,
and the next run, once the store is back, completes the push or the ingest. A paused store: the operation waits
(or times out and retries) and completes when the store answers again.
"""

from __future__ import annotations

import threading
import time

import pytest

from tests.helpers.figures import record_figures
from objret import storage
from objret.steps import dataset as dataset_step
from objret.config import load_params
from objret.errors import StoreError
from objret.ingest.lake import Lake
from objret.steps.workspace import Workspace
from tests.helpers.push_worker import outcome_of, report_of
from tests.dataset.test_concurrent_push import bench_frames, report_frames

pytestmark = pytest.mark.slow

BUCKET = "objret-faults"
PAUSE_S = 3.0


@pytest.fixture
def published(faulty_s3, request) -> str:
    """This test's dataset prefix on the module's store (the bucket outlives a test)."""
    client = faulty_s3.store.client()
    if BUCKET not in [b["Name"] for b in client.list_buckets().get("Buckets", [])]:
        client.create_bucket(Bucket=BUCKET)
    return f"s3://{BUCKET}/{request.node.name[:40]}/retraining"


def _workspace(tmp_path, published: str) -> Workspace:
    return Workspace(load_params(None, [f"dataset.registry={tmp_path / 'registry'}", f"dataset.root={published}"]),
                     tmp_path / "work")


def _push(ws: Workspace, frames: list[dict], i: int):
    job = {"report_id": f"rep-{i}", "frames": report_frames(frames, i)}
    return dataset_step.push_mined(ws, report_of(job), outcome_of(job, str(ws.run_dir(f"mine-rep-{i}"))))


def _before_s3_call(monkeypatch, name: str, n: int, action) -> None:
    """Run ``action()`` just before the n-th S3 call of storage.<name> (write_bytes, read_bytes) from now on."""
    real = getattr(storage, name)
    count = 0

    def wrapped(uri, *args, **kwargs):
        nonlocal count
        if storage.is_s3(uri):
            count += 1
            if count == n:
                action()
        return real(uri, *args, **kwargs)

    monkeypatch.setattr(storage, name, wrapped)


def _published_images(published: str) -> list[str]:
    return sorted(uri.rsplit("/", 1)[-1] for uri in storage.list_uris(f"{published}/images"))


def test_a_store_stopped_mid_push_fails_clearly_and_the_next_push_completes_it(tmp_path, bench_dir, faulty_s3,
                                                                                published, monkeypatch):
    frames = bench_frames(bench_dir)
    ws = _workspace(tmp_path, published)
    registry = ws.dataset_registry
    first = _push(ws, frames, 0)   # version 1, published
    v1 = storage.read_bytes(f"{published}/annotations.json")

    # Report 1 shares 2 frames with report 0: its publish writes 2 images, then annotations.json. The store dies
    # after the first image.
    with monkeypatch.context() as patch:
        _before_s3_call(patch, "write_bytes", 2, faulty_s3.kill)
        start = time.monotonic()
        with pytest.raises(StoreError) as failed:
            _push(ws, frames, 1)
        to_error = time.monotonic() - start
    message = str(failed.value)
    assert f"cannot write {published}/images/" in message and "gave up after 5 attempts" in message
    assert "dataset version 2" in message and "the next push publishes it" in message
    assert faulty_s3.store.secret_key not in message and faulty_s3.store.access_key not in message
    assert 3.0 < to_error < 15.0   # 3.75-7.5 s of backoff, refused connections fail at once

    restart_s = faulty_s3.start()
    # No partial version visible: the published annotations.json is version 1, whole, with all its images.
    assert storage.read_bytes(f"{published}/annotations.json") == v1
    assert len(_published_images(published)) == 5   # version 1's 4 and one image of version 2 nobody references yet
    assert [v["number"] for v in registry.versions()] == [1, 2]   # version 2 is safe in the registry

    # The next run (the same report mined again) publishes version 2; it makes no third version.
    start = time.monotonic()
    again = _push(ws, frames, 1)
    complete_s = time.monotonic() - start
    assert (again.changed, again.dvc_version) == (False, 2)
    assert storage.read_bytes(f"{published}/annotations.json") == \
        (registry.dataset_dir / "annotations.json").read_bytes()
    assert _published_images(published) == sorted(p.name for p in (registry.dataset_dir / "images").iterdir())
    assert len(_published_images(published)) == 6 and first.dvc_version == 1
    record_figures("store_stopped_mid_push", {
        "time_to_error_s": round(to_error, 2), "store_restart_s": round(restart_s, 2),
        "next_push_completes_s": round(complete_s, 2), "published_version_while_down": 1, "error": message,
        "versions_made": len(registry.versions())})


def test_a_store_paused_mid_push_delays_it_and_it_completes(tmp_path, bench_dir, faulty_s3, published,
                                                            monkeypatch):
    frames = bench_frames(bench_dir)
    ws = _workspace(tmp_path, published)
    start = time.monotonic()
    _push(ws, frames, 0)
    unpaused_s = time.monotonic() - start

    def pause():
        faulty_s3.pause()
        threading.Timer(PAUSE_S, faulty_s3.resume).start()

    with monkeypatch.context() as patch:   # paused before the second image: shorter than one read timeout
        _before_s3_call(patch, "write_bytes", 2, pause)
        start = time.monotonic()
        result = _push(ws, frames, 2)
        paused_s = time.monotonic() - start
    assert result.dvc_version == 2 and PAUSE_S <= paused_s < PAUSE_S + 10
    assert storage.read_bytes(f"{published}/annotations.json") == \
        (ws.dataset_registry.dataset_dir / "annotations.json").read_bytes()

    # Paused longer than a read timeout (1 s here): the timed-out attempts are retried until it answers again.
    monkeypatch.setattr(storage, "READ_TIMEOUT_S", 1)
    monkeypatch.setattr(storage, "RETRY_BASE_S", 0.25)
    storage.s3_client.cache_clear()
    failures = []
    transient = storage._transient
    with monkeypatch.context() as patch:
        _before_s3_call(patch, "write_bytes", 1, pause)
        patch.setattr(storage, "_transient", lambda exc: failures.append(type(exc).__name__) or transient(exc))
        start = time.monotonic()
        result = _push(ws, frames, 4)
        retried_s = time.monotonic() - start
    assert result.dvc_version == 3 and PAUSE_S <= retried_s < PAUSE_S + 10
    assert failures and set(failures) == {"ReadTimeoutError"}   # timed out, retried, then through
    assert storage.read_bytes(f"{published}/annotations.json") == \
        (ws.dataset_registry.dataset_dir / "annotations.json").read_bytes()

    # Paused for good: the attempts time out, then a clear error. 3 attempts here (to keep the test short): 3 x (1 s
    # for the "100 Continue" botocore waits for + the 1 s read timeout) + 0.375-0.75 s of backoff.
    monkeypatch.setattr(storage, "RETRY_ATTEMPTS", 3)
    with monkeypatch.context() as patch:
        _before_s3_call(patch, "write_bytes", 1, faulty_s3.pause)
        start = time.monotonic()
        with pytest.raises(StoreError, match=r"cannot write s3://.*ReadTimeoutError.*gave up after 3 attempts"):
            _push(ws, frames, 6)
        hung_s = time.monotonic() - start
    faulty_s3.resume()
    assert 6.0 <= hung_s < 15.0
    record_figures("store_paused_mid_push", {
        "push_s_unpaused": round(unpaused_s, 2), "pause_s": PAUSE_S, "push_s_with_pause": round(paused_s, 2),
        "push_s_with_pause_over_1s_read_timeout": round(retried_s, 2), "timeouts_retried": len(failures),
        "time_to_error_s_hung_store_3_attempts_1s_read_timeout": round(hung_s, 2),
        "time_to_error_s_hung_store_default_bound": 5 * (30 + 1) + 7.5})


def test_a_store_stopped_mid_ingest_keeps_what_was_read_and_the_next_ingest_completes(tmp_path, bench_dir,
                                                                                     faulty_s3, published,
                                                                                     monkeypatch):
    frames = bench_frames(bench_dir, 8)
    source = published.replace("/retraining", "/lake")
    for i, frame in enumerate(frames):
        storage.write_bytes(f"{source}/{i:02d}.jpg", open(frame["path"], "rb").read())
    lake = Lake(tmp_path / "lake")
    with monkeypatch.context() as patch:   # the store dies before the 4th frame is read
        _before_s3_call(patch, "read_bytes", 4, faulty_s3.kill)
        start = time.monotonic()
        with pytest.raises(StoreError) as failed:
            lake.ingest(source, every_n=1, progress=False)
        to_error = time.monotonic() - start
    message = str(failed.value)
    assert f"cannot read {source}/03.jpg" in message and "gave up after 5 attempts" in message
    assert faulty_s3.store.secret_key not in message
    assert [f.uri for f in lake.frames()] == [f"{source}/{i:02d}.jpg" for i in range(3)]   # kept

    faulty_s3.start()
    start = time.monotonic()
    resumed = lake.ingest(source, every_n=1, progress=False)
    complete_s = time.monotonic() - start
    assert (resumed.added, resumed.skipped, resumed.errors) == (5, 3, [])
    assert [f.frame_id for f in lake.frames()] == [f["frame_id"] for f in frames]
    record_figures("store_stopped_mid_ingest", {
        "time_to_error_s": round(to_error, 2), "frames_kept": 3, "next_ingest_added": resumed.added,
        "next_ingest_s": round(complete_s, 2)})
