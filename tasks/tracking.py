"""MLflow records for flow runs: an SQLite-backed store under the work folder unless a tracking URI is given."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import mlflow

from objret.workspace import Workspace


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
                              cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except OSError:
        return None


@contextlib.contextmanager
def mlflow_run(ws: Workspace, run_name: str, tags: dict | None = None):
    """Start an MLflow run with every parameter of params.yaml logged, tagged with the params hash and commit."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    mlflow.set_tracking_uri(ws.tracking_uri)
    name = ws.params.section("tracking").get("experiment", "objret")
    if mlflow.get_experiment_by_name(name) is None:
        artifact_location = ws.artifact_root if ws.tracking_uri.startswith("sqlite:") else None
        mlflow.create_experiment(name, artifact_location=artifact_location)
    mlflow.set_experiment(name)
    all_tags = {"params_hash": ws.params.digest(), "git_commit": _git_commit() or "unknown", **(tags or {})}
    with mlflow.start_run(run_name=run_name, tags=all_tags) as run:
        params = _flatten("", dict(ws.params), {})
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
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
