"""The class list of objret.index.class_frames at growing lake sizes: build time, memory, one query's cost.

    python benchmarks/class_frames_scale.py [--sizes 100000,1000000]

A LakeSearch builds it from the region index's per-region meta the first time a query with detector classes
asks (objret.mining.search.LakeSearch.class_frames); each such query then reads the lists of its box's classes.
Synthetic meta, each size in its own process (so its peak RSS is its own): 50 regions a frame, 60% of them
detector regions (the SSD keeps up to 30 boxes over score 0.05) drawn from 9 street classes weighted as a
driving lake would hold them (person and car most), confidences uniform in (0, 1]: more (frame, class) pairs than
the bench's 5.3 a frame. Per size: build seconds, the pairs held, the bytes held, the build's peak RSS growth
over the meta itself, and the median of 20 queries' agreement() (a box seen as a person 0.8, a bicycle 0.2).
Results go to benchmarks/results/class_frames_scale.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REGIONS_PER_FRAME = 50
DETECTOR_SHARE = 0.6
STREET_CLASSES = [1, 1, 1, 3, 3, 2, 10, 6, 8]   # person, car, bicycle, traffic light, bus, truck (COCO ids)


def one_size(n_frames: int) -> dict:
    from objret.index.class_frames import ClassFrames

    rng = np.random.default_rng(0)
    n = n_frames * REGIONS_PER_FRAME
    owner = np.repeat(np.arange(n_frames, dtype=np.int32), REGIONS_PER_FRAME)
    detector = rng.random(n) < DETECTOR_SHARE
    classes = np.full(n, -1, np.float32)   # the index stores the class as float32 meta
    classes[detector] = rng.choice(STREET_CLASSES, int(detector.sum()))
    scores = np.where(detector, 1.0 - rng.random(n), 0.0).astype(np.float32)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    frames = ClassFrames.from_regions(owner, classes, scores, n_frames)
    build = time.perf_counter() - start
    growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    times = []
    for _ in range(20):
        start = time.perf_counter()
        frames.agreement({1: 0.8, 2: 0.2})
        times.append(time.perf_counter() - start)
    held = frames.rows.nbytes + frames.scores.nbytes + frames.starts.nbytes + frames.labels.nbytes
    return {"frames": n_frames, "regions": n, "build_s": round(build, 3), "pairs": len(frames),
            "pairs_per_frame": round(len(frames) / n_frames, 2), "held_MB": round(held / 1e6, 1),
            "build_peak_rss_growth_GB": round(growth / 1e6, 3),
            "query_ms_p50": round(1e3 * statistics.median(times), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)   # run one size in this process
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "class_frames_scale.json"))
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_size(args.one)))
        return
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        done = subprocess.run([sys.executable, __file__, "--one", str(size)], check=True, capture_output=True,
                              text=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    Path(args.out).write_text(json.dumps({"command": f"python benchmarks/class_frames_scale.py --sizes {args.sizes}",
                                          "results": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
