"""Per-frame regions and their raw (unwhitened) descriptors, stored in batches next to the feature cache.

Raw descriptors are kept so that whitening can be refitted and the index rebuilt without touching the
backbone again. Each batch is one .npz of plain arrays (no pickle), written atomically; a killed run
leaves only whole batches, and the next run extracts just the frames no batch holds. An .npz is a zip whose
central directory holds each array's CRC-32, checked as the array is read: a truncated or altered batch is
named, never used.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from objret import storage
from objret.errors import ObjretError
from objret.regions.sources import FrameRegions


FORMAT = 2   # 2: each region's detector class and confidence


@dataclass
class RegionTable:
    """All regions of many frames as flat arrays; ``frame_ids[owner[i]]`` owns region i."""

    frame_ids: list[str]
    owner: np.ndarray        # R int32
    boxes: np.ndarray        # R x 4 float32, cells of the region layer
    sources: np.ndarray      # R int8
    scores: np.ndarray       # R float32
    descriptors: np.ndarray  # R x D float32 (raw, L2-normalised per pooling part)
    map_hw: np.ndarray       # F x 2 int32, region-layer map size per frame (to convert boxes to pixels)
    classes: np.ndarray      # R int16, a detector box's class id, -1 for other regions (FrameRegions)
    class_scores: np.ndarray  # R float32, its confidence

    def __len__(self) -> int:
        return len(self.owner)

    def select(self, frame_ids: list[str]) -> "RegionTable":
        row = {fid: i for i, fid in enumerate(self.frame_ids)}
        keep_frames = [row[f] for f in frame_ids]
        new_row = {old: new for new, old in enumerate(keep_frames)}
        mask = np.isin(self.owner, keep_frames)
        owner = np.array([new_row[o] for o in self.owner[mask]], np.int32)
        return RegionTable(list(frame_ids), owner, self.boxes[mask], self.sources[mask], self.scores[mask],
                           self.descriptors[mask], self.map_hw[keep_frames], self.classes[mask],
                           self.class_scores[mask])


class RegionStore:
    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    def batches(self) -> list[Path]:
        return sorted(self.dir.glob("regions-*.npz"))

    def stored_ids(self) -> set[str]:
        return set(self.frame_order())

    def frame_order(self) -> list[str]:
        """The stored frames in the order ``load`` lists them (batch by batch, in name order)."""
        ids: list[str] = []
        for path in self.batches():
            ids += _read_batch(path, ["frame_ids"])["frame_ids"].astype(str).tolist()
        return ids

    def write(self, per_frame: dict[str, tuple[FrameRegions, np.ndarray, tuple[int, int]]]) -> Path:
        """``{frame_id: (regions, descriptors, (map_h, map_w))}`` -> one batch file."""
        frame_ids = sorted(per_frame)
        regions = [per_frame[f][0] for f in frame_ids]
        arrays = {
            "frame_ids": np.array(frame_ids, dtype="S64"),
            "counts": np.array([len(r) for r in regions], np.int32),
            "map_hw": np.array([per_frame[f][2] for f in frame_ids], np.int32).reshape(-1, 2),
            "boxes": np.concatenate([r.boxes for r in regions]).astype(np.float32),
            "sources": np.concatenate([r.sources for r in regions]).astype(np.int8),
            "scores": np.concatenate([r.scores for r in regions]).astype(np.float32),
            "classes": np.concatenate([r.classes for r in regions]).astype(np.int16),
            "class_scores": np.concatenate([r.class_scores for r in regions]).astype(np.float32),
            "descriptors": np.concatenate([per_frame[f][1] for f in frame_ids]).astype(np.float16),
        }
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        name = hashlib.sha1("\n".join(frame_ids).encode()).hexdigest()[:16]
        path = self.dir / f"regions-{name}.npz"
        storage.write_bytes(str(path), buffer.getvalue())
        return path

    def load(self, frame_ids: list[str] | None = None) -> RegionTable:
        ids, owner, parts = [], [], {k: [] for k in ("boxes", "sources", "scores", "descriptors", "map_hw",
                                                     "classes", "class_scores")}
        for path in self.batches():
            data = _read_batch(path, ["frame_ids", "counts", *parts])
            batch_ids = data["frame_ids"].astype(str).tolist()
            owner.append(np.repeat(np.arange(len(ids), len(ids) + len(batch_ids)), data["counts"]))
            ids += batch_ids
            for key in parts:
                parts[key].append(data[key])
        if not ids:
            raise FileNotFoundError(f"no regions stored in {self.dir}")
        table = RegionTable(ids, np.concatenate(owner).astype(np.int32), np.concatenate(parts["boxes"]),
                            np.concatenate(parts["sources"]), np.concatenate(parts["scores"]),
                            np.concatenate(parts["descriptors"]).astype(np.float32),
                            np.concatenate(parts["map_hw"]), np.concatenate(parts["classes"]),
                            np.concatenate(parts["class_scores"]))
        return table.select(frame_ids) if frame_ids is not None else table


def _read_batch(path: Path, keys: list[str]) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in keys}
    except (zipfile.BadZipFile, OSError, KeyError, ValueError, EOFError) as exc:
        raise ObjretError(f"region batch {path} is truncated or damaged ({exc}): delete it and run build-index to "
                          "extract its frames again") from exc


def params_key(params: dict) -> str:
    """A short key for the region parameters (objret.config.RegionsParams.store_key()) and the batches' format, so
    changed parameters, or batches without what this version reads (format 2: the detector's classes), get a
    fresh store."""
    blob = json.dumps({**params, "format": FORMAT}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]
