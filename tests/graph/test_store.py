"""objret.graph.store: versioned, atomically switched region graphs; GraphDiffusion: diffusion scores per frame
from a search over the graph's nodes, the same as objret.graph.diffusion's functions."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest

from objret.graph.centrality import katz_centrality
from objret.graph.diffusion import GraphDiffusion, diffuse, frame_scores
from objret.errors import ObjretError
from objret.graph.store import load_graph, save_graph
from objret.graph.knn import build_region_graph, refresh_region_graph


pytestmark = pytest.mark.usefixtures("one_faiss_thread")


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def vectors(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((8, 16)))
    return unit(centres[rng.integers(0, 8, n)] + rng.standard_normal((n, 16)) * 0.1)


def test_save_and_load_round_trip_and_switch_versions(tmp_path):
    x = vectors(300, 0)
    graph = build_region_graph(x, k=8)
    g = katz_centrality(graph.matrix).values
    manifest = {"index": {"current": "v-1"}, "settings": {"knn": {"beta": 3.0}}, "stats": {"nodes": graph.nodes}}
    first = save_graph(tmp_path, graph, g, np.arange(5), x[:5], manifest)
    loaded = load_graph(tmp_path)
    assert loaded.version == first.version == (tmp_path / "CURRENT").read_text()
    assert (loaded.matrix != graph.matrix).nnz == 0
    np.testing.assert_array_equal(loaded.knn.neighbors, graph.knn.neighbors)
    np.testing.assert_array_equal(loaded.centrality, g)
    ids, check = loaded.check()
    np.testing.assert_array_equal(check, x[:5])
    assert json.loads((tmp_path / first.version / "manifest.json").read_text())["format"] == 1

    # A refreshed graph is a new version; CURRENT moves to it and the old version is removed.
    more = np.concatenate([x, vectors(20, 1)])
    refreshed = refresh_region_graph(loaded.knn, more, beta=3.0)
    second = save_graph(tmp_path, refreshed, katz_centrality(refreshed.matrix).values, np.arange(5), more[:5],
                        {**manifest, "stats": {"nodes": refreshed.nodes}})
    assert second.version != first.version and load_graph(tmp_path).nodes == 320
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["CURRENT", second.version]


def test_a_damaged_or_missing_graph_is_reported(tmp_path):
    assert load_graph(tmp_path / "nothing") is None
    x = vectors(100, 2)
    graph = build_region_graph(x, k=5)
    saved = save_graph(tmp_path, graph, np.ones(100), np.arange(3), x[:3], {"stats": {"nodes": 100}})
    with open(saved.directory / "matrix.npz", "ab") as handle:
        handle.write(b"junk")
    with pytest.raises(ObjretError, match="matrix.npz has .* bytes"):
        load_graph(tmp_path)


def test_graph_diffusion_scores_frames_as_diffuse_and_frame_scores_do():
    x = vectors(240, 3)
    S = build_region_graph(x, k=8).matrix
    owner = np.repeat(np.arange(40), 6)                  # 40 frames of 6 regions
    frame_ids = [f"f{i}" for i in range(40)]
    index = faiss.IndexFlatIP(16)
    index.add(x)

    def search(q, k):
        sims, ids = index.search(q[None], k)
        return ids[0], sims[0]

    d = GraphDiffusion(S, owner, frame_ids, search, k=10, alpha=0.95, max_iter=30)
    query = x[17]
    expected = diffuse(S, query, x, k=10, alpha=0.95, max_iter=30)
    rows = d.rows_for(["f3", "nope", "f0"])
    scores, solve = d.scores(query, rows)
    np.testing.assert_allclose(solve.values, expected.values)
    per_frame = frame_scores(expected.values, owner)
    np.testing.assert_allclose(scores, [per_frame[3], 0.0, per_frame[0]])
    assert np.argmax(frame_scores(solve.values, owner)) == 17 // 6   # the query's own frame
    with pytest.raises(ObjretError, match="owners"):
        GraphDiffusion(S, owner[:-1], frame_ids, search)
    with pytest.raises(ObjretError, match="out of range"):
        GraphDiffusion(S, owner, frame_ids[:10], search)
