"""Memory-mapped index files read row by row, without read-ahead.

A memory-mapped index is read where searches touch it. On a disk with a large read-ahead (8 MB here) every page
fault pulls megabytes around it into the page cache, and the kernel maps whole large folios into the process:
scoring 1,000 scattered frames by their 8-bit refine vectors (19 MB of rows) made 630 MB of the file resident
(100k-frame lake). Telling the kernel the access is random (madvise MADV_RANDOM) keeps it to the rows read.
faiss maps the index file itself and gives no handle on its mapping, so the refine codes are mapped a second
time here, read-only, at their place in the file: an IndexRefine is written as its base index, its refine index
and a 4-byte k_factor, and an IndexScalarQuantizer's codes are its last field, so the codes are the file's last
4 + n * code_size bytes. That layout is checked against faiss's own decoding before it is used; where a faiss
version writes otherwise, reads go through faiss (right, only with more pages resident).
"""

from __future__ import annotations

import mmap
from pathlib import Path

import faiss
import numpy as np


def random_access(array: np.ndarray) -> np.ndarray:
    """``array`` (a numpy memmap, else returned as is) with read-ahead off for its mapping."""
    mapping = getattr(array, "_mmap", None)
    if mapping is not None and hasattr(mmap, "MADV_RANDOM"):
        mapping.madvise(mmap.MADV_RANDOM)
    return array


def refine_codes(index_file: Path, index) -> tuple[np.ndarray, faiss.Index] | None:
    """The refine codes of the IndexRefine ``index`` saved in ``index_file``: (n x code_size uint8 read-only memmap,
    without read-ahead; the refine index that decodes them), or None where the layout is not the expected one."""
    if not isinstance(index, faiss.IndexRefine):
        return None
    refine = faiss.downcast_index(index.refine_index)
    n, size = int(refine.ntotal), int(refine.sa_code_size())
    if not isinstance(refine, faiss.IndexScalarQuantizer) or n == 0:
        return None
    offset = Path(index_file).stat().st_size - 4 - n * size
    if offset < 0:
        return None
    codes = random_access(np.memmap(index_file, np.uint8, "r", offset, (n, size)))
    probe = np.array([0, n // 2, n - 1])
    if not np.array_equal(refine.sa_decode(np.ascontiguousarray(codes[probe])), refine.reconstruct_batch(probe)):
        return None
    return codes, refine


def decode_rows(codes: np.ndarray, refine: faiss.Index, ids: np.ndarray) -> np.ndarray:
    """The refine vectors of rows ``ids`` (n x d float32), read in row order (one pass over the file)."""
    order = np.argsort(ids, kind="stable")
    out = np.empty((len(ids), refine.d), np.float32)
    out[order] = refine.sa_decode(np.ascontiguousarray(codes[ids[order]]))
    return out
