"""Dataset steps: mined frames pushed to the retraining dataset (versioned, published); review decisions applied;
versions exported for labelling and training tools."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from objret import storage
from objret.dataset.coco import ANNOTATIONS_FILE, MinedFrame, PushResult, parse_annotations, push
from objret.dataset.decisions import ApplyResult, Decisions, apply_decisions, rejected_frames, rejections
from objret.dataset.exports import ExportResult, export, take_snapshot
from objret.dataset.publish import publish
from objret.dataset.review_page import write_review_page
from objret.errors import ObjretError, StoreError
from objret.mining.report import FailureReport
from objret.steps.mine import MiningOutcome
from objret.steps.workspace import Workspace


def push_mined(ws: Workspace, report: FailureReport, outcome: MiningOutcome) -> PushResult:
    """Push the mined frames with their boxes and provenance to the retraining dataset (idempotent)."""
    mined_frames = [MinedFrame(frame_id=k["frame_id"], uri=k["uri"], image_uri=k["image_uri"], width=k["width"],
                               height=k["height"], score=k["score"], box=tuple(k["box"]), rank=k["rank"],
                               frame_index=k["frame_index"], time_s=k["time_s"],
                               evidence={**k["evidence"], "near_duplicates": len(k["duplicates"])})
                    for k in outcome.mined]
    registry = ws.dataset_registry
    with registry.lock():   # concurrent mining runs take turns: each push builds on the one before
        rejected = rejected_frames(str(registry.dataset_dir), report.report_id)   # by a review: never again
        mined_frames = [f for f in mined_frames if f.frame_id not in rejected]
        result = push(str(registry.dataset_dir), report, mined_frames, outcome.provenance,
                      copy_frames=ws.params.dataset.copy_frames,
                      endpoint_url=ws.s3_endpoint_url)
        # Every call: a push that changed nothing maps to the version it already is (and a version a killed
        # run did not record is recorded now).
        version = registry.commit({"report_id": report.report_id, "annotations_sha": result.version})
        if ws.dataset_root != str(registry.dataset_dir):
            _publish(ws, version)
            result = replace(result, root=ws.dataset_root,
                             annotations_uri=storage.join(ws.dataset_root, ANNOTATIONS_FILE))
    return replace(result, dvc_md5=version.md5, dvc_version=version.number, dvc_file=version.dvc_file,
                   dvc_pushed=version.pushed, rejected=len(outcome.mined) - len(mined_frames))


def _publish(ws: Workspace, version) -> None:
    """The registry's dataset published to dataset.root (call with the registry's lock held). When the store
    fails, the error says what is safe: the version is in the registry, readers of dataset.root still see the
    previous one whole (annotations.json is written last), and the next push or review publishes it."""
    registry = ws.dataset_registry
    try:
        publish(str(registry.dataset_dir), ws.dataset_root, ws.s3_endpoint_url,
                guard=ws.params.dataset.publish_guard)
    except StoreError as exc:
        raise StoreError(f"dataset version {version.number} ({version.md5}) is saved in {registry.root} but is not "
                         f"published to {ws.dataset_root} yet (readers there see the previous version; the next "
                         f"push publishes it): {exc}") from exc


def review_page(ws: Workspace, outcome: MiningOutcome, run: dict | None = None) -> tuple[str, str]:
    """The mining run's review page (objret.dataset.review_page) in its run folder and beside the dataset
    (Workspace.reviews_root); returns both locations. ``run``: what else to show and export (MLflow run, dataset
    version)."""
    local = str(Path(outcome.run_dir) / "review.html")
    beside = storage.join(ws.reviews_root, f"{outcome.report_id}.html")
    write_review_page(outcome.mined_json, [local, beside], run, ws.s3_endpoint_url)
    return local, beside


def apply_review(ws: Workspace, decisions: Decisions) -> ApplyResult:
    """A review's decisions applied to the retraining dataset as a new version: the rejected frames' annotations
    removed, the rejections remembered (objret.dataset.decisions), then versioned and published as a push is."""
    registry = ws.dataset_registry
    with registry.lock():
        result = apply_decisions(str(registry.dataset_dir), decisions)
        version = registry.commit({"report_id": decisions.report_id, "annotations_sha": result.version,
                                   "review": {"accepted": result.accepted, "rejected": result.rejected,
                                              "removed": result.removed}})
        if ws.dataset_root != str(registry.dataset_dir):
            _publish(ws, version)
            result = replace(result, root=ws.dataset_root)
    return replace(result, dvc_md5=version.md5, dvc_version=version.number, dvc_file=version.dvc_file,
                   dvc_pushed=version.pushed)


def export_dataset(ws: Workspace, fmt: str, out: str, version: str | None = None) -> ExportResult:
    """A dataset version (number or md5 prefix; default the current one) exported to ``out`` in ``fmt``
    (objret.dataset.exports). Frames a review rejected are left out, by the verdicts as they stand now."""
    registry = ws.dataset_registry
    entry = registry.find_version(version)
    files = registry.version_files(entry)
    if ANNOTATIONS_FILE not in files:
        raise StoreError(f"dataset version {entry['number']} ({entry['md5']}) holds no {ANNOTATIONS_FILE}")
    coco = parse_annotations(files[ANNOTATIONS_FILE].read_bytes(), f"dataset version {entry['md5']}")

    def read_image(image: dict) -> bytes:
        name = image["file_name"]
        if name in files:   # copied into the dataset (dataset.copy_frames)
            return files[name].read_bytes()
        return storage.read_bytes(name, ws.s3_endpoint_url)   # the lake's own file

    rejected = rejections(str(registry.dataset_dir))
    snapshot = take_snapshot(coco, {"number": entry["number"], "md5": entry["md5"]}, rejected, read_image)
    return export(snapshot, fmt, out, ws.s3_endpoint_url)


def mining_run_in_fiftyone(ws: Workspace, report_id: str):
    """The last mining run of ``report_id`` loaded into the FiftyOne dataset ``objret-mine-<report_id>``."""
    from objret.dataset.exports.fiftyone_dataset import mining_run_dataset

    mined_json = ws.run_path(f"mine-{report_id}") / "mined.json"
    if not mined_json.is_file():
        raise ObjretError(f"no mining run of report {report_id!r} in {mined_json.parent.parent}: objret mine it first")
    run = json.loads(mined_json.read_text())
    return mining_run_dataset(run, f"objret-mine-{report_id}")
