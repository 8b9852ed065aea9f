#!/usr/bin/env bash
# Create .venv and install the locked dependencies plus objret itself. Re-running it is cheap: it
# reinstalls only when requirements.lock or pyproject.toml changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
stamp=.venv/.objret-installed
want=$(cat requirements.lock pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "setting up .venv (first run: a few minutes; torch is large)" >&2
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# pip's own config decides where packages come from (PyPI, or a local mirror where one is configured).
.venv/bin/python -m pip install --quiet -r requirements.lock 2>&1 | grep -v "^WARNING: Location" >&2 || true
.venv/bin/python -m pip install --quiet --no-deps -e . 2>&1 | grep -v "^WARNING: Location" >&2 || true
.venv/bin/python -c "import objret, torch, torchvision, timm, faiss, prefect, mlflow, dvc, cv2" \
  || { echo "setup failed: the environment does not import; see the pip messages above" >&2; exit 1; }
echo "$want" > "$stamp"
