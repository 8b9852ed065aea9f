"""Mutual k-nearest-neighbour graph over the lake's region descriptors (paper 003 sec. 3.6, eq. 11).

Vertices are the L2-normalised region descriptors v_1..v_n. Following 003 (after Iscen et al. [12]):

  * similarity    s(v, u) = (v.u)^beta, kept only for positive v.u (a negative power is meaningless for
                  non-integer beta, and dissimilar regions should not be linked);
  * adjacency     w_ij = s(v_i, v_j) if v_i and v_j are *mutual* k-NN (each in the other's list), else 0;
                  no self-loops;
  * normalisation S = D^-1/2 W D^-1/2 with D = diag(W 1) and 0/0 = 0 (eq. 11): a node with no mutual
                  neighbour is an isolated vertex with an all-zero row.

The k-NN lists come from faiss inner-product search:

  * ``exact``  ``IndexFlatIP`` (brute force) while n <= ``exact_max``. Its cost grows as n^2: about a minute
    at 100k x 128 on this 2-core machine, so the default threshold is 50k, not higher;
  * ``ivf``    IVF-Flat above it. Chosen over HNSW because building the graph is one batch all-vs-all
    search: IVF-Flat's build is one spherical k-means on a sample plus a single assignment pass (HNSW inserts
    the n vectors one by one, each insertion a graph search, and stores ~2M links a node), its
    distances inside the probed lists are exact (no quantisation, so the edge weights are the true
    (v.u)^beta), recall is a single knob (``nprobe``), and with the centroids kept the lists can be updated
    incrementally exactly as a rebuild with the same centroids would compute them. Its recall against
    exact k-NN is measured on a seeded sample of rows (``knn_recall``).

``refresh_region_graph`` adds new regions without a full rebuild: the new nodes' lists are searched against
all nodes, and an old node's list changes only if a new vector beats its current k-th neighbour, so only
the old nodes x new vectors similarities are computed (for ``ivf``: only inside each old node's probed
lists). The sparse matrix is then reassembled from the lists (linear in n*k, cheap next to the search).

A GPU is used when ``faiss.get_num_gpus() > 0`` (faiss-gpu builds only): for the flat searches (exact
lists, the k-means assignment to centroids) and k-means training; IVF list scanning stays on the CPU so
that results do not depend on the device.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import sparse
from scipy.sparse.csgraph import connected_components

from objret.errors import ObjretError
from objret.graph.knn_search import (default_nlist, flat_search, gpu_wanted, ivf, ivf_search, nearest_lists,
                                     train_centroids)

DEFAULT_K = 50            # Iscen et al. [12] database graph k (003 follows [12]; 003 does not restate it)
DEFAULT_BETA = 3.0        # similarity exponent of [12] (their gamma = 3)
EXACT_MAX = 50_000        # exact (n^2) k-NN up to here, IVF-Flat above
DEFAULT_NPROBE = 16       # k-NN recall 0.98 at 100k, 1.00 at 1M clustered vectors (benchmarks/graph_scale.py)


@dataclass
class KnnLists:
    """Each node's k nearest other nodes, what a graph (and its incremental refresh) is built from."""

    neighbors: np.ndarray            # n x k int32, descending similarity; -1 where fewer than k were found
    similarities: np.ndarray         # n x k float32, v_i . v_j; -inf where neighbors is -1
    centroids: np.ndarray | None = None   # ivf: nlist x d coarse centroids (kept so a refresh reuses them)
    probes: np.ndarray | None = None      # ivf: n x nprobe int32, each node's nearest centroids (col 0 = its list)

    @property
    def kind(self) -> str:
        return "exact" if self.centroids is None else "ivf"

    @property
    def n(self) -> int:
        return len(self.neighbors)

    @property
    def k(self) -> int:
        return self.neighbors.shape[1]

    def save(self, path: str | Path) -> None:
        """Plain .npz (no pickle); ``load`` reads it back."""
        arrays = {"neighbors": self.neighbors, "similarities": self.similarities}
        if self.centroids is not None:
            arrays.update(centroids=self.centroids, probes=self.probes)
        with open(path, "wb") as handle:
            np.savez(handle, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> "KnnLists":
        try:
            with np.load(path, allow_pickle=False) as data:
                return cls(data["neighbors"], data["similarities"],
                           data["centroids"] if "centroids" in data else None,
                           data["probes"] if "probes" in data else None)
        except (KeyError, ValueError, OSError) as exc:
            raise ObjretError(f"not a k-NN lists file: {path} ({exc})") from exc


@dataclass
class RegionGraph:
    """The normalised mutual k-NN graph S (eq. 11), the lists it came from, and figures about it."""

    matrix: sparse.csr_matrix        # S = D^-1/2 W D^-1/2, symmetric, float64
    knn: KnnLists
    beta: float
    nodes: int
    edges: int                       # undirected edges (mutual pairs with positive similarity)
    mean_degree: float               # edges per node, 2 * edges / nodes
    isolated: int                    # nodes with no mutual neighbour (zero rows of S)
    components: int                  # connected components, isolated nodes included
    build_seconds: float
    recall: float                    # k-NN recall vs exact on a sample; 1.0 for exact lists
    timings: dict[str, float] = field(default_factory=dict)  # seconds per step


# ---- public functions -----------------------------------------------------------------------------

def build_region_graph(vectors: np.ndarray, *, k: int = DEFAULT_K, beta: float = DEFAULT_BETA,
                       exact_max: int = EXACT_MAX, nlist: int | None = None, nprobe: int = DEFAULT_NPROBE,
                       recall_sample: int = 1000, seed: int = 0, use_gpu: bool | None = None) -> RegionGraph:
    """Mutual k-NN graph of L2-normalised ``vectors`` (n x d float32), normalised as eq. 11.

    Exact k-NN up to ``exact_max`` nodes, IVF-Flat (``nlist`` lists, default ~4 sqrt(n); ``nprobe`` probed)
    above, whose recall is then measured on ``recall_sample`` seeded rows (0: not measured, reported NaN).
    """
    _check_params(k, beta)
    start = time.perf_counter()
    x = _as_unit_vectors(vectors, "vectors")
    _check_k(k, len(x))
    knn, timings = nearest_neighbors(x, k, exact_max=exact_max, nlist=nlist, nprobe=nprobe, seed=seed,
                                     use_gpu=use_gpu)
    return _finish(knn, beta, x, start, timings, recall_sample, seed, use_gpu)


def nearest_neighbors(vectors: np.ndarray, k: int, *, exact_max: int = EXACT_MAX, nlist: int | None = None,
                      nprobe: int = DEFAULT_NPROBE, centroids: np.ndarray | None = None, seed: int = 0,
                      use_gpu: bool | None = None) -> tuple[KnnLists, dict[str, float]]:
    """Each row's k nearest other rows by inner product (self excluded), and seconds per step.

    Above ``exact_max`` rows: IVF-Flat with ``centroids`` if given (e.g. a previous graph's), else trained.
    """
    x = _as_unit_vectors(vectors, "vectors")
    _check_k(k, len(x))
    gpu = gpu_wanted(use_gpu)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    if len(x) <= exact_max:
        ids, sims = flat_search(x, x, k + 1, gpu)
        timings["knn_search_s"] = time.perf_counter() - t
        ids, sims = _drop_self(ids, sims, np.arange(len(x)), k)
        return KnnLists(ids, sims), timings

    if centroids is None:
        centroids = train_centroids(x, nlist or default_nlist(len(x)), seed=seed, use_gpu=gpu)
        timings["ivf_train_s"] = time.perf_counter() - t
    centroids = np.ascontiguousarray(centroids, np.float32)
    if centroids.ndim != 2 or centroids.shape[1] != x.shape[1]:
        raise ObjretError(f"centroids of shape {centroids.shape} do not fit {x.shape[1]}-d vectors")
    if not 1 <= nprobe <= len(centroids):
        raise ObjretError(f"nprobe={nprobe} must be in [1, nlist={len(centroids)}]")
    t = time.perf_counter()
    probes = nearest_lists(centroids, x, nprobe, gpu)
    timings["ivf_assign_s"] = time.perf_counter() - t
    t = time.perf_counter()
    index = ivf(centroids, [(x, probes)])
    ids, sims = ivf_search(index, x, probes, k + 1)
    del index
    timings["knn_search_s"] = time.perf_counter() - t
    ids, sims = _drop_self(ids, sims, np.arange(len(x)), k)
    return KnnLists(ids, sims, centroids, probes), timings


def mutual_graph(knn: KnnLists, beta: float = DEFAULT_BETA) -> sparse.csr_matrix:
    """S = D^-1/2 W D^-1/2 (eq. 11) with w_ij = (v_i.v_j)^beta for mutual k-NN pairs of positive similarity."""
    _check_params(knn.k, beta)
    n = knn.n
    valid = (knn.neighbors >= 0) & (knn.similarities > 0)
    indptr = np.zeros(n + 1, np.int64)
    np.cumsum(valid.sum(axis=1), out=indptr[1:])
    indices = knn.neighbors[valid]                       # row-major: grouped by row, as CSR wants
    weights = knn.similarities[valid].astype(np.float64) ** beta
    directed = sparse.csr_matrix((weights, indices, indptr), shape=(n, n))
    del valid, indices, weights
    # Mutual: min(w_ij, w_ji) is non-zero only where j is in i's list and i in j's. Taking the minimum of
    # the two searches' values also makes W exactly symmetric (they may differ in the last float bit).
    adjacency = directed.minimum(directed.T.tocsr()).tocsr()
    del directed
    adjacency.eliminate_zeros()                          # (self-loops cannot occur: _drop_self removed them)
    adjacency.sort_indices()
    degree = np.asarray(adjacency.sum(axis=1)).ravel()
    inv_sqrt = np.zeros(n)
    np.divide(1.0, np.sqrt(degree), out=inv_sqrt, where=degree > 0)   # 0/0 = 0 for isolated nodes
    rows = np.repeat(np.arange(n), np.diff(adjacency.indptr))
    # inv_i * inv_j is the same float for (i, j) and (j, i), so S stays exactly symmetric.
    adjacency.data *= inv_sqrt[rows] * inv_sqrt[adjacency.indices]
    return adjacency


def knn_recall(vectors: np.ndarray, knn: KnnLists, *, sample: int = 1000, seed: int = 0,
               use_gpu: bool | None = None) -> float:
    """Mean fraction of each sampled row's exact k nearest neighbours present in its list in ``knn``."""
    x = _as_unit_vectors(vectors, "vectors")
    if len(x) != knn.n:
        raise ObjretError(f"knn has {knn.n} rows but {len(x)} vectors were given")
    rows = np.sort(np.random.default_rng(seed).choice(len(x), min(sample, len(x)), replace=False))
    exact_ids, exact_sims = flat_search(x, x[rows], knn.k + 1, gpu_wanted(use_gpu))
    exact_ids, _ = _drop_self(exact_ids, exact_sims, rows, knn.k)
    found = (exact_ids[:, :, None] == knn.neighbors[rows][:, None, :]).any(axis=2) & (exact_ids >= 0)
    return float(np.mean(found.sum(axis=1) / np.maximum((exact_ids >= 0).sum(axis=1), 1)))


def refresh_region_graph(previous: RegionGraph | KnnLists, vectors: np.ndarray, *,
                         beta: float | None = None, recall_sample: int = 0, seed: int = 0,
                         use_gpu: bool | None = None) -> RegionGraph:
    """The graph after appending regions: ``vectors`` holds the previous n rows unchanged, then the new ones.

    Only the new rows' lists are searched against everything; an old row's list is merged with its best
    new candidates and changes only where one beats its current k-th neighbour. For exact lists the result
    is the graph a full rebuild on all rows would give; for ivf lists it is the rebuild with the same
    centroids (a rebuild from scratch would retrain them). ``beta`` defaults to the previous graph's.
    """
    knn = previous.knn if isinstance(previous, RegionGraph) else previous
    if beta is None:
        beta = previous.beta if isinstance(previous, RegionGraph) else DEFAULT_BETA
    start = time.perf_counter()
    x = _as_unit_vectors(vectors, "vectors")
    n_old, k = knn.n, knn.k
    if len(x) < n_old:
        raise ObjretError(f"vectors has {len(x)} rows, fewer than the previous graph's {n_old}")
    if knn.centroids is not None and x.shape[1] != knn.centroids.shape[1]:
        raise ObjretError(f"vectors are {x.shape[1]}-d but the graph's centroids are {knn.centroids.shape[1]}-d")
    old, new = x[:n_old], x[n_old:]
    new_ids = np.arange(n_old, len(x))
    gpu = gpu_wanted(use_gpu)
    timings: dict[str, float] = {}
    if len(new) == 0:
        return _finish(knn, beta, x, start, timings, recall_sample, seed, use_gpu)

    t = time.perf_counter()
    if knn.centroids is None:
        # New rows against all rows; old rows against the new rows only (n_old x m, not n^2).
        ids, sims = flat_search(x, new, k + 1, gpu)
        new_lists = _drop_self(ids, sims, new_ids, k)
        candidates = flat_search(new, old, min(k, len(new)), gpu)
        new_probes = None
    else:
        nprobe = knn.probes.shape[1]
        new_probes = nearest_lists(knn.centroids, new, nprobe, gpu)
        index = ivf(knn.centroids, [(old, knn.probes), (new, new_probes)])
        ids, sims = ivf_search(index, new, new_probes, k + 1)
        del index
        new_lists = _drop_self(ids, sims, new_ids, k)
        # Old rows scan only the new vectors inside their own probed lists: what a rebuild would add.
        index = ivf(knn.centroids, [(new, new_probes)])
        candidates = ivf_search(index, old, knn.probes, min(k, len(new)))
        del index
    timings["knn_search_s"] = time.perf_counter() - t

    t = time.perf_counter()
    cand_ids, cand_sims = candidates
    cand_ids = np.where(cand_ids >= 0, cand_ids + n_old, -1).astype(np.int32)   # ids within ``new`` -> global
    old_ids, old_sims, affected = _merge(knn.neighbors, knn.similarities, cand_ids, cand_sims)
    merged = KnnLists(np.concatenate([old_ids, new_lists[0]]), np.concatenate([old_sims, new_lists[1]]),
                      knn.centroids,
                      None if knn.probes is None else np.concatenate([knn.probes, new_probes]))
    timings["knn_merge_s"] = time.perf_counter() - t
    timings["affected_old_nodes"] = float(affected)
    return _finish(merged, beta, x, start, timings, recall_sample, seed, use_gpu)


def _finish(knn: KnnLists, beta: float, x: np.ndarray, start: float, timings: dict[str, float],
            recall_sample: int, seed: int, use_gpu: bool | None) -> RegionGraph:
    """Assemble S from the lists, add the figures; recall (if asked) is timed apart from the build."""
    t = time.perf_counter()
    matrix = mutual_graph(knn, beta)
    timings["graph_s"] = time.perf_counter() - t
    t = time.perf_counter()
    components, _ = connected_components(matrix, directed=False)
    timings["components_s"] = time.perf_counter() - t
    build_seconds = time.perf_counter() - start
    if knn.kind == "exact":
        recall = 1.0
    elif recall_sample > 0:
        t = time.perf_counter()
        recall = knn_recall(x, knn, sample=recall_sample, seed=seed, use_gpu=use_gpu)
        timings["recall_s"] = time.perf_counter() - t
    else:
        recall = float("nan")
    edges = matrix.nnz // 2
    isolated = int(np.count_nonzero(np.diff(matrix.indptr) == 0))
    return RegionGraph(matrix, knn, float(beta), knn.n, edges, 2 * edges / max(knn.n, 1), isolated,
                       int(components), build_seconds, recall, timings)


def _merge(neighbors: np.ndarray, similarities: np.ndarray, cand_ids: np.ndarray,
           cand_sims: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Old lists merged with new candidates; only rows where a candidate beats the k-th neighbour change."""
    k = neighbors.shape[1]
    cand_sims = np.where(cand_ids >= 0, cand_sims, -np.inf)
    kth = np.where(neighbors[:, -1] >= 0, similarities[:, -1], -np.inf)
    affected = np.flatnonzero(cand_sims.max(axis=1) > kth)
    neighbors, similarities = neighbors.copy(), similarities.copy()
    ids = np.concatenate([neighbors[affected], cand_ids[affected]], axis=1)
    sims = np.concatenate([similarities[affected], cand_sims[affected]], axis=1)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    neighbors[affected] = np.take_along_axis(ids, order, axis=1)
    similarities[affected] = np.take_along_axis(sims, order, axis=1)
    return neighbors, similarities, len(affected)


def _drop_self(ids: np.ndarray, sims: np.ndarray, self_ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """k+1 search results -> k without the query itself (normally first; duplicates can move it)."""
    sims = np.where(ids >= 0, sims, -np.inf).astype(np.float32)
    out_ids, out_sims = ids[:, 1:k + 1].copy(), sims[:, 1:k + 1].copy()
    other = np.flatnonzero(ids[:, 0] != self_ids)
    if len(other):
        not_self = ids[other] != self_ids[other, None]
        order = np.argsort(~not_self, axis=1, kind="stable")[:, :k]   # stable: similarity order kept
        out_ids[other] = np.take_along_axis(ids[other], order, axis=1)
        out_sims[other] = np.take_along_axis(sims[other], order, axis=1)
    return out_ids.astype(np.int32), out_sims


def _as_unit_vectors(vectors: np.ndarray, name: str) -> np.ndarray:
    """float32 C-contiguous n x d with unit rows, or ObjretError."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ObjretError(f"{name} must be a non-empty n x d array, got shape {x.shape}")
    sample = x[:: max(1, len(x) // 10_000)]               # a strided sample: O(10k) rows, not the whole lake
    norms = np.linalg.norm(sample, axis=1)
    if not np.all(np.isfinite(norms)) or np.abs(norms - 1).max() > 1e-3:
        raise ObjretError(f"{name} must be finite and L2-normalised (row norms range "
                          f"{norms.min():.4g}..{norms.max():.4g})")
    return x


def _check_k(k: int, n: int) -> None:
    if not 1 <= k < n:
        raise ObjretError(f"k={k} must be in [1, n) for n={n} vectors (a node's neighbours exclude itself)")


def _check_params(k: int, beta: float) -> None:
    if k < 1:
        raise ObjretError(f"k={k} must be at least 1")
    if not beta > 0:
        raise ObjretError(f"beta={beta} must be positive (003 sec. 3.6)")
