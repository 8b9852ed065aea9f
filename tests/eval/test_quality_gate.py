"""The quality gate: `objret eval` with the default parameters over the shipped bench subset (tests/data/bench:
class queries, small pasted objects, video instances), through the production mining path, with
``mining.rerank`` at a tenth of the subset's lake as the default 150 is of the full bench's 1526 frames: the
region and cell shortlists do the work they do on a large lake, and the maps come from the mining store.

Each group's mAP must stay within TOLERANCE of the stored baseline (tests/data/quality_baseline.json), and the
default method's Loc@10 of each instance group within LOC_TOLERANCE (its boxes), so a change that halves the
default method's quality, or moves it at all, fails here; and the default method must
stay at or above whole-image GeM on class queries, small pasted objects and instances overall. A deliberate change of the figures updates the baseline:
OBJRET_UPDATE_QUALITY_BASELINE=1 bash scripts/test.sh tests/eval/test_quality_gate.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[1] / "data"
BENCH = DATA / "bench"
BASELINE = DATA / "quality_baseline.json"
GROUPS = ("class", "paste_visible", "video_instance", "instance")
# fused >= gem where the subset's figure means something: on its 10 video-instance queries (2-5 a set) the two
# are tied (0.749 vs 0.752 when the baseline was written); the full bench has them apart (docs/evaluation.md).
ABOVE_GEM = ("class", "paste_visible", "instance")
RERANK = 14       # 136 frames in the subset's lake
TOLERANCE = 0.015   # mAP; same code and data on another CPU moves a group by far less (float summation order)
LOC_GROUPS = ("paste_visible", "video_instance", "instance")
LOC_TOLERANCE = 0.03   # Loc@10 moves in steps of one box among a few queries' top-10 hits


@pytest.mark.slow
def test_default_method_holds_its_figures_and_stays_above_gem(tmp_path, prefect_api):
    results = tmp_path / "results.json"
    env = dict(os.environ, PREFECT_API_URL=prefect_api)
    env.pop("MLFLOW_TRACKING_URI", None)   # the work folder's own MLflow store
    done = subprocess.run([sys.executable, "-m", "flows.cli", "eval", "--bench", str(BENCH), "--results", str(results),
                           "--workdir", str(tmp_path / "work"), "--methods", "fused,gem",
                           "--set", f"mining.rerank={RERANK}"],
                          capture_output=True, text=True, env=env, timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads(results.with_name("results.summary.json").read_text())
    measured = {method: {g: round(summary[method][g]["mAP"], 4) for g in GROUPS} for method in ("fused", "gem")}
    located = {g: round(summary["fused"][g]["Loc@10"], 4) for g in LOC_GROUPS}
    counts = {g: summary["fused"][g]["n"] for g in GROUPS}
    if os.environ.get("OBJRET_UPDATE_QUALITY_BASELINE"):
        BASELINE.write_text(json.dumps({"queries": counts, "mAP": measured, "fused_Loc@10": located}, indent=1) + "\n")
        pytest.skip(f"baseline written: {measured}, {located}")
    baseline = json.loads(BASELINE.read_text())
    assert counts == baseline["queries"]
    for method in ("fused", "gem"):
        for g in GROUPS:
            assert measured[method][g] == pytest.approx(baseline["mAP"][method][g], abs=TOLERANCE), (method, g)
    for g in LOC_GROUPS:
        assert located[g] == pytest.approx(baseline["fused_Loc@10"][g], abs=LOC_TOLERANCE), (g, located)
    for g in ABOVE_GEM:
        assert measured["fused"][g] >= measured["gem"][g], (g, measured)
