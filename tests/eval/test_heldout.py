"""Leave-one-set-out selection on the test bench with rankings whose quality per set is known: a candidate that
is good only on the set it is reported on is never chosen for that set, so the held-out figure shows what the
in-sample one hides."""

from __future__ import annotations

import pytest

from objret.config import load_params
from objret.errors import ObjretError
from objret.eval.bench import load_bench
from objret.eval.heldout import as_overrides, held_out_table, leave_one_set_out, selection_score, tune_grid


def perfect(bench, q) -> list[dict]:
    """q's gallery with its positives first: AP 1."""
    positives = bench.positives(q)
    keys = sorted(bench.gallery_keys(q), key=lambda k: (k not in positives, k))
    return [{"set": s, "image_id": i, "score": float(len(keys) - r), "bbox": [0, 0, 10, 10]}
            for r, (s, i) in enumerate(keys)]


def test_a_candidate_good_only_where_it_is_reported_is_not_chosen_there(bench_dir):
    bench = load_bench(bench_dir)
    classes = {q.id: perfect(bench, q) if q.kind == "class" else [] for q in bench.queries}     # class queries only
    instances = {q.id: perfect(bench, q) if q.kind == "instance" else [] for q in bench.queries}
    settings = [{"mining.fusion": "adaptive"}, {"mining.fusion": "sum"}]
    result = leave_one_set_out(bench, [classes, instances], settings)

    # Every class query is in coco_mini: left out, only instance sets choose, and they choose `instances`.
    assert result.chosen["coco_mini"] == 1
    # Any instance set left out: both candidates score (1 + 0) / 2 on the rest, and the tie goes to the first.
    query_sets = {q.set for q in bench.queries}
    assert set(result.chosen) == query_sets and len(query_sets) >= 3
    assert {s for s, i in result.chosen.items() if i == 0} == query_sets - {"coco_mini"}
    assert result.in_sample == 0
    held, inside = result.held_out_report, result.in_sample_report
    assert inside.group("class/all").mAP == pytest.approx(1.0) and held.group("class/all").mAP == 0.0
    assert inside.group("instance/all").mAP == held.group("instance/all").mAP == 0.0
    assert result.held_out_results == {q.id: classes[q.id] if q.set != "coco_mini" else instances[q.id]
                                       for q in bench.queries}
    table = held_out_table(result)
    assert "class/all" in table and "held-out coco_mini: mining.fusion=sum" in table
    assert selection_score(inside.queries, {"coco_mini"}) == pytest.approx(1.0)


def test_grid_and_overrides_round_trip_through_params():
    grid = tune_grid({"mining.fusion": ["adaptive", "sum"], "mining.mirror": [True, False], "mining.rerank": [150]})
    assert grid[0] == {"mining.fusion": "adaptive", "mining.mirror": True, "mining.rerank": 150} and len(grid) == 4
    params = load_params().replace(*as_overrides(grid[3]))
    assert (params.mining.fusion, params.mining.mirror, params.mining.rerank) == ("sum", False, 150)
    assert tune_grid({}) == [{}]
    with pytest.raises(ObjretError, match="lists no value"):
        tune_grid({"mining.fusion": []})


def test_tune_names_only_existing_mining_parameters():
    params = load_params()
    assert params.eval.tune, "params.yaml tunes no parameter leave-one-set-out"
    for key, values in params.eval.tune.items():   # the default comes first
        default = params
        for part in key.split("."):   # a nested one too: mining.weights.classes
            default = getattr(default, part)
        assert values[0] == default, key
    with pytest.raises(ObjretError, match="'mining.fusoin', which is not a parameter"):
        load_params(None, ["eval.tune={mining.fusoin: [sum]}"])
    with pytest.raises(ObjretError, match="only mining parameters"):
        load_params(None, ["eval.tune={index.gem_p: [2.0, 3.0]}"])


def test_one_set_cannot_be_left_out(bench_dir, tmp_path):
    bench = load_bench(bench_dir)
    one_set = type(bench)(bench.root, bench.sets, bench.images, [q for q in bench.queries if q.set == "coco_mini"],
                          bench._index)
    with pytest.raises(ObjretError, match="at least two sets"):
        leave_one_set_out(one_set, [{}], [{}])
