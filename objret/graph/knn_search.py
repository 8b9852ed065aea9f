"""The faiss searches behind the region graph's k-NN lists: exact (flat) and IVF-Flat, on the GPU when one is
there, chunked so that temporary memory stays bounded."""

from __future__ import annotations

import faiss
import numpy as np

from objret.errors import ObjretError

TRAIN_POINTS_PER_LIST = 64  # k-means sample: above faiss' 39/centroid minimum, far below its 256 default
GPU_MAX_K = 2048          # faiss GPU k-selection limit
_CHUNK = 65_536           # query rows per search call: bounds temporary memory, no effect on results


def train_centroids(vectors: np.ndarray, nlist: int, *, seed: int = 0, use_gpu: bool = False) -> np.ndarray:
    """Spherical k-means centroids (unit vectors: inner product is the right assignment) on a seeded sample."""
    x = np.asarray(vectors, np.float32)
    if nlist > len(x):
        raise ObjretError(f"nlist={nlist} exceeds the number of vectors ({len(x)})")
    rng = np.random.default_rng(seed)
    n_train = min(len(x), TRAIN_POINTS_PER_LIST * nlist)
    sample = x[np.sort(rng.choice(len(x), n_train, replace=False))] if n_train < len(x) else x
    kmeans = faiss.Kmeans(x.shape[1], nlist, niter=10, seed=seed, spherical=True, gpu=use_gpu, verbose=False,
                          min_points_per_centroid=1, max_points_per_centroid=TRAIN_POINTS_PER_LIST)
    kmeans.train(sample)
    return np.ascontiguousarray(kmeans.centroids, np.float32)


def default_nlist(n: int) -> int:
    """~4 sqrt(n) lists (the usual IVF rule), but at least 39 points per list (faiss' k-means minimum)."""
    return max(1, min(int(4 * np.sqrt(n)), n // 39))


# ---- helpers ---------------------------------------------------------------------------------------


def flat_search(base: np.ndarray, queries: np.ndarray, k: int, gpu: bool) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product k-NN of ``queries`` in ``base``: (ids int64, sims float32), -1 past len(base)."""
    index = faiss.IndexFlatIP(base.shape[1])
    index.add(base)
    if gpu and k <= GPU_MAX_K:
        resources = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(resources, 0, index)
    return chunked(lambda q: index.search(q, k), queries, k)


def nearest_lists(centroids: np.ndarray, x: np.ndarray, nprobe: int, gpu: bool) -> np.ndarray:
    """Each row's ``nprobe`` nearest centroids (int32), nearest first: its IVF list and the lists it scans."""
    ids, _ = flat_search(centroids, x, nprobe, gpu)
    return ids.astype(np.int32)


def ivf(centroids: np.ndarray, parts: list[tuple[np.ndarray, np.ndarray]]) -> faiss.IndexIVFFlat:
    """IVF-Flat over the concatenated parts, each row filed in its nearest centroid's list (probes[:, 0])."""
    quantizer = faiss.IndexFlatIP(centroids.shape[1])
    quantizer.add(centroids)
    index = faiss.IndexIVFFlat(quantizer, centroids.shape[1], len(centroids), faiss.METRIC_INNER_PRODUCT)
    index.referenced_objects = [quantizer]               # the index must not outlive its quantizer
    offset = 0
    for vectors, probes in parts:
        for s in range(0, len(vectors), _CHUNK):
            # Named arrays: swig_ptr holds no reference, so a temporary would be freed before the call.
            chunk = np.ascontiguousarray(vectors[s:s + _CHUNK])
            ids = np.arange(offset + s, offset + s + len(chunk), dtype=np.int64)
            lists = np.ascontiguousarray(probes[s:s + _CHUNK, 0], np.int64)
            index.add_core(len(chunk), faiss.swig_ptr(chunk), faiss.swig_ptr(ids), faiss.swig_ptr(lists))
        offset += len(vectors)
    return index


def ivf_search(index: faiss.IndexIVFFlat, queries: np.ndarray, probes: np.ndarray,
                k: int) -> tuple[np.ndarray, np.ndarray]:
    """Search each query inside its own probed lists (assignment precomputed, not redone)."""
    index.nprobe = probes.shape[1]
    out_ids = np.empty((len(queries), k), np.int64)
    out_sims = np.empty((len(queries), k), np.float32)
    for s in range(0, len(queries), _CHUNK):
        q = np.ascontiguousarray(queries[s:s + _CHUNK])
        lists = np.ascontiguousarray(probes[s:s + _CHUNK], np.int64)
        sims, ids = index.search_preassigned(q, k, lists, np.zeros(lists.shape, np.float32))
        out_ids[s:s + len(q)], out_sims[s:s + len(q)] = ids, sims
    return out_ids, out_sims


def chunked(search, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    out_ids = np.empty((len(queries), k), np.int64)
    out_sims = np.empty((len(queries), k), np.float32)
    for s in range(0, len(queries), _CHUNK):
        sims, ids = search(np.ascontiguousarray(queries[s:s + _CHUNK]))
        out_ids[s:s + len(sims)], out_sims[s:s + len(sims)] = ids, sims
    return out_ids, out_sims


def gpu_wanted(use_gpu: bool | None) -> bool:
    available = hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
    return available if use_gpu is None else bool(use_gpu) and available
