"""What a mining run reads, loaded once: the region index, the lake's frames and the maps of every indexed frame.

A process that mines many reports (a served deployment, a batch of reports, the latency benchmark) keeps one
LakeSearch and pays the load once: a report then costs its own work only (query maps, shortlist, template
matching). ``LakeSearch.open`` returns the process's current one while the index version and the parameters
it was loaded with are unchanged, and loads a new one otherwise.

The maps are held in memory (about 1.3 MB a frame at 640 px for stride-8 maps in fp32): right for lakes of
thousands of frames; a lake of millions needs them memory-mapped from disk and a small-object shortlist.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from objret.errors import ObjretError
from objret.graph.diffusion import GraphDiffusion
from objret.index.region_index import RegionIndex
from objret.ingest.lake import Frame
from objret.mining.lakemaps import load_lake_maps
from objret.mining.lakemaps import LakeMaps
from objret.steps.workspace import Workspace

_current: dict[str, "LakeSearch"] = {}   # one per process: the latest opened


@dataclass
class LakeSearch:
    key: str                 # index version + the parameters the maps were loaded with
    index: RegionIndex
    frames: dict[str, Frame]   # every lake frame (the query frame may be one that is not indexed)
    maps: LakeMaps           # rows follow ``frame_ids``: the indexed frames still in the lake
    frame_ids: list[str]
    # The region graph for diffusion, loaded on first use (and again after a new graph version is saved).
    _diffusion: GraphDiffusion | None = field(default=None, repr=False)
    _graph_rows: np.ndarray | None = field(default=None, repr=False)

    @classmethod
    def open(cls, ws: Workspace) -> "LakeSearch":
        """The current LakeSearch of ``ws``'s index, loaded on first use and again after the index changed."""
        key = search_key(ws)
        cached = _current.get("search")
        if cached is None or cached.key != key:
            _current.clear()   # drop the old maps before loading new ones (memory)
            _current["search"] = cls.load(ws, key)
        return _current["search"]

    @classmethod
    def load(cls, ws: Workspace, key: str | None = None) -> "LakeSearch":
        index = RegionIndex.load(ws.current_index_dir())
        frames = {f.frame_id: f for f in ws.lake.frames()}
        ids = [f for f in index.frame_ids if f in frames]
        if not ids:
            raise ObjretError("the index holds no frame of the lake: run build-index first")
        # Frames of one shape side by side: template matching pads a block of frames to its largest map, and
        # a portrait frame among landscape ones pads them all to a square.
        ids.sort(key=lambda f: frames[f].height / max(1, frames[f].width))
        m = ws.params.section("mining")
        maps = load_lake_maps(ws.cache, [frames[i] for i in ids], m.get("layer", "stride8"),
                              gem_p=ws.params.section("index").get("gem_p", 3.0),
                              regions=ws.region_store.load(ids), region_params=ws.params.section("regions"),
                              whitening=ws.load_whitening(), with_rmac=m.get("method") == "rmac")
        return cls(key or search_key(ws), index, frames, maps, ids)

    def frames_but(self, exclude: str | None) -> list[str]:
        """The indexed frames but ``exclude``."""
        return [f for f in self.frame_ids if f != exclude]

    def rows(self, exclude: str | None = None) -> np.ndarray:
        """Every indexed frame but ``exclude`` (the query's own frame)."""
        return np.array([i for i, f in enumerate(self.frame_ids) if f != exclude], np.int64)

    def diffusion(self, ws: Workspace, params: dict) -> GraphDiffusion:
        """Diffusion over the current index's region graph with the query side's ``params`` (mining.diffusion);
        ObjretError when no graph was built for this index version."""
        from objret.graph.store import current_version, open_diffusion

        directory = ws.graph_dir()
        if self._diffusion is None or self._diffusion.version != current_version(directory):
            self._diffusion = open_diffusion(directory, ws.current_index_dir(), self.index, params)
            self._graph_rows = None
        return replace(self._diffusion, k=int(params.get("k", 10)), alpha=float(params.get("alpha", 0.99)),
                       max_iter=int(params.get("max_iter", 20)))

    def graph_rows(self, diffusion: GraphDiffusion) -> np.ndarray:
        """The graph's frame row of each row of this LakeSearch (computed once per graph)."""
        if self._graph_rows is None:
            self._graph_rows = diffusion.rows_for(self.frame_ids)
        return self._graph_rows

    def shortlist(self, vector: np.ndarray, k: int, exclude: str | None = None) -> np.ndarray:
        """Rows of the ``k`` frames whose best region is nearest ``vector`` in the region index."""
        row_of = {f: i for i, f in enumerate(self.frame_ids)}
        hits = self.index.best_frames(vector, k + 1)
        return np.array([row_of[h.frame_id] for h in hits if h.frame_id in row_of and h.frame_id != exclude][:k],
                        np.int64)


def search_key(ws: Workspace) -> str:
    """Changes whenever a new index version is saved or a parameter the loaded maps depend on changes."""
    directory = ws.current_index_dir()
    try:
        version = (directory / "CURRENT").read_text().strip()
    except OSError as exc:
        raise ObjretError(f"no region index in {directory}: run build-index first") from exc
    m, idx = ws.params.section("mining"), ws.params.section("index")
    return json.dumps([str(Path(directory).resolve()), version, m.get("layer"), m.get("method") == "rmac",
                       idx.get("gem_p")])
