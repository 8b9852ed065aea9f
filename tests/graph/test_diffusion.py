"""Diffusion as query expansion (Iscen et al. 2017, used in 003): it follows the query's manifold past its
direct neighbours, matches a dense solve when run to convergence, truncates CG on request, and frame scores
take each frame's best region."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from objret.graph.diffusion import diffuse, frame_scores, initial_vector
from objret.errors import ObjretError
from objret.graph.knn import build_region_graph


pytestmark = pytest.mark.usefixtures("one_faiss_thread")


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def arc_and_blob(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Cluster A: 45 regions along a quarter circle from e1 to e2 (one object seen from many angles).
    Cluster B: 30 regions tightly around (e1 + sqrt(3) e3)/2, which is *closer* to A's start (cosine 0.5)
    than A's far end is (cosine ~0). The query sits at A's start."""
    rng = np.random.default_rng(seed)
    d = 16
    t = np.linspace(0, np.pi / 2, 45)
    arc = np.zeros((45, d))
    arc[:, 0], arc[:, 1] = np.cos(t), np.sin(t)
    blob = np.zeros((30, d))
    blob[:, 0], blob[:, 2] = 0.5, np.sqrt(3) / 2
    x = unit(np.concatenate([arc, blob]) + rng.standard_normal((75, d)) * 0.005)
    query = unit(np.eye(d)[:1] + rng.standard_normal((1, d)) * 0.005)[0]
    return x, query


def test_diffusion_ranks_the_whole_query_manifold_above_a_nearer_cluster():
    x, query = arc_and_blob()
    arc, blob = np.arange(45), np.arange(45, 75)
    cosine = x @ query
    # Plain nearest-neighbour ranking puts part of B above the far part of A ...
    assert cosine[blob].max() > cosine[arc].min() + 0.3
    # ... and the far part of A is not among the query's direct neighbours that seed the diffusion.
    seeds = np.flatnonzero(initial_vector(query, x, k=10))
    assert set(seeds) <= set(arc[:12])

    S = build_region_graph(x, k=8).matrix
    result = diffuse(S, query, x, k=10)               # defaults: beta 3, alpha 0.99, CG truncated at 20
    f = result.values
    assert f[arc].min() > f[blob].max()
    assert f[arc[-5:]].min() > 0                      # reached the far end along the graph
    assert result.iterations <= 20


def test_diffusion_to_convergence_matches_a_dense_solve():
    x, query = arc_and_blob(seed=1)
    S = build_region_graph(x, k=8).matrix
    y = initial_vector(query, x, k=10, beta=3.0)
    assert np.count_nonzero(y) == 10
    np.testing.assert_allclose(y[y > 0], np.sort(x @ query)[::-1][:10] ** 3, rtol=1e-5)
    expected = np.linalg.solve(np.eye(75) - 0.99 * S.toarray(), y)
    full = diffuse(S, query, x, k=10, alpha=0.99, max_iter=1000, tol=1e-12)
    assert full.converged
    np.testing.assert_allclose(full.values, expected, rtol=1e-6, atol=1e-9)
    truncated = diffuse(S, query, x, k=10, alpha=0.99, max_iter=2, tol=1e-12)
    assert truncated.iterations == 2 and not truncated.converged
    assert np.abs(truncated.values - expected).max() > 1e-3


def test_diffusion_accepts_a_faiss_index_in_node_order():
    x, query = arc_and_blob(seed=2)
    S = build_region_graph(x, k=8).matrix
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    np.testing.assert_allclose(diffuse(S, query, index).values, diffuse(S, query, x).values)


def test_frame_scores_take_each_frames_best_region():
    scores = np.array([0.1, 0.9, 0.3, -0.2, 0.5])
    owner = np.array([0, 0, 2, 3, 2])
    np.testing.assert_array_equal(frame_scores(scores, owner), [0.9, -np.inf, 0.5, -0.2])
    np.testing.assert_array_equal(frame_scores(scores, owner, n_frames=6, empty=0.0), [0.9, 0, 0.5, -0.2, 0, 0])
    with pytest.raises(ObjretError, match="n_frames"):
        frame_scores(scores, owner, n_frames=3)
    with pytest.raises(ObjretError, match="one owner"):
        frame_scores(scores, owner[:4])


def test_diffusion_refuses_mismatched_input():
    x, query = arc_and_blob()
    S = build_region_graph(x, k=8).matrix
    with pytest.raises(ObjretError, match="-d"):
        diffuse(S, query[:8], x)
    with pytest.raises(ObjretError, match="nodes"):
        diffuse(S, query, x[:50])
    with pytest.raises(ObjretError, match="k=76"):
        diffuse(S, query, x, k=76)
