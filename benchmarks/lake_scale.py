"""Mining a lake of 10k to 100k+ frames on one machine: latency, memory, disk and build time by lake size.

    python benchmarks/lake_scale.py --bench ../shared/bench --workdir W --sizes 10000,100000

W is a work folder where `objret eval --bench ../shared/bench --workdir W` (or build-index over the bench) has
run: the bench's feature cache, region index, mining store and cell index. Each lake of N frames holds the
bench's 1,526 real frames plus N - 1,526 generated ones, made without a backbone forward from the bench's own
cached maps: a generated frame takes a bench frame A, pastes a random tile of a bench frame B of the same map
size over it and shifts the result circularly by a random offset (on the stride-8 PQ codes of the mining store,
and on the stride-16 maps the cell index is built from, at the same place); its GeM vector is A's and B's mixed
by the tile's share, and its regions are A's region vectors with Gaussian noise (sigma 0.05, re-normalised), with
A's detector classes (the class list's source, objret.index.class_frames). So
the lake has real statistics (no easy outliers), the bench's objects recur in new places and mixtures, and the
bench's queries still have their true positives among the real frames.

Per lake size, in fresh processes: the build (mining store shards, cell index, region index, in objret's own
classes and build order) and its time; then mining: one report's search latency p50/p95 (objret.mining.
shortlist.rank_query, what `objret mine` runs between the query's maps and the outputs), peak RSS of the
mining process, disk bytes a frame, index RAM bytes a frame, and exhaustive template matching of the same
query over a sample of the lake's frames read from the store, scaled to N, for the speed-up. The output boxes' fit
(objret.mining.box_fit, which reads the pixels of the frames a report outputs) is not timed: generated frames have
no pixels of their own, and its cost does not grow with the lake (`objret eval`'s seconds per query hold it). Results:
benchmarks/results/lake_scale.json (and .md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from objret.config import load_params
from objret.eval.bench import load_bench
from objret.eval.run import bench_frame_ids
from objret.index.cell_index import salient_cells
from objret.index.map_store import MapStore
from objret.index.region_index import RegionIndex
from objret.ingest.lake import Frame, Lake
from objret.steps.workspace import Workspace

RESULTS = Path(__file__).resolve().parent / "results"
SHARD = 1024


OVERRIDES: list[str] = []   # --set KEY=VALUE: parameters over params.yaml (e.g. mining.mapped_indexes=false)


def bench_workspace(workdir: str) -> Workspace:
    return Workspace(load_params(None, OVERRIDES), workdir)


# ---- build -----------------------------------------------------------------------------------------

def build(workdir: str, out: Path, size: int, seed: int = 0) -> dict:
    """The lake of ``size`` frames under ``out`` (see the module's docstring); returns the build's figures."""
    ws = bench_workspace(workdir)
    p = ws.params
    rng = np.random.default_rng(seed)
    bench_store, bench_index = ws.map_store, RegionIndex.load(ws.current_index_dir())
    bench_cells = RegionIndex.load(ws.cells_dir())
    real = [f for f in ws.lake.frames() if f.frame_id in bench_store]
    if size < len(real):
        raise SystemExit(f"a lake of {size} frames cannot hold the bench's {len(real)}")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    store = MapStore(out / "store")
    store.set_codec(bench_store.codec)
    regions = RegionIndex(bench_index.dim, kind=p.index.region_kind, flat_max=p.index.flat_max, use_gpu=False)
    cells = RegionIndex(bench_cells.dim, kind=p.index.region_kind, flat_max=p.index.flat_max, refine=None,
                        use_gpu=False, recipe=bench_cells.recipe)
    timings = {"store_s": 0.0, "cells_s": 0.0, "regions_s": 0.0, "generate_s": 0.0}

    # The bench's own frames first, as build-index added them.
    ids = [f.frame_id for f in real]
    region_ids, owner = _regions_of(bench_index, ids)
    t = time.perf_counter()
    bench_meta = bench_index.meta   # the detector's class and confidence per region (the class list's source)
    regions.add([ids[o] for o in owner], bench_index.vectors(region_ids), bench_index.boxes[region_ids],
                {k: v[region_ids] for k, v in bench_meta.items()})
    timings["regions_s"] += time.perf_counter() - t
    cell_ids, cell_owner = _regions_of(bench_cells, ids)
    t = time.perf_counter()
    cells.add([ids[o] for o in cell_owner], bench_cells.vectors(cell_ids), bench_cells.boxes[cell_ids])
    timings["cells_s"] += time.perf_counter() - t
    frames = list(real)
    for start in range(0, len(ids), SHARD):
        chunk = ids[start:start + SHARD]
        coded = [bench_store.codes(f) for f in chunk]
        t = time.perf_counter()
        store.write_codes(chunk, [c for c, _ in coded], [hw for _, hw in coded], list(bench_store.gem_vectors(chunk)))
        timings["store_s"] += time.perf_counter() - t

    # Generated frames, a shard at a time.
    # The bench's codes, stride-16 maps, GeM and region vectors, read once (~0.5 GB).
    real_codes = {f.frame_id: bench_store.codes(f.frame_id) for f in real}
    real_gem = dict(zip(ids, bench_store.gem_vectors(ids)))
    by_shape: dict[tuple, list[int]] = {}
    shapes = {}
    for i, f in enumerate(real):
        hw = real_codes[f.frame_id][1]
        shapes[f.frame_id] = hw
        by_shape.setdefault(hw, []).append(i)
    region_rows = _region_lists(bench_index, ids)
    real_regions = {f: bench_index.vectors(r) for f, r in region_rows.items()}
    stride16 = ws.params.index.cells.layer
    cached16 = {}
    for start in range(0, len(ids), 256):
        cached16.update(ws.cache.load(ids[start:start + 256], stride16))
    per_frame = ws.params.index.cells.per_frame
    n_new = size - len(real)
    for start in range(0, n_new, SHARD):
        t = time.perf_counter()
        count = min(SHARD, n_new - start)
        new_ids, codes, hws, gems, cell_vecs, cell_boxes, cell_owner = [], [], [], [], [], [], []
        region_vecs, region_boxes, region_owner, region_meta = [], [], [], []
        picks = rng.integers(0, len(real), count)
        for k, i in enumerate(picks):
            group = by_shape[shapes[real[i].frame_id]]
            a, b = real[i], real[group[rng.integers(0, len(group))]]
            fid = f"gen-{size}-{start + k:07d}"
            code_a, (h, w) = real_codes[a.frame_id]
            code_b, _ = real_codes[b.frame_id]
            th, tw = rng.integers(max(1, h // 4), max(2, h // 2) + 1), rng.integers(max(1, w // 4), max(2, w // 2) + 1)
            y0, x0 = rng.integers(0, h - th + 1), rng.integers(0, w - tw + 1)
            dy, dx = rng.integers(0, h), rng.integers(0, w)
            grid = code_a.reshape(h, w, -1).copy()
            grid[y0:y0 + th, x0:x0 + tw] = code_b.reshape(h, w, -1)[y0:y0 + th, x0:x0 + tw]
            codes.append(np.roll(grid, (dy, dx), axis=(0, 1)).reshape(h * w, -1))
            hws.append((h, w))
            share = th * tw / (h * w)
            mixed = (1 - share) * real_gem[a.frame_id] + share * real_gem[b.frame_id]
            gems.append(mixed / (np.linalg.norm(mixed) + 1e-6))
            # The same recombination on the stride-16 map (half the cells a side).
            m16 = cached16[a.frame_id].astype(np.float32).copy()
            h16, w16 = m16.shape[-2:]
            sy, sx = h16 / h, w16 / w
            ys, ye, xs, xe = int(y0 * sy), max(int(y0 * sy) + 1, int((y0 + th) * sy)), int(x0 * sx), \
                max(int(x0 * sx) + 1, int((x0 + tw) * sx))
            m16[:, ys:ye, xs:xe] = cached16[b.frame_id][:, ys:ye, xs:xe]
            m16 = np.roll(m16, (int(dy * sy), int(dx * sx)), axis=(1, 2))
            vectors, boxes = salient_cells(m16, per_frame)
            cell_vecs.append(vectors)
            cell_boxes.append(boxes * np.array([a.width / w16, a.height / h16] * 2, np.float32))
            cell_owner += [fid] * len(vectors)
            rid = region_rows[a.frame_id]
            noisy = real_regions[a.frame_id] + rng.normal(0, 0.05, (len(rid), bench_index.dim)).astype(np.float32)
            region_vecs.append(noisy / np.linalg.norm(noisy, axis=1, keepdims=True))
            region_boxes.append(bench_index.boxes[rid])
            region_meta.append(rid)
            region_owner += [fid] * len(rid)
            new_ids.append(fid)
            frames.append(Frame(fid, f"generated:{fid}", a.image_uri, "lake_scale", None, None, a.width, a.height))
        timings["generate_s"] += time.perf_counter() - t
        t = time.perf_counter()
        store.write_codes(new_ids, codes, hws, gems)
        timings["store_s"] += time.perf_counter() - t
        t = time.perf_counter()
        cells.add(cell_owner, np.concatenate(cell_vecs), np.concatenate(cell_boxes))
        timings["cells_s"] += time.perf_counter() - t
        t = time.perf_counter()
        taken = np.concatenate(region_meta)
        regions.add(region_owner, np.concatenate(region_vecs), np.concatenate(region_boxes),
                    {k: v[taken] for k, v in bench_meta.items()})
        timings["regions_s"] += time.perf_counter() - t
        print(f"  {size}: {len(frames)} frames", file=sys.stderr, flush=True)
    t = time.perf_counter()
    regions.save(out / "regions")
    cells.save(out / "cells")
    timings["save_s"] = time.perf_counter() - t
    Lake(out / "lake").record(frames)   # the lake's manifest, read as `objret mine` reads a lake's
    return {"frames": len(frames), "regions": len(regions), "cells": len(cells), "region_index": regions.active,
            "cell_index": cells.active, "build_s": sum(v for k, v in timings.items() if k != "generate_s"),
            **{k: round(v, 2) for k, v in timings.items()},
            "peak_rss_build_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _region_lists(index: RegionIndex, frame_ids: list[str]) -> dict[str, np.ndarray]:
    region_ids, position = _regions_of(index, frame_ids)
    bounds = np.searchsorted(position, np.arange(len(frame_ids) + 1))   # regions_of groups them frame by frame
    return {f: region_ids[bounds[i]:bounds[i + 1]] for i, f in enumerate(frame_ids)}


def _regions_of(index: RegionIndex, frame_ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return index.regions_of(index.rows_of(frame_ids))


# ---- mine ------------------------------------------------------------------------------------------

def mine(workdir: str, out: Path, bench_dir: str, queries: int, sample: int, seed: int = 0) -> dict:
    """Open the lake under ``out`` as `objret mine` opens one, then rank bench queries through rank_query."""
    from objret.mining.shortlist import rank_query
    from objret.mining.fusion import match_query
    from objret.mining.template_matching import MapStack
    from objret.regions.encoding import RegionVectors
    from objret.steps.mine import frame_query, lake_search

    torch.set_num_threads(max(1, torch.get_num_threads()))
    ws = bench_workspace(workdir)
    p = ws.params
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    anon0 = rss_split()["RssAnon"]
    t = time.perf_counter()
    mapped = p.mining.mapped_indexes   # as objret.steps.mine opens them
    index = RegionIndex.load(out / "regions", use_gpu=False, mapped=mapped)
    cells = RegionIndex.load(out / "cells", use_gpu=False, mapped=mapped)
    store = MapStore(out / "store")
    encoding = RegionVectors(np.zeros((0, index.dim), np.float32), np.zeros(0, np.int64), np.zeros((0, 4), np.float32),
                             p.regions.layer, p.regions.pooling, None)
    search = lake_search(Lake(out / "lake"), index, cells, store, store.load_maps, encoding, p.mining.rerank)
    ids, frames = search.frame_ids, search.frames
    open_s = time.perf_counter() - t
    rss_open = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    held_per_frame = (rss_split()["RssAnon"] - anon0) * 2**20 / len(search)   # what opening holds for every frame
    t = time.perf_counter()   # the class list, built on a search's first class query: timed apart from the queries
    class_list = search.class_frames()
    class_list_s = time.perf_counter() - t

    bench = load_bench(bench_dir)
    frame_of = bench_frame_ids(bench, ws.lake)
    lake_frames = {f.frame_id: f for f in ws.lake.frames()}
    rng = np.random.default_rng(seed)
    small = [q for q in bench.queries if q.area_frac < p.mining.small_box]
    large = [q for q in bench.queries if q.area_frac >= p.mining.small_box]
    chosen = ([small[i] for i in rng.choice(len(small), queries // 2, replace=False)]
              + [large[i] for i in rng.choice(len(large), queries - queries // 2, replace=False)])
    latencies, stages, hits, timed, anon = [], {}, [], [], 0.0
    exhaustive_per_frame = []
    sample_rows = rng.choice(len(ids), min(sample, len(ids)), replace=False)
    for n, q in enumerate(chosen):
        query = frame_query(ws, lake_frames[frame_of[q.key]], q.bbox, "fused")
        t = time.perf_counter()
        result = rank_query(search, query, "fused", p.mining, gem_p=p.index.gem_p)
        latencies.append(time.perf_counter() - t)
        stages[result.stage] = stages.get(result.stage, 0) + 1
        positives = {frame_of[k] for k in bench.positives(q)}
        top = [result.ranking.frame_ids[i] for i in result.ranking.order()[:50]]
        if positives:
            hits.append(len(positives & set(top)) / min(50, len(positives)))
        if n < 4:
            timed.append(query)
        anon = max(anon, rss_split()["RssAnon"])
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # mining alone, before the timing below
    file_backed = rss_split()["RssFile"]
    by_file = rss_by_file(out)
    for query in timed:   # exhaustive template matching of the same queries over a sample, read from the store
            t = time.perf_counter()
            rows = np.sort(sample_rows)
            for s in range(0, len(rows), 256):
                part = [ids[r] for r in rows[s:s + 256]]
                maps = store.load_maps(part)
                stack = MapStack(part, [maps[f] for f in part], [(frames[f].width, frames[f].height) for f in part])
                match_query(query, stack, p.mining.layer, p.mining.template_cells, tuple(p.mining.scales))
            exhaustive_per_frame.append((time.perf_counter() - t) / len(rows))
    # The baseline, measured last (after the peak RSS above): the same per-frame data held whole, as a LakeSearch
    # held it before reading frames and GeM vectors on demand (a dict of every Frame, N x D float32).
    anon1 = rss_split()["RssAnon"]
    whole = ({f.frame_id: f for f in Lake(out / "lake").frames()}, store.gem_vectors(ids))
    held_whole_per_frame = (rss_split()["RssAnon"] - anon1) * 2**20 / len(ids) + held_per_frame
    del whole
    lat = np.array(latencies)
    per_frame = float(np.median(exhaustive_per_frame))
    ram = index_ram(index) + index_ram(cells)
    return {"open_s": round(open_s, 2), "class_list_s": round(class_list_s, 2),
            "class_list_pairs": 0 if class_list is None else len(class_list), "queries": len(chosen), "stages": stages,
            "latency_p50_s": float(np.percentile(lat, 50)), "latency_p95_s": float(np.percentile(lat, 95)),
            "latency_mean_s": float(lat.mean()),
            "exhaustive_s_per_frame": per_frame, "exhaustive_report_s": per_frame * len(ids),
            "speedup_vs_exhaustive": per_frame * len(ids) / float(np.percentile(lat, 50)),
            "positives_in_top50": float(np.mean(hits)) if hits else None,
            "peak_rss_mb": peak_rss, "rss_file_backed_mb": file_backed, "rss_anonymous_max_mb": anon,
            "rss_after_open_mb": rss_open, "rss_before_open_mb": rss0, "rss_file_backed_by_part_mb": by_file,
            "index_ram_bytes_per_frame": ram / len(ids), "held_bytes_per_frame": held_per_frame,
            "held_whole_bytes_per_frame": held_whole_per_frame,
            "disk_bytes_per_frame": disk_bytes(out) / len(ids),
            "store_bytes_per_frame": store.bytes_on_disk() / len(ids)}


def drop_page_cache() -> None:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
    except OSError as exc:
        raise SystemExit(f"--cold drops the page cache, which needs root: {exc}") from exc


def rss_split() -> dict[str, float]:
    """This process's resident memory now, in MB: RssAnon (its own) and RssFile (pages of memory-mapped files:
    the page cache, which the kernel drops under memory pressure and reads again when touched)."""
    with open("/proc/self/status") as status:
        return {k: int(v.split()[0]) / 1024 for k, v in (line.split(":", 1) for line in status)
                if k in ("RssAnon", "RssFile")}


def rss_by_file(out: Path) -> dict[str, float]:
    """Resident pages of the lake's memory-mapped files, MB, by part of the lake (regions, cells, store)."""
    parts: dict[str, float] = {}
    name = None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 6:   # a mapping's header line ends with its path
                path = Path(fields[-1])
                name = (path.relative_to(out).parts[0] + "/" + path.name.split("-")[0].split(".")[0]
                        if path.is_relative_to(out) else None)
            elif fields[0] == "Rss:" and name is not None:
                parts[name] = parts.get(name, 0.0) + int(fields[1]) / 1024
    return {k: round(v, 1) for k, v in sorted(parts.items(), key=lambda kv: -kv[1]) if v >= 1}


def index_ram(index: RegionIndex) -> int:
    """Bytes the index holds in memory: its faiss structure (as serialised) and its side arrays."""
    return int(index.bytes_per_region() * len(index))


def disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# ---- driver ----------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", default=str(Path(__file__).resolve().parents[2] / "shared" / "bench"))
    parser.add_argument("--workdir", required=True, help="a work folder with the bench built (see above)")
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--queries", type=int, default=40)
    parser.add_argument("--sample", type=int, default=1024, help="frames matched exhaustively to time it")
    parser.add_argument("--lakes", default=None, help="where the generated lakes go (default: WORKDIR/scale)")
    parser.add_argument("--out", default=str(RESULTS / "lake_scale.json"))
    parser.add_argument("--mine-only", action="store_true", help="reuse the lakes (and build figures) already built")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a parameter override")
    parser.add_argument("--cold", action="store_true",
                        help="drop the page cache before each mining run (root): mapped files read from disk, as "
                             "after a reboot or in a lake larger than RAM, not still cached from the build")
    parser.add_argument("--step", choices=["build", "mine"], help=argparse.SUPPRESS)   # one step, in a child
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    OVERRIDES[:] = args.set
    lakes = Path(args.lakes or Path(args.workdir) / "scale")
    if args.step:
        out = lakes / f"lake-{args.size}"
        result = (build(args.workdir, out, args.size) if args.step == "build"
                  else mine(args.workdir, out, args.bench, args.queries, args.sample))
        print(json.dumps(result))
        return
    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        row = {"frames": size}
        for step in ("build", "mine"):   # each in its own process: the mining RSS is the mining alone
            saved = lakes / f"lake-{size}" / f"{step}.json"
            if step == "build" and args.mine_only:
                row[step] = json.loads(saved.read_text())
                continue
            cmd = [sys.executable, __file__, "--step", step, "--size", str(size), "--workdir", args.workdir,
                   "--bench", args.bench, "--queries", str(args.queries), "--sample", str(args.sample),
                   "--lakes", str(lakes)] + [f"--set={o}" for o in args.set]
            if step == "mine" and args.cold:
                drop_page_cache()
            done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
            row[step] = json.loads(done.stdout.strip().splitlines()[-1])
            saved.write_text(json.dumps(row[step]))
            print(f"{size} {step}: {row[step]}", flush=True)
        rows.append(row)
    fit = None
    if len(rows) >= 2:
        a, b = rows[0], rows[-1]
        fit = math.log(b["mine"]["latency_p50_s"] / a["mine"]["latency_p50_s"]) / math.log(b["frames"] / a["frames"])
    mining = load_params(None, args.set).mining
    report = {"command": f"python benchmarks/lake_scale.py --workdir W --sizes {args.sizes} --queries {args.queries} "
                         f"--sample {args.sample}" + "".join(f" --set {o}" for o in args.set) + " --cold" * args.cold,
              "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
              "params": {"rerank": mining.rerank, "shortlist": mining.shortlist, "mapped_indexes": mining.mapped_indexes},
              "page_cache": "dropped before mining" if args.cold else "as the build left it",
              "lakes": rows, "latency_growth_exponent": fit}
    Path(args.out).write_text(json.dumps(report, indent=1))
    Path(args.out).with_suffix(".md").write_text(table(report))
    print(table(report))


def table(report: dict) -> str:
    lines = ["| frames | search p50 / p95 (s) | exhaustive (s, est.) | speed-up | peak RSS mining (MB) "
             "| of it mapped files / own, max (MB) | held a frame, B (held whole) | disk B/frame | index B/frame "
             "| build (s) | class list build (s) | bench positives in top 50 |", "|" + "---|" * 12]
    nan = float("nan")   # figures a run before them did not measure
    for row in report["lakes"]:
        m, b = row["mine"], row["build"]
        lines.append(f"| {row['frames']:,} | {m['latency_p50_s']:.3f} / {m['latency_p95_s']:.3f} "
                     f"| {m['exhaustive_report_s']:.1f} | {m['speedup_vs_exhaustive']:.0f}x | {m['peak_rss_mb']:.0f} "
                     f"| {m.get('rss_file_backed_mb', float('nan')):.0f} / {m.get('rss_anonymous_max_mb', float('nan')):.0f} "
                     f"| {m.get('held_bytes_per_frame', nan):,.0f} ({m.get('held_whole_bytes_per_frame', nan):,.0f}) "
                     f"| {m['disk_bytes_per_frame']:,.0f} | {m['index_ram_bytes_per_frame']:,.0f} | {b['build_s']:.0f} "
                     f"| {m.get('class_list_s', nan):.2f} | {m['positives_in_top50']:.3f} |")
    if report["latency_growth_exponent"] is not None:
        lines.append(f"\nSearch latency grows as N^{report['latency_growth_exponent']:.3f} (p50, first to last size).")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
