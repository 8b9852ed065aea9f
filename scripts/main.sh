#!/usr/bin/env bash
# The main job on the embedded defaults: set up, build a lake from the PETS 2009 video (or the folder, video
# or s3:// prefix given as an argument), mine the shipped failure report, print where the results are.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/objret demo "$@"
