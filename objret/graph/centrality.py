"""Graph centrality of regions and the object saliency map it induces (paper 003 sec. 3.7-3.8, eq. 12-14).

Centrality (eq. 12-13). With S = D^-1/2 W D^-1/2 the normalised mutual k-NN graph (objret.graph.knn),

    L_alpha := (I - alpha S) / (1 - alpha)        (eq. 12, alpha in [0, 1))
    L_alpha g = 1                                 (eq. 13)

solved by conjugate gradients (L_alpha is symmetric positive-definite). g* is Katz centrality: g* =
(1 - alpha) sum_t alpha^t S^t 1. The 1/(1 - alpha) of eq. 12 only scales g* (a node with no mutual
neighbour gets exactly 1 - alpha); it is kept so that values read as in the paper. Because S is
degree-normalised, g* does not grow with a component's size: a node in any regular component gets ~1. What
it separates is *connected* regions (recurring patterns that are mutual neighbours of others, g ~ 1, more for
hubs) from *isolated* ones (clutter that is nobody's mutual neighbour, g = 1 - alpha).

Object saliency (eq. 14). For a frame with activation map A (C x h x w, the layer the regions were pooled
from), feature saliency F^ (h x w) and each position p:

    u_p = w(m_A(R_p))                             R_p: square patch of side a centred at p, pooled as the
                                                  regions were (eq. 10: max), then whitened and normalised
    S_p = F^_p^Theta * sum_{i in N_p} s(v_i, u_p) f_i^theta g*_i        (eq. 14)

with N_p the k nearest region vectors of u_p, s(v, u) = (v.u)^beta (positive part, as in the graph), f_i
region i's feature saliency (eq. 9, its mean F^ inside) and g*_i its centrality. Theta and theta are
*exponents* (003 sec. 4: Theta = 2, theta = 3), not thresholds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import faiss
import numpy as np
from scipy import sparse
from scipy.sparse.linalg import LinearOperator, cg

from objret.errors import ObjretError
from objret.graph.knn import DEFAULT_BETA, DEFAULT_K

DEFAULT_ALPHA = 0.99      # Iscen et al. [12], whose L_alpha 003 adopts; 003 does not restate a value
BIG_THETA = 2.0           # 003 sec. 4.1: exponent of the frame's own feature saliency F^_p
SMALL_THETA = 3.0         # 003 sec. 4.1: exponent of the neighbouring regions' feature saliency f_i
DEFAULT_PATCH = 3         # side a of R_p in cells; 003 does not give it (3: a cell and its 8 neighbours)
POOLINGS = ("max", "avg", "avgmax")


@dataclass
class GraphSolve:
    """A CG solution of (I - alpha S) x = b, with how it went."""

    values: np.ndarray        # n float64
    iterations: int
    residual_norm: float      # ||b - (I - alpha S) x|| of the system as posed (see each caller)
    relative_residual: float  # residual_norm / ||b||
    converged: bool           # CG reached its tolerance within max_iter
    seconds: float


def solve_graph_system(S: sparse.spmatrix, rhs: np.ndarray, *, alpha: float, scale: float = 1.0,
                       tol: float = 1e-6, max_iter: int | None = None) -> GraphSolve:
    """Solve ((I - alpha S) / scale) x = rhs by conjugate gradients (scipy), counting iterations.

    ``tol`` is CG's relative residual tolerance; ``max_iter`` truncates the iteration (None: scipy's 10 n).
    """
    S = _check_graph(S)
    if not 0 <= alpha < 1:
        raise ObjretError(f"alpha={alpha} must be in [0, 1) (003 eq. 12)")
    rhs = np.asarray(rhs, np.float64)
    n = S.shape[0]
    if rhs.shape != (n,):
        raise ObjretError(f"right-hand side of shape {rhs.shape} does not fit a graph of {n} nodes")
    if max_iter is not None and max_iter < 1:
        raise ObjretError(f"max_iter={max_iter} must be at least 1")

    def apply(x: np.ndarray) -> np.ndarray:
        x = np.ravel(x)
        return (x - alpha * (S @ x)) / scale

    operator = LinearOperator((n, n), matvec=apply, dtype=np.float64)
    iterations = 0

    def count(_: np.ndarray) -> None:   # scipy calls it once per CG iteration
        nonlocal iterations
        iterations += 1

    start = time.perf_counter()
    values, info = cg(operator, rhs, rtol=tol, atol=0.0, maxiter=max_iter, callback=count)
    seconds = time.perf_counter() - start
    if info < 0:
        raise ObjretError(f"conjugate gradients broke down (scipy info={info})")
    residual = float(np.linalg.norm(rhs - apply(values)))
    rhs_norm = float(np.linalg.norm(rhs))
    return GraphSolve(values, iterations, residual, residual / rhs_norm if rhs_norm else residual,
                      info == 0, seconds)


def katz_centrality(S: sparse.spmatrix, *, alpha: float = DEFAULT_ALPHA, tol: float = 1e-6,
                    max_iter: int = 1000) -> GraphSolve:
    """Centrality g* solving L_alpha g = 1, L_alpha = (I - alpha S) / (1 - alpha) (003 eq. 12-13), by CG.

    ``residual_norm`` is ||1 - L_alpha g*||. Computed once per graph (offline), so the default tolerance is
    tight; ~100 iterations at alpha = 0.99.
    """
    n = _check_graph(S).shape[0]
    return solve_graph_system(S, np.ones(n), alpha=alpha, scale=1.0 - alpha, tol=tol, max_iter=max_iter)


def patch_descriptors(feature_map: np.ndarray, patch: int = DEFAULT_PATCH, pooling: str = "max") -> np.ndarray:
    """m_A(R_p) for every position p: (h*w) x C (2C for avgmax), rows in (y, x) order, each part L2-normalised.

    R_p is the square of ``patch`` cells centred at p (for an even side, one more cell up/left), clipped to
    the map: exactly objret.regions.sources.pool_regions on the box (x - patch//2, y - patch//2, patch, patch), so
    patch descriptors live in the same space as the region descriptors. Computed for all positions at once.
    """
    A = np.asarray(feature_map, np.float32)
    if A.ndim != 3:
        raise ObjretError(f"feature map must be C x h x w, got shape {A.shape}")
    if patch < 1:
        raise ObjretError(f"patch={patch} must be at least 1 cell")
    if pooling not in POOLINGS:
        raise ObjretError(f"unknown pooling {pooling!r}: use one of {', '.join(POOLINGS)}")
    channels, h, w = A.shape
    before, after = patch // 2, patch - 1 - patch // 2          # cells before / after p in the window
    parts = []
    if pooling in ("avg", "avgmax"):
        integral = np.zeros((channels, h + 1, w + 1), np.float64)
        integral[:, 1:, 1:] = A.cumsum(1).cumsum(2)
        y0, y1 = np.clip(np.arange(h) - before, 0, h), np.clip(np.arange(h) + after + 1, 0, h)
        x0, x1 = np.clip(np.arange(w) - before, 0, w), np.clip(np.arange(w) + after + 1, 0, w)
        total = (integral[:, y1][:, :, x1] - integral[:, y0][:, :, x1]
                 - integral[:, y1][:, :, x0] + integral[:, y0][:, :, x0])
        parts.append(total / ((y1 - y0)[:, None] * (x1 - x0)[None, :]))
    if pooling in ("max", "avgmax"):
        # Max over the clipped window == max over the window with edges replicated ("nearest").
        from scipy.ndimage import maximum_filter
        # scipy's window for side a spans a//2 cells before and a - 1 - a//2 after: the same as above.
        parts.append(maximum_filter(A, size=(1, patch, patch), mode="nearest"))
    rows = [p.reshape(channels, h * w).T for p in parts]
    return np.concatenate([r / (np.linalg.norm(r, axis=1, keepdims=True) + 1e-12) for r in rows],
                          axis=1).astype(np.float32)


def object_saliency(feature_map: np.ndarray, region_vectors: np.ndarray, centrality: np.ndarray,
                    region_saliency: np.ndarray, *, frame_saliency: np.ndarray | None = None,
                    whiten: Callable[[np.ndarray], np.ndarray] | None = None, k: int = DEFAULT_K,
                    beta: float = DEFAULT_BETA, Theta: float = BIG_THETA, theta: float = SMALL_THETA,
                    patch: int = DEFAULT_PATCH, pooling: str = "max",
                    index: faiss.Index | None = None) -> np.ndarray:
    """Object saliency S (h x w float32) of one frame, 003 eq. 14 (see the module docstring).

    ``feature_map``      C x h x w activation map A of the frame (the layer the regions were pooled from).
    ``region_vectors``   n x d region descriptors v_i (the graph's nodes, L2-normalised).
    ``centrality``       n values g*_i (``katz_centrality(...).values``).
    ``region_saliency``  n values f_i, each region's mean feature saliency (eq. 9; the region store's
                         scores). Pass ones to drop the f_i^theta factor.
    ``frame_saliency``   h x w feature saliency F^ of this frame; default objret.regions.saliency.feature_saliency(A).
    ``whiten``           the regions' w(.) (e.g. ``Whitening.apply``), applied to the pooled patch
                         descriptors; None when the regions were not whitened. u_p is L2-normalised after.
    ``pooling``          how the regions were pooled: eq. 10's max by default (params.yaml may say avg).
    ``index``            a faiss inner-product index over ``region_vectors`` to search instead of building
                         an exact one per call (e.g. for a large lake).

    Interpretation: s(v_i, u_p) uses the positive part of v_i.u_p, as the graph's edge weights do, so a
    dissimilar neighbour contributes nothing rather than a negative or complex value.
    """
    A = np.asarray(feature_map, np.float32)
    if A.ndim != 3:
        raise ObjretError(f"feature map must be C x h x w, got shape {A.shape}")
    _, h, w = A.shape
    v = np.ascontiguousarray(region_vectors, np.float32)
    g = np.asarray(centrality, np.float64)
    f = np.asarray(region_saliency, np.float64)
    if v.ndim != 2 or g.shape != (len(v),) or f.shape != (len(v),):
        raise ObjretError(f"need n x d region vectors with n centralities and n saliencies, got shapes "
                          f"{v.shape}, {g.shape}, {f.shape}")
    if not 1 <= k <= len(v):
        raise ObjretError(f"k={k} must be in [1, {len(v)}] (the number of region vectors)")
    if frame_saliency is None:
        from objret.regions.saliency import feature_saliency
        frame_saliency = feature_saliency(A)
    F = np.asarray(frame_saliency, np.float64)
    if F.shape != (h, w):
        raise ObjretError(f"frame saliency of shape {F.shape} does not match the {h} x {w} feature map")

    u = patch_descriptors(A, patch, pooling)
    if whiten is not None:
        u = np.asarray(whiten(u), np.float32)
    u = np.ascontiguousarray(u / (np.linalg.norm(u, axis=1, keepdims=True) + 1e-12), np.float32)
    if u.shape[1] != v.shape[1]:
        raise ObjretError(f"patch descriptors are {u.shape[1]}-d but region vectors {v.shape[1]}-d "
                          f"(same layer, pooling and whitening as the regions?)")
    if index is None:
        index = faiss.IndexFlatIP(v.shape[1])
        index.add(v)
    sims, ids = index.search(u, k)                                        # N_p and v_i.u_p
    found = ids >= 0
    similarity = np.where(found, np.maximum(sims, 0.0), 0.0).astype(np.float64) ** beta   # s(v_i, u_p)
    neighbour = np.where(found, ids, 0)
    terms = similarity * f[neighbour] ** theta * g[neighbour]
    return (F ** Theta * terms.sum(axis=1).reshape(h, w)).astype(np.float32)


def _check_graph(S) -> sparse.csr_matrix:
    shape = getattr(S, "shape", None)
    if not (sparse.issparse(S) or isinstance(S, np.ndarray)) or len(shape) != 2 or shape[0] != shape[1]:
        raise ObjretError(f"the graph must be a square (sparse) matrix, got {type(S).__name__} of shape {shape}")
    return S if sparse.issparse(S) and S.format == "csr" else sparse.csr_matrix(S)
