"""The retraining dataset's versions in DVC: each changing push a new version, any version back by its md5,
versions sent to and pulled from an S3 DVC remote (SeaweedFS), published to an S3 prefix with nothing half-written
when the store refuses."""

from __future__ import annotations

import shutil

import pytest

from objret import storage
from objret.dataset.coco import push
from objret.dataset.publish import publish
from objret.dataset.registry import DatasetRegistry
from objret.errors import StoreError
from tests.dataset.test_coco import PROVENANCE, frame_paths, make_report, mined  # noqa: F401 (frame_paths: a fixture)


def _push(registry: DatasetRegistry, report_id: str, frames):
    with registry.lock():
        result = push(str(registry.dataset_dir), make_report(report_id), frames, PROVENANCE)
        return result, registry.commit({"report_id": report_id})


def _bucket(store, name: str) -> None:
    client = store.client()
    if name not in [b["Name"] for b in client.list_buckets().get("Buckets", [])]:
        client.create_bucket(Bucket=name)


def test_each_changing_push_is_a_version_and_any_version_comes_back(tmp_path, frame_paths):
    registry = DatasetRegistry(tmp_path / "datasets")
    first, v1 = _push(registry, "rep-1", mined(frame_paths[:3]))
    v1_bytes = (registry.dataset_dir / "annotations.json").read_bytes()
    same, v1_again = _push(registry, "rep-1", mined(frame_paths[:3]))
    second, v2 = _push(registry, "rep-2", mined(frame_paths[3:6]))

    assert (v1.number, v2.number) == (1, 2) and v1.md5 != v2.md5
    assert not same.changed and v1_again.md5 == v1.md5 and v1_again.number == 1   # no new version
    assert [v["md5"] for v in registry.versions()] == [v1.md5, v2.md5]
    assert registry.current_md5() == v2.md5
    assert len(list((registry.dataset_dir / "images").iterdir())) == 6

    registry.checkout(v1.md5[:8])
    assert (registry.dataset_dir / "annotations.json").read_bytes() == v1_bytes
    assert len(list((registry.dataset_dir / "images").iterdir())) == 3
    registry.checkout(v2.md5)
    assert len(list((registry.dataset_dir / "images").iterdir())) == 6
    with pytest.raises(Exception, match="no dataset version matches"):
        registry.checkout("ffffffff")
    # A version number that does not exist is never taken for the start of an md5 ("9" once found md5 9f...).
    assert registry.find_version("2")["md5"] == v2.md5 and registry.find_version(v1.md5[:6])["md5"] == v1.md5
    for missing in ("9", v1.md5[:5]):
        with pytest.raises(Exception, match="no dataset version matches"):
            registry.find_version(missing)


def test_versions_go_to_an_s3_dvc_remote_and_come_back_on_another_machine(tmp_path, frame_paths, s3_store):
    _bucket(s3_store, "objret-dataset-versions")
    remote = "s3://objret-dataset-versions/datasets"
    registry = DatasetRegistry(tmp_path / "here", remote=remote, endpoint_url=s3_store.endpoint_url)
    _, v1 = _push(registry, "rep-1", mined(frame_paths[:2]))
    v1_bytes = (registry.dataset_dir / "annotations.json").read_bytes()
    _, v2 = _push(registry, "rep-2", mined(frame_paths[2:5]))
    assert v1.pushed and v2.pushed
    assert any(uri.startswith(remote) for uri in storage.list_uris(remote, s3_store.endpoint_url))

    # Another machine: the registry's version files, no DVC cache, no dataset folder.
    there = tmp_path / "there"
    there.mkdir()
    shutil.copytree(registry.versions_dir, there / "versions")
    shutil.copy(registry.root / "versions.jsonl", there / "versions.jsonl")
    elsewhere = DatasetRegistry(there, remote=remote, endpoint_url=s3_store.endpoint_url)
    elsewhere.checkout(v1.md5)
    assert (elsewhere.dataset_dir / "annotations.json").read_bytes() == v1_bytes
    assert sorted(p.name for p in (elsewhere.dataset_dir / "images").iterdir()) == \
        sorted(p.name for p in (registry.dataset_dir / "images").iterdir() if p.name in
               {f"{f.frame_id}.jpg" for f in mined(frame_paths[:2])})


def test_publishing_to_s3_with_wrong_credentials_leaves_the_published_version_whole(
        tmp_path, frame_paths, s3_store, monkeypatch):
    _bucket(s3_store, "objret-published")
    root = "s3://objret-published/retraining"
    registry = DatasetRegistry(tmp_path / "datasets")
    _push(registry, "rep-1", mined(frame_paths[:2]))
    assert publish(str(registry.dataset_dir), root) == 3
    published_v1 = storage.read_bytes(f"{root}/annotations.json")
    _push(registry, "rep-2", mined(frame_paths[2:4]))

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    storage.s3_client.cache_clear()
    with pytest.raises(StoreError) as refused:
        publish(str(registry.dataset_dir), root)
    assert root in str(refused.value) and "not-the-secret" not in str(refused.value)
    assert s3_store.secret_key not in str(refused.value)

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_store.secret_key)
    storage.s3_client.cache_clear()
    assert storage.read_bytes(f"{root}/annotations.json") == published_v1   # readers still see version 1 whole
    assert publish(str(registry.dataset_dir), root) == 3   # the next publish completes version 2
    assert storage.read_bytes(f"{root}/annotations.json") == (registry.dataset_dir / "annotations.json").read_bytes()
    assert publish(str(registry.dataset_dir), root) == 0


def test_versions_made_while_the_dvc_remote_is_unreachable_are_sent_by_the_next_push(tmp_path, frame_paths,
                                                                                     s3_store):
    _bucket(s3_store, "objret-dataset-later")
    remote = "s3://objret-dataset-later/datasets"
    down = DatasetRegistry(tmp_path / "here", remote=remote, endpoint_url="http://127.0.0.1:9")   # nothing there
    with pytest.raises(StoreError, match="saved locally .* could not be sent to the DVC remote s3://objret-dataset"):
        _push(down, "rep-1", mined(frame_paths[:2]))
    assert len(down.versions()) == 1   # the version exists locally
    v1_bytes = (down.dataset_dir / "annotations.json").read_bytes()

    up = DatasetRegistry(tmp_path / "here", remote=remote, endpoint_url=s3_store.endpoint_url)   # the store is back
    _, v2 = _push(up, "rep-2", mined(frame_paths[2:4]))
    assert v2.pushed and v2.number == 2
    assert s3_store.secret_key not in (up.root / ".dvc" / "config").read_text()   # keys stay in the AWS chain

    # Both versions are on the remote: another machine gets version 1 back from it.
    there = tmp_path / "there"
    there.mkdir()
    shutil.copytree(up.versions_dir, there / "versions")
    shutil.copy(up.root / "versions.jsonl", there / "versions.jsonl")
    DatasetRegistry(there, remote=remote, endpoint_url=s3_store.endpoint_url).checkout(down.versions()[0]["md5"])
    assert (there / "retraining" / "annotations.json").read_bytes() == v1_bytes
