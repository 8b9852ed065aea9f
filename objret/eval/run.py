"""Score mining methods on a benchmark folder (bench format) ingested as one lake.

Each query is ranked by a function the caller gives (``rank_with(method, query) -> Ranking``): objret's flows
pass the very path ``objret mine`` takes (objret.steps.mine.rank_report_query: candidate selection from the
region index, small-box rule, ``mining.rerank``, the method registry), so the figures measure production.
A gallery image the method did not rank (outside the candidates) is missing from the ranking, as it would
be missing from a mining run, and costs its positives' recall.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from objret.errors import ObjretError
from objret.eval.bench import Bench, Query
from objret.eval.metrics import EvalReport, evaluate
from objret.mining.evidence import Ranking


@dataclass
class MethodRun:
    method: str
    results: dict[str, list[dict]]
    report: EvalReport
    seconds_per_query: float


def bench_frame_ids(bench: Bench, lake) -> dict[tuple[str, int], str]:
    """Map each bench image (set, image_id) to its lake frame id (the lake must hold every bench image)."""
    out, missing = {}, []
    for key, image in bench.images.items():
        frame = lake.find(str(Path(image.path).resolve()))
        if frame is None:
            missing.append(str(image.path))
        else:
            out[key] = frame.frame_id
    if missing:
        raise ObjretError(f"{len(missing)} bench images are not in the lake (first: {missing[0]}); ingest the bench")
    return out


def gallery_entries(bench: Bench, q: Query, frame_of: dict, ranking: Ranking) -> list[dict]:
    """A query's gallery images that ``ranking`` scored, with their frame's score and box, best first (the
    bench's result format)."""
    row_of = {fid: i for i, fid in enumerate(ranking.frame_ids)}
    entries = []
    for key in bench.gallery_keys(q):
        row = row_of.get(frame_of[key])
        if row is not None:
            entries.append({"set": key[0], "image_id": key[1], "score": float(ranking.scores[row]),
                            "bbox": [round(float(v), 2) for v in ranking.boxes[row]]})
    entries.sort(key=lambda e: -e["score"])
    return entries


def run_method(method: str, bench: Bench, frame_of: dict, rank_with: Callable[[str, Query], Ranking],
               progress: bool = True) -> tuple[dict[str, list[dict]], float]:
    """Every query of ``bench`` ranked by ``method``; results in the bench README's format, seconds a query."""
    results: dict[str, list[dict]] = {}
    start = time.perf_counter()
    for q in tqdm(bench.queries, desc=method, unit="query", disable=not progress, dynamic_ncols=True):
        results[q.id] = gallery_entries(bench, q, frame_of, rank_with(method, q))
    return results, (time.perf_counter() - start) / max(1, len(bench.queries))


def evaluate_methods(bench: Bench, frame_of: dict, methods: list[str], rank_with: Callable[[str, Query], Ranking],
                     progress: bool = True) -> list[MethodRun]:
    """Every method over the same lake, each query through ``rank_with``; scored per the bench's README."""
    runs = []
    for method in methods:
        results, seconds = run_method(method, bench, frame_of, rank_with, progress)
        runs.append(MethodRun(method, results, evaluate(bench, results), seconds))
    return runs
