"""Measured figures of the hardening tests (issue 7), kept where $OBJRET_FIGURES names a JSON file
(benchmarks/results/hardening.json is written this way); nothing is written when it is unset."""

from __future__ import annotations

import json
import os
from pathlib import Path


def record_figures(name: str, figures: dict) -> None:
    target = os.environ.get("OBJRET_FIGURES")
    print(f"figures {name}: {json.dumps(figures, default=str)}")
    if not target:
        return
    path = Path(target)
    known = json.loads(path.read_text()) if path.is_file() else {}
    known[name] = figures
    path.write_text(json.dumps(known, indent=1, sort_keys=True, default=str) + "\n")
