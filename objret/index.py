"""Global frame index: one GeM vector per frame in faiss, used to shortlist candidate frames for a query."""

from __future__ import annotations

import json
import os
from pathlib import Path

import faiss
import numpy as np

from objret.errors import ObjretError


class GlobalIndex:
    """Inner-product (cosine, vectors are L2-normalised) exact index with the frame ids alongside."""

    def __init__(self, dim: int):
        self.index = faiss.IndexFlatIP(dim)
        self.frame_ids: list[str] = []

    def add(self, frame_ids: list[str], vectors: np.ndarray) -> None:
        known = set(self.frame_ids)
        keep = [i for i, fid in enumerate(frame_ids) if fid not in known]  # adding a frame twice is a no-op
        if keep:
            self.index.add(np.ascontiguousarray(vectors[keep], dtype=np.float32))
            self.frame_ids += [frame_ids[i] for i in keep]

    def __len__(self) -> int:
        return len(self.frame_ids)

    def search(self, vector: np.ndarray, k: int) -> tuple[list[str], np.ndarray]:
        k = min(k, len(self.frame_ids))
        if k == 0:
            return [], np.zeros(0, np.float32)
        scores, idx = self.index.search(np.ascontiguousarray(vector[None], dtype=np.float32), k)
        return [self.frame_ids[i] for i in idx[0]], scores[0]

    def save(self, directory: str | Path) -> None:
        """Write the index and its frame ids; the ids file is replaced last so both always match."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tmp_index = directory / f".global.faiss.{os.getpid()}.tmp"
        faiss.write_index(self.index, str(tmp_index))
        os.replace(tmp_index, directory / "global.faiss")
        tmp_ids = directory / f".frame_ids.json.{os.getpid()}.tmp"
        tmp_ids.write_text(json.dumps({"count": len(self.frame_ids), "frame_ids": self.frame_ids}))
        os.replace(tmp_ids, directory / "frame_ids.json")

    @classmethod
    def load(cls, directory: str | Path) -> "GlobalIndex":
        directory = Path(directory)
        try:
            index = faiss.read_index(str(directory / "global.faiss"))
            ids = json.loads((directory / "frame_ids.json").read_text())["frame_ids"]
        except (OSError, RuntimeError, ValueError, KeyError) as exc:
            raise ObjretError(f"no usable index in {directory}: run build-index first ({exc})") from exc
        if index.ntotal != len(ids):
            raise ObjretError(f"index in {directory} is inconsistent ({index.ntotal} vectors, {len(ids)} ids): "
                              "run build-index again")
        out = cls(index.d)
        out.index, out.frame_ids = index, ids
        return out
