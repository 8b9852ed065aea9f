"""Feature caching throughput against the bare backbone forward on the same frames, in one run.

    python benchmarks/feature_caching.py --bench ../shared/bench --frames 96

Prints frames/s for (1) the bare forward pass on preprocessed tensors already in memory, (2) the full
caching path (decode + resize + forward + fp16 + sharded write) into an empty cache, (3) a second caching
run over the same frames (everything cached), and writes them to benchmarks/results/feature_caching.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from objret.features.backbone import build_backbone, pick_device, preprocess
from objret.config import load_params
from objret.features.cache import FeatureCache, cache_features, forward
from objret.steps import store as store_step
from objret.steps.workspace import Workspace
from objret.ingest.lake import Lake
from objret.ingest.decode import load_image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", default=str(Path(__file__).resolve().parents[2] / "shared" / "bench"))
    parser.add_argument("--set", default="pets09_s2l1", help="bench set whose frames are used")
    parser.add_argument("--frames", type=int, default=96)
    parser.add_argument("--backbone", default="efficientnet_lite2")
    parser.add_argument("--max-side", type=int, default=640)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "feature_caching.json"))
    args = parser.parse_args()

    device = pick_device()
    layers = tuple(load_params().features.layers)   # as the cache runs
    backbone = build_backbone(args.backbone, layers=layers, max_side=args.max_side)
    with tempfile.TemporaryDirectory() as tmp:
        lake = Lake(Path(tmp) / "lake")
        images = sorted(Path(args.bench, args.set, "images").glob("*.jpg"))[: args.frames]
        for path in images:
            lake.ingest(str(path), every_n=1, progress=False)
        frames = lake.frames()

        # (1) bare forward: tensors prepared beforehand, the same batching and autocast as the cache uses.
        tensors = [preprocess(load_image(f.image_uri), backbone.spec.preprocessing) for f in frames]
        backbone.to(device)
        forward(backbone, torch.stack(tensors[: args.batch_size]), device)  # warm-up
        start = time.perf_counter()
        for i in range(0, len(tensors), args.batch_size):
            forward(backbone, torch.stack(tensors[i:i + args.batch_size]), device)
            if device.type == "cuda":
                torch.cuda.synchronize()
        bare = time.perf_counter() - start

        # (2) the caching path, cold; (3) the same again, warm.
        cache = FeatureCache(Path(tmp) / "features", backbone.spec.cache_key())
        read = load_image
        cold = cache_features(backbone, cache, frames, read, batch_size=args.batch_size, device=device, progress=False)
        start = time.perf_counter()
        warm = cache_features(backbone, cache, frames, read, batch_size=args.batch_size, device=device, progress=False)
        warm_s = time.perf_counter() - start
        shard_bytes = sum(p.stat().st_size for p in cache.shards())

        # (4) the mining store written from that cache, as build-index's store step does it (codebooks learned
        # once, then every frame encoded): a lake's frames pay the encoding on top of (2).
        ws = Workspace(load_params(None, [f"features.backbone={args.backbone}", f"features.max_side={args.max_side}"]),
                       tmp)
        assert ws.cache.dir == cache.dir
        start = time.perf_counter()   # the codebooks: once per lake (on its first frames), not per frame
        ids = [f.frame_id for f in frames]
        ws.map_store.set_codec(store_step.fit_codec(ws, ids[:ws.params.index.map_store.train_frames]))
        codec_s = time.perf_counter() - start
        start = time.perf_counter()
        stored = store_step.store(ws, progress=False)
        store_s = time.perf_counter() - start

    n = len(frames)
    figures = {
        "frames": n, "backbone": args.backbone, "max_side": args.max_side, "device": str(device),
        "torch_threads": torch.get_num_threads(), "machine": platform.machine(),
        "bare_forward_frames_per_s": n / bare,
        "caching_frames_per_s": cold.computed / cold.seconds,
        "caching_over_bare": (cold.computed / cold.seconds) / (n / bare),
        "second_run_computed": warm.computed, "second_run_seconds": warm_s,
        "cache_bytes_per_frame": shard_bytes / n,
        "codebooks_seconds": codec_s, "store_seconds": store_s, "store_bytes_per_frame": stored.bytes_per_frame,
        "caching_and_store_over_bare": (cold.computed / (cold.seconds + store_s)) / (n / bare),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(figures, indent=1) + "\n")
    print(f"{n} frames of {args.set}, {args.backbone} at {args.max_side} px on {device}")
    print(f"  bare backbone forward : {figures['bare_forward_frames_per_s']:7.2f} frames/s")
    print(f"  feature caching       : {figures['caching_frames_per_s']:7.2f} frames/s "
          f"({figures['caching_over_bare']:.2f}x the bare forward)")
    print(f"  second run            : {warm.computed} computed in {warm_s:.2f} s")
    print(f"  cache size            : {figures['cache_bytes_per_frame'] / 1e3:.0f} kB per frame (fp16)")
    print(f"  store codebooks       : {codec_s:.2f} s (once per lake)")
    print(f"  + mining store        : {store_s:.2f} s ({figures['store_bytes_per_frame'] / 1e3:.0f} kB per frame); "
          f"caching and store {figures['caching_and_store_over_bare']:.2f}x the bare forward")


if __name__ == "__main__":
    main()
