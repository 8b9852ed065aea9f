"""Katz centrality by CG (003 eq. 12-13) against a dense solve, recurring vs isolated regions, and object
saliency (eq. 14): against a loop-by-loop reference, and on synthetic frames with a recurring object,
a one-off object and clutter."""

from __future__ import annotations

import numpy as np
import pytest

from objret.graph.centrality import katz_centrality, object_saliency, patch_descriptors
from objret.errors import ObjretError
from objret.graph.knn import build_region_graph
from objret.regions.sources import mean_inside, pool_regions
from objret.regions.saliency import feature_saliency
from objret.regions.whitening import fit_whitening


pytestmark = pytest.mark.usefixtures("one_faiss_thread")


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_katz_matches_a_dense_solve_and_reports_its_iterations():
    rng = np.random.default_rng(0)
    centres = unit(rng.standard_normal((6, 24)))
    x = unit(centres[rng.integers(0, 6, 250)] + rng.standard_normal((250, 24)) * 0.15)
    S = build_region_graph(x, k=10).matrix
    alpha = 0.99
    expected = np.linalg.solve((np.eye(250) - alpha * S.toarray()) / (1 - alpha), np.ones(250))  # eq. 12-13
    result = katz_centrality(S, alpha=alpha, tol=1e-10)
    np.testing.assert_allclose(result.values, expected, rtol=1e-7)
    assert result.converged and 1 < result.iterations < 250
    assert result.residual_norm < 1e-8 * np.sqrt(250) and result.seconds >= 0
    truncated = katz_centrality(S, alpha=alpha, tol=1e-10, max_iter=3)
    assert truncated.iterations == 3 and not truncated.converged
    assert truncated.residual_norm > 100 * result.residual_norm


def test_recurring_regions_are_central_and_isolated_clutter_is_not():
    rng = np.random.default_rng(1)
    d, per_cluster = 64, 40
    centres = np.eye(d)[:3]
    members = unit(np.repeat(centres, per_cluster, axis=0) + rng.standard_normal((3 * per_cluster, d)) * 0.06)
    # Clutter: each region half-resembles some recurring object (so its nearest neighbours are that object's
    # regions, which prefer each other: never mutual) plus a direction of its own.
    own = np.eye(d)[3:23]
    clutter = unit(0.6 * centres[rng.integers(0, 3, 20)] + 0.8 * own)
    graph = build_region_graph(np.concatenate([members, clutter]), k=20)
    alpha = 0.99
    g = katz_centrality(graph.matrix, alpha=alpha, tol=1e-10).values
    assert graph.isolated == 20
    np.testing.assert_allclose(g[120:], 1 - alpha)          # isolated node: L_alpha g = 1 gives g = 1 - alpha
    assert g[:120].min() > 10 * g[120:].max()
    assert g[:120].mean() == pytest.approx(1.0, rel=0.1)     # degree-normalised: ~1 inside a component


def reference_object_saliency(A, V, g, f, F, *, k, beta, Theta, theta, patch, whiten):
    """Eq. 14 position by position, pooling each patch with the region pipeline's own pool_regions."""
    _, h, w = A.shape
    out = np.zeros((h, w))
    for y in range(h):
        for x in range(w):
            box = np.array([[x - patch // 2, y - patch // 2, patch, patch]], np.float32)
            u = whiten(pool_regions(A, box, "max"))[0].astype(np.float64)
            u /= np.linalg.norm(u)
            sims = V.astype(np.float64) @ u
            nearest = np.argsort(-sims)[:k]
            out[y, x] = F[y, x] ** Theta * sum(max(sims[i], 0) ** beta * f[i] ** theta * g[i] for i in nearest)
    return out


def test_object_saliency_follows_equation_14_exactly():
    rng = np.random.default_rng(2)
    A = np.abs(rng.standard_normal((6, 5, 7))).astype(np.float32)
    whitening = fit_whitening(np.abs(rng.standard_normal((200, 6))), dim=6)
    V = whitening.apply(np.abs(rng.standard_normal((30, 6))))
    g, f, F = rng.uniform(0.01, 2, 30), rng.uniform(0, 1, 30), rng.uniform(0, 1, (5, 7))
    params = dict(k=5, beta=3.0, Theta=2.0, theta=3.0, patch=3)
    got = object_saliency(A, V, g, f, frame_saliency=F, whiten=whitening.apply, **params)
    expected = reference_object_saliency(A, V, g, f, F, whiten=whitening.apply, **params)
    assert got.shape == (5, 7)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("pooling", ["max", "avg", "avgmax"])
@pytest.mark.parametrize("patch", [1, 2, 3])
def test_patch_descriptors_are_the_region_pipelines_pooling(pooling, patch):
    A = np.random.default_rng(3).standard_normal((8, 5, 6)).astype(np.float32)
    boxes = np.array([[x - patch // 2, y - patch // 2, patch, patch] for y in range(5) for x in range(6)],
                     np.float32)
    np.testing.assert_allclose(patch_descriptors(A, patch, pooling), pool_regions(A, boxes, pooling), atol=1e-6)


# ---- object saliency on synthetic frames ---------------------------------------------------------------
C, SIDE = 256, 12
RECURRING, ONE_OFF = np.arange(0, 8), np.arange(8, 16)   # channels of the two objects; clutter uses 16..255


def frame(rng, objects: dict[tuple[int, int], np.ndarray]) -> np.ndarray:
    """A C x SIDE x SIDE map: clutter cells (2 random clutter channels each) and 3x3 objects at (x, y)."""
    A = np.zeros((C, SIDE, SIDE), np.float32)
    for y in range(SIDE):
        for x in range(SIDE):
            A[rng.choice(np.arange(16, C), 2, replace=False), y, x] = rng.uniform(0.5, 1.5, 2)
    for (x0, y0), channels in objects.items():
        look = np.random.default_rng(int(channels[0])).uniform(1.0, 2.0, 8)   # the same in every frame
        A[:, y0:y0 + 3, x0:x0 + 3] = 0
        A[channels, y0:y0 + 3, x0:x0 + 3] = look[:, None, None] + rng.normal(0, 0.05, (8, 3, 3))
    return A


def lake_regions(rng, n_frames: int = 30):
    """Region vectors and their feature saliency from frames that all show the recurring object, once the
    one-off object, and clutter; 1 object box + 3 clutter boxes a frame, max-pooled as in the region store."""
    vectors, saliency = [], []
    for i in range(n_frames):
        objects = {(0, 0): RECURRING} | ({(9, 9): ONE_OFF} if i == 0 else {})
        A = frame(rng, objects)
        boxes = np.array([[0, 0, 3, 3], [4, 4, 3, 3], [8, 0, 3, 3], [0, 8, 3, 3]]
                         + ([[9, 9, 3, 3]] if i == 0 else []), np.float32)
        vectors.append(pool_regions(A, boxes, "max"))
        saliency.append(mean_inside(feature_saliency(A), boxes))
    return unit(np.concatenate(vectors)), np.concatenate(saliency)


def test_object_saliency_keeps_recurring_objects_and_drops_one_offs_and_clutter():
    rng = np.random.default_rng(4)
    V, f = lake_regions(rng)
    graph = build_region_graph(V, k=10)
    g = katz_centrality(graph.matrix).values
    assert g[4] == pytest.approx(0.01)            # the one-off object's region (frame 0's 5th) is isolated
    recurring_regions = g[np.arange(30) * 4 + (np.arange(30) > 0)]
    assert np.mean(recurring_regions > 0.5) >= 0.9   # mutual k-NN can leave an odd one out (nobody's top k)

    A = frame(rng, {(2, 2): RECURRING, (7, 7): ONE_OFF})   # a new frame, new clutter
    F = feature_saliency(A)
    S = object_saliency(A, V, g, f, frame_saliency=F)
    recurring, one_off = S[3, 3], S[8, 8]                     # the objects' centre cells
    clutter = S[np.ix_([0, 11], range(12))].max()           # rows whose patches touch no object
    assert recurring > 50 * one_off and recurring > 50 * clutter

    # It is the centrality that drops the one-off object: with flat centrality it is much closer.
    flat = object_saliency(A, V, np.ones_like(g), f, frame_saliency=F)
    assert recurring / one_off > 20 * (flat[3, 3] / flat[8, 8])
    # And F^_p^Theta scales each position.
    twice = object_saliency(A, V, g, f, frame_saliency=F * 2, Theta=2.0)
    np.testing.assert_allclose(twice, 4 * S, rtol=1e-5)


def test_object_saliency_refuses_mismatched_input():
    rng = np.random.default_rng(5)
    A = rng.standard_normal((8, 4, 4)).astype(np.float32)
    V = unit(rng.standard_normal((10, 8)))
    with pytest.raises(ObjretError, match="region vectors"):
        object_saliency(A, V, np.ones(9), np.ones(10))
    with pytest.raises(ObjretError, match="k=11"):
        object_saliency(A, V, np.ones(10), np.ones(10), k=11)
    with pytest.raises(ObjretError, match="-d"):
        object_saliency(A, unit(rng.standard_normal((10, 5))), np.ones(10), np.ones(10), k=3)
    with pytest.raises(ObjretError, match="frame saliency"):
        object_saliency(A, V, np.ones(10), np.ones(10), k=3, frame_saliency=np.ones((3, 4)))
    with pytest.raises(ObjretError, match="alpha"):
        katz_centrality(np.eye(3), alpha=1.0)
