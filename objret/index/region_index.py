"""Region index: faiss over every region descriptor of the lake, with a region -> frame map.

A frame's score for a query is its best region's similarity (inner product; descriptors are L2-normalised).
Region ids are the positions in the index (insertion order) and never change, not even when ``kind="auto"``
rebuilds it into IVF-PQ; ``owner[r]`` is the frame row of region r, ``frame_ids[owner[r]]`` its frame id.

Kinds:
  * ``flat``  exact ``IndexFlatIP`` (4*dim bytes a region).
  * ``ivfpq`` ``IndexIVFPQ`` (inner product), PQ codes of ~dim/8 bytes a region. Training needs data, so the
    regions stay in an exact flat index until ``IVFPQ_MIN_TRAIN`` exist; then it is trained once on those
    (sampled) and every later add is encoded with that training. ``nprobe`` trades speed for recall.
    PQ codes this short cannot order near neighbours reliably (recall@10 vs flat ~0.4 on clustered synthetic
    data), so by default (``refine="sq8"``) the index also keeps 8-bit scalar-quantized vectors (dim bytes a
    region, a quarter of flat) and re-ranks ``refine_k_factor``*k PQ candidates with them (faiss IndexRefine).
    ``refine=None`` keeps the PQ codes only, for lakes where memory matters more than recall.
  * ``hnsw``  ``IndexHNSWFlat`` (inner product), graph over the raw vectors; ``ef_search`` trades speed for recall.
  * ``auto``  flat while the index holds at most ``flat_max`` regions, then rebuilt once into ivfpq.

GPU (``faiss.index_cpu_to_gpu``) only speeds up search of flat and ivfpq indexes; the CPU index stays the
reference copy (add, save, reconstruct), so a GPU is never required and results do not depend on one. Mining
opens an index read-only by memory map (``load(mapped=True)``): it then lives in the page cache, not in the
process (100k-frame lake: 2.2 GB), read as searches touch it.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import warnings
from pathlib import Path
from typing import Sequence

import faiss
import numpy as np

from objret.errors import ObjretError
from objret.index.frame_scoring import FrameScoring
from objret.index.mapped_rows import decode_rows, random_access, refine_codes
from objret.index.sizing import HNSW_QUANTIZER_MIN, default_nlist, default_nprobe, default_pq_m, serialized_size
from objret.versions import load_manifest, save_version

KINDS = ("auto", "flat", "ivfpq", "hnsw")
REFINE_TYPES = {None: None, "sq8": faiss.ScalarQuantizer.QT_8bit, "fp16": faiss.ScalarQuantizer.QT_fp16}
IVFPQ_MIN_TRAIN = 10_000   # 256 PQ centroids a sub-quantizer want ~39 points each for a sound k-means
GPU_MAX_K = 2048           # faiss GPU k-selection limit; larger searches run on the CPU copy
_CHUNK = 65_536            # bounds temporary memory when adding / reconstructing
_FORMAT = 1


class RegionIndex(FrameScoring):
    """faiss over region vectors with a region -> frame map; a frame's score is its best region's."""

    def __init__(self, dim: int, *, kind: str = "auto", flat_max: int = 200_000, nlist: int | None = None,
                 pq_m: int | None = None, hnsw_m: int = 32, use_gpu: bool | None = None,
                 nprobe: int | None = None, ef_search: int = 64, refine: str | None = "sq8",
                 refine_k_factor: int = 4, recipe: dict | None = None):
        if kind not in KINDS:
            raise ObjretError(f"unknown region index kind {kind!r}: use one of {', '.join(KINDS)}")
        pq_m = pq_m or default_pq_m(dim)
        if refine not in REFINE_TYPES:
            raise ObjretError(f"unknown refine {refine!r}: use one of {', '.join(map(str, REFINE_TYPES))}")
        if dim % pq_m:
            raise ObjretError(f"pq_m={pq_m} does not divide the descriptor dimension {dim}")
        self.dim, self.kind, self.flat_max = dim, kind, flat_max
        self.nlist, self.pq_m, self.hnsw_m = nlist, pq_m, hnsw_m
        self.nprobe, self.ef_search = nprobe, ef_search
        self.refine, self.refine_k_factor = refine, refine_k_factor
        # How the vectors were made (backbone, layer, pooling, whitening): saved with the index and checked on
        # load, as retrieval libraries carry a descriptor's recipe with the model, so that a query is never
        # encoded differently from the lake.
        self.recipe = dict(recipe or {})
        if kind == "hnsw":
            self.index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            self.active = "hnsw"
        else:  # flat, and ivfpq/auto until they have enough regions to train
            self.index = faiss.IndexFlatIP(dim)
            self.active = "flat"
        self.frame_ids: list[str] = []
        self._row: dict[str, int] = {}
        # Per-region side arrays kept as chunk lists so many small adds stay linear; joined on first read.
        self._owner: list[np.ndarray] = []
        self._boxes: list[np.ndarray] = []
        self._meta: dict[str, list[np.ndarray]] | None = None   # names fixed by the first add
        self._direct_map = False
        self.mapped = False   # opened read-only by memory map (load)
        self._refine_codes = None   # mapped: the refine codes read without read-ahead (objret.index.mapped_rows)
        if use_gpu is None:
            use_gpu = hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
        self.use_gpu = bool(use_gpu)
        self._gpu_res = self._gpu_index = None
        self._sync_gpu()

    # ---- sizes and side arrays -------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def n_frames(self) -> int:
        return len(self.frame_ids)

    @property
    def owner(self) -> np.ndarray:
        """R int32: frame row of each region."""
        return _joined(self._owner, np.int32, (0,))

    @property
    def boxes(self) -> np.ndarray:
        """R x 4 float32: x, y, w, h in frame pixels (NaN where not given)."""
        return _joined(self._boxes, np.float32, (0, 4))

    @property
    def meta(self) -> dict[str, np.ndarray]:
        """Per-region metadata arrays given to add (e.g. saliency score, source id)."""
        return {name: _joined(chunks, np.float32, (0,)) for name, chunks in (self._meta or {}).items()}

    def rows_of(self, frame_ids: Sequence[str]) -> np.ndarray:
        """The frame row of each frame id (-1: not indexed)."""
        return np.array([self._row.get(f, -1) for f in frame_ids], np.int64)

    def vectors(self, region_ids: np.ndarray) -> np.ndarray:
        """The stored vectors of ``region_ids`` (n x dim float32): exact for flat and hnsw, the refine vectors
        for ivfpq, decoded PQ codes without refine (via a direct map, 8 bytes a region, built on first use)."""
        ids = np.asarray(region_ids, np.int64)
        if self.active == "ivfpq" and self.refine is None and not self._direct_map:
            self.index.make_direct_map()
            self._direct_map = True
        if not len(ids):
            return np.zeros((0, self.dim), np.float32)
        if self._refine_codes is not None:
            codes, refine = self._refine_codes
            return np.concatenate([decode_rows(codes, refine, ids[s:s + _CHUNK]) for s in range(0, len(ids), _CHUNK)])
        return np.concatenate([self.index.reconstruct_batch(ids[s:s + _CHUNK]) for s in range(0, len(ids), _CHUNK)])

    def region_frames(self, region_ids: np.ndarray) -> list[str]:
        owner = self.owner
        return [self.frame_ids[owner[r]] for r in np.asarray(region_ids, np.int64)]

    # ---- adding ----------------------------------------------------------------------------------
    def add(self, frame_ids: Sequence[str], vectors: np.ndarray, region_boxes: np.ndarray | None = None,
            region_meta: dict[str, np.ndarray] | None = None) -> None:
        """Add regions; ``frame_ids[i]`` owns ``vectors[i]``. Frames already indexed are skipped whole."""
        if self.mapped:   # faiss aborts the process when a memory-mapped index grows
            raise ObjretError("this region index was opened read-only (memory-mapped): load it unmapped to add")
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim or len(vectors) != len(frame_ids):
            raise ObjretError(f"add needs {len(frame_ids)} x {self.dim} vectors for {len(frame_ids)} frame ids, "
                              f"got shape {vectors.shape}")
        boxes = (np.full((len(vectors), 4), np.nan, np.float32) if region_boxes is None
                 else np.asarray(region_boxes, np.float32).reshape(-1, 4))
        meta = {k: np.asarray(v) for k, v in (region_meta or {}).items()}
        self._check_side(len(vectors), boxes, meta)

        keep = [i for i, f in enumerate(frame_ids) if f not in self._row]  # a known frame is a no-op
        if not keep:
            return
        new_rows: dict[str, int] = {}
        owner = np.empty(len(keep), np.int32)
        for j, i in enumerate(keep):
            owner[j] = new_rows.setdefault(frame_ids[i], self.n_frames + len(new_rows))
        take = np.asarray(keep) if len(keep) < len(vectors) else slice(None)
        x = np.ascontiguousarray(vectors[take], dtype=np.float32)

        if self._ivfpq_due(len(x)):
            self._rebuild_ivfpq(x)
        else:
            for s in range(0, len(x), _CHUNK):
                self.index.add(x[s:s + _CHUNK])
            if self._gpu_index is not None:
                self._gpu_index.add(x)
        # Side arrays are committed only once faiss has taken the vectors.
        self.frame_ids += list(new_rows)
        self._row.update(new_rows)
        self._owner.append(owner)
        self._boxes.append(boxes[take])
        if self._meta is None:
            self._meta = {k: [] for k in meta}
        for k, v in meta.items():
            self._meta[k].append(v[take])

    def _check_side(self, n: int, boxes: np.ndarray, meta: dict[str, np.ndarray]) -> None:
        if len(boxes) != n:
            raise ObjretError(f"region_boxes has {len(boxes)} rows for {n} regions")
        if self._meta is not None and set(meta) != set(self._meta):
            raise ObjretError(f"region_meta keys {sorted(meta)} differ from the index's {sorted(self._meta)}")
        for k, v in meta.items():
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", k):
                raise ObjretError(f"region_meta name {k!r}: use letters, digits, '_', '.', '-'")
            if v.shape[:1] != (n,) or v.dtype.hasobject:
                raise ObjretError(f"region_meta[{k!r}] must be a numeric array with {n} rows, got "
                                  f"{v.dtype} {v.shape}")

    def _ivfpq_due(self, n_new: int) -> bool:
        if self.active != "flat" or self.kind not in ("ivfpq", "auto"):
            return False
        n = len(self) + n_new
        if self.kind == "auto":
            return n > self.flat_max and n >= 1024   # PQ codebooks need a few hundred points at the least
        return n >= max(IVFPQ_MIN_TRAIN, 39 * (self.nlist or 0))

    def _rebuild_ivfpq(self, x_new: np.ndarray) -> None:
        """Train IVF-PQ on a sample of the flat regions plus x_new, then move everything into it (ids kept)."""
        flat, n_old = self.index, len(self)
        n = n_old + len(x_new)
        nlist = self.nlist or default_nlist(n)
        # k-means on 40 points a list is enough for the coarse quantizer and keeps training fast at 1M+.
        n_train = min(n, max(40 * nlist, IVFPQ_MIN_TRAIN, 65_536))
        pick = np.sort(np.random.default_rng(0).choice(n, n_train, replace=False))
        old, new = pick[pick < n_old], pick[pick >= n_old] - n_old
        train = np.concatenate([flat.reconstruct_batch(old) if len(old) else np.zeros((0, self.dim), np.float32),
                                x_new[new]])
        # Many lists: an HNSW graph over the centroids assigns a vector in ~log(nlist) comparisons (faiss "IVF_HNSW").
        quantizer = (faiss.IndexHNSWFlat(self.dim, 32, faiss.METRIC_INNER_PRODUCT) if nlist >= HNSW_QUANTIZER_MIN
                     else faiss.IndexFlatIP(self.dim))
        ivf = faiss.IndexIVFPQ(quantizer, self.dim, nlist, self.pq_m, 8, faiss.METRIC_INNER_PRODUCT)
        index = ivf
        if self.refine is not None:
            exact = faiss.IndexScalarQuantizer(self.dim, REFINE_TYPES[self.refine], faiss.METRIC_INNER_PRODUCT)
            index = faiss.IndexRefine(ivf, exact)
            index.k_factor = self.refine_k_factor
        index.train(np.ascontiguousarray(train))
        del train
        for s in range(0, n_old, _CHUNK):
            index.add(flat.reconstruct_n(s, min(_CHUNK, n_old - s)))
        for s in range(0, len(x_new), _CHUNK):
            index.add(x_new[s:s + _CHUNK])
        self.index, self.active, self.nlist = index, "ivfpq", nlist
        self._direct_map = False
        self._sync_gpu()

    # ---- search ----------------------------------------------------------------------------------
    def search(self, query: np.ndarray, k_regions: int, *, refine: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Nearest regions: (region_ids, sims), each (k,) for a (d,) query or (q, k) for (q, d) queries.

        Sims are descending; an approximate index that finds fewer than k regions pads with id -1.
        ``refine=False``: an IVF-PQ index with refine vectors ranks by its PQ codes alone (no refine rows read).
        """
        q = np.asarray(query, np.float32)
        if q.ndim not in (1, 2) or q.shape[-1] != self.dim:
            raise ObjretError(f"query must be ({self.dim},) or (q, {self.dim}), got {q.shape}")
        qs = np.ascontiguousarray(q.reshape(-1, self.dim))
        k = min(int(k_regions), len(self))
        if k <= 0:
            ids, sims = np.zeros((len(qs), 0), np.int64), np.zeros((len(qs), 0), np.float32)
        else:
            sims, ids = self._search_index(k, refine).search(qs, k)
        return (ids[0], sims[0]) if q.ndim == 1 else (ids, sims)

    def _search_index(self, k: int, refine: bool = True):
        index = self._gpu_index if self._gpu_index is not None and k <= GPU_MAX_K else self.index
        refined = self.active == "ivfpq" and self.refine is not None   # (no GPU copy then: see _sync_gpu)
        if refined and not refine:
            index, refined = faiss.downcast_index(index.base_index), False
        if self.active == "ivfpq":
            ivf, candidates = index, k
            if refined:
                # Re-rank at least 256 candidates: at small k, refine_k_factor*k PQ candidates miss true ones.
                index.k_factor = max(float(self.refine_k_factor), 256 / k)
                ivf, candidates = faiss.downcast_index(index.base_index), k * index.k_factor
            # By default probe lists holding ~2x the candidates wanted, so a large k in a small lake still
            # finds them; an explicit nprobe is taken as is.
            need = math.ceil(2 * self.nlist * candidates / len(self))
            ivf.nprobe = self.nprobe or min(self.nlist, max(default_nprobe(self.nlist), need))
            quantizer = faiss.downcast_index(ivf.quantizer)
            if isinstance(quantizer, faiss.IndexHNSW):
                quantizer.hnsw.efSearch = max(64, 2 * ivf.nprobe)   # HNSW returns at most efSearch lists
        elif self.active == "hnsw":
            index.hnsw.efSearch = max(self.ef_search, k)   # HNSW returns at most efSearch results
        return index

    # ---- size ------------------------------------------------------------------------------------
    def bytes_per_region(self) -> float:
        """Serialized faiss index plus the side arrays (owner, boxes, meta, frame ids), per region."""
        if not len(self):
            return 0.0
        side = self.owner.nbytes + self.boxes.nbytes + sum(v.nbytes for v in self.meta.values())
        side += sum(len(f.encode()) for f in self.frame_ids)
        return (serialized_size(self.index) + side) / len(self)

    # ---- GPU -------------------------------------------------------------------------------------
    def _sync_gpu(self) -> None:
        self._gpu_index = None
        if not self.use_gpu or self.active == "hnsw" or (self.active == "ivfpq" and self.refine is not None):
            return   # faiss has no GPU HNSW nor GPU IndexRefine: those search on the CPU
        try:
            if self._gpu_res is None:
                self._gpu_res = faiss.StandardGpuResources()
            self._gpu_index = faiss.index_cpu_to_gpu(self._gpu_res, 0, self.index)
        except (AttributeError, RuntimeError) as exc:   # CPU-only faiss, or a layout the GPU does not take
            warnings.warn(f"region index stays on the CPU: {exc}")
            self.use_gpu = False

    # ---- persistence -----------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        """Write a new version folder, then switch the CURRENT pointer to it (one os.replace): a crash or a
        reader at any moment sees either the previous save or this one, never a mix."""
        def write(folder: Path) -> None:
            faiss.write_index(self.index, str(folder / "regions.faiss"))
            arrays = {"owner": self.owner, "boxes": self.boxes, **{f"meta-{k}": v for k, v in self.meta.items()}}
            for name, arr in arrays.items():
                np.save(folder / f"{name}.npy", arr, allow_pickle=False)
            (folder / "frame_ids.json").write_text(json.dumps(self.frame_ids))

        save_version(directory, "v", write, {
            "format": _FORMAT, "kind": self.kind, "active": self.active, "dim": self.dim,
            "ntotal": len(self), "n_frames": self.n_frames, "meta": sorted(self.meta), "recipe": self.recipe,
            "params": {"flat_max": self.flat_max, "nlist": self.nlist, "pq_m": self.pq_m,
                       "hnsw_m": self.hnsw_m, "nprobe": self.nprobe, "ef_search": self.ef_search,
                       "refine": self.refine, "refine_k_factor": self.refine_k_factor}})

    @classmethod
    def load(cls, directory: str | Path, *, use_gpu: bool | None = None, recipe: dict | None = None,
             mapped: bool = False) -> "RegionIndex":
        """The index saved in ``directory``; with ``recipe``, an ObjretError unless its vectors were made that way;
        ``mapped``: read-only by memory map (faiss IO_FLAG_MMAP_IFC, numpy mmap_mode)."""
        directory = Path(directory)

        def bad(why: str) -> ObjretError:
            return ObjretError(f"region index in {directory} is unusable ({why}): build it again")

        found = load_manifest(directory, "region index", _FORMAT)   # sizes and sha256 checked
        if found is None:
            raise bad(f"nothing saved there (no {directory / 'CURRENT'})")
        version, manifest = found
        try:
            index = faiss.read_index(str(version / "regions.faiss"),
                                     faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY if mapped else 0)
            mode = "r" if mapped else None
            owner = np.load(version / "owner.npy", allow_pickle=False, mmap_mode=mode)
            boxes = np.load(version / "boxes.npy", allow_pickle=False, mmap_mode=mode)
            meta = {k: np.load(version / f"meta-{k}.npy", allow_pickle=False, mmap_mode=mode)
                    for k in manifest["meta"]}
            frame_ids = json.loads((version / "frame_ids.json").read_text())
            params = manifest["params"]
            out = cls(manifest["dim"], kind=manifest["kind"], use_gpu=False, recipe=manifest.get("recipe"), **params)
        except (OSError, RuntimeError, ValueError, KeyError, TypeError) as exc:
            raise bad(f"{type(exc).__name__}: {exc}") from exc
        if recipe is not None and out.recipe != recipe:
            differs = sorted(k for k in set(recipe) | set(out.recipe) if recipe.get(k) != out.recipe.get(k))
            raise ObjretError(f"region index in {directory} was built with another descriptor recipe ("
                              + ", ".join(f"{k}: {out.recipe.get(k)!r}, now {recipe.get(k)!r}" for k in differs)
                              + "): run build-index")
        n = manifest["ntotal"]
        if not (index.ntotal == n == len(owner) == len(boxes) and all(len(v) == n for v in meta.values())):
            raise bad(f"{index.ntotal} vectors, {len(owner)} owners, {len(boxes)} boxes, manifest {n}")
        if len(frame_ids) != manifest["n_frames"] or len(set(frame_ids)) != len(frame_ids):
            raise bad(f"{len(frame_ids)} frame ids, manifest {manifest['n_frames']}")
        if index.d != out.dim or (n and not 0 <= owner.min() <= owner.max() < len(frame_ids)):
            raise bad("dimension or region owners out of range")
        out.index, out.active = index, manifest["active"]
        out.frame_ids, out._row = frame_ids, {f: i for i, f in enumerate(frame_ids)}
        out._owner, out._boxes = [owner.astype(np.int32, copy=False)], [boxes.astype(np.float32, copy=False)]
        out.mapped = mapped
        if mapped:   # rows read at random: no read-ahead (objret.index.mapped_rows)
            for rows in (boxes, *meta.values()):
                random_access(rows)
            out._refine_codes = refine_codes(version / "regions.faiss", index)
        out._meta = {k: [v] for k, v in meta.items()}
        out._direct_map = (out.active == "ivfpq" and out.refine is None
                           and index.direct_map.type != faiss.DirectMap.NoMap)
        out.use_gpu = bool(use_gpu) if use_gpu is not None else (
            hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0)
        out._sync_gpu()
        return out


def _joined(chunks: list[np.ndarray], dtype, empty_shape: tuple[int, ...]) -> np.ndarray:
    if len(chunks) > 1:
        chunks[:] = [np.concatenate(chunks)]   # join once; later reads are free
    return chunks[0] if chunks else np.zeros(empty_shape, dtype)


def index_version(frame_ids: list[str]) -> str:
    """A short digest of the indexed frames: names the lake an index (and a mining run) saw."""
    return hashlib.sha256("\n".join(frame_ids).encode()).hexdigest()[:12]
