"""objret.mining.box_fit on real frames: the subset's TUD-Stadtmitte shopping street, several pedestrians a frame,
each annotated with its track. A box put on the wrong pedestrian moves to the right one by colour; the heat of the
match and the size of the candidates bound what it may move to."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from PIL import Image

from objret.boxes import iou_xywh
from objret.mining.box_fit import AREA_RANGE, colour_likeness, colour_signature, fit_box, fit_boxes
from objret.mining.evidence import Ranking
from objret.mining.lakemaps import LakeMaps
from objret.regions.encoding import RegionVectors

FLAT = np.full((60, 80), 0.5, np.float32)   # a heat map with no preference: colour decides


@pytest.fixture(scope="module")
def street(bench_dir):
    """{image id: (RGB pixels, {track id: box})} of the subset's tud_stadtmitte frames."""
    root = bench_dir / "tud_stadtmitte"
    ann = json.loads((root / "annotations.json").read_text())
    frames = {}
    for image in ann["images"]:
        pixels = np.asarray(Image.open(root / image["file_name"]).convert("RGB"))
        frames[image["id"]] = (pixels, {a["track_id"]: a["bbox"] for a in ann["annotations"]
                                        if a["image_id"] == image["id"]})
    return frames


def test_colour_signatures_compare_boxes_by_their_colours(street):
    pixels, boxes = next(iter(street.values()))
    box = next(iter(boxes.values()))
    signature = colour_signature(pixels, box)
    assert signature.dtype == np.float32 and signature.sum() == pytest.approx(1.0, abs=1e-5)
    assert colour_likeness(signature, signature) == pytest.approx(1.0, abs=1e-5)
    # Boxes partly or wholly outside the frame are read where they overlap it, never an empty crop.
    h, w = pixels.shape[:2]
    for outside in ([w - 5, h - 5, 50, 50], [-20, -20, 25, 25], [w + 10, 0, 5, 5]):
        assert colour_signature(pixels, outside).sum() == pytest.approx(1.0, abs=1e-5)
    # A red box is nothing like a blue one.
    red, blue = np.zeros((40, 40, 3), np.uint8), np.zeros((40, 40, 3), np.uint8)
    red[..., 0], blue[..., 2] = 220, 220
    assert colour_likeness(colour_signature(red, [0, 0, 40, 40]), colour_signature(blue, [0, 0, 40, 40])) < 0.01


def test_a_box_on_the_wrong_pedestrian_moves_to_the_right_one(street):
    """Every pair of frames, every pedestrian in both: the match's box is put on another pedestrian of the second
    frame, its pedestrians' boxes are the region boxes, the heat is flat. Colour finds the query's pedestrian
    in most cases, against the one in 6.5 that a blind pick among the candidates would."""
    right = total = candidates = 0
    for a, b in itertools.permutations(sorted(street), 2):
        (pixels_a, tracks_a), (pixels_b, tracks_b) = street[a], street[b]
        regions = np.array(list(tracks_b.values()), np.float32)
        for track, box in tracks_a.items():
            if track not in tracks_b:
                continue
            wrong = [o for t, o in tracks_b.items() if t != track and iou_xywh(o, tracks_b[track]) < 0.05]
            if not wrong:
                continue
            fitted = fit_box(wrong[0], regions, FLAT, pixels_b, colour_signature(pixels_a, box), 1.0)
            right += iou_xywh(fitted, tracks_b[track]) > 0.9
            total += 1
            candidates += len(regions)
    assert total > 300
    assert right / total > 0.55 and right / total > 3 * total / candidates   # measured: 0.68, chance 0.15


def test_the_heat_and_the_size_bound_what_a_box_may_move_to(street):
    (pixels_a, tracks_a), (pixels_b, tracks_b) = street[min(street)], street[max(street)]
    track = next(t for t in tracks_a if t in tracks_b and any(
        iou_xywh(o, tracks_b[t]) < 0.05 for u, o in tracks_b.items() if u != t))
    query = colour_signature(pixels_a, tracks_a[track])
    match = np.array(next(o for u, o in tracks_b.items() if u != track and iou_xywh(o, tracks_b[track]) < 0.05),
                     np.float32)
    regions = np.array(list(tracks_b.values()), np.float32)
    # Weight 0 with a flat heat: every candidate ties and the match's box stays.
    np.testing.assert_array_equal(fit_box(match, regions, FLAT, pixels_b, query, 0.0), match)
    # The match's centre hot, the rest cold: a small colour weight does not move it.
    heat = np.zeros_like(FLAT)
    h, w = pixels_b.shape[:2]
    heat[int((match[1] + match[3] / 2) / h * 60), int((match[0] + match[2] / 2) / w * 80)] = 1.0
    np.testing.assert_array_equal(fit_box(match, regions, heat, pixels_b, query, 0.1), match)
    # A region box far larger than the match's is no candidate, however alike its colours (the whole frame).
    whole = np.array([[0, 0, w, h]], np.float32)
    assert whole[0, 2] * whole[0, 3] > AREA_RANGE * match[2] * match[3]
    np.testing.assert_array_equal(fit_box(match, whole, FLAT, pixels_b, colour_signature(pixels_b, [0, 0, w, h]),
                                          5.0), match)


def test_fit_boxes_refits_the_first_frames_with_a_heat_map_and_an_image(street):
    ids = sorted(street)
    pixels_a, tracks_a = street[ids[0]]
    others = ids[1:4]
    track = next(t for t in tracks_a if all(t in street[i][1] for i in others)
                 and all(any(u != t and iou_xywh(o, street[i][1][t]) < 0.05 for u, o in street[i][1].items())
                         for i in others))
    query = colour_signature(pixels_a, tracks_a[track])
    frame_ids = [f"f{i}" for i in others]
    wrong = np.array([next(o for u, o in street[i][1].items() if u != track and iou_xywh(o, street[i][1][track]) < 0.05)
                      for i in others], np.float32)
    boxes, owner = [], []
    for row, i in enumerate(others):
        boxes += list(street[i][1].values())
        owner += [row] * len(street[i][1])
    regions = RegionVectors(np.zeros((len(owner), 4), np.float32), np.array(owner), np.array(boxes, np.float32),
                            "stride32", "avg", None)
    lake = LakeMaps(None, np.zeros((3, 4), np.float32), regions, frame_ids=frame_ids)
    # What fit_box gives each frame on its own region boxes (the lake's regions owned by its row).
    expected = [fit_box(wrong[r], np.array(list(street[i][1].values()), np.float32), FLAT, street[i][0], query, 1.0)
                for r, i in enumerate(others)]
    assert not np.array_equal(expected[0], wrong[0])   # the first frame's box does move

    def ranking():   # best first: f(others[0]), f(others[1]), f(others[2]); the last without a heat map
        return Ranking(frame_ids, np.array([3.0, 2.0, 1.0], np.float32), wrong.copy(),
                       heatmaps={f: FLAT for f in frame_ids[:2]})

    first = ranking()
    assert fit_boxes(first, lake, query, lambda f: street[int(f[1:])][0], frames=1, weight=1.0) == 1
    np.testing.assert_array_equal(first.boxes[0], expected[0])
    np.testing.assert_array_equal(first.boxes[1:], wrong[1:])   # past ``frames``: untouched

    def unreadable_second(frame_id):
        if frame_id == frame_ids[1]:
            raise OSError("unreadable")
        return street[int(frame_id[1:])][0]

    every = ranking()
    fit_boxes(every, lake, query, unreadable_second, frames=3, weight=1.0)
    np.testing.assert_array_equal(every.boxes[0], expected[0])
    np.testing.assert_array_equal(every.boxes[1], wrong[1])   # its image could not be read: the match's box
    np.testing.assert_array_equal(every.boxes[2], wrong[2])   # no heat map: not fitted
