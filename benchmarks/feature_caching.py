"""Feature caching throughput against the bare backbone forward on the same frames, in one run.

    python benchmarks/feature_caching.py --bench ../shared/bench --frames 256 --rounds 3

Each round, in a new work folder: (1) the bare forward pass on preprocessed tensors already in memory, (2)
build-index's features step into an empty cache (decode + resize + forward + fp16 + CRC + sharded write), (3)
its store step from that cache (codebooks learned once, in the first round). The bare forward runs again after (3)
and the mean of its two runs is the round's baseline, so a drift in this shared machine's speed (2x within minutes,
measured) falls on both sides alike. The medians of the per-round ratios are reported, with a second run of (2)
over the same frames (everything cached), in benchmarks/results/feature_caching.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from objret.features.backbone import pick_device, preprocess
from objret.config import load_params
from objret.features.cache import FeatureCache, forward, use_huge_page_buffers
from objret.steps import features as features_step
from objret.steps import store as store_step
from objret.steps.workspace import Workspace
from objret.ingest.decode import load_image


def bare_forward(backbone, tensors: list, batch_size: int, device: torch.device) -> float:
    """(wall, CPU) seconds for the backbone alone over prepared tensors, batched and autocast as the cache runs it."""
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(tensors), batch_size):
        forward(backbone, torch.stack(tensors[i:i + batch_size]), device)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - cpu


def cpu_ms_per_frame(work, items) -> float:
    """CPU milliseconds a frame of ``work`` done on each item in turn, on this thread."""
    start = time.process_time()
    for item in items:
        work(item)
    return 1e3 * (time.process_time() - start) / max(1, len(items))


def overhead_parts(ws, frames, codec) -> dict:
    """What caching and the store add to the forward, part by part, in CPU ms a frame (one part at a time, on
    this thread, no contention): the JPEG's decode, its resize and normalisation, the shard write of its maps
    (CRC, serialisation, fsync) and the store's PQ encoding of its stride-8 map."""
    images = [load_image(f.image_uri) for f in frames]
    pre = ws.backbone.spec.preprocessing
    ids = [f.frame_id for f in frames]
    maps = ws.cache.load(ids, ws.params.mining.layer)
    every_layer: dict = {}
    for layer in ws.backbone.spec.layers:
        for fid, m in ws.cache.load(ids, layer).items():
            every_layer.setdefault(fid, {})[layer] = m
    with tempfile.TemporaryDirectory() as scratch:
        write_ms = 1e3 * _seconds(lambda: FeatureCache(scratch, "parts").write_shard(every_layer, {})) / len(ids)
    return {"decode": cpu_ms_per_frame(lambda f: load_image(f.image_uri), frames),
            "resize_and_normalise": cpu_ms_per_frame(lambda img: preprocess(img, pre), images),
            "shard_write": write_ms,
            "pq_encode": cpu_ms_per_frame(lambda fid: codec.encode(maps[fid]), ids)}


def _seconds(work) -> float:
    start = time.process_time()
    work()
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", default=str(Path(__file__).resolve().parents[2] / "shared" / "bench"))
    parser.add_argument("--set", default="pets09_s2l1", help="bench set whose frames are used")
    parser.add_argument("--frames", type=int, default=256, help="4 shards: the steady state, not the pipeline filling")
    parser.add_argument("--backbone", default="efficientnet_lite2")
    parser.add_argument("--max-side", type=int, default=640)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians reported")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "feature_caching.json"))
    args = parser.parse_args()
    use_huge_page_buffers()   # as `objret build-index` runs the features step

    overrides = [f"features.backbone={args.backbone}", f"features.max_side={args.max_side}",
                 f"features.batch_size={args.batch_size}"]
    images = sorted(Path(args.bench, args.set, "images").glob("*.jpg"))[: args.frames]
    device = pick_device()
    bare_s, caching_s, store_s, codec_s = [], [], [], 0.0
    bare_cpu, caching_cpu, store_cpu = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        codec = None
        for r in range(args.rounds):
            # Each round: a new work folder; the bare forward, build-index's features and store steps, the bare
            # forward again.
            ws = Workspace(load_params(None, overrides), Path(tmp) / f"round-{r}")
            for path in images:
                ws.lake.ingest(str(path), every_n=1, progress=False)
            frames = ws.lake.frames()
            backbone = ws.backbone
            backbone.to(device)
            tensors = [preprocess(load_image(f.image_uri), backbone.spec.preprocessing) for f in frames]
            forward(backbone, torch.stack(tensors[: args.batch_size]), device)  # warm-up
            before = bare_forward(backbone, tensors, args.batch_size, device)
            cpu = time.process_time()
            cold = features_step.features(ws, progress=False)
            caching_s.append(cold.seconds)
            caching_cpu.append(time.process_time() - cpu)
            if codec is None:   # the codebooks: once per lake (on its first frames), not per frame
                start = time.perf_counter()
                codec = store_step.fit_codec(ws, [f.frame_id for f in frames][:ws.params.index.map_store.train_frames])
                codec_s = time.perf_counter() - start
            ws.map_store.set_codec(codec)
            start, cpu = time.perf_counter(), time.process_time()
            stored = store_step.store(ws, progress=False)
            store_s.append(time.perf_counter() - start)
            store_cpu.append(time.process_time() - cpu)
            # bare, caching + store, bare: the mean of the two bare runs cancels a drift in the machine's speed
            after = bare_forward(backbone, tensors, args.batch_size, device)
            bare_s.append((before[0] + after[0]) / 2)
            bare_cpu.append((before[1] + after[1]) / 2)
            print(f"  round {r + 1}: bare {bare_s[-1]:.2f} s ({bare_cpu[-1]:.2f} s CPU), caching {caching_s[-1]:.2f} s "
                  f"({caching_cpu[-1]:.2f}), store {store_s[-1]:.2f} s ({store_cpu[-1]:.2f})",
                  flush=True)
        parts = overhead_parts(ws, frames, codec)
        start = time.perf_counter()
        warm = features_step.features(ws, progress=False)
        warm_s = time.perf_counter() - start
        shard_bytes = sum(p.stat().st_size for p in ws.cache.shards())

    n = len(frames)
    ratio = [b / c for b, c in zip(bare_s, caching_s)]
    with_store = [b / (c + st) for b, c, st in zip(bare_s, caching_s, store_s)]
    # CPU seconds of all threads: what a frame costs on a machine whose cores are all busy (the caching path's
    # threads contend with the backbone's for them).
    cpu_ratio = [b / c for b, c in zip(bare_cpu, caching_cpu)]
    cpu_with_store = [b / (c + st) for b, c, st in zip(bare_cpu, caching_cpu, store_cpu)]
    figures = {
        "frames": n, "backbone": args.backbone, "max_side": args.max_side, "device": str(device),
        "torch_threads": torch.get_num_threads(), "machine": platform.machine(), "rounds": args.rounds,
        "bare_forward_frames_per_s": n / statistics.median(bare_s),
        "caching_frames_per_s": n / statistics.median(caching_s),
        "caching_over_bare": statistics.median(ratio), "caching_over_bare_rounds": ratio,
        "second_run_computed": warm.computed, "second_run_seconds": warm_s,
        "cache_bytes_per_frame": shard_bytes / n,
        "codebooks_seconds": codec_s, "store_seconds": statistics.median(store_s),
        "store_bytes_per_frame": stored.bytes_per_frame,
        "caching_and_store_over_bare": statistics.median(with_store),
        "caching_and_store_over_bare_rounds": with_store,
        "cpu_ms_per_frame": {"bare": 1e3 * statistics.median(bare_cpu) / n,
                             "caching": 1e3 * statistics.median(caching_cpu) / n,
                             "store": 1e3 * statistics.median(store_cpu) / n},
        "caching_over_bare_cpu": statistics.median(cpu_ratio),
        "caching_and_store_over_bare_cpu": statistics.median(cpu_with_store),
        "caching_and_store_over_bare_cpu_rounds": cpu_with_store,
        "overhead_cpu_ms_per_frame": parts,
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
    print(f"  + mining store        : {figures['store_seconds']:.2f} s ({figures['store_bytes_per_frame'] / 1e3:.0f} kB per frame); "
          f"caching and store {figures['caching_and_store_over_bare']:.2f}x the bare forward")
    cpu = figures["cpu_ms_per_frame"]
    print(f"  CPU ms a frame        : bare {cpu['bare']:.1f}, caching {cpu['caching']:.1f}, store {cpu['store']:.1f}: "
          f"caching {figures['caching_over_bare_cpu']:.2f}x, caching and store "
          f"{figures['caching_and_store_over_bare_cpu']:.2f}x the bare forward")
    print("  overhead, CPU ms a frame (one thread): " + ", ".join(f"{k} {v:.1f}" for k, v in parts.items()))


if __name__ == "__main__":
    main()
