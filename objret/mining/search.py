"""What a mining run reads, opened once: the region index, the cell index, the lake's frames and a reader of
each frame's maps.

A process that mines many reports (a served deployment, a batch of reports, an evaluation) keeps one
LakeSearch and pays the opening once: a report then costs its own work only (query maps, shortlist, ranking).
objret.steps.mine keeps the current one per work folder; objret.eval.run ranks a bench through the same object.

Only what is small per frame is held for every frame: the frame ids and the indexes' id maps (the indexes
themselves are memory-mapped). What a report reads of its candidates is read when it asks (``lake_maps``): the
maps template matching reads and the whole-frame GeM vectors from the mining store (compact, memory-mapped) or,
where kept, the fp16 feature cache; the region vectors from the region index; the frames (sizes, URIs) from the
lake's manifest. A lake no larger than ``resident_max`` frames is read once and kept.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

import numpy as np

from objret.errors import ObjretError
from objret.graph.diffusion import GraphDiffusion
from objret.index.cell_index import vote
from objret.index.class_frames import ClassFrames
from objret.index.frame_scoring import FrameHit
from objret.index.map_store import StoredRows
from objret.index.region_index import RegionIndex
from objret.ingest.lake import Frame
from objret.mining.lakemaps import LakeMaps
from objret.mining.template_matching import MapStack
from objret.regions.encoding import RegionVectors

MapReader = Callable[[list[str]], dict[str, np.ndarray]]   # frame ids -> {frame id: C x h x w map}


@dataclass
class LakeSearch:
    index: RegionIndex
    frames: Mapping[str, Frame]   # every lake frame, the query's too (not always indexed): objret.ingest.frame_table
    read_maps: MapReader       # the template-matching maps of frames (mining store or feature cache)
    frame_ids: list[str]       # the indexed frames still in the lake (rows)
    global_vectors: np.ndarray | StoredRows   # N x D whole-frame GeM vectors, rows follow frame_ids
    encoding: RegionVectors    # how a query box becomes a region vector (layer, pooling, whitening); no vectors
    cells: RegionIndex | None = None   # the small-object shortlist (objret.index.cell_index); None: regions only
    rmac_vectors: np.ndarray | None = None   # N x D whole-frame R-MAC (method rmac)
    discovery: object | None = None          # objret.graph.discovery.DiscoveryVectors (method discovery)
    resident_max: int = 2000   # a lake of at most this many frames keeps its maps in memory once read whole
    read_image: Callable[[str], np.ndarray] | None = None   # frame id -> RGB pixels (box fitting); None: not read
    diffusion: GraphDiffusion | None = None   # the region graph's diffusion, when a caller attached one
    key: str = ""              # what the caller loaded it for (objret.steps.mine.search_key)
    _graph_rows: tuple[str, np.ndarray] | None = field(default=None, repr=False)
    _resident: LakeMaps | None = field(default=None, repr=False)
    _class_frames: ClassFrames | None = field(default=None, repr=False)

    def __post_init__(self):
        if not self.frame_ids:
            raise ObjretError("the index holds no frame of the lake: run build-index first")
        self.row_of = {f: i for i, f in enumerate(self.frame_ids)}
        self._index_rows: np.ndarray | None = None   # the region index's row of each frame (regions_of)

    def __len__(self) -> int:
        return len(self.frame_ids)

    def rows(self, exclude: str | None = None) -> np.ndarray:
        """Every indexed frame but ``exclude`` (the query's own frame)."""
        return np.array([i for i, f in enumerate(self.frame_ids) if f != exclude], np.int64)

    # ---- first stage -----------------------------------------------------------------------------

    def region_shortlist(self, vector: np.ndarray, k: int, exclude: Collection[str] = ()) -> list[FrameHit]:
        """The ``k`` frames whose best region is nearest ``vector`` in the region index, best first, none in
        ``exclude`` (an IVF-PQ index scores no more frames than that exactly: the shortlist is already a margin
        over the re-ranked)."""
        exclude = set(exclude)
        hits = self.index.best_frames(vector, k + len(exclude), candidates=k + len(exclude))
        return [h for h in hits if h.frame_id in self.row_of and h.frame_id not in exclude][:k]

    def cell_shortlist(self, keys: np.ndarray, k: int, exclude: Collection[str] = ()) -> list[FrameHit]:
        """The ``k`` frames the query template's cells ``keys`` vote for in the cell index (objret.index.cell_index),
        none in ``exclude``."""
        if self.cells is None:
            raise ObjretError("the lake has no cell index (the small-object shortlist): run build-index")
        exclude = set(exclude)
        hits = vote(self.cells, keys, k + len(exclude))
        return [h for h in hits if h.frame_id in self.row_of and h.frame_id not in exclude][:k]

    def class_shortlist(self, query_classes: dict[int, float], k: int, exclude: Collection[str] = ()) -> list[FrameHit]:
        """The ``k`` frames of highest class agreement with a query box of ``query_classes`` (objret.mining.
        class_agreement), none in ``exclude`` (no region nor box: they are re-ranked, never shown as found). Empty
        when the index carries no detector classes."""
        frames = self.class_frames()
        if frames is None or not query_classes:
            return []
        rows, agreement = frames.agreement(query_classes)
        exclude = set(exclude)
        hits = []
        for i in _best_first(agreement, k + len(exclude)):
            frame_id = self.index.frame_ids[rows[i]]
            if frame_id in self.row_of and frame_id not in exclude:
                hits.append(FrameHit(frame_id, float(agreement[i]), -1, (np.nan,) * 4))
                if len(hits) == k:
                    break
        return hits

    def class_frames(self) -> ClassFrames | None:
        """The index's frames by detector class (objret.index.class_frames), built on first use; None when its
        regions carry no class."""
        if self._class_frames is None:
            meta = self.index.meta   # joined per call where the index is held in chunks: read it once
            if "class" in meta and "class_score" in meta:
                self._class_frames = ClassFrames.from_regions(self.index.owner, meta["class"], meta["class_score"],
                                                              self.index.n_frames)
        return self._class_frames

    @property
    def cells_layer(self) -> str | None:
        """The map the cell index's cells come from (its recipe)."""
        return None if self.cells is None else self.cells.recipe.get("layer")

    # ---- what the methods read -------------------------------------------------------------------

    def lake_maps(self, rows: np.ndarray) -> LakeMaps:
        """The frames at ``rows`` as the methods read them: maps, GeM vectors, region vectors (and R-MAC or
        OS.EGM vectors when loaded). Every row: read once and kept when the lake is at most ``resident_max``."""
        rows = np.asarray(rows, np.int64)
        whole = len(rows) == len(self.frame_ids) and np.array_equal(rows, np.arange(len(rows)))
        if self._resident is not None:
            return self._resident if whole else self._resident.subset(rows)
        lake = self._read(rows)
        if whole and len(rows) <= self.resident_max:
            self._resident = lake
        return lake

    def _read(self, rows: np.ndarray) -> LakeMaps:
        ids = [self.frame_ids[r] for r in rows]
        sizes = [(self.frames[f].width, self.frames[f].height) for f in ids]

        def stack() -> MapStack:   # read when a method matches templates, not before
            maps = self.read_maps(ids)
            return MapStack(ids, [maps[f] for f in ids], sizes)

        region_ids, owner = self.regions_of(rows)
        meta = self.index.meta   # an index built before regions carried detector classes has none
        regions = RegionVectors(self.index.vectors(region_ids), owner, self.index.boxes[region_ids],
                                self.encoding.layer, self.encoding.pooling, self.encoding.whitening,
                                meta["class"][region_ids] if "class" in meta else None,
                                meta["class_score"][region_ids] if "class_score" in meta else None)
        return LakeMaps(stack, self.global_vectors[rows], regions,
                        None if self.rmac_vectors is None else self.rmac_vectors[rows],
                        None if self.discovery is None else self.discovery.subset(rows),
                        frame_ids=ids, image_sizes=np.asarray(sizes, np.float32))

    def regions_of(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The region index's regions of the frames at ``rows``: (region ids, position of their frame in rows)."""
        if self._index_rows is None:
            self._index_rows = self.index.rows_of(self.frame_ids)
        return self.index.regions_of(self._index_rows[np.asarray(rows, np.int64)])

    def graph_rows(self, diffusion: GraphDiffusion) -> np.ndarray:
        """The graph's frame row of each row of this LakeSearch (computed once per graph version)."""
        if self._graph_rows is None or self._graph_rows[0] != diffusion.version:
            self._graph_rows = (diffusion.version, diffusion.rows_for(self.frame_ids))
        return self._graph_rows[1]


def _best_first(scores: np.ndarray, head: int):
    """Positions of ``scores``, highest first: the first ``head`` found by partition (a class's frames may be most
    of the lake), the rest sorted only if the caller reads past them."""
    if len(scores) > 2 * head:
        top = np.argpartition(-scores, head)[:head]
        top = top[np.argsort(-scores[top], kind="stable")]
        yield from top
        rest = np.setdiff1d(np.arange(len(scores)), top)
        yield from rest[np.argsort(-scores[rest], kind="stable")]
    else:
        yield from np.argsort(-scores, kind="stable")

