"""MLflow records for flow runs: an SQLite-backed store under the work folder, or any tracking URI
(tracking.mlflow_uri, else MLFLOW_TRACKING_URI), e.g. the server `objret tracking-server` starts."""

from __future__ import annotations

import contextlib
import hashlib
import json
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


# MLflow 3 opens an experiment of no kind on its GenAI "Traces" overview; a model-training one opens on its runs.
EXPERIMENT_KIND = "mlflow.experimentKind"
# The runs table's columns, as a view the UI loads from the experiment's tags (its "share view" mechanism): the
# URL runs_view_url() names shows the key figures beside each run's dataset.
VIEW_KEY = "objret"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"


def runs_view(method: str) -> dict:
    """Mining runs: report, mined frames, dataset version; eval runs: the default method's headline figures."""
    metric = lambda name: f"metrics.`{name}`"   # noqa: E731  (the UI's column keys)
    return {"selectedColumns": ["attributes.`Dataset`", "tags.`flow`", "tags.`report_id`", metric("mined"),
                                "tags.`dataset_dvc_version`", metric(f"{method}.class_mAP"),
                                metric(f"{method}.paste_visible_mAP"), metric(f"{method}.paste_visible_Loc10"),
                                metric(f"{method}.instance_Loc10"), "attributes.`Duration`"],
            "orderByKey": "attributes.start_time", "orderByAsc": False}


def experiment_tags(method: str) -> dict:
    return {EXPERIMENT_KIND: "custom_model_development", VIEW_TAG: json.dumps(runs_view(method))}


def runs_view_url(ui_url: str, experiment_id: str) -> str:
    return f"{ui_url.rstrip('/')}/#/experiments/{experiment_id}/runs?viewStateShareKey={VIEW_KEY}"


def _experiment(name: str, tracking_uri: str, artifact_root: str, tags: dict) -> None:
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        for key, value in tags.items():   # an experiment an older objret (or another method) made
            if experiment.tags.get(key) != value:
                mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, key, value)
        return
    # A local store keeps artifacts in the work folder; a server uses its own (proxied) artifact store.
    artifact_location = None if tracking_uri.startswith(SERVER_SCHEMES) else artifact_root
    try:
        mlflow.create_experiment(name, artifact_location=artifact_location, tags=tags)
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
        _experiment(name, uri, ws.artifact_root, experiment_tags(ws.params.mining.method))
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


def log_dataset_input(name: str, digest: str, source_uri: str, context: str, tags: dict | None = None) -> None:
    """Record a dataset as an input of the active run (MLflow's dataset panel and the runs table's Dataset
    column): its name, digest and where it lives. Only the reference is logged, never the data."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    with warnings.catch_warnings():   # a local path matches two equivalent local source types; either is right
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(source_uri)
    mlflow.log_input(MetaDataset(source, name=name, digest=digest), context=context,
                     tags={k: str(v) for k, v in (tags or {}).items()})
