"""Dense feature cache: fp16 maps per frame and layer, sharded, keyed by frame id + backbone + preprocessing.

A shard is one safetensors file holding the maps of up to ``shard_size`` frames; it is written atomically
(temp + rename), so a killed run leaves only finished shards and the next run computes just the frames
that no shard holds yet. safetensors stores raw tensors, never pickles. Each tensor's CRC-32 is in the shard's
header and checked when it is read (crc32 runs at ~6 GB/s, against the ~1 ms a map takes to read): a
truncated or altered shard is named, never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save as save_safetensors
from tqdm import tqdm

from objret import storage
from objret.errors import BadFrameError, ObjretError
from objret.features.backbone import Backbone, pick_device, preprocess


def use_huge_page_buffers() -> None:
    """Back PyTorch's CPU buffers of 2 MB and more with transparent huge pages in this process (its
    ``THP_MEM_ALLOC_ENABLE``, read once, at torch's first allocation: call this before one; a value the user set
    wins). For processes that cache features: the backbone's forward ran 1.75x faster with it on a 2-core AVX-512
    CPU (benchmarks/huge_pages.py). Mining showed no clear gain (template matching 0.96x the time in one run,
    1.16x in another), so processes that only mine (and `objret eval`, whose timings stand for them) are left as
    the user runs them; `objret build-index` and `objret demo` call this."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


@dataclass
class CacheResult:
    computed: int
    already_cached: int
    failed: list[tuple[str, str]]
    seconds: float

    @property
    def frames_per_second(self) -> float:
        return self.computed / self.seconds if self.seconds > 0 else 0.0


class FeatureCache:
    """The cached maps of one backbone configuration under ``root/<cache key>/``."""

    def __init__(self, root: str | Path, cache_key: str):
        self.dir = Path(root) / cache_key
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cache_key = cache_key
        self._where: dict[str, Path] = {}  # frame id -> shard, read from shard headers
        self._read: set[Path] = set()      # shards whose header is in _where

    def shards(self) -> list[Path]:
        return sorted(self.dir.glob("shard-*.safetensors"))

    def _locations(self) -> dict[str, Path]:
        if not self._read:
            self._read_new_shards()
        return self._where

    def _read_new_shards(self) -> None:
        # Only headers not read before: a resumed run over many shards would otherwise reread them all per frame.
        for shard in self.shards():
            if shard not in self._read:
                for frame_id in self.shard_frames(shard):
                    self._where[frame_id] = shard
                self._read.add(shard)

    def _rescanned(self, frame_id: str) -> dict[str, Path]:
        """The locations, with shards written since (by another process or another FeatureCache on the same
        folder) read when ``frame_id`` is not among the remembered ones."""
        if frame_id not in self._locations():
            self._read_new_shards()
        return self._where

    def __contains__(self, frame_id: str) -> bool:
        return frame_id in self._rescanned(frame_id)

    def cached_ids(self) -> set[str]:
        self._read_new_shards()
        return set(self._where)

    def shard_frames(self, shard: Path) -> list[str]:
        try:
            with safe_open(shard, framework="numpy") as f:
                return json.loads(f.metadata()["frames"])
        except (SafetensorError, OSError, KeyError, TypeError, ValueError) as exc:
            raise _damaged(shard, exc) from exc

    def drop_shard(self, shard: Path) -> None:
        """Delete a shard (its frames are no longer cached)."""
        for fid in self.shard_frames(shard):
            self._where.pop(fid, None)
        self._read.discard(shard)
        shard.unlink()

    def write_shard(self, maps: dict[str, dict[str, np.ndarray]], meta: dict) -> Path:
        """Store ``{frame_id: {layer: C x h x w}}`` as one shard, atomically."""
        frame_ids = sorted(maps)
        tensors = {f"{fid}/{layer}": np.ascontiguousarray(arr, dtype=np.float16)
                   for fid in frame_ids for layer, arr in maps[fid].items()}
        name = hashlib.sha1("\n".join(frame_ids).encode()).hexdigest()[:16]
        path = self.dir / f"shard-{name}.safetensors"
        crc = {key: zlib.crc32(arr.tobytes()) for key, arr in tensors.items()}
        metadata = {"frames": json.dumps(frame_ids), "crc": json.dumps(crc), **{k: str(v) for k, v in meta.items()}}
        storage.write_bytes(str(path), save_safetensors(tensors, metadata=metadata))   # temp + fsync + rename
        if self._read:   # already scanned: remember this shard (else the first scan reads it)
            self._where.update({fid: path for fid in frame_ids})
            self._read.add(path)
        return path

    def load(self, frame_ids: Iterable[str], layer: str) -> dict[str, np.ndarray]:
        """``{frame_id: C x h x w float16}`` for the given frames; unknown frames raise ObjretError."""
        where = self._locations()
        by_shard: dict[Path, list[str]] = {}
        for fid in frame_ids:
            if fid not in where:
                where = self._rescanned(fid)
            if fid not in where:
                raise ObjretError(f"frame {fid} has no cached features under {self.dir}; run the features step")
            by_shard.setdefault(where[fid], []).append(fid)
        out = {}
        for shard, fids in by_shard.items():
            try:
                with safe_open(shard, framework="numpy") as f:
                    crc = json.loads((f.metadata() or {}).get("crc", "{}"))   # shards from before checksums: {}
                    for fid in fids:
                        key = f"{fid}/{layer}"
                        out[fid] = f.get_tensor(key)
                        if key in crc and zlib.crc32(out[fid].tobytes()) != crc[key]:
                            raise ObjretError(f"the maps of frame {fid} do not match their CRC-32")
            except (SafetensorError, OSError, ValueError, ObjretError) as exc:
                raise _damaged(shard, exc) from exc
        return out


def _damaged(shard: Path, exc: Exception) -> ObjretError:
    return ObjretError(f"feature shard {shard} is truncated or damaged ({exc}): delete it and run the features "
                       "step again to recompute its frames")


def _batches_by_shape(tensors: list[tuple[str, torch.Tensor]], batch_size: int):
    # Frames of one size go through the backbone together; mixed sizes would need padding that changes maps.
    by_shape: dict[tuple, list] = {}
    for item in tensors:
        by_shape.setdefault(tuple(item[1].shape), []).append(item)
    for items in by_shape.values():
        for i in range(0, len(items), batch_size):
            yield items[i:i + batch_size]


def forward(backbone: Backbone, batch: torch.Tensor, device: torch.device, autocast: bool = True) -> dict:
    """One batch through the backbone the way the cache runs it: ``{layer: N x C x h x w}`` on ``device``."""
    x = batch.to(device)
    if device.type == "cpu":
        x = x.contiguous(memory_format=torch.channels_last)  # about 2x faster convolutions on CPU
    dtype = autocast_dtype(device)
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=autocast and dtype is not None):
        return backbone(x)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """fp16 on CUDA; bf16 on a CPU with native bf16 (AVX512-BF16/AMX: ~2x fp32), else None (fp32).

    Without native support bf16 is emulated: 12x slower than fp32 (EfficientNet-Lite2 at 640 px, AVX2 CPU).
    """
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def cpu_has_native_bf16() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def extract_maps(backbone: Backbone, images: Sequence[tuple[str, np.ndarray]], batch_size: int = 8,
                 device: torch.device | None = None, autocast: bool = True,
                 max_side: int | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Run the backbone over ``[(frame_id, RGB array)]`` -> ``{frame_id: {layer: fp16 C x h x w}}``, the images
    resized to the backbone's longer side or to ``max_side``."""
    pre = backbone.spec.preprocessing
    pre = replace(pre, max_side=max_side) if max_side else pre
    tensors = [(fid, preprocess(img, pre)) for fid, img in images]
    return _maps_of(backbone, tensors, batch_size, device or pick_device(), autocast)


def _maps_of(backbone: Backbone, tensors: list[tuple[str, torch.Tensor]], batch_size: int, device: torch.device,
             autocast: bool) -> dict[str, dict[str, np.ndarray]]:
    backbone.to(device)
    out: dict[str, dict[str, np.ndarray]] = {}
    for batch in _batches_by_shape(tensors, batch_size):
        maps = forward(backbone, torch.stack([t for _, t in batch]), device, autocast)
        for layer, value in maps.items():
            value = value.to(torch.float16).cpu().numpy()   # bf16 -> fp16 in one pass: the same values, 1/5 the CPU
            for (fid, _), arr in zip(batch, value):
                out.setdefault(fid, {})[layer] = arr
    return out


def cache_features(backbone: Backbone, cache: FeatureCache, frames: Sequence, read_image: Callable[[str], np.ndarray],
                   *, shard_size: int = 64, batch_size: int = 8, device: torch.device | None = None,
                   autocast: bool = True, progress: bool = True) -> CacheResult:
    """Compute and cache the maps of every frame not cached yet; frames are objects with frame_id/image_uri.

    Undecodable frames are reported in ``failed`` and skipped; the rest are cached.
    """
    storage.remove_stale_temps(cache.dir)   # what killed runs left half-written
    todo = [f for f in frames if f.frame_id not in cache]
    already = len(frames) - len(todo)
    failed: list[tuple[str, str]] = []
    start = time.perf_counter()
    bar = tqdm(total=len(todo), unit="frame", desc="features", disable=not progress, dynamic_ncols=True)

    pre = backbone.spec.preprocessing

    def prepare(frame):   # decoded and resized off the main thread: PIL releases the GIL while it works
        try:
            return frame.frame_id, preprocess(read_image(frame.image_uri), pre)
        except BadFrameError as exc:
            return frame.frame_id, exc

    meta = {"cache_key": cache.cache_key, "backbone": backbone.spec.name}
    device = device or pick_device()
    chunks = [todo[i:i + shard_size] for i in range(0, len(todo), shard_size)]
    # A pipeline one shard deep on each side of the backbone: the next shard's frames are decoded (by the cores
    # the backbone leaves idle: one on a CPU-only machine, most of them beside a GPU), and the last shard is
    # written (CRC, fsync), while the backbone runs on this one. One shard each way bounds memory; waiting for
    # the last write before handing over the next keeps write errors in shard order.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    readers = max(1, cores - (torch.get_num_threads() if device.type == "cpu" else 1))
    with ThreadPoolExecutor(max_workers=readers) as reader, ThreadPoolExecutor(max_workers=1) as writer:
        upcoming = [reader.submit(prepare, f) for f in chunks[0]] if chunks else []
        written = None
        for i in range(len(chunks)):
            prepared = [job.result() for job in upcoming]
            upcoming = [reader.submit(prepare, f) for f in chunks[i + 1]] if i + 1 < len(chunks) else []
            tensors = []
            for fid, result in prepared:
                if isinstance(result, Exception):
                    failed.append((fid, str(result)))
                else:
                    tensors.append((fid, result))
            if tensors:
                maps = _maps_of(backbone, tensors, batch_size, device, autocast)
                if written is not None:
                    written.result()
                written = writer.submit(cache.write_shard, maps, meta)
            bar.update(len(prepared))
        if written is not None:
            written.result()
    bar.close()
    return CacheResult(len(todo) - len(failed), already, failed, time.perf_counter() - start)
