"""objret.mining.shortlist: one candidate selection and one ranking path for `objret mine` and `objret eval`.

The same report, mined through objret.steps.mine.mine and scored through the evaluation's ranking function,
gives the same ranked frames with the same boxes, with the region index's shortlist doing real work
(mining.rerank below the lake's size) for a large box (region shortlist) and a small one (cell shortlist)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from objret.config import load_params
from objret.eval.bench import load_bench
from objret.eval.run import bench_frame_ids, evaluate_methods
from objret.mining.report import parse_report
from objret.steps import features as features_step, index as index_step, ingest as ingest_step
from objret.steps import mine as mine_step, regions as regions_step, store as store_step
from objret.steps import whitening as whitening_step
from objret.steps.workspace import Workspace

LAKE_FRAMES = set(range(16, 36))   # 20 TUD-Campus frames


@pytest.fixture(scope="module")
def built(tud_campus_bench, tmp_path_factory):
    """A bench folder of 20 TUD-Campus frames, ingested and indexed as a lake (Lite0 at 320 px)."""
    root = tmp_path_factory.mktemp("shortlist")
    bench_dir = tud_campus_bench(root / "bench", LAKE_FRAMES)
    params = load_params(overrides=["features.backbone=efficientnet_lite0", "features.max_side=320",
                                    "regions.sources=[whole, uniform, egm]", "mining.scales=[0.75, 1.0, 1.5]",
                                    "mining.mirror=false", "mining.dedup_iou=1.0", "mining.dedup_frames=0",
                                    "mining.top_k=50"])
    ws = Workspace(params, root / "work")
    bench = load_bench(bench_dir)
    ingest_step.ingest(ws, [str(bench_dir / "tud_campus" / "images")], progress=False)
    features_step.features(ws, progress=False)
    regions_step.regions(ws, progress=False)
    whitening_step.whitening(ws)
    index_step.build_index(ws)
    store_step.store(ws, progress=False)
    store_step.cells(ws, progress=False)
    return ws, bench, bench_dir


def _mine_and_eval(ws: Workspace, bench, q, report_dir: Path):
    frame_of = bench_frame_ids(bench, ws.lake)
    frames = {f.frame_id: f for f in ws.lake.frames()}
    frame = frames[frame_of[q.key]]
    report = parse_report({
        "report_id": f"same-path-{q.id}", "detector": {"name": "test", "version": "1"},
        "frame": {"uri": frame.uri}, "box": list(q.bbox), "class_name": "person", "failure_kind": "false_negative"})
    outcome = mine_step.mine(ws, report, progress=False)

    search = mine_step.open_search(ws)

    one_query = dataclasses.replace(bench, queries=[q])
    run, = evaluate_methods(one_query, frame_of, [ws.params.mining.method], mine_step.query_ranker(ws, search, frame_of),
                            progress=False)
    return outcome, run.results[q.id], frame_of


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [["mining.rerank=6", "mining.small_box=0.0"],   # the region index's shortlist
                                       ["mining.rerank=6", "mining.small_box=1.0"]],  # small box: + the cell index's
                         ids=["region-shortlist", "small-box-cell-shortlist"])
def test_mine_and_eval_rank_the_same_frames_with_the_same_boxes(built, overrides, tmp_path):
    ws, bench, _ = built
    ws = Workspace(ws.params.replace(*overrides), ws.root)
    # No junk frames, so that every mined frame is scored by the bench as well (the comparison is the point).
    q = dataclasses.replace(max(bench.queries, key=lambda q: len(bench.positives(q))), junk=frozenset())
    outcome, entries, frame_of = _mine_and_eval(ws, bench, q, tmp_path)
    key_of = {fid: key for key, fid in frame_of.items()}
    gallery = set(bench.gallery_keys(q))   # the bench leaves the query's video neighbours out as junk
    mined = [(key_of[m["frame_id"]], [round(v, 2) for v in m["box"]]) for m in outcome.mined]
    scored = [((e["set"], e["image_id"]), e["bbox"]) for e in entries]
    assert len(scored) >= 3 and [k for k, _ in mined if k in gallery] == [k for k, _ in scored]
    for (_, a), (_, b) in zip([m for m in mined if m[0] in gallery], scored):
        assert np.allclose(a, b, atol=0.011)
    lake_size = len(LAKE_FRAMES) - 1   # the query's own frame is never mined
    assert outcome.candidates == 6 < lake_size   # the shortlist did the work; the rest follow it unmatched
    assert len(mined) == lake_size


def test_an_index_built_with_another_recipe_is_refused(built, tmp_path):
    """The index's manifest carries the descriptor recipe; loading it for other parameters is an error."""
    from objret.errors import ObjretError
    from objret.index.region_index import RegionIndex

    ws, _, _ = built
    index = RegionIndex.load(ws.current_index_dir(), recipe=ws.index_recipe())
    assert index.recipe == ws.index_recipe() and index.recipe["backbone"] == ws.backbone.spec.cache_key()
    with pytest.raises(ObjretError, match="another descriptor recipe.*pooling"):
        RegionIndex.load(ws.current_index_dir(), recipe={**ws.index_recipe(), "pooling": "max"})
    manifest = json.loads(next(ws.current_index_dir().glob("v*/manifest.json")).read_text())
    assert manifest["recipe"] == ws.index_recipe()


def test_only_a_small_box_for_a_template_method_is_seen_zoomed_in(built):
    """objret.steps.mine.frame_query: a box under mining.small_box gets the zoomed view (maps at mining.query_zoom
    times the input size); a large box, a method without templates or query_zoom 1 do not pay for it."""
    from objret.steps.mine import frame_query

    ws, _, _ = built
    frame = next(iter(ws.lake.frames()))
    small, large = (100, 80, 20, 40), (100, 80, 300, 300)
    query = frame_query(ws, frame, small, "fused")
    zoomed = query.zoomed
    assert zoomed is not None and zoomed.mirror is None   # mining.mirror is off here
    # Half the frame's sides around the box (640 x 480 -> 320 x 240), at the frame's cells: twice its cells a pixel.
    assert zoomed.image_size == (320, 240) and zoomed.box[2:] == small[2:]
    for layer in ("stride8", "stride16"):
        assert zoomed.maps[layer].shape[-2:] == query.maps[layer].shape[-2:], layer
    assert frame_query(ws, frame, large, "fused").zoomed is None
    assert frame_query(ws, frame, small, "gem").zoomed is None
    assert frame_query(Workspace(ws.params.replace("mining.query_zoom=1"), ws.root), frame, small, "fused").zoomed is None
