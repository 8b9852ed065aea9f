"""Flow ``mine``: a failure report -> mined frames -> retraining dataset, recorded in MLflow."""

from __future__ import annotations

import mlflow
from prefect import flow

from objret.config import load_params
from objret.mining.report import load_report
from objret.steps.workspace import Workspace
from tasks import steps
from objret.dataset.registry import DATASET_NAME
from tasks.tracking import log_dataset_input, mlflow_run


@flow(name="mine", log_prints=True, persist_result=False)
def mine_flow(report_path: str, params_path: str | None = None, overrides: list[str] | None = None,
              workdir: str | None = None) -> dict:
    ws = Workspace(load_params(params_path, overrides), workdir)
    report = load_report(report_path)  # invalid reports fail here, before any work, with one line per problem
    with mlflow_run(ws, f"mine {report.report_id}", {"flow": "mine", "report_id": report.report_id}) as run:
        outcome = steps.mine(ws, report)
        pushed = steps.push(ws, report, outcome)
        mlflow.set_tags({"index_version": outcome.provenance["index_version"], "dataset_version": pushed["version"],
                         "dataset_dvc_md5": pushed["dvc_md5"], "dataset_dvc_version": pushed["dvc_version"]})
        mlflow.log_artifact(pushed["dvc_file"], "dataset")   # `dvc checkout` / `dvc pull` with it restores the dataset
        # Lineage: the dataset version this run made, by its DVC md5, where DVC keeps it (remote, else registry).
        registry = ws.dataset_registry
        log_dataset_input(DATASET_NAME, pushed["dvc_md5"], registry.remote or str(registry.root), "mined_into",
                          {"dvc_version": pushed["dvc_version"], "annotations_sha": pushed["version"]})
        mlflow.log_artifact(outcome.mined_json)
        mlflow.log_artifact(outcome.contact_sheet)
        mlflow.log_dict(report.to_dict(), "report.json")
        # The page a labeller reviews the frames on; its exported decisions carry this run's ids.
        page_run = {"mlflow_run_id": run.info.run_id, "dataset_version": pushed["dvc_version"],
                    "dataset_dvc_md5": pushed["dvc_md5"], "annotations_sha": pushed["version"],
                    "mined_json": outcome.mined_json}
        if pushed["rejected"]:
            page_run["not_pushed_rejected_before"] = pushed["rejected"]
        page = steps.review_page(ws, outcome, page_run)
        mlflow.log_artifact(page["path"])
        return {"report_id": report.report_id, "mined": len(outcome.mined), "dataset": pushed,
                "contact_sheet": outcome.contact_sheet, "mined_json": outcome.mined_json,
                "review_page": page["uri"], "review_page_run": page["path"],
                "mlflow_run_id": run.info.run_id, "mlflow_experiment_id": run.info.experiment_id,
                "tracking_uri": ws.tracking_uri, "timings": outcome.timings}
