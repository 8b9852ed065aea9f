"""The backbone forward, and mining, with and without PyTorch's transparent-huge-page buffers, alternating.

    python benchmarks/huge_pages.py --bench ../shared/bench --pairs 3 [--workdir W]

`objret build-index` sets THP_MEM_ALLOC_ENABLE=1 (objret.features.cache.use_huge_page_buffers); mining processes
do not. This runs the bare forward of the default backbone over the same frames in fresh processes with it on
and off, alternately (the variable is read once per process). With ``--workdir`` (a work folder whose index is
built, e.g. by `objret eval`) it also runs benchmarks/mining_latency.py there with it on and off, alternately.
Frames/s and latencies per run, and the median ratios, go to benchmarks/results/huge_pages.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

def forward_frames_per_s(images: str, frames: int, passes: int) -> float:
    """In this process: the default backbone's bare forward over the first ``frames`` images, ``passes`` times."""
    import torch

    from feature_caching import bare_forward   # this folder is the script's, so first on sys.path
    from objret.config import load_params
    from objret.features.backbone import build_backbone, pick_device, preprocess
    from objret.features.cache import forward
    from objret.ingest.decode import load_image

    f = load_params().features
    backbone = build_backbone(f.backbone, tuple(f.layers), f.max_side, f.resnet50_weights)
    tensors = [preprocess(load_image(str(p)), backbone.spec.preprocessing)
               for p in sorted(Path(images).glob("*.jpg"))[:frames]]
    device = pick_device()
    backbone.to(device)
    forward(backbone, torch.stack(tensors[:8]), device)   # warm-up
    return passes * len(tensors) / sum(bare_forward(backbone, tensors, 8, device)[0] for _ in range(passes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", default=str(Path(__file__).resolve().parents[2] / "shared" / "bench"))
    parser.add_argument("--set", default="pets09_s2l1")
    parser.add_argument("--frames", type=int, default=48)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--workdir", help="a built work folder: also time mining there (mining_latency.py)")
    parser.add_argument("--reports", type=int, default=20)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "huge_pages.json"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)   # one timed process
    args = parser.parse_args()
    if args.child:
        print(forward_frames_per_s(str(Path(args.bench, args.set, "images")), args.frames, args.passes))
        return

    runs: dict[str, list[float]] = {"on": [], "off": []}
    for pair in range(args.pairs):
        for setting, value in (("on", "1"), ("off", "0")):
            env = {**os.environ, "THP_MEM_ALLOC_ENABLE": value}
            out = subprocess.run([sys.executable, __file__, "--child", "--bench", args.bench, "--set", args.set,
                                  "--frames", str(args.frames), "--passes", str(args.passes)], env=env,
                                 capture_output=True, text=True, check=True)
            runs[setting].append(float(out.stdout.split()[-1]))
            print(f"  pair {pair + 1}, huge pages {setting:3s}: {runs[setting][-1]:6.2f} frames/s", flush=True)
    ratios = [a / b for a, b in zip(runs["on"], runs["off"])]
    figures = {"frames": args.frames, "passes": args.passes, "pairs": args.pairs,
               "thp_setting": Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip(),
               "frames_per_s_on": runs["on"], "frames_per_s_off": runs["off"],
               "on_over_off_median": statistics.median(ratios)}
    if args.workdir:
        figures["mining"] = mining(args)
    Path(args.out).write_text(json.dumps(figures, indent=1) + "\n")
    print(f"bare forward with huge pages {figures['on_over_off_median']:.2f}x the forward without (median of "
          f"{args.pairs} alternating pairs)")
    if args.workdir:
        m = figures["mining"]
        print(f"mining (template matching and fusion, median of {args.reports} reports) with huge pages "
              f"{m['rank_on_over_off_median']:.2f}x the time without")


def mining(args) -> dict:
    """Median seconds a report spends ranking (template matching + fusion) and in all, huge pages on and off."""
    script = Path(__file__).resolve().parent / "mining_latency.py"
    runs: dict[str, list[dict]] = {"on": [], "off": []}
    with tempfile.TemporaryDirectory() as tmp:
        for pair in range(args.pairs):
            for setting, value in (("on", "1"), ("off", "0")):
                out = Path(tmp) / f"{setting}-{pair}.json"
                subprocess.run([sys.executable, str(script), "--bench", args.bench, "--workdir", args.workdir,
                                "--reports", str(args.reports), "--out", str(out)],
                               env={**os.environ, "THP_MEM_ALLOC_ENABLE": value}, capture_output=True, check=True)
                timing = json.loads(out.read_text())["all"]
                runs[setting].append({"rank_s": timing["rank_s"]["median_s"], "total_s": timing["total_s"]["median_s"]})
                print(f"  pair {pair + 1}, mining, huge pages {setting:3s}: rank {runs[setting][-1]['rank_s']:.3f} s, "
                      f"total {runs[setting][-1]['total_s']:.3f} s", flush=True)
    ratios = [a["rank_s"] / b["rank_s"] for a, b in zip(runs["on"], runs["off"])]
    return {"reports": args.reports, "on": runs["on"], "off": runs["off"],
            "rank_on_over_off_median": statistics.median(ratios)}


if __name__ == "__main__":
    main()
