"""Sizing rules of the region index's faiss structures: PQ sub-quantizers, IVF lists and probes, bytes on disk."""

from __future__ import annotations

import math

import faiss


def default_pq_m(dim: int) -> int:
    """About one byte of code per 8 dimensions: the largest divisor of dim not above dim/8."""
    return next(m for m in range(max(1, dim // 8), 0, -1) if dim % m == 0)


HNSW_QUANTIZER_MIN = 1024   # lists from which the coarse quantizer is an HNSW graph rather than exhaustive
MAX_NLIST = 4096   # k-means of more lists costs minutes of training on a 2-core CPU; lists then grow instead


def default_nlist(n: int) -> int:
    """~4*sqrt(n) lists, at most MAX_NLIST, and at least 39 training points per list (faiss k-means' minimum)."""
    return max(1, min(int(4 * math.sqrt(n)), n // 39, MAX_NLIST))


def default_nprobe(nlist: int) -> int:
    return max(1, min(nlist, max(8, nlist // 16), 64))


def serialized_size(index) -> int:
    """Bytes faiss.serialize_index would produce, counted without holding a copy of them."""
    total = 0

    def count(buf: bytes) -> int:
        nonlocal total
        total += len(buf)
        return len(buf)

    faiss.write_index(index, faiss.PyCallbackIOWriter(count))
    return total
