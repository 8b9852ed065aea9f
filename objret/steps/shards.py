"""Shards step: the mining store, the cell index and the region index built as shards of whole frames, one
call per shard, so that many workers (tasks/scale_out.py, on Dask) build one lake; mining reads them as one
(objret.index.sharded).

Each shard is a folder with its own region index and cell index over its frames; its maps go into the
work folder's mining store, whose shard files are named by their frames. What every shard must share is
fitted once before (``prepare``): the whitening (build-index's whitening step) and the store's codebooks.
A shard already saved is skipped, so a killed build resumes shard by shard.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from objret.errors import ObjretError
from objret.index.sharded import ShardedIndex, ShardSearch, load_shards
from objret.steps import store as store_step
from objret.steps.index import build_index
from objret.steps.workspace import Workspace


@dataclass
class ShardResult:
    name: str
    frames: int
    regions: int
    cells: int


def shards_dir(ws: Workspace) -> Path:
    """Where this recipe's shards live (region recipe + cell recipe, as the single indexes' folder names)."""
    return ws.root / "shards" / f"{ws.current_index_dir().name}+{ws.cells_dir().name}"


def shard_name(number: int) -> str:
    return f"shard-{number:06d}"


def next_number(ws: Workspace) -> int:
    """The number the next shard takes, after removing the folders of shards a killed build left unsaved (their
    frames are planned again: a re-run resumes shard by shard)."""
    saved = set(saved_shards(ws))
    root = shards_dir(ws)
    for folder in (root.glob("shard-*") if root.exists() else []):
        if folder not in saved:
            shutil.rmtree(folder)
    return 1 + max((int(p.name.split("-")[1]) for p in saved), default=-1)


def prepare(ws: Workspace, frame_ids: list[str]) -> None:
    """What every shard shares: the store's codebooks, learned on the first of ``frame_ids`` in lake order (the
    frames the single-process store step learns them on)."""
    st = ws.map_store
    if not st.has_codec():
        wanted = set(frame_ids)
        first = [f.frame_id for f in ws.lake.frames() if f.frame_id in wanted]
        st.set_codec(store_step.fit_codec(ws, first[:ws.params.index.map_store.train_frames]))


def build_shard(ws: Workspace, name: str, frame_ids: list[str]) -> ShardResult:
    """Store, cell index and region index of ``frame_ids`` (cached, regions stored) as shard ``name``."""
    if not ws.map_store.has_codec():
        raise ObjretError("the mining store has no codebooks yet: prepare the shards first")
    folder = shards_dir(ws) / name
    store_step.store(ws, progress=False, frame_ids=frame_ids)
    found = store_step.cells(ws, progress=False, frame_ids=frame_ids, directory=folder / "cells")
    index = build_index(ws, frame_ids=frame_ids, directory=folder / "regions")
    return ShardResult(name, index.frames, index.regions, found.cells)


def saved_shards(ws: Workspace) -> list[Path]:
    """The shards with both indexes saved, in name order."""
    root = shards_dir(ws)
    if not root.exists():
        return []
    return sorted(p for p in root.glob("shard-*")
                  if (p / "regions" / "CURRENT").exists() and (p / "cells" / "CURRENT").exists())


ServedBy = Callable[[list[Path], dict], ShardSearch]
"""(shard index folders, recipe) -> who searches them (tasks/shard_serving.py: the Dask workers holding them)."""


def open_shards(ws: Workspace, mapped: bool = False,
                served_by: ServedBy | None = None) -> tuple[ShardedIndex, ShardedIndex]:
    """The region index and the cell index of every saved shard, each answered as one. With ``served_by`` the
    searches go where it sends them, and this process keeps only memory-mapped copies for the rows it reads."""
    shards = saved_shards(ws)
    if not shards:
        raise ObjretError(f"no index shards in {shards_dir(ws)}: build them first")

    def open_kind(kind: str, recipe: dict) -> ShardedIndex:
        folders = [p / kind for p in shards]
        return load_shards(folders, recipe=recipe, mapped=mapped or served_by is not None,
                           search_shards=served_by(folders, recipe) if served_by else None)

    return open_kind("regions", ws.index_recipe()), open_kind("cells", ws.cells_recipe())
