"""Index step: stored regions, encoded -> the region index (faiss), new frames appended."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from objret.errors import ObjretError
from objret.index.region_index import RegionIndex, index_version
from objret.regions.encoding import region_vectors
from objret.steps.workspace import Workspace


@dataclass
class IndexResult:
    frames: int
    regions: int
    version: str
    directory: str
    bytes_per_region: float


def build_index(ws: Workspace, frame_ids: list[str] | None = None, directory: Path | None = None) -> IndexResult:
    """The region index: every stored region of the lake, encoded (whitened when enabled), frames added once.

    New frames are added to the existing index; a change of whitening rebuilds it. ``frame_ids`` and
    ``directory``: an index of these frames only, saved there (a shard: objret.steps.shards).
    """
    whitening_obj = ws.load_whitening()
    directory = directory or ws.current_index_dir()
    ip, rp = ws.params.index, ws.params.regions
    recipe = ws.index_recipe()
    try:
        index = RegionIndex.load(directory)
    except ObjretError:
        index = None
    if index is not None and index.recipe != recipe:
        if index.recipe:   # the folder is named for the recipe: another one here is a damaged build
            raise ObjretError(f"the region index in {directory} holds another descriptor recipe ({index.recipe}); "
                              f"delete the folder to build it again")
        index.recipe = recipe   # an index saved before recipes were recorded: same folder, same recipe
        index.save(directory)
    table = ws.region_store.load()
    frames = {f.frame_id: f for f in ws.lake.frames()}
    indexed = set(index.frame_ids) if index is not None else set()
    wanted = frames.keys() if frame_ids is None else set(frame_ids) & frames.keys()
    new = [fid for fid in table.frame_ids if fid in wanted and fid not in indexed]
    vectors = None
    if new:
        table = table.select(new)
        vectors = region_vectors(table, [frames[f] for f in new], rp.layer, rp.pooling, whitening_obj)
        if index is None:
            index = RegionIndex(vectors.vectors.shape[1], kind=ip.region_kind, flat_max=ip.flat_max, recipe=recipe)
        by_frame = np.argsort(table.owner, kind="stable")   # the order of vectors' regions
        index.add([new[o] for o in vectors.owner], vectors.vectors, vectors.boxes,
                  {"saliency": table.scores[by_frame], "class": table.classes[by_frame].astype(np.float32),
                   "class_score": table.class_scores[by_frame]})
        index.save(directory)
    return IndexResult(index.n_frames, len(index), index_version(sorted(index.frame_ids)), str(directory),
                       index.bytes_per_region())

