"""Index step: stored regions, encoded -> the region index (faiss), new frames appended."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from objret.errors import ObjretError
from objret.index.region_index import RegionIndex, index_version
from objret.mining.lakemaps import region_vectors
from objret.steps.workspace import Workspace


@dataclass
class IndexResult:
    frames: int
    regions: int
    version: str
    directory: str
    bytes_per_region: float


def build_index(ws: Workspace) -> IndexResult:
    """The region index: every stored region of the lake, encoded (whitened when enabled), frames added once.

    New frames are added to the existing index; a change of whitening rebuilds it.
    """
    whitening_obj = ws.load_whitening()
    directory = ws.current_index_dir()
    ip = ws.params.section("index")
    try:
        index = RegionIndex.load(directory)
    except ObjretError:
        index = None
    table = ws.region_store.load()
    frames = {f.frame_id: f for f in ws.lake.frames()}
    indexed = set(index.frame_ids) if index is not None else set()
    new = [fid for fid in table.frame_ids if fid in frames and fid not in indexed]
    vectors = None
    if new:
        table = table.select(new)
        vectors = region_vectors(table, [frames[f] for f in new], ws.params.section("regions").get("layer", "stride32"),
                                 ws.params.section("regions").get("pooling", "avg"), whitening_obj)
        if index is None:
            index = RegionIndex(vectors.vectors.shape[1], kind=ip.get("region_kind", "auto"),
                                flat_max=int(ip.get("flat_max", 200_000)))
        index.add([new[o] for o in vectors.owner], vectors.vectors, vectors.boxes,
                  {"saliency": table.scores[np.argsort(table.owner, kind="stable")]})
        index.save(directory)
    return IndexResult(index.n_frames, len(index), index_version(sorted(index.frame_ids)), str(directory),
                       index.bytes_per_region())

