#!/usr/bin/env bash
# Create .venv and install the locked dependencies plus objret itself. Re-running it is cheap: it
# reinstalls only when requirements.lock or pyproject.toml changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."
# The review page's browser test drives Debian's Chromium through its chromedriver (nothing downloaded at run time).
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  echo "installing Debian's chromium and chromium-driver (the review page's browser test)" >&2
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  # Wait for another apt/dpkg run (an unattended upgrade, a second setup) instead of failing on its lock.
  apt_install() { DEBIAN_FRONTEND=noninteractive $sudo apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
                    --no-install-recommends chromium chromium-driver >/dev/null 2>&1; }
  apt_install || { $sudo apt-get -o DPkg::Lock::Timeout=600 update -qq >/dev/null 2>&1 && apt_install; } \
    || { echo "setup failed: cannot install chromium and chromium-driver with apt-get (run as root or with sudo)" >&2
         exit 1; }
fi
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
.venv/bin/python -c "import objret, torch, torchvision, timm, faiss, prefect, mlflow, dvc, cv2, selenium" \
  || { echo "setup failed: the environment does not import; see the pip messages above" >&2; exit 1; }
echo "$want" > "$stamp"
