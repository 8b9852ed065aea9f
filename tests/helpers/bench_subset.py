"""A bench-format folder holding some frames of one video set of the test bench and the queries among them (the
tests/fixtures/data.py fixture ``tud_campus_bench`` does the same for TUD-Campus only)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def write_subset(bench_dir: Path, root: Path, set_name: str, keep: set[int]) -> Path:
    """Images ``keep`` (ids) of ``set_name`` with their annotations, and the queries on them, under ``root``."""
    ann = json.loads((bench_dir / set_name / "annotations.json").read_text())
    ann["images"] = [i for i in ann["images"] if i["id"] in keep]
    ann["annotations"] = [a for a in ann["annotations"] if a["image_id"] in keep]
    missing = set(keep) - {i["id"] for i in ann["images"]}
    assert not missing, f"{set_name} of {bench_dir} lacks images {sorted(missing)}"
    (root / set_name / "images").mkdir(parents=True)
    for image in ann["images"]:
        shutil.copy(bench_dir / set_name / image["file_name"], root / set_name / image["file_name"])
    (root / set_name / "annotations.json").write_text(json.dumps(ann))
    queries = [q for q in json.loads((bench_dir / "queries.json").read_text())["queries"]
               if q["set"] == set_name and q["image_id"] in keep]
    for q in queries:
        q.pop("num_positives", None)   # counted on the whole set
    (root / "queries.json").write_text(json.dumps({"version": 1, "queries": queries}))
    return root
