"""What a mining run reads, loaded once: the region index, the lake's frames and the maps of every indexed frame.

A process that mines many reports (a served deployment, a batch of reports, an evaluation) keeps one
LakeSearch and pays the load once: a report then costs its own work only (query maps, shortlist, ranking).
objret.steps.mine keeps the current one per work folder; objret.eval.run ranks a bench through the same object.

The maps are held in memory (about 1.3 MB a frame at 640 px for stride-8 maps in fp32): right for lakes of
thousands of frames; a lake of millions needs them memory-mapped from disk and a small-object shortlist.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from objret.errors import ObjretError
from objret.features.cache import FeatureCache
from objret.graph.diffusion import GraphDiffusion
from objret.index.region_index import RegionIndex
from objret.ingest.lake import Frame
from objret.mining.lakemaps import LakeMaps, load_lake_maps
from objret.regions.store import RegionStore


@dataclass
class LakeSearch:
    index: RegionIndex
    frames: dict[str, Frame]   # every lake frame (the query frame may be one that is not indexed)
    maps: LakeMaps             # rows follow ``frame_ids``: the indexed frames still in the lake
    frame_ids: list[str]
    diffusion: GraphDiffusion | None = None   # the region graph's diffusion, when a caller attached one
    key: str = ""              # what the caller loaded it for (objret.steps.mine.search_key)
    _graph_rows: tuple[str, np.ndarray] | None = field(default=None, repr=False)

    @classmethod
    def load(cls, index: RegionIndex, frames: list[Frame], cache: FeatureCache, region_store: RegionStore, *,
             map_layer: str, gem_p: float, region_layer: str, pooling: str, whitening=None,
             with_rmac: bool = False) -> "LakeSearch":
        """The indexed frames among ``frames`` (the lake), their maps on ``map_layer``, whole-frame GeM vectors
        and region vectors (encoded with ``whitening`` as the index's were)."""
        by_id = {f.frame_id: f for f in frames}
        ids = [f for f in index.frame_ids if f in by_id]
        if not ids:
            raise ObjretError("the index holds no frame of the lake: run build-index first")
        # Frames of one shape side by side: template matching pads a block of frames to its largest map, and
        # a portrait frame among landscape ones pads them all to a square.
        ids.sort(key=lambda f: by_id[f].height / max(1, by_id[f].width))
        maps = load_lake_maps(cache, [by_id[i] for i in ids], map_layer, gem_p=gem_p, regions=region_store.load(ids),
                              region_layer=region_layer, pooling=pooling, whitening=whitening, with_rmac=with_rmac)
        return cls(index, by_id, maps, ids)

    def __post_init__(self):
        self.row_of = {f: i for i, f in enumerate(self.frame_ids)}

    def rows(self, exclude: str | None = None) -> np.ndarray:
        """Every indexed frame but ``exclude`` (the query's own frame)."""
        return np.array([i for i, f in enumerate(self.frame_ids) if f != exclude], np.int64)

    def shortlist(self, vector: np.ndarray, k: int, exclude: str | None = None) -> np.ndarray:
        """Rows of the ``k`` frames whose best region is nearest ``vector`` in the region index."""
        hits = self.index.best_frames(vector, k + 1)
        return np.array([self.row_of[h.frame_id] for h in hits if h.frame_id in self.row_of and h.frame_id != exclude][:k],
                        np.int64)

    def graph_rows(self, diffusion: GraphDiffusion) -> np.ndarray:
        """The graph's frame row of each row of this LakeSearch (computed once per graph version)."""
        if self._graph_rows is None or self._graph_rows[0] != diffusion.version:
            self._graph_rows = (diffusion.version, diffusion.rows_for(self.frame_ids))
        return self._graph_rows[1]
