"""objret.eval.metrics: hand-computed values on a tiny bench, and an oracle ranking on the real bench."""

import json
import math
import re

import pytest

from objret.eval.bench import load_bench
from objret.eval.metrics import (
    average_precision, compare_table, evaluate, flat_metrics, format_table, iou_xywh, recall_at_k,
)



# --- pure functions ------------------------------------------------------------------------------


def test_average_precision_by_hand():
    ranking = ["p1", "n1", "p2", "n2", "n3", "p3", "n4"]
    assert average_precision(ranking, {"p1", "p2", "p3"}) == pytest.approx((1 + 2 / 3 + 3 / 6) / 3)
    # a positive never returned contributes 0
    assert average_precision(["n1", "p1"], {"p1", "p2"}) == pytest.approx((1 / 2) / 2)
    assert average_precision([], {"p1"}) == 0.0
    assert average_precision(["p1", "p2"], {"p1", "p2"}) == 1.0


def test_recall_at_k():
    ranking = ["n1", "p1", "n2", "p2"]
    assert recall_at_k(ranking, {"p1", "p2", "p3"}, 2) == pytest.approx(1 / 3)
    assert recall_at_k(ranking, {"p1", "p2", "p3"}, 10) == pytest.approx(2 / 3)


def _shifted(box, dx):
    x, y, w, h = box
    return [x + dx, y, w, h]


def _shift_for_iou(width, iou):
    """Horizontal shift of an equal box that gives this IoU: (w - dx) / (w + dx) = iou."""
    return width * (1 - iou) / (1 + iou)


def test_iou_xywh():
    assert iou_xywh([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert iou_xywh([0, 0, 10, 10], [10, 0, 10, 10]) == 0.0  # touching edges
    assert iou_xywh([0, 0, 10, 10], [5, 0, 10, 10]) == pytest.approx(50 / 150)
    assert iou_xywh([0, 0, 10, 10], [2, 2, 5, 5]) == pytest.approx(25 / 100)
    assert iou_xywh([0, 0, 0, 10], [0, 0, 0, 10]) == 0.0
    gt = [100, 100, 100, 20]
    assert iou_xywh(gt, _shifted(gt, _shift_for_iou(100, 0.51))) == pytest.approx(0.51)
    assert iou_xywh(gt, _shifted(gt, _shift_for_iou(100, 0.49))) == pytest.approx(0.49)


# --- a tiny bench --------------------------------------------------------------------------------
#
# photos (still images 1..8): a dog in 1 (the class query), 2, 4, 7; nothing else.
# street (video, id = frame + 1, 1..8): track 1 in ids 2..8, box GT_BOX.
# The instance query is street/4 (frame 3) with junk frames [2, 4] -> junk ids 3, 4, 5;
# positives {2, 6, 7, 8}; gallery {1, 2, 6, 7, 8}.

GT_BOX = [100, 100, 100, 20]


@pytest.fixture
def tiny(tmp_path):
    def images(with_frames):
        return [dict(id=i, file_name=f"images/{i}.jpg", width=640, height=480,
                     **({"frame": i - 1} if with_frames else {})) for i in range(1, 9)]

    photos = {"images": images(False), "categories": [{"id": 18, "name": "dog"}],
              "annotations": [{"id": i, "image_id": i, "category_id": 18, "bbox": [10, 10, 200, 200],
                               "area": 40000, "iscrowd": 0} for i in (1, 2, 4, 7)]}
    street = {"images": images(True), "categories": [{"id": 1, "name": "person"}],
              "annotations": [{"id": i, "image_id": i, "category_id": 1, "bbox": GT_BOX, "area": 2000,
                               "iscrowd": 0, "track_id": 1} for i in range(2, 9)]}
    queries = [
        {"id": "qdog", "set": "photos", "image_id": 1, "bbox": [10, 10, 200, 200], "category": "dog",
         "kind": "class", "track_id": None, "area_frac": 0.13, "gallery": ["photos"], "num_positives": 3},
        {"id": "qtrack", "set": "street", "image_id": 4, "bbox": GT_BOX, "category": "person",
         "kind": "instance", "track_id": 1, "area_frac": 0.0065, "gallery": ["street"],
         "junk_frames": [2, 4], "num_positives": 4},
    ]
    for rel, data in {"photos/annotations.json": photos, "street/annotations.json": street,
                      "queries.json": {"queries": queries}}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(json.dumps(data))
    return load_bench(tmp_path)


def _entries(set_name, ids, boxes=None):
    boxes = boxes or {}
    return [{"set": set_name, "image_id": i, "score": 1.0 - rank / 100, "bbox": boxes.get(i, GT_BOX)}
            for rank, i in enumerate(ids)]


def test_class_ranking_by_hand(tiny):
    forward = evaluate(tiny, {"qdog": _entries("photos", [2, 3, 4, 5, 6, 7, 8]), "qtrack": []})
    row = forward.queries[0]
    assert row.num_positives == 3
    assert row.ap == pytest.approx((1 + 2 / 3 + 3 / 6) / 3)  # positives at ranks 1, 3, 6
    assert row.recall == {10: 1.0, 50: 1.0, 100: 1.0}
    assert row.loc10 is None  # class queries have no localization score

    reverse = evaluate(tiny, {"qdog": _entries("photos", [8, 7, 6, 5, 4, 3, 2]), "qtrack": []})
    assert reverse.queries[0].ap == pytest.approx((1 / 2 + 2 / 5 + 3 / 7) / 3)  # ranks 2, 5, 7
    assert reverse.group("class/all").mAP == pytest.approx((1 / 2 + 2 / 5 + 3 / 7) / 3)
    assert reverse.group("class/>=5%").n == 1


def test_query_image_junk_non_gallery_unknown_and_duplicates_are_ignored(tiny):
    clean = evaluate(tiny, {"qdog": [], "qtrack": _entries("street", [1, 2, 6, 7, 8])})
    noisy_ranking = (
        _entries("street", [4, 3, 1, 5])  # the query image and junk frames 3, 5
        + _entries("photos", [2, 4])  # positives of nothing: not in this query's gallery
        + [{"set": "street", "image_id": 999, "score": 0.5, "bbox": GT_BOX},  # not in the bench
           {"set": "attic", "image_id": 1, "score": 0.5, "bbox": GT_BOX}]
        + _entries("street", [1, 2, 1, 6, 7, 2, 8])  # repeats keep their first rank
    )
    noisy = evaluate(tiny, {"qdog": [], "qtrack": noisy_ranking})
    assert clean.queries[1].ap == pytest.approx((1 / 2 + 2 / 3 + 3 / 4 + 4 / 5) / 4)
    assert noisy.queries[1].ap == pytest.approx(clean.queries[1].ap)
    assert noisy.queries[1].num_returned == 5
    assert noisy.warnings["unknown_images"] == 2
    assert noisy.warnings["duplicate_entries"] == 3


def test_localization_iou_threshold(tiny):
    boxes = {2: _shifted(GT_BOX, _shift_for_iou(100, 0.51)),
             6: _shifted(GT_BOX, _shift_for_iou(100, 0.49)),
             7: [100, 100, 50, 20],  # half of GT_BOX: IoU exactly 0.5 counts
             8: None}  # no box returned: not localized
    report = evaluate(tiny, {"qdog": [], "qtrack": _entries("street", [2, 6, 1, 7, 8], boxes)})
    row = report.queries[1]
    assert iou_xywh(boxes[7], GT_BOX) == 0.5
    assert row.ap == pytest.approx((1 + 1 + 3 / 4 + 4 / 5) / 4)
    assert row.loc10 == pytest.approx(2 / 4)  # 4 true positives in the top 10, 2 with IoU >= 0.5
    group = report.group("instance/all")
    assert group.loc10 == pytest.approx(0.5) and group.loc10_n == 1


def test_no_true_positive_in_top_10_leaves_loc_undefined(tiny):
    report = evaluate(tiny, {"qdog": [], "qtrack": _entries("street", [1])})
    assert report.queries[1].loc10 is None
    assert report.group("instance/all").loc10 is None and report.group("instance/all").loc10_n == 0
    assert "instance_Loc10" not in flat_metrics(report)


def test_missing_and_unknown_queries_are_counted_not_fatal(tiny):
    report = evaluate(tiny, {"qtrack": _entries("street", [2, 6, 7, 8]), "q_stray": []})
    assert report.queries[0].missing and report.queries[0].ap == 0.0
    assert report.warnings["missing_queries"] == 1 and report.warnings["unknown_queries"] == 1
    assert report.queries[1].ap == 1.0
    assert "missing_queries 1" in format_table(report)


def test_report_outputs(tiny):
    report = evaluate(tiny, {"qdog": _entries("photos", [2, 4, 7]), "qtrack": _entries("street", [2, 6])})
    as_dict = json.loads(json.dumps(report.to_dict()))
    assert [(q["id"], q["ap"]) for q in as_dict["queries"]] == [("qdog", 1.0), ("qtrack", 0.5)]
    assert as_dict["queries"][1]["R@10"] == 0.5
    flat = flat_metrics(report)
    assert flat["class_mAP"] == 1.0 and flat["class_area_ge5_mAP"] == 1.0
    assert flat["video_instance_mAP"] == 0.5 and flat["video_instance_street_mAP"] == 0.5
    assert flat["instance_Loc10"] == 1.0 and flat["instance_R10"] == 0.5
    assert "class_area_lt1_mAP" not in flat  # empty groups are left out
    table = format_table(report)
    for row in ("class/all", "class/>=5%", "instance/video-sets", "instance/video street", "instance/all"):
        assert re.search(rf"^{re.escape(row)}\s", table, re.MULTILINE), row


# --- the real bench ------------------------------------------------------------------------------


def _oracle_results(bench):
    """Positives first, each with its ground-truth box; then every other gallery image."""
    results = {}
    for q in bench.queries:
        positives = bench.positives(q)
        ranking = sorted(bench.gallery_keys(q), key=lambda key: key not in positives)
        results[q.id] = [
            {"set": s, "image_id": i, "score": -rank,
             "bbox": list(bench.gt_boxes(q, (s, i))[0]) if (s, i) in positives else None}
            for rank, (s, i) in enumerate(ranking)
        ]
    return results


def test_oracle_on_real_bench(real_bench):
    report = evaluate(real_bench, _oracle_results(real_bench))
    assert all(count == 0 for count in report.warnings.values()), report.warnings
    for row in report.queries:
        assert row.ap == pytest.approx(1.0)
        for k, recall in row.recall.items():
            assert recall == pytest.approx(min(k, row.num_positives) / row.num_positives)
    for group in report.groups:
        assert group.mAP == pytest.approx(1.0)
    instance = report.group("instance/all")
    assert instance.n == 23 and instance.loc10 == pytest.approx(1.0) and instance.loc10_n == 23
    assert report.group("instance/paste_visible").n == 13
    assert report.group("instance/video-sets").n == 10
    assert report.group("class/all").n == 56
    assert report.group("class/area<1%").n == 16

    flat = flat_metrics(report)
    for key in ("class_mAP", "class_area_lt1_mAP", "paste_visible_mAP", "paste_visible_Loc10",
                "video_instance_mAP", "instance_Loc10", "class_R10"):
        assert key in flat
    assert all(re.fullmatch(r"[A-Za-z0-9_]+", key) for key in flat)
    assert all(isinstance(v, float) and math.isfinite(v) for v in flat.values())

    table = format_table(report)
    for row in ("class/all", "class/area<1%", "class/1-5%", "class/>=5%", "instance/video-sets",
                "instance/video pets09_s2l1", "instance/video tud_stadtmitte", "instance/paste_visible",
                "instance/all"):
        assert re.search(rf"^{re.escape(row)}\s", table, re.MULTILINE), row
    assert "class/cat person" not in table and "class/cat person" in format_table(report, details=True)


def test_reversed_oracle_and_compare_table(real_bench):
    oracle = _oracle_results(real_bench)
    reversed_results = {qid: entries[::-1] for qid, entries in oracle.items()}
    best, worst = evaluate(real_bench, oracle), evaluate(real_bench, reversed_results)
    assert worst.warnings["unsorted_rankings"] == len(real_bench.queries)
    for q, row in zip(real_bench.queries, worst.queries):
        # positives last: with G gallery images and P positives they sit at ranks G-P+1 .. G
        size, n_pos = len(real_bench.gallery_keys(q)), row.num_positives
        expected = sum(j / (size - n_pos + j) for j in range(1, n_pos + 1)) / n_pos
        assert row.ap == pytest.approx(expected)
    assert worst.group("class/all").mAP < 0.2

    table = compare_table({"oracle": best, "reversed": worst})
    assert "oracle" in table.splitlines()[0] and "reversed" in table.splitlines()[0]
    paste_row = next(line for line in table.splitlines() if line.startswith("instance/paste_visible"))
    assert paste_row.count("1.000") >= 4 and paste_row.count("|") == 2


def test_recall_curve_by_hand_filters_like_evaluate(tiny):
    from objret.eval.metrics import recall_curve

    noisy_track = _entries("street", [4, 3, 1, 2]) + _entries("street", [1, 6, 7, 8])   # -> 1, 2, 6, 7, 8
    results = {"qdog": _entries("photos", [2, 3, 4, 5, 6, 7, 8]), "qtrack": noisy_track}
    dog = [1 / 3, 1 / 3, 2 / 3, 2 / 3, 2 / 3, 1, 1]          # positives at ranks 1, 3, 6 of 7
    track = [0, 1 / 4, 2 / 4, 3 / 4, 1, 1, 1]                # positives at ranks 2..5 of 5, then all found
    curve = recall_curve(tiny, results)
    assert [k for k, _ in curve] == list(range(1, 8))
    assert [r for _, r in curve] == pytest.approx([(d + t) / 2 for d, t in zip(dog, track)])
    report = evaluate(tiny, results)
    assert curve[-1][1] == pytest.approx(sum(q.recall[10] for q in report.queries) / 2)
