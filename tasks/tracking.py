"""MLflow records for flow runs: an SQLite-backed store under the work folder, or any tracking URI
(tracking.mlflow_uri, else MLFLOW_TRACKING_URI), e.g. the server `objret tracking-server` starts."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException

from objret.config import redact_credentials
from objret.steps.workspace import Workspace

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# Tracking URIs of a server: it picks (and proxies) the artifact store itself.
SERVER_SCHEMES = ("http://", "https://", "databricks")


def _flatten(prefix: str, value, out: dict) -> dict:
    if isinstance(value, dict):
        for key, sub in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), sub, out)
    else:
        out[prefix] = value
    return out


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=PROJECT_ROOT).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def dvc_lock_hash(root: Path = PROJECT_ROOT) -> str:
    """sha256 prefix of the project's dvc.lock (what `dvc checkout` restores), "none" when there is none."""
    path = Path(root) / "dvc.lock"
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12] if path.is_file() else "none"


def run_tags(ws: Workspace) -> dict:
    """The tags that lead from a run back to its exact inputs: code, parameters, region index and DVC outputs.
    index_version is "none" until the flow knows the index it built or searched (it sets the tag then)."""
    return {"git_commit": _git_commit() or "unknown", "params_hash": ws.params.digest(),
            "index_version": "none", "dvc_lock_hash": dvc_lock_hash()}


def _experiment(name: str, tracking_uri: str, artifact_root: str) -> None:
    if mlflow.get_experiment_by_name(name) is not None:
        return
    # A local store keeps artifacts in the work folder; a server uses its own (proxied) artifact store.
    artifact_location = None if tracking_uri.startswith(SERVER_SCHEMES) else artifact_root
    try:
        mlflow.create_experiment(name, artifact_location=artifact_location)
    except MlflowException:
        if mlflow.get_experiment_by_name(name) is None:   # not another flow creating it at the same time
            raise


@contextlib.contextmanager
def _tracking_uri(uri: str):
    # mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI; the user's value (or none) comes back after the
    # run, or the next flow of this process would take this run's store for the user's choice.
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before


@contextlib.contextmanager
def mlflow_run(ws: Workspace, run_name: str, tags: dict | None = None):
    """Start an MLflow run with every parameter of params.yaml logged, tagged with run_tags (and ``tags``)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = ws.tracking_uri
    with _tracking_uri(uri):
        name = ws.params.tracking.experiment
        _experiment(name, uri, ws.artifact_root)
        mlflow.set_experiment(name)
        with mlflow.start_run(run_name=run_name, tags={**run_tags(ws), **(tags or {})}) as run:
            params = _flatten("", ws.params.to_dict(), {})
            # A URL parameter may carry user:password (an S3 endpoint, a DVC remote): never log that part.
            mlflow.log_params({k: redact_credentials(str(v))[:500] for k, v in params.items()})
            yield run


def log_metrics(metrics: dict) -> None:
    mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None})


def log_artifacts(paths: list[str], artifact_path: str | None = None) -> None:
    for path in paths:
        mlflow.log_artifact(path, artifact_path)


def set_tags(tags: dict) -> None:
    mlflow.set_tags({k: str(v) for k, v in tags.items()})


def run_url(run) -> str:
    return f"experiment {run.info.experiment_id}, run {run.info.run_id}"
