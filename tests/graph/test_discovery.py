"""objret.graph.discovery (003 sec. 3.8-3.9): OS.EGM regions, the global descriptor on them, the pipeline step that
stores them beside the region graph, and the mining method ``discovery`` over them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from objret import storage
from objret.config import EgmParams
from objret.graph import discovery as disc
from objret.errors import ObjretError
from objret.regions.sources import SOURCES, FrameRegions
from objret.regions.whitening import fit_whitening
from tests.helpers.bench_subset import write_subset
from tests.helpers.chance import chance_map
from tests.helpers.sigkill import run_killed, sigkill_at_call


pytestmark = pytest.mark.usefixtures("one_faiss_thread")

OS_EGM = EgmParams(sigma=2.0, tau=0.0, rho=2.0, purge=0.5)   # 003 sec. 4.2's values for object saliency


def blob(h, w, cx, cy, s):
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    return np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * s * s))


# ---- OS.EGM ------------------------------------------------------------------------------------------------------

def test_os_egm_boxes_the_two_objects_of_an_object_saliency_map():
    h, w = 20, 30
    centres = [(6.5, 5.5), (22.5, 14.5)]
    # Object saliency is zero on the background (003 sec. 4.2) and peaks on the objects; one blob weaker.
    S = 1.0 * blob(h, w, *centres[0], 1.5) + 0.6 * blob(h, w, *centres[1], 2.0)
    S[S < 0.02] = 0.0
    fmap = np.random.default_rng(0).standard_normal((16, h, w)).astype(np.float32)
    regions = disc.os_egm_regions(fmap, S, OS_EGM)
    assert isinstance(regions, FrameRegions) and len(regions) >= 2
    assert (regions.sources == SOURCES.index("os_egm")).all() and SOURCES[-1] == "os_egm"
    boxes = regions.boxes
    for cx, cy in centres:   # each object inside a box that holds no other object and is far from the whole map
        holding = [b for b in boxes if b[0] <= cx <= b[0] + b[2] and b[1] <= cy <= b[1] + b[3]]
        assert holding, (cx, cy, boxes)
        best = min(holding, key=lambda b: b[2] * b[3])
        others = [c for c in centres if c != (cx, cy)]
        assert not any(best[0] <= ox <= best[0] + best[2] and best[1] <= oy <= best[1] + best[3] for ox, oy in others)
        assert best[2] * best[3] < 0.25 * h * w
    # Scores are the mean object saliency inside (eq. 9), best first: the stronger blob's box leads.
    assert np.all(np.diff(regions.scores) <= 1e-6)
    x, y, bw, bh = boxes[0]
    assert x <= centres[0][0] <= x + bw and y <= centres[0][1] <= y + bh
    # Nothing salient: no region; a map of another size: refused.
    assert len(disc.os_egm_regions(fmap, np.zeros((h, w)), OS_EGM)) == 0
    with pytest.raises(ObjretError, match="does not match"):
        disc.os_egm_regions(fmap, S[:-1], OS_EGM)


# ---- the 3.9 descriptor ------------------------------------------------------------------------------------------

def reference_descriptor(A, int_boxes, whitening=None):
    """Max-pool each box (x0, y0, x1, y1 cells), L2, sum, then whiten as Whitening does (L2, centre, project,
    L2) or L2: plain numpy."""
    total = np.zeros(A.shape[0], np.float64)
    for x0, y0, x1, y1 in int_boxes:
        m = A[:, y0:y1, x0:x1].reshape(A.shape[0], -1).max(axis=1).astype(np.float64)
        total += m / np.linalg.norm(m)
    if whitening is None:
        return total / np.linalg.norm(total)
    x = total / np.linalg.norm(total)
    y = (x - whitening.mean) @ whitening.projection
    return y / np.linalg.norm(y)


def test_descriptor_is_max_pool_l2_sum_then_l2_or_whitening():
    rng = np.random.default_rng(1)
    A = rng.standard_normal((24, 9, 13)).astype(np.float32)        # negative values too (Lite2's maps are)
    boxes = np.array([[0, 0, 4, 3], [5.4, 2.2, 3.1, 4.5], [8, 5, 5, 4]], np.float32)
    cells = [(0, 0, 4, 3), (5, 2, 9, 7), (8, 5, 13, 9)]           # the cells each box touches
    got = disc.discovery_descriptor(A, boxes)
    np.testing.assert_allclose(got, reference_descriptor(A, cells), atol=1e-5)
    assert got.shape == (24,) and got.dtype == np.float32
    # A FrameRegions gives the same; the order of the regions does not matter (a sum).
    regions = FrameRegions(boxes[::-1].copy(), np.zeros(3, np.int8), np.ones(3, np.float32))
    np.testing.assert_allclose(disc.discovery_descriptor(A, regions), got, atol=1e-6)

    # With a whitening, the aggregated vector is whitened (not each region).
    white = fit_whitening(rng.standard_normal((200, 24)), dim=10)
    got_w = disc.discovery_descriptor(A, boxes, white)
    np.testing.assert_allclose(got_w, reference_descriptor(A, cells, white), atol=1e-5)
    assert got_w.shape == (10,)
    per_region = disc.region_vectors(A, boxes, white)
    summed_after = per_region.sum(0) / np.linalg.norm(per_region.sum(0))
    assert not np.allclose(got_w, summed_after, atol=1e-3)
    # A frame with no region: the whole frame (its MAC).
    np.testing.assert_allclose(disc.discovery_descriptor(A, np.zeros((0, 4))),
                               reference_descriptor(A, [(0, 0, 13, 9)]), atol=1e-5)
    # The query side: its box is the only region, and equals that region's own vector.
    np.testing.assert_allclose(disc.query_descriptor(A, boxes[1], white), per_region[1], atol=1e-6)
    with pytest.raises(ObjretError, match="whitening takes"):
        disc.discovery_descriptor(A, boxes, fit_whitening(rng.standard_normal((50, 12)), dim=None))


def test_rank_discovery_scores_by_descriptor_and_boxes_by_the_nearest_region():
    from types import SimpleNamespace

    from objret.mining.template_matching import MapStack
    from objret.mining.lakemaps import LakeMaps
    from objret.config import load_params
    from objret.mining.methods import RankInputs, rank
    from objret.mining.query import QueryObject

    params = load_params(None, ["mining.method=discovery"])
    inputs = RankInputs(params.mining, gem_p=params.index.gem_p)
    rng = np.random.default_rng(2)
    maps = [rng.random((8, 6, 8)).astype(np.float32) for _ in range(4)]
    # Frame 2 holds the query's pattern in its second region.
    pattern = np.zeros(8, np.float32)
    pattern[3] = 5.0
    maps[2][:, 3:5, 4:7] += pattern[:, None, None]
    per_frame = {}
    region_boxes = {0: [[0, 0, 3, 3]], 1: [], 2: [[0, 0, 2, 2], [4, 3, 3, 2]], 3: [[1, 1, 4, 4], [5, 2, 2, 2]]}
    for i, fmap in enumerate(maps):
        r = FrameRegions(np.array(region_boxes[i], np.float32).reshape(-1, 4),
                         np.full(len(region_boxes[i]), SOURCES.index("os_egm"), np.int8),
                         np.ones(len(region_boxes[i]), np.float32))
        per_frame[f"f{i}"] = disc.FrameDiscovery(r, disc.discovery_descriptor(fmap, r), disc.region_vectors(fmap, r),
                                                 (6, 8))
    stored = SimpleNamespace(arrays=disc.pack(per_frame), frame_ids=list(per_frame))
    frames = [SimpleNamespace(frame_id=f"f{i}", width=160, height=120) for i in range(4)]
    vectors = disc.discovery_vectors(stored, frames, "stride32")
    lake = LakeMaps(MapStack([f.frame_id for f in frames], maps, [(160, 120)] * 4), np.zeros((4, 8), np.float32),
                    discovery=vectors)
    qmap = rng.random((8, 6, 8)).astype(np.float32)
    qmap[:, 1:3, 1:3] += pattern[:, None, None]
    query = QueryObject({"stride32": qmap}, (160, 120), (20, 20, 40, 40), frame_id="q")
    ranking = rank("discovery", query, lake, inputs)
    q = disc.query_descriptor(qmap, [1, 1, 2, 2])
    np.testing.assert_allclose(ranking.scores, [per_frame[f].descriptor @ q for f in per_frame], atol=1e-5)
    # Frame 2's box: its region holding the pattern, in pixels (20 px a cell); frame 1 (no region): the frame.
    np.testing.assert_allclose(ranking.boxes[2], [80, 60, 60, 40])
    np.testing.assert_allclose(ranking.boxes[1], [0, 0, 160, 120])
    # A subset keeps frames and their regions together.
    sub = lake.subset([2, 0])
    np.testing.assert_allclose(rank("discovery", query, sub, inputs).boxes[0], [80, 60, 60, 40])
    with pytest.raises(ObjretError, match="OS.EGM descriptors"):
        rank("discovery", query, LakeMaps(lake.stack, lake.global_vectors), inputs)


def test_patch_search_follows_the_graphs_ivf_lists():
    """Above graph.exact_max the patches search the graph's own IVF lists: all lists probed, the exact answer."""
    from types import SimpleNamespace

    from objret.steps.graph import patch_search
    from objret.graph.knn import build_region_graph

    rng = np.random.default_rng(3)
    centres = rng.standard_normal((12, 16))
    x = centres[rng.integers(0, 12, 600)] + 0.3 * rng.standard_normal((600, 16))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    built = build_region_graph(x, k=10, exact_max=100, nprobe=2, recall_sample=0)
    assert built.knn.kind == "ivf"
    nlist = len(built.knn.centroids)
    queries = x[:40] + 0.05 * rng.standard_normal((40, 16)).astype(np.float32)
    queries = np.ascontiguousarray(queries / np.linalg.norm(queries, axis=1, keepdims=True), np.float32)
    exact_sims = queries @ x.T
    for nprobe, least in ((nlist, 1.0), (2, 0.6)):
        stored = SimpleNamespace(knn=built.knn, manifest={"settings": {"knn": {"nprobe": nprobe}}})
        sims, ids = patch_search(None, stored, x).search(queries, 10)
        truth = np.argsort(-exact_sims, axis=1)[:, :10]
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth)])
        assert recall >= least
        found = ids >= 0
        np.testing.assert_allclose(sims[found], np.take_along_axis(exact_sims, np.where(found, ids, 0), 1)[found],
                                   atol=1e-5)


# ---- the pipeline step on a small real workspace --------------------------------------------------------------

SMALL = ["features.backbone=efficientnet_lite0", "features.max_side=320", "features.shard_size=3",
         "regions.sources=[whole,uniform,egm]"]


@pytest.fixture(scope="module")
def workspace(bench_dir, tmp_path_factory, one_torch_thread):
    """8 real TUD-Campus frames, their features, regions, index and region graph (Lite0 at 320 px)."""
    from objret.steps import discovery as discovery_step, features as features_step, graph as graph_step, index as index_step, ingest as ingest_step, regions as regions_step, store as store_step
    from objret.config import load_params
    from objret.steps.workspace import Workspace

    folder = tmp_path_factory.mktemp("frames")
    for n in range(16, 24):
        (folder / f"{n:06d}.jpg").write_bytes((bench_dir / "tud_campus" / "images" / f"{n:06d}.jpg").read_bytes())
    ws = Workspace(load_params(None, SMALL), tmp_path_factory.mktemp("work"))
    ingest_step.ingest(ws, [str(folder)], progress=False)
    features_step.features(ws, progress=False)
    regions_step.regions(ws, progress=False)
    index = index_step.build_index(ws)
    store_step.store(ws, progress=False)
    store_step.cells(ws, progress=False)
    with pytest.raises(ObjretError, match="run build-index.*no region graph"):
        discovery_step.discovery(ws, progress=False)
    graph_step.graph(ws)
    return ws, index, folder


def test_discovery_step_stores_every_indexed_frame_and_a_second_run_does_nothing(workspace):
    from objret.steps import discovery as discovery_step, graph as graph_step
    from objret.index.region_index import RegionIndex
    from objret.regions.saliency import feature_saliency

    ws, built, _ = workspace
    index = RegionIndex.load(ws.current_index_dir())
    assert index.n_frames == built.frames == 8

    # A run SIGKILLed in a forked child (tests/helpers/sigkill.py: no cleanup of any kind runs) at the rename of its
    # second part, written in full: its first part (3 frames) is kept, the second is a hidden temp file, nothing is
    # visible yet; the next run takes the first part over.
    def run():
        sigkill_at_call(storage.os, "replace", 2)
        discovery_step.discovery(ws, progress=False)

    run_killed(run)
    assert disc.load_discovery(discovery_step.discovery_dir(ws)) is None          # nothing visible yet
    (work,) = discovery_step.discovery_dir(ws).glob(".work-*")
    assert len(list(work.glob("part-*.npz"))) == 1 and len(list(work.glob(".part-*.tmp"))) == 1

    first = discovery_step.discovery(ws, progress=False)
    assert first.mode == "computed" and first.frames == 8 and first.resumed == 3 and first.computed == 5
    assert first.regions > 0 and first.mean_regions == pytest.approx(first.regions / 8)
    assert 0 < first.seconds_per_frame < first.seconds
    stored = disc.load_discovery(discovery_step.discovery_dir(ws))
    assert stored.version == first.version and stored.frame_ids == list(index.frame_ids)
    assert stored.manifest["graph"]["version"] == (ws.graph_dir() / "CURRENT").read_text().strip()
    a = stored.arrays
    assert a["descriptors"].shape == (8, a["descriptors"].shape[1]) and a["descriptors"].shape[1] > 0
    np.testing.assert_allclose(np.linalg.norm(a["descriptors"], axis=1), 1.0, atol=1e-5)
    assert a["counts"].sum() == len(a["boxes"]) == len(a["region_vectors"]) == first.regions
    assert not list(discovery_step.discovery_dir(ws).glob(".work-*"))               # parts folded into the version

    # What is stored is what the functions give for that frame's map and the graph's object saliency.
    vectors, saliency, _ = graph_step.graph_nodes(ws, index)
    from objret.graph.store import load_graph
    saliency_of = graph_step.object_saliency_function(ws, index, load_graph(ws.graph_dir()), vectors, saliency)
    for fid in (index.frame_ids[0], index.frame_ids[5]):
        fmap = ws.cache.load([fid], "stride32")[fid].astype(np.float32)
        regions = disc.os_egm_regions(fmap, saliency_of(fmap, feature_saliency(fmap)), ws.params.graph.discovery.egm)
        kept = stored.frame(fid)
        np.testing.assert_allclose(kept.regions.boxes, regions.boxes, atol=1e-4)
        np.testing.assert_allclose(kept.descriptor, disc.discovery_descriptor(fmap, regions), atol=1e-5)
        assert kept.map_hw == tuple(fmap.shape[-2:])
        assert len(kept.region_vectors) == len(regions)

    # Nothing new: nothing done, the same version.
    again = discovery_step.discovery(ws, progress=False)
    assert again.mode == "unchanged" and again.computed == 0 and again.version == first.version
    # Other OS.EGM parameters: computed again, a new version.
    from objret.config import load_params
    from objret.steps.workspace import Workspace

    other = Workspace(load_params(None, SMALL + ["graph.discovery.egm={sigma: 1.0, tau: 0.0, rho: 2.0, purge: 0.5}"]),
                      ws.root)
    changed = discovery_step.discovery(other, progress=False)
    assert changed.mode == "computed" and changed.computed == 8 and changed.version != first.version
    manifest = json.loads((discovery_step.discovery_dir(ws) / changed.version / "manifest.json").read_text())
    assert manifest["settings"]["egm"]["sigma"] == 1.0


def test_mining_a_report_with_method_discovery(workspace):
    from objret.steps import discovery as discovery_step, mine as mine_step
    from objret.config import load_params
    from objret.index.region_index import RegionIndex
    from objret.mining.report import FailureReport
    from objret.steps.workspace import Workspace

    ws, _, _ = workspace
    discovery_step.discovery(ws, progress=False)      # the default parameters' version (another test may have changed it)
    miner = Workspace(load_params(None, SMALL + ["mining.method=discovery", "mining.top_k=5", "mining.dedup_frames=0"]),
                      ws.root)
    index = RegionIndex.load(ws.current_index_dir())
    query_id = index.frame_ids[0]
    report = FailureReport("disc-test", "t", "1", query_id, None, None, (300.0, 150.0, 60.0, 160.0), "person",
                           "false_negative")
    outcome = mine_step.mine(miner, report, progress=False)
    assert outcome.provenance["method"] == "discovery" and outcome.candidates == 7   # every other indexed frame
    mined = outcome.mined
    assert 1 <= len(mined) <= 5 and query_id not in {m["frame_id"] for m in mined}
    assert [m["score"] for m in mined] == sorted((m["score"] for m in mined), reverse=True)
    stored = disc.load_discovery(discovery_step.discovery_dir(ws))
    for m in mined:   # each box is one of the frame's OS.EGM regions (in pixels), or the whole frame
        kept = stored.frame(m["frame_id"])
        h, w = kept.map_hw
        pixels = kept.regions.boxes * np.array([m["width"] / w, m["height"] / h] * 2)
        assert any(np.allclose(m["box"], b, atol=0.05) for b in pixels) or len(pixels) == 0
    # Descriptors computed with other parameters are refused, saying what to run.
    other = Workspace(load_params(None, SMALL + ["mining.method=discovery",
                                                 "graph.discovery.egm={sigma: 3.0, tau: 0.0, rho: 2.0, purge: 0.5}"]),
                      ws.root)
    with pytest.raises(ObjretError, match="other parameters"):
        mine_step.mine(other, report, progress=False)


def test_build_index_flow_runs_discovery_after_the_graph_and_logs_it(workspace, prefect_server):
    import mlflow

    from flows.build_index import build_index_flow
    from objret.steps import discovery as discovery_step

    ws, _, folder = workspace
    off = build_index_flow(sources=[str(folder)], overrides=SMALL + ["graph.discovery.enabled=false"],
                           workdir=str(ws.root))
    assert off["discovery"] is None
    # Other OS.EGM parameters than the stored version's: computed by the flow, after the graph, and logged.
    result = build_index_flow(sources=[str(folder)],
                              overrides=SMALL + ["graph.discovery.enabled=true",
                                                 "graph.discovery.egm={sigma: 1.5, tau: 0.0, rho: 2.0, purge: 0.5}"],
                              workdir=str(ws.root))
    assert result["graph"]["mode"] == "unchanged"
    found = result["discovery"]
    assert found["mode"] == "computed" and found["frames"] == found["computed"] == 8
    assert found["graph_version"] == result["graph"]["version"]
    assert disc.load_discovery(discovery_step.discovery_dir(ws)).version == found["version"]
    run = mlflow.tracking.MlflowClient(f"sqlite:///{ws.root / 'mlflow.db'}").get_run(result["mlflow_run_id"])
    metrics = run.data.metrics
    assert metrics["discovery_frames"] == 8 and metrics["discovery_computed"] == 8
    assert metrics["discovery_mean_regions"] == pytest.approx(found["mean_regions"]) and found["mean_regions"] > 0
    assert 0 < metrics["discovery_seconds_per_frame"] <= metrics["discovery_seconds"]
    assert run.data.tags["discovery_version"] == found["version"]


def test_eval_with_method_discovery_builds_index_graph_and_descriptors(bench_dir, prefect_server, tmp_path):
    """`objret eval --methods discovery,...` on a bench-format folder (14 PETS 2009 frames, 1 instance query whose
    gallery holds frames without the person, so that a ranking can be told from a random one)."""
    from flows.evaluate import evaluate_flow
    from objret.steps import discovery as discovery_step
    from objret.eval.bench import load_bench
    from objret.config import load_params
    from objret.steps.workspace import Workspace

    # The query of frame 753 (person 1) and 13 frames: 301-305 show the person, 101-119 do not. Not TUD-Campus:
    # there every query's gallery of these sizes holds positives only, where any ranking has AP 1 and an mAP proves
    # nothing, and with negatives added the methods stay at chance (frames 14-36 and 57: discovery 0.71 and gem 0.69
    # mAP against 0.73 for random rankings).
    root = write_subset(bench_dir, tmp_path / "bench", "pets09_s2l1", {753, 301, 303, 305, *range(101, 120, 2)})
    assert [q["image_id"] for q in json.loads((root / "queries.json").read_text())["queries"]] == [753]

    workdir = tmp_path / "work"
    out = evaluate_flow(bench_dir=str(root), results=str(tmp_path / "out.json"), methods=["discovery", "gem"],
                        overrides=SMALL + ["graph.enabled=false", "graph.discovery.enabled=false"],
                        workdir=str(workdir))
    ws = Workspace(load_params(None, SMALL), workdir)
    stored = disc.load_discovery(discovery_step.discovery_dir(ws))
    assert stored is not None and len(stored.frame_ids) == 14            # every bench frame, whatever the switches
    results = json.loads((tmp_path / "out.json").read_text())
    bench = load_bench(root)
    assert set(results) == {q.id for q in bench.queries}
    for q in bench.queries:
        entries = results[q.id]
        assert len(entries) == len(bench.gallery_keys(q)) > 1
        assert [e["score"] for e in entries] == sorted((e["score"] for e in entries), reverse=True)
        assert len({round(e["score"], 6) for e in entries}) > 1
    # Far above chance, the expected mAP of random rankings of the same gallery (0.37: 3 positives in 13 frames);
    # measured: 1.0. A random, constant (gallery order puts the positives last) or reversed ranking fails.
    chance = chance_map(bench, bench.queries)
    found = out["methods"]["discovery"]["metrics"]["video_instance_mAP"]
    assert chance < 0.4 and found >= chance + 0.5, (found, chance)
    assert (tmp_path / "out.gem.json").exists()


def test_discovery_step_without_an_index_says_what_to_run(tmp_path):
    from objret.steps import discovery as discovery_step
    from objret.config import load_params
    from objret.steps.workspace import Workspace

    ws = Workspace(load_params(None, SMALL), tmp_path / "empty")
    with pytest.raises(ObjretError, match="run build-index: no region index"):
        discovery_step.discovery(ws, progress=False)
