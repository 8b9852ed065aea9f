"""Several region (or cell) indexes over disjoint frames, searched shard by shard and answered as one.

A lake past one machine's memory, or built by many workers, is cut into shards of whole frames, each with its
own index (objret.index.region_index, saved on its own). ``ShardedIndex`` searches every shard for the k
nearest and merges the lists by similarity (faiss.merge_knn_results): with exact (flat) shards the merged
list is exactly the one index over every frame would return, so the shortlists and everything downstream
(``best_frames``, the cell votes) are unchanged; with IVF-PQ shards each shard is as approximate as one index.
Region ids are global: shard s's region r is ``offset[s] + r``, frames likewise, so LakeSearch and the cell
vote read owners, boxes and vectors as from one index. Read-only: new frames go into a shard of their own.

Who searches a shard is a ``ShardSearch``: this process by default; tasks/shard_serving.py has each shard
searched by the Dask worker holding it in memory, this process then reading only the few rows a shortlist
needs (owners, boxes, vectors) from its memory-mapped copy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import faiss
import numpy as np

from objret.errors import ObjretError
from objret.index.region_index import RegionIndex


ShardSearch = Callable[[np.ndarray, int, bool], list]
"""(queries, k, refine) -> one (ids, sims) per shard, in shard order, ids the shard's own (None: an empty shard)."""


class ShardedIndex(RegionIndex):
    """The union of ``shards`` (RegionIndexes over disjoint frames, same dimension and recipe), in shard order;
    ``search_shards`` answers the k nearest of each shard (default: each shard searched in this process)."""

    def __init__(self, shards: Sequence[RegionIndex], search_shards: ShardSearch | None = None):   # noqa: no super()
        if not shards:
            raise ObjretError("a sharded index needs at least one shard")
        dims, recipes = {s.dim for s in shards}, [s.recipe for s in shards]
        if len(dims) != 1 or any(r != recipes[0] for r in recipes):
            raise ObjretError(f"shards disagree on dimension or descriptor recipe: {sorted(dims)}, {recipes}")
        self.shards = list(shards)
        self.dim, self.recipe, self.mapped = dims.pop(), dict(recipes[0]), all(s.mapped for s in shards)
        self.active = "flat" if all(s.active == "flat" for s in shards) else "ivfpq"
        self.refine_k_factor = max(s.refine_k_factor for s in shards)   # best_frames' candidate margin
        self.region_offset = np.cumsum([0] + [len(s) for s in shards])
        self.frame_offset = np.cumsum([0] + [s.n_frames for s in shards])
        self.frame_ids = [f for s in shards for f in s.frame_ids]
        if len(set(self.frame_ids)) != len(self.frame_ids):
            raise ObjretError("shards share frames: each frame must be in exactly one shard")
        self._row = {f: i for i, f in enumerate(self.frame_ids)}
        self._owner = [np.concatenate([s.owner.astype(np.int64) + o for s, o in zip(shards, self.frame_offset)])]
        self._boxes = [np.concatenate([s.boxes for s in shards])]
        names = {tuple(sorted(s.meta)) for s in shards}
        if len(names) > 1:   # shards built by different versions of build-index
            raise ObjretError(f"shards disagree on their per-region arrays: {sorted(names)}")
        self._meta = {k: [np.concatenate([s.meta[k] for s in shards])] for k in shards[0].meta}
        self._refine_codes = None
        self.use_gpu, self._gpu_index = False, None   # each shard keeps its own (GPU) index
        self.search_shards = search_shards or self.search_here

    def search_here(self, queries: np.ndarray, k: int, refine: bool) -> list:
        return [shard.search(queries, k, refine=refine) if len(shard) else None for shard in self.shards]

    def __len__(self) -> int:
        return int(self.region_offset[-1])

    def add(self, *args, **kwargs) -> None:
        raise ObjretError("a sharded index is read-only: add new frames as a shard of their own")

    def save(self, directory) -> None:
        raise ObjretError("a sharded index is saved shard by shard (each shard's own save)")

    def search(self, query: np.ndarray, k_regions: int, *, refine: bool = True) -> tuple[np.ndarray, np.ndarray]:
        q = np.asarray(query, np.float32)
        if q.ndim not in (1, 2) or q.shape[-1] != self.dim:
            raise ObjretError(f"query must be ({self.dim},) or (q, {self.dim}), got {q.shape}")
        qs = q.reshape(-1, self.dim)
        k = min(int(k_regions), len(self))
        if k <= 0:
            ids, sims = np.zeros((len(qs), 0), np.int64), np.zeros((len(qs), 0), np.float32)
        else:
            all_sims = np.full((len(self.shards), len(qs), k), -np.inf, np.float32)
            all_ids = np.full((len(self.shards), len(qs), k), -1, np.int64)
            for s, (found, offset) in enumerate(zip(self.search_shards(qs, k, refine), self.region_offset)):
                if found is None:
                    continue
                ids, sims = found
                kk = ids.shape[1]
                all_sims[s, :, :kk] = np.where(ids >= 0, sims, -np.inf)
                all_ids[s, :, :kk] = np.where(ids >= 0, ids + offset, -1)
            sims, ids = faiss.merge_knn_results(all_sims, all_ids, keep_max=True)
        return (ids[0], sims[0]) if q.ndim == 1 else (ids, sims)

    def vectors(self, region_ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(region_ids, np.int64)
        out = np.zeros((len(ids), self.dim), np.float32)
        shard_of = np.searchsorted(self.region_offset, ids, side="right") - 1
        for s in np.unique(shard_of):
            at = shard_of == s
            out[at] = self.shards[s].vectors(ids[at] - self.region_offset[s])
        return out

    def bytes_per_region(self) -> float:
        return sum(s.bytes_per_region() * len(s) for s in self.shards) / max(1, len(self))


def load_shards(directories: Sequence, *, recipe: dict | None = None, use_gpu: bool | None = None,
                mapped: bool = False, search_shards: ShardSearch | None = None) -> ShardedIndex:
    """The indexes saved in ``directories`` (each checked against ``recipe``; ``mapped``: memory-mapped), as one."""
    return ShardedIndex([RegionIndex.load(d, recipe=recipe, use_gpu=use_gpu, mapped=mapped) for d in directories],
                        search_shards)
