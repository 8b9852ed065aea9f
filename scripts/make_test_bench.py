#!/usr/bin/env python3
"""Build tests/data/bench: a small real subset of the objret benchmark, in the bench's own format.

usage: python scripts/make_test_bench.py [FULL_BENCH] [--out DIR]
       FULL_BENCH defaults to ../shared/bench beside the repository, DIR to tests/data/bench.

Deterministic: the same full bench gives the same files, byte for byte (images are copied, not re-encoded;
json is written with sorted query order and fixed formatting). Standard library only.

What is kept (see tests/data/README.md):

* CORE: the frames and photos the tests load by name (each list says which tests use it);
* VIDEO_QUERIES: video instance queries whose galleries in the subset hold positives (same track, outside the
  junk window) and negatives (a random ranking's expected AP <= 0.7): their query frames and VIDEO_EXTRA are kept;
* PASTE_IMAGES: 18 paste_visible images, chosen (seeded local search over the 120 images) so that 13 cut-outs
  have their query image and at least 3 of their 11 other pasted images in the subset; the COCO source image of
  each of those cut-outs (its junk image) is kept in coco_mini;
* coco_mini: CORE plus the cut-out sources, then images added greedily so that as many class queries as
  possible have their query image and at least 2 positives in the subset;
* queries.json: a fixed stratified subset of the real queries (class queries per area bin, the paste_visible
  queries above, the video instance queries above), every field as in the full bench except num_positives,
  recomputed on the subset with the bench README's rules (and junk_images: only entries kept in the subset).

Every set's annotations.json keeps its info (source, licence, notes, cut-outs), licences and categories, the
kept images and all of their annotations; info gains a "subset" note.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETS = ["coco_mini", "kitti_0005", "paste_visible", "pets09_s2l1", "tud_campus", "tud_stadtmitte"]

# Image ids (= MOT frame number for pets09_s2l1 / tud_*, = KITTI frame + 1 for kitti_0005, = COCO image id for
# coco_mini) that tests load by name or by position.
CORE: dict[str, list[int]] = {
    # TUD-Campus frames 14..36: the tud_campus_bench fixture (flows: 16..35; tracking server: 17..20 + 28),
    # discovery (16..23), mining methods (14, 16), matching/fusion (30), and the "first N frames" of the lake,
    # dataset, concurrent-push, storage, feature-cache and crash-safety tests.
    "tud_campus": list(range(14, 37)),
    # PETS09-S2L1 MOT frames 101..147 (every 2nd: the flow, review page, demo, service, scale-out and tracking
    # server videos and lakes; pedestrian track 19 at 121, review items 101..111) and 301..307 (the second video
    # of the incremental build test, track 14 at 303). The discovery and DVC tests' benches take 101..131,
    # 301..305 and 753 (the query frame of q0595, kept below).
    "pets09_s2l1": [*range(101, 149, 2), *range(301, 309, 2)],
    # TUD-Stadtmitte 50 (clock pasted into it: matching, fused, region store), 100 and 150 (fused negatives).
    "tud_stadtmitte": [50, 100, 150],
    # KITTI frames 0 (first frame: backbone, features, crash safety), 20 (mining), 40 and 100 (matching, fused,
    # regions, region store); image id = frame + 1.
    "kitti_0005": [0 + 1, 20 + 1, 40 + 1, 100 + 1],
    # COCO: 9 (fused), 34 zebra, 64 clock, 394 dog, 359937 bus (backbone, matching, fused, features, crash
    # safety), 78, 5529, 9769, 63217 (DASR*), 34, 81, 514, 636 (saliency/EGM: the first 4 by id with one large
    # object). Whitening (the first 10 by id) and the detector test (the first 10 by id with a large clear
    # object) take theirs from whatever the subset holds.
    "coco_mini": [9, 34, 64, 78, 81, 394, 514, 636, 5529, 9769, 63217, 359937],
    # paste_visible 1..4: the first images by id (saliency/EGM).
    "paste_visible": [1, 2, 3, 4],
}

# paste_visible images kept (CORE's 1..4 included): cut-outs 3, 6, 11, 13, 15, 19, 21, 23, 25, 29, 31, 33, 39
# (person x3, car x2, bus x2, bicycle, traffic light, fire hydrant, bench, dog, handbag) each have their query
# image and >= 3 other pasted images here; backgrounds from all four video sets.
PASTE_IMAGES = [1, 2, 3, 4, 14, 18, 19, 20, 38, 48, 57, 61, 66, 74, 83, 96, 110, 115]
PASTE_MIN_POSITIVES = 3

# Video instance queries (their query frames are kept) and the frames kept for them besides CORE: each query's
# gallery (the kept frames of its set outside its junk window) must hold >= 2 positives and enough negatives that a
# random ranking's expected AP stays <= VIDEO_MAX_CHANCE. Most of the bench's video queries fail that on any small
# subset: their person is in every frame of a short clip (TUD-Campus tracks 4 and 5 span all 71 frames, KITTI
# tracks 1 and 2 all 154), so every ranking has AP ~1. KITTI has no query here (each would cost 3-4 of its large
# frames).
VIDEO_QUERIES = [
    "q0595", "q0610", "q0611",                     # pets09_s2l1: person 1 at 753, 16 at 205, 17 at 261
    "q0615", "q0619",                              # tud_campus: person 2 at 28, 7 at 57
    "q0621", "q0623", "q0624", "q0628", "q0629",   # tud_stadtmitte: persons 2, 4, 5, 9, 10
]
VIDEO_EXTRA = {
    "tud_campus": [52, 64, 69],                    # after person 2 left (frame 48): its negatives
    "tud_stadtmitte": [40, 80, 140, 154],          # positives of persons 5 (40), 4 (40, 80), 10 (140, 154)
}
VIDEO_MIN_POSITIVES = 2
VIDEO_MAX_CHANCE = 0.7

# coco_mini: at most this many images; class queries need their image and >= CLASS_MIN_POSITIVES positives.
COCO_MAX_IMAGES = 44
CLASS_MIN_POSITIVES = 2
# Class queries kept per area bin of the query box (the bench's query bins), round-robin over categories.
AREA_BINS = [(0.0, 0.01, "<1%"), (0.01, 0.05, "1-5%"), (0.05, 0.20, "5-20%"), (0.20, 1.01, ">=20%")]
CLASS_PER_BIN = 16

MAX_BYTES = 12_500_000


def load(bench: Path):
    sets = {s: json.loads((bench / s / "annotations.json").read_text()) for s in SETS}
    queries = json.loads((bench / "queries.json").read_text())
    return sets, queries


class Index:
    """Per set: images by id, category names, image ids per category name, per track."""

    def __init__(self, sets: dict):
        self.images, self.names, self.by_cat, self.by_track, self.cats_of = {}, {}, {}, {}, {}
        for s, js in sets.items():
            self.images[s] = {im["id"]: im for im in js["images"]}
            names = {c["id"]: c["name"] for c in js["categories"]}
            by_cat, by_track, cats_of = (collections.defaultdict(set) for _ in range(3))
            for a in js["annotations"]:
                by_cat[names[a["category_id"]]].add(a["image_id"])
                cats_of[a["image_id"]].add(names[a["category_id"]])
                if a.get("track_id") is not None:
                    by_track[a["track_id"]].add(a["image_id"])
            self.names[s], self.by_cat[s], self.by_track[s], self.cats_of[s] = names, by_cat, by_track, cats_of

    def gallery_size(self, q: dict, keep: dict[str, set[int]]) -> int:
        """How many kept images are scored for q: its gallery sets minus the query image and junk."""
        junk = {(j["set"], j["image_id"]) for j in q.get("junk_images") or []} | {(q["set"], q["image_id"])}
        n = 0
        for s in q.get("gallery") or [q["set"]]:
            for i in keep[s]:
                if (s, i) in junk:
                    continue
                if q.get("junk_frames") and s == q["set"]:
                    lo, hi = q["junk_frames"]
                    if lo <= self.images[s][i]["frame"] <= hi:
                        continue
                n += 1
        return n

    def positives(self, q: dict, keep: dict[str, set[int]]) -> set[tuple[str, int]]:
        """The README's rules (as check_bench.py), over the kept images only."""
        pos = set()
        for s in q.get("gallery") or [q["set"]]:
            if q["kind"] == "class":
                pos |= {(s, i) for i in self.by_cat[s].get(q["category"], ()) if i in keep[s]}
            elif s == q["set"]:
                for i in self.by_track[s].get(q["track_id"], ()):
                    if i not in keep[s]:
                        continue
                    if q.get("junk_frames"):
                        lo, hi = q["junk_frames"]
                        if lo <= self.images[s][i]["frame"] <= hi:
                            continue
                    pos.add((s, i))
        pos.discard((q["set"], q["image_id"]))
        for j in q.get("junk_images") or []:
            pos.discard((j["set"], j["image_id"]))
        return pos


def chance_ap(n: int, positives: int) -> float:
    """The expected AP of a uniformly random order of n gallery images of which ``positives`` are positives."""
    if positives == 0:
        return 0.0
    if n == 1:
        return 1.0
    return sum((1 + (r - 1) * (positives - 1) / (n - 1)) / r for r in range(1, n + 1)) / n


def area_bin(q: dict) -> str:
    return next(name for lo, hi, name in AREA_BINS if lo <= q["area_frac"] < hi)


def select(bench: Path, sets: dict, queries: list[dict]):
    index = Index(sets)
    keep = {s: set(CORE[s]) for s in SETS}
    for s, ids in keep.items():
        missing = ids - set(index.images[s])
        if missing:
            sys.exit(f"{s}: no image id(s) {sorted(missing)} in {bench}")

    # Video instance queries: VIDEO_QUERIES with their frames and VIDEO_EXTRA.
    by_id = {q["id"]: q for q in queries}
    chosen = [by_id[i] for i in VIDEO_QUERIES]
    for q in chosen:
        keep[q["set"]].add(q["image_id"])
    for s, ids in VIDEO_EXTRA.items():
        keep[s] |= set(ids)

    # paste_visible queries: the cut-outs whose query image and >= 3 positives are among PASTE_IMAGES.
    keep["paste_visible"] |= set(PASTE_IMAGES)
    paste = [q for q in queries if q["set"] == "paste_visible" and q["image_id"] in keep["paste_visible"]
             and len(index.by_track["paste_visible"][q["track_id"]] & keep["paste_visible"]
                     - {q["image_id"]}) >= PASTE_MIN_POSITIVES]
    for q in paste:
        for j in q.get("junk_images") or []:
            keep[j["set"]].add(j["image_id"])
    chosen += paste

    # coco_mini: grow greedily for class queries.
    class_qs = [q for q in queries if q["kind"] == "class"]

    def valid(q, coco):
        return q["image_id"] in coco and len(index.positives(q, {**keep, "coco_mini": coco})) >= CLASS_MIN_POSITIVES

    def score(coco):
        per_bin = collections.Counter(area_bin(q) for q in class_qs if valid(q, coco))
        # balanced: the sum over bins of min(count, CLASS_PER_BIN), then the total
        return sum(min(v, CLASS_PER_BIN) for v in per_bin.values()), sum(per_bin.values())

    size = {i: os.path.getsize(bench / "coco_mini" / im["file_name"]) for i, im in index.images["coco_mini"].items()}
    candidates = sorted({q["image_id"] for q in class_qs})
    current = score(keep["coco_mini"])
    while len(keep["coco_mini"]) < COCO_MAX_IMAGES:
        best = None
        for i in candidates:
            if i in keep["coco_mini"]:
                continue
            gain = score(keep["coco_mini"] | {i})
            key = (gain, -size[i], -i)
            if gain > current and (best is None or key > best[0]):
                best = (key, i)
        if best is None:
            break
        keep["coco_mini"].add(best[1])
        current = best[0][0]

    # Class queries: per area bin, round-robin over categories (sorted), lowest query id first within one.
    for _, _, name in AREA_BINS:
        pool = collections.defaultdict(list)
        for q in class_qs:
            if area_bin(q) == name and valid(q, keep["coco_mini"]):
                pool[q["category"]].append(q)
        picked = []
        while len(picked) < CLASS_PER_BIN and any(pool.values()):
            for cat in sorted(pool):
                if pool[cat] and len(picked) < CLASS_PER_BIN:
                    picked.append(pool[cat].pop(0))
        chosen += picked

    chosen.sort(key=lambda q: q["id"])
    out = []
    for q in chosen:
        q = json.loads(json.dumps(q))
        if q.get("junk_images") is not None:
            q["junk_images"] = [j for j in q["junk_images"] if j["image_id"] in keep[j["set"]]]
        q["num_positives"] = len(index.positives(q, keep))
        assert q["num_positives"] > 0, q["id"]
        if q["id"] in VIDEO_QUERIES:
            chance = chance_ap(index.gallery_size(q, keep), q["num_positives"])
            assert q["num_positives"] >= VIDEO_MIN_POSITIVES and chance <= VIDEO_MAX_CHANCE, (q["id"], chance)
        out.append(q)
    return keep, out, index


def write(bench: Path, out: Path, sets: dict, queries: dict, keep: dict, chosen: list[dict]) -> None:
    for s in SETS:
        js = sets[s]
        images = [im for im in js["images"] if im["id"] in keep[s]]
        ids = {im["id"] for im in images}
        sub = {k: v for k, v in js.items() if k not in ("images", "annotations")}
        sub["info"] = {**js.get("info", {}), "subset": (
            f"objret test subset: {len(images)} of the {len(js['images'])} images of this set with all their "
            f"annotations, made by scripts/make_test_bench.py; images byte-identical to the full bench")}
        sub["images"] = images
        sub["annotations"] = [a for a in js["annotations"] if a["image_id"] in ids]
        (out / s / "images").mkdir(parents=True)
        for im in images:
            shutil.copyfile(bench / s / im["file_name"], out / s / im["file_name"])
        (out / s / "annotations.json").write_text(json.dumps(sub, indent=None, separators=(",", ":")) + "\n")
    q = {"version": queries.get("version", 1), "seed": queries.get("seed"),
         "subset": (f"objret test subset: {len(chosen)} of the {len(queries['queries'])} queries of the full bench "
                    "(ids kept), num_positives recomputed on the subset; made by scripts/make_test_bench.py"),
         "queries": chosen}
    (out / "queries.json").write_text(json.dumps(q, indent=1) + "\n")


LICENSE_TEXT = """\
# Licences of the test bench

This folder is a subset of the objret retrieval benchmark (its README, sections "Where each set comes from"
and "Licences"), made by `scripts/make_test_bench.py`: the images are byte-identical copies of the bench's
JPEGs (quality 90, original pixel size), the annotations are the bench's own for those images. Each set's
`annotations.json` repeats its source, licence and notes in `info`.

**Non-commercial research use only.** Every set below carries at least one non-commercial term (MOT15
annotations and KITTI under CC BY-NC-SA 3.0, PETS 2009 / TUD data for research use, most COCO photos under a
Flickr NC licence). They are here to test objret; do not use them for anything else. COCO photos under a
NoDerivs licence (ids 3 and 6 below) are redistributed as the bench holds them, not altered further (the subset
copies the files byte for byte; only paste_visible composites are derived works, and none of their cut-outs
comes from a NoDerivs photo).

| set | source | licence |
|---|---|---|
| `pets09_s2l1` | PETS 2009 S2.L1 View 001 (= MOT15 PETS09-S2L1). Frames decoded from `usr/share/doc/opencv-doc/examples/data/vtest.avi` of the Debian package opencv-doc (4.6.0+dfsg-12, md5 d401fe2028f78dd585e2ade0a0d678c0); boxes: MOT15 ground truth, GitHub repo gonzalocarreteroh/MASA-OA, `benchmarks/MOT15/PETS09-S2L1/gt/gt.txt` | PETS 2009 data (University of Reading), research use; MOTChallenge MOT15 annotations CC BY-NC-SA 3.0. Non-commercial research use only. |
| `tud_campus`, `tud_stadtmitte` | MOT15 TUD-Campus / TUD-Stadtmitte (TU Darmstadt pedestrian sequences). Frames decoded from GitHub repo gonzalocarreteroh/MASA-OA, `benchmarks/MOT15/TUD-*/TUD-*.mp4` (MPEG-4 re-encodes of the MOT15 `img1` frames); boxes from `.../gt/gt.txt` | TUD pedestrian sequences, research use; MOTChallenge MOT15 annotations CC BY-NC-SA 3.0. Non-commercial research use only. |
| `kitti_0005` | KITTI raw 2011_09_26_drive_0005_sync, left colour camera (image_02), from GitHub repo Deepak3994/Kitti-Dataset, `KITTI_Cam_LIDAR_Projections/2011_09_26_drive_0005_sync/`; boxes: the 3D tracklets projected into image_02 | KITTI: CC BY-NC-SA 3.0. Non-commercial research use only. |
| `coco_mini` | COCO 2017 images (train2017, val2017) from the GitHub repos lightly-ai/coco128_yolo, developer0hye/COCO128, Obmutescence/COCO-MINI, zzowenzz/COCO_Tiny, enginbozaba/tiny_coco; re-encoded at JPEG quality 90 by the bench (no other change) | COCO annotations: CC BY 4.0. Images: Flickr, each under its own licence: `images[].license` holds the COCO licence id, named in the top-level `licenses` list of `coco_mini/annotations.json` (table below). |
| `paste_visible` | Synthetic composites: real COCO object cut-outs (COCO's own masks) alpha-pasted into frames of the video sets above (bench README, "paste_visible") | Cut-outs: COCO annotations CC BY 4.0, each cut-out keeps the Flickr licence of its source image (`info.cutouts[].coco_image_license`, table below); only licences that allow derivative works were used (no NoDerivs, no unknown licence). Backgrounds: as their sets (KITTI CC BY-NC-SA 3.0; PETS 2009 / TUD research use with MOT15 annotations CC BY-NC-SA 3.0). Non-commercial research use only. |
"""


def licenses(out: Path) -> str:
    """LICENSE_TEXT plus the licence of every COCO photo and every pasted cut-out in the subset."""
    coco = json.loads((out / "coco_mini" / "annotations.json").read_text())
    names = {lic["id"]: lic["name"] for lic in coco.get("licenses", [])}
    lines = [LICENSE_TEXT, "## coco_mini photos in this subset\n", "| COCO licence id | licence | images (COCO ids) |",
             "|---|---|---|"]
    by_licence = collections.defaultdict(list)
    for im in coco["images"]:
        by_licence[im.get("license")].append(im["id"])
    for lic in sorted(by_licence, key=lambda v: (v is None, v or 0)):
        name = names.get(lic, "not recorded in the source copy") if lic is not None else "not recorded in the source copy"
        lines.append(f"| {lic if lic is not None else 'null'} | {name} | {', '.join(map(str, sorted(by_licence[lic])))} |")
    paste = json.loads((out / "paste_visible" / "annotations.json").read_text())
    present = {a["track_id"] for a in paste["annotations"]}
    lines += ["", "## paste_visible cut-outs in this subset\n",
              "| cut-out (track_id) | class | source COCO image | its licence |", "|---|---|---|---|"]
    for c in sorted(paste["info"].get("cutouts", []), key=lambda c: c["track_id"]):
        if c["track_id"] in present:
            lines.append(f"| {c['track_id']} | {c['category']} | {c['coco_image_id']} | "
                         f"{c['coco_image_license']} {c['coco_image_license_name']} |")
    return "\n".join(lines) + "\n"


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bench", nargs="?", default=str(REPO.parent / "shared" / "bench"), help="the full bench")
    ap.add_argument("--out", default=str(REPO / "tests" / "data" / "bench"), help="the subset folder (replaced)")
    args = ap.parse_args(argv)
    bench, out = Path(args.bench).resolve(), Path(args.out).resolve()
    if not (bench / "queries.json").is_file():
        sys.exit(f"no full bench at {bench} (queries.json missing)")
    sets, queries = load(bench)
    keep, chosen, index = select(bench, sets, queries["queries"])

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".bench-", dir=out.parent))
    tmp.chmod(0o755)
    try:
        write(bench, tmp, sets, queries, keep, chosen)
        (tmp / "LICENSES.md").write_text(licenses(tmp))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)

    total = du(out)
    print(f"wrote {out}: {sum(len(v) for v in keep.values())} images, {len(chosen)} queries, {total / 1e6:.2f} MB")
    for s in SETS:
        print(f"  {s:15s} {len(keep[s]):3d} images  {du(out / s) / 1e6:5.2f} MB")
    groups = collections.defaultdict(list)
    for q in chosen:
        name = ("class " + area_bin(q) if q["kind"] == "class" else
                "instance paste_visible" if q["set"] == "paste_visible" else f"instance video {q['set']}")
        groups[name].append(chance_ap(index.gallery_size(q, keep), q["num_positives"]))
    for k in sorted(groups):
        print(f"  {k:32s} {len(groups[k]):3d} queries  (chance mAP {sum(groups[k]) / len(groups[k]):.3f})")
    if total > MAX_BYTES:
        print(f"error: {total} bytes > {MAX_BYTES}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
