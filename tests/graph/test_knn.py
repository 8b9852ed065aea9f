"""Mutual k-NN region graph (003 eq. 11): exactness against a numpy brute force, IVF recall on clustered data,
incremental refresh equal to a full rebuild, graph figures, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import sparse

from objret.errors import ObjretError
from objret.graph.knn import (KnnLists, build_region_graph, knn_recall, mutual_graph, nearest_neighbors,
                                 refresh_region_graph)


pytestmark = pytest.mark.usefixtures("one_faiss_thread")


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n: int, d: int, n_clusters: int, seed: int, spread: float = 0.6) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((n_clusters, d)))
    return unit(centres[rng.integers(0, n_clusters, n)] + rng.standard_normal((n, d)) * spread / np.sqrt(d))


def reference_graph(x: np.ndarray, k: int, beta: float) -> np.ndarray:
    """003 sec. 3.6 / eq. 11 in dense float64 numpy, independently of faiss and scipy.sparse."""
    sims = x.astype(np.float64) @ x.T.astype(np.float64)
    np.fill_diagonal(sims, -np.inf)
    knn = np.argsort(-sims, axis=1)[:, :k]
    in_list = np.zeros(sims.shape, bool)
    in_list[np.arange(len(x))[:, None], knn] = True
    mutual = in_list & in_list.T & (sims > 0)
    W = np.where(mutual, np.clip(sims, 0, None) ** beta, 0.0)
    degree = W.sum(axis=1)
    inv = np.where(degree > 0, 1 / np.sqrt(np.where(degree > 0, degree, 1)), 0.0)
    return inv[:, None] * W * inv[None, :]


@pytest.mark.parametrize("n, d, k", [(400, 16, 8), (40, 64, 25)])   # the second has negative-similarity NNs
def test_exact_graph_equals_numpy_brute_force(n, d, k):
    x = clustered(n, d, n_clusters=12, seed=n)
    graph = build_region_graph(x, k=k, beta=3.0)
    expected = reference_graph(x, k, 3.0)
    S = graph.matrix
    assert graph.knn.kind == "exact" and graph.recall == 1.0
    np.testing.assert_array_equal(S.toarray() != 0, expected != 0)          # the same mutual edges
    np.testing.assert_allclose(S.toarray(), expected, rtol=1e-5, atol=1e-7)
    assert (S != S.T).nnz == 0                                              # exactly symmetric
    assert not S.diagonal().any()                                           # no self-loops
    assert graph.edges == np.count_nonzero(expected) // 2
    assert graph.mean_degree == pytest.approx(np.count_nonzero(expected) / n)
    assert graph.isolated == int(np.sum(~expected.any(axis=1)))
    if d == 64:   # there, mutual list neighbours of negative similarity exist: they must not become edges
        i, slot = np.nonzero(graph.knn.similarities < 0)
        j = graph.knn.neighbors[i, slot]
        mutual = np.array([a in graph.knn.neighbors[b] for a, b in zip(i, j)])
        assert mutual.any() and not np.asarray(S[i[mutual], j[mutual]]).any()


def test_knn_lists_exclude_self_and_are_sorted():
    x = clustered(300, 16, 10, seed=1)
    x[7] = x[3]    # a duplicate: the search may return the twin before the row itself
    knn, _ = nearest_neighbors(x, 5)
    assert knn.neighbors.shape == (300, 5) and knn.neighbors.dtype == np.int32
    assert not np.any(knn.neighbors == np.arange(300)[:, None])
    assert np.all(np.diff(knn.similarities, axis=1) <= 1e-6)
    assert 7 in knn.neighbors[3] and 3 in knn.neighbors[7]


def test_separated_clusters_give_one_component_each():
    rng = np.random.default_rng(2)
    x = np.zeros((150, 16))
    for c in range(3):   # cluster c lives on its own dims (c and 3+4c..6+4c): zero similarity across clusters
        dims = [c, *range(3 + 4 * c, 7 + 4 * c)]
        x[50 * c:50 * (c + 1), dims] = np.array([1, 0, 0, 0, 0]) + rng.standard_normal((50, 5)) * 0.2
    graph = build_region_graph(unit(x), k=10)
    assert graph.components == 3 and graph.isolated == 0
    labels = sparse.csgraph.connected_components(graph.matrix, directed=False)[1]
    assert len(set(labels[:50])) == len(set(labels[50:100])) == len(set(labels[100:])) == 1


def test_ivf_recall_is_measured_and_high_on_clustered_data():
    x = clustered(6000, 32, n_clusters=60, seed=3)
    graph = build_region_graph(x, k=10, exact_max=1000, nprobe=16, recall_sample=500)
    assert graph.knn.kind == "ivf" and graph.knn.probes.shape == (6000, 16)
    assert graph.recall > 0.95
    # The measure itself, over all rows, against an independent numpy brute force:
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    exact = np.argsort(-sims, axis=1)[:, :10]
    numpy_recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, graph.knn.neighbors)])
    assert knn_recall(x, graph.knn, sample=6000) == pytest.approx(numpy_recall, abs=1e-12)
    # ... and it notices a worse search:
    coarse = build_region_graph(x, k=10, exact_max=1000, nprobe=1, recall_sample=500)
    assert coarse.recall < graph.recall - 0.05


def test_exact_refresh_equals_full_rebuild(tmp_path):
    old = clustered(1000, 16, 20, seed=4)
    new = clustered(30, 16, 20, seed=5)
    everything = np.concatenate([old, new])
    previous = build_region_graph(old, k=10)
    previous.knn.save(tmp_path / "knn.npz")
    refreshed = refresh_region_graph(KnnLists.load(tmp_path / "knn.npz"), everything, beta=3.0)
    full = build_region_graph(everything, k=10)
    np.testing.assert_array_equal(refreshed.knn.neighbors, full.knn.neighbors)
    a, b = refreshed.matrix, full.matrix
    np.testing.assert_array_equal(a.indptr, b.indptr)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_allclose(a.data, b.data, rtol=1e-6)
    assert (refreshed.nodes, refreshed.edges, refreshed.components) == (full.nodes, full.edges, full.components)
    # Only some old lists changed, and exactly those a new vector entered:
    changed = np.any(previous.knn.neighbors != refreshed.knn.neighbors[:1000], axis=1)
    entered = np.any(refreshed.knn.neighbors[:1000] >= 1000, axis=1)
    np.testing.assert_array_equal(changed, entered)
    assert 0 < refreshed.timings["affected_old_nodes"] == changed.sum() < 1000


def test_ivf_refresh_equals_rebuild_with_the_same_centroids():
    old = clustered(4000, 16, 40, seed=6)
    new = clustered(40, 16, 40, seed=7)
    everything = np.concatenate([old, new])
    previous = build_region_graph(old, k=8, exact_max=500, nprobe=4)
    refreshed = refresh_region_graph(previous, everything)
    rebuilt, _ = nearest_neighbors(everything, 8, exact_max=500, nprobe=4, centroids=previous.knn.centroids)
    np.testing.assert_array_equal(refreshed.knn.neighbors, rebuilt.neighbors)
    np.testing.assert_array_equal(refreshed.knn.probes, rebuilt.probes)
    assert (refreshed.matrix != mutual_graph(rebuilt, 3.0)).nnz == 0


def test_bad_input_is_refused():
    x = clustered(20, 8, 4, seed=8)
    with pytest.raises(ObjretError, match="k=20"):
        build_region_graph(x, k=20)
    with pytest.raises(ObjretError, match="L2-normalised"):
        build_region_graph(x * 2, k=3)
    with pytest.raises(ObjretError, match="n x d"):
        build_region_graph(x[0], k=3)
    with pytest.raises(ObjretError, match="beta"):
        build_region_graph(x, k=3, beta=0)
    with pytest.raises(ObjretError, match="fewer"):
        refresh_region_graph(build_region_graph(x, k=3), x[:10])
