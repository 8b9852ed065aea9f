"""Diffusion on the region graph as query expansion (Iscen et al., CVPR 2017 [12], as used in paper 003 sec. 4).

Given the normalised mutual k-NN graph S (objret.graph.knn, 003 eq. 11) and a query descriptor q:

  * y_i = s(q, v_i) = (q.v_i)^beta (positive part) for the query's ``k`` nearest region nodes, 0 elsewhere;
  * f solves (I - alpha S) f = y, by conjugate gradients stopped after ``max_iter`` iterations or at relative
    residual ``tol`` (truncated CG: a few tens of iterations rank well, the exact solve is not needed);
  * a node's score is f_i; a frame's score is its best region's.

Nodes reachable from the query's neighbours along the graph get a score even when they are far from q
itself (same object seen differently): the point of diffusion over plain k-NN. [12]'s L_alpha =
(I - alpha S)/(1 - alpha) would only scale f, so the system is posed without the factor. [12]'s other
"truncation" (solving on a sub-graph of the query's top-ranked nodes) is not done here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import faiss
import numpy as np
from scipy import sparse

from objret.errors import ObjretError
from objret.graph.centrality import DEFAULT_ALPHA, GraphSolve, solve_graph_system
from objret.graph.knn import DEFAULT_BETA

DEFAULT_QUERY_K = 10      # the query's neighbours that seed y ([12]'s k for the query side)
DEFAULT_MAX_ITER = 20     # CG iterations ([12] stops CG early; ~20 already ranks well)


def diffuse(S: sparse.spmatrix, query: np.ndarray, regions: np.ndarray | faiss.Index, *,
            k: int = DEFAULT_QUERY_K, beta: float = DEFAULT_BETA, alpha: float = DEFAULT_ALPHA,
            max_iter: int = DEFAULT_MAX_ITER, tol: float = 1e-6) -> GraphSolve:
    """Per-node diffusion scores f (``.values``, n) for one L2-normalised ``query`` (d).

    ``regions`` are the graph's node vectors (n x d, L2-normalised) or a faiss inner-product index over them,
    in node order. ``residual_norm`` is ||y - (I - alpha S) f||.
    """
    if len(getattr(S, "shape", ())) != 2:
        raise ObjretError(f"the graph must be a square (sparse) matrix, got {type(S).__name__}")
    n = S.shape[0]
    q = np.ascontiguousarray(np.asarray(query, np.float32).reshape(1, -1))
    index = _as_index(regions)
    if index.ntotal != n:
        raise ObjretError(f"the graph has {n} nodes but {index.ntotal} region vectors were given")
    if q.shape[1] != index.d:
        raise ObjretError(f"query is {q.shape[1]}-d but region vectors are {index.d}-d")
    if not 1 <= k <= n:
        raise ObjretError(f"k={k} must be in [1, {n}] (the number of nodes)")
    y = initial_vector(q[0], index, k=k, beta=beta)
    return solve_graph_system(S, y, alpha=alpha, tol=tol, max_iter=max_iter)


def initial_vector(query: np.ndarray, regions: np.ndarray | faiss.Index, *, k: int = DEFAULT_QUERY_K,
                   beta: float = DEFAULT_BETA) -> np.ndarray:
    """y: (q.v_i)^beta (positive part) at the query's k nearest nodes, 0 elsewhere (n float64)."""
    index = _as_index(regions)
    sims, ids = index.search(np.ascontiguousarray(np.asarray(query, np.float32).reshape(1, -1)), k)
    return seed_vector(index.ntotal, ids[0], sims[0], beta)


def seed_vector(n: int, ids: np.ndarray, sims: np.ndarray, beta: float = DEFAULT_BETA) -> np.ndarray:
    """y from a search's hits: (q.v_i)^beta (positive part) at the nodes ``ids`` (-1: no hit), 0 elsewhere."""
    ids, sims = np.asarray(ids, np.int64).ravel(), np.asarray(sims, np.float64).ravel()
    keep = ids >= 0
    if len(ids) and ids.max() >= n:
        raise ObjretError(f"search hit node {ids.max()} but the graph has {n} nodes")
    y = np.zeros(n)
    y[ids[keep]] = np.maximum(sims[keep], 0.0) ** beta
    return y


@dataclass
class GraphDiffusion:
    """Diffusion from a query over a lake's region graph, as per-frame scores (mining's diffusion evidence).

    Node i of ``matrix`` is region i of the region index; ``owner[i]`` its frame's row in ``frame_ids``;
    ``search(query, k)`` returns the query's k nearest nodes as (ids, sims), best first (e.g.
    ``RegionIndex.search``). ``beta`` is the graph's; ``k``, ``alpha``, ``max_iter`` the query side's.
    """

    matrix: sparse.csr_matrix
    owner: np.ndarray
    frame_ids: list[str]
    search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]
    k: int = DEFAULT_QUERY_K
    beta: float = DEFAULT_BETA
    alpha: float = DEFAULT_ALPHA
    max_iter: int = DEFAULT_MAX_ITER
    tol: float = 1e-6
    version: str = ""            # the stored graph's version, for provenance

    def __post_init__(self):
        n = self.matrix.shape[0]
        self.owner = np.asarray(self.owner, np.int64)
        if self.owner.shape != (n,):
            raise ObjretError(f"the graph has {n} nodes but {len(self.owner)} region owners were given")
        if n and not 0 <= self.owner.min() <= self.owner.max() < len(self.frame_ids):
            raise ObjretError("region owners out of range of the graph's frames")
        if self.k < 1 or self.max_iter < 1:
            raise ObjretError(f"diffusion k={self.k} and max_iter={self.max_iter} must be at least 1")

    def rows_for(self, frame_ids: Sequence[str]) -> np.ndarray:
        """The graph's frame row of each given frame (-1 for a frame the graph does not hold)."""
        row = {f: i for i, f in enumerate(self.frame_ids)}
        return np.array([row.get(f, -1) for f in frame_ids], np.int64)

    def scores(self, query: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, GraphSolve]:
        """Each frame's best diffused region score for the L2-normalised ``query``, at ``rows`` (from rows_for;
        0 where the graph has no region of the frame), and the CG solve."""
        n = self.matrix.shape[0]
        ids, sims = self.search(np.asarray(query, np.float32).reshape(-1), min(self.k, n))
        y = seed_vector(n, ids, sims, self.beta)
        solve = solve_graph_system(self.matrix, y, alpha=self.alpha, tol=self.tol, max_iter=self.max_iter)
        per_frame = frame_scores(solve.values, self.owner, len(self.frame_ids), empty=0.0)
        rows = np.asarray(rows, np.int64)
        return np.where(rows >= 0, per_frame[np.maximum(rows, 0)], 0.0), solve


def frame_scores(node_scores: np.ndarray, owner: np.ndarray, n_frames: int | None = None, *,
                 empty: float = -np.inf) -> np.ndarray:
    """Per-frame score = max over the frame's regions; ``owner[r]`` is region r's frame row.

    Frames without regions (rows below ``n_frames`` that no region names) get ``empty``.
    """
    scores = np.asarray(node_scores, np.float64)
    owner = np.asarray(owner)
    if scores.ndim != 1 or owner.shape != scores.shape:
        raise ObjretError(f"need one owner per node score, got shapes {scores.shape} and {owner.shape}")
    if not np.issubdtype(owner.dtype, np.integer) or (len(owner) and owner.min() < 0):
        raise ObjretError("owner must hold non-negative integer frame rows")
    n_frames = int(owner.max()) + 1 if n_frames is None and len(owner) else (n_frames or 0)
    if len(owner) and owner.max() >= n_frames:
        raise ObjretError(f"owner names frame row {owner.max()} but n_frames={n_frames}")
    out = np.full(n_frames, -np.inf)
    np.maximum.at(out, owner, scores)
    out[np.bincount(owner, minlength=n_frames) == 0] = empty   # after the max: ``empty`` is no floor
    return out


def _as_index(regions: np.ndarray | faiss.Index) -> faiss.Index:
    if isinstance(regions, faiss.Index):
        return regions
    v = np.ascontiguousarray(regions, np.float32)
    if v.ndim != 2:
        raise ObjretError(f"region vectors must be n x d, got shape {v.shape}")
    index = faiss.IndexFlatIP(v.shape[1])
    index.add(v)
    return index
