#!/usr/bin/env bash
# Set up, then run the test suite offline (telemetry off; services are started by the tests on 127.0.0.1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DO_NOT_TRACK=true MLFLOW_DISABLE_TELEMETRY=true PREFECT_SERVER_ANALYTICS_ENABLED=false \
  DVC_NO_ANALYTICS=1 DVC_STUDIO_OFFLINE=1 PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=180 FIFTYONE_DO_NOT_TRACK=true
exec .venv/bin/python -m pytest "$@"
