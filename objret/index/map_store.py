"""The mining store: what mining reads of a frame, compact on disk and read one frame at a time.

Per frame: its template-matching map (``mining.layer``, stride 8) as product-quantised cells, and its
whole-frame GeM vector. A cell is L2-normalised (template matching compares cells by cosine), then encoded
by a faiss ProductQuantizer learned on a sample of the lake's cells: ``pq_m`` bytes a cell (48 channels,
8 bytes: 4,800 cells of a 640 x 480 frame in 38 kB, against 460 kB in the fp16 feature cache).

Storage: immutable safetensors shards (codes, per-frame offsets, map sizes, GeM vectors, CRC32s) named by their
frames, written atomically like the feature cache's. safetensors because it is already the cache's format, it
never unpickles, and ``safe_open`` memory-maps a shard and reads a slice of a tensor without reading the rest:
random access by frame at the cost of one page-cache read. A store is read where mining runs, from local disk;
its shards are immutable files, so a remote copy (S3) is synced whole (``aws s3 sync``, ``dvc pull``), never
patched. zarr or Lance would add a dependency for the same access pattern; ragged frames (maps of different
sizes) are an offsets table either way.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save as save_safetensors

from objret import storage
from objret.errors import ObjretError

_FORMAT = 1
WHOLE_TENSOR_SHARE = 0.125   # gem_vectors reads a shard's whole GeM tensor when this share of its frames is wanted


class MapCodec:
    """Product quantisation of L2-normalised map cells (C channels -> ``pq_m`` bytes)."""

    def __init__(self, pq: faiss.ProductQuantizer):
        self.pq = pq
        # M x 256 x dsub: decoding is a gather (numpy's is ~30x faster than faiss's decode for a frame's cells).
        self._centroids = faiss.vector_to_array(pq.centroids).reshape(pq.M, pq.ksub, pq.dsub)
        # Centroids laid out dimension-major: faiss encodes short sub-vectors with SIMD over 256 centroids at once
        # (the same codes, ~25% faster here).
        pq.sync_transposed_centroids()

    @classmethod
    def fit(cls, cells: np.ndarray, pq_m: int, seed: int = 0) -> "MapCodec":
        """Learn the codebooks on ``cells`` (n x C, a sample of the lake's cells): the largest number of bytes a
        cell not above ``pq_m`` that divides C (48 channels, pq_m 12: 12; a backbone with 40: 10)."""
        cells = _normalized(cells)
        dim = cells.shape[1]
        pq_m = max(m for m in range(1, max(1, pq_m) + 1) if dim % m == 0)
        if len(cells) < 256:
            raise ObjretError(f"the mining store's codebooks need at least 256 cells to learn from, got {len(cells)}")
        pq = faiss.ProductQuantizer(dim, pq_m, 8)
        pq.cp.seed = seed
        pq.train(cells)
        return cls(pq)

    @property
    def dim(self) -> int:
        return int(self.pq.d)

    @property
    def code_size(self) -> int:
        return int(self.pq.code_size)

    def version(self) -> str:
        return hashlib.sha256(faiss.vector_to_array(self.pq.centroids).tobytes()).hexdigest()[:12]

    def encode(self, fmap: np.ndarray) -> np.ndarray:
        """C x h x w map -> (h*w) x code_size uint8, cells in row-major order."""
        c = fmap.shape[0]
        return self.pq.compute_codes(_normalized(np.asarray(fmap, np.float32).reshape(c, -1).T))

    def decode(self, codes: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
        """The map back: C x h x w float32 (unit cells, up to the quantisation error)."""
        h, w = (int(v) for v in hw)
        cells = self._centroids[np.arange(self.pq.M), np.asarray(codes)]   # n x M x dsub
        return np.ascontiguousarray(cells.reshape(len(codes), self.dim).T.reshape(self.dim, h, w))

    def save(self, path: Path) -> None:
        chunks: list[bytes] = []
        faiss.write_ProductQuantizer(self.pq, faiss.PyCallbackIOWriter(lambda b: chunks.append(bytes(b)) or len(b)))
        storage.write_bytes(str(path), b"".join(chunks))   # atomic: a killed build leaves no half codebook

    @classmethod
    def load(cls, path: Path) -> "MapCodec":
        try:
            return cls(faiss.read_ProductQuantizer(str(path)))
        except RuntimeError as exc:
            raise ObjretError(f"the mining store's codebooks {path} are unreadable ({exc}): rebuild the store") from exc


def _normalized(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, np.float32)
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-6)


@dataclass(frozen=True)
class StoredFrame:
    shard: Path
    row: int


class StoredRows:
    """Per-frame vectors kept on disk and read by row: ``rows_reader[rows]`` is ``read([frame_ids[r] for r in rows])``
    as an array. A mining process holds the lake's whole-frame GeM vectors this way: held whole they would be
    1.4 kB a frame (1.4 GB of its memory at 1M frames), while a report reads the few hundred it re-ranks."""

    def __init__(self, read, frame_ids: list[str]):
        self.read, self.frame_ids = read, frame_ids

    def __len__(self) -> int:
        return len(self.frame_ids)

    def __getitem__(self, rows) -> np.ndarray:
        rows = np.arange(len(self.frame_ids))[rows] if isinstance(rows, slice) else np.asarray(rows, np.int64)
        return self.read([self.frame_ids[r] for r in rows.ravel()])


class MapStore:
    """Shards of encoded maps under ``directory`` (one codec: ``codec.pq``, learned at the first write)."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._codec: MapCodec | None = None
        self._where: dict[str, StoredFrame] = {}
        self._read: set[Path] = set()
        self._tables: dict[Path, dict[str, np.ndarray]] = {}   # per shard: offsets, map_hw, crc (small)
        self._handles: dict[Path, object] = {}

    # ---- codec -----------------------------------------------------------------------------------

    @property
    def codec_path(self) -> Path:
        return self.dir / "codec.pq"

    def has_codec(self) -> bool:
        return self.codec_path.exists()

    @property
    def codec(self) -> MapCodec:
        if self._codec is None:
            if not self.has_codec():
                raise ObjretError(f"the mining store in {self.dir} has no codebooks yet: run build-index")
            self._codec = MapCodec.load(self.codec_path)
        return self._codec

    def set_codec(self, codec: MapCodec) -> None:
        if self.has_codec():
            raise ObjretError(f"the mining store in {self.dir} already has codebooks (a store is encoded with one)")
        codec.save(self.codec_path)
        self._codec = codec

    # ---- writing ---------------------------------------------------------------------------------

    def write_shard(self, maps: dict[str, np.ndarray], gem_vectors: dict[str, np.ndarray]) -> Path:
        """``{frame_id: C x h x w}`` maps and ``{frame_id: D}`` GeM vectors -> one shard, atomically."""
        frame_ids = sorted(maps)
        return self.write_codes(frame_ids, [self.codec.encode(maps[f]) for f in frame_ids],
                                [maps[f].shape[-2:] for f in frame_ids], [gem_vectors[f] for f in frame_ids])

    def write_codes(self, frame_ids: list[str], codes: list[np.ndarray], map_hw: list[tuple[int, int]],
                    gem_vectors: list[np.ndarray]) -> Path:
        """Frames already encoded with the store's codec (cells x code_size each, row-major) -> one shard."""
        codec = self.codec
        if any(c.shape != (h * w, codec.code_size) for c, (h, w) in zip(codes, map_hw)):
            raise ObjretError(f"codes must be (cells, {codec.code_size}) uint8 arrays matching their map sizes")
        gem = np.stack([np.asarray(g, np.float16) for g in gem_vectors])
        offsets = np.zeros(len(frame_ids) + 1, np.int64)
        offsets[1:] = np.cumsum([len(c) for c in codes])
        crc = np.array([zlib.crc32(c.tobytes(), zlib.crc32(g.tobytes())) for c, g in zip(codes, gem)], np.uint32)
        tensors = {"codes": np.concatenate(codes), "offsets": offsets, "gem": gem, "crc": crc,
                   "map_hw": np.array(map_hw, np.int32).reshape(-1, 2)}
        name = hashlib.sha1("\n".join(frame_ids).encode()).hexdigest()[:16]
        path = self.dir / f"shard-{name}.safetensors"
        metadata = {"frames": json.dumps(frame_ids), "format": str(_FORMAT), "codec": codec.version()}
        storage.write_bytes(str(path), save_safetensors(tensors, metadata=metadata))   # temp + fsync + rename
        if self._read:
            self._index_shard(path, frame_ids)
        return path

    # ---- reading ---------------------------------------------------------------------------------

    def shards(self) -> list[Path]:
        return sorted(self.dir.glob("shard-*.safetensors"))

    def _handle(self, shard: Path):
        handle = self._handles.get(shard)
        if handle is None:
            try:
                handle = safe_open(str(shard), framework="numpy")
                metadata = handle.metadata() or {}
                frames = json.loads(metadata["frames"])
                if metadata.get("format") != str(_FORMAT):
                    raise ObjretError(f"format {metadata.get('format')!r}, expected {_FORMAT}")
                if self.has_codec() and metadata.get("codec") != self.codec.version():
                    raise ObjretError(f"encoded with codebooks {metadata.get('codec')}, the store's are "
                                      f"{self.codec.version()}")
                table = {k: handle.get_tensor(k) for k in ("offsets", "map_hw", "crc")}
                if not (len(table["offsets"]) == len(frames) + 1 == len(table["map_hw"]) + 1 == len(table["crc"]) + 1):
                    raise ObjretError("its tables disagree with its frame list")
            except (SafetensorError, OSError, KeyError, ValueError) as exc:
                raise ObjretError(f"mining store shard {shard} is unreadable (truncated or damaged: {exc}); "
                                  f"delete it and run build-index to write it again") from exc
            except ObjretError as exc:
                raise ObjretError(f"mining store shard {shard} is unusable ({exc}); delete it and run "
                                  f"build-index") from exc
            self._handles[shard] = handle
            self._tables[shard] = {**table, "frames": frames}
        return handle

    def _index_shard(self, shard: Path, frame_ids: list[str] | None = None) -> None:
        if frame_ids is None:
            self._handle(shard)
            frame_ids = self._tables[shard]["frames"]
        for row, fid in enumerate(frame_ids):
            self._where[fid] = StoredFrame(shard, row)
        self._read.add(shard)

    def _locations(self) -> dict[str, StoredFrame]:
        for shard in self.shards():
            if shard not in self._read:
                self._index_shard(shard)
        return self._where

    def stored_ids(self) -> set[str]:
        return set(self._locations())

    def __contains__(self, frame_id: str) -> bool:
        return frame_id in self._where or frame_id in self._locations()

    def _locate(self, frame_ids: Iterable[str]) -> list[StoredFrame]:
        where = self._where
        out = []
        for fid in frame_ids:
            if fid not in where:
                where = self._locations()
            if fid not in where:
                raise ObjretError(f"frame {fid} is not in the mining store {self.dir}: run build-index")
            out.append(where[fid])
        return out

    def codes(self, frame_id: str) -> tuple[np.ndarray, tuple[int, int]]:
        """One frame's codes (cells x code_size) and map size, checked against its CRC."""
        at = self._locate([frame_id])[0]
        handle, table = self._handle(at.shard), self._tables[at.shard]
        start, stop = int(table["offsets"][at.row]), int(table["offsets"][at.row + 1])
        try:
            codes = handle.get_slice("codes")[start:stop]
            gem = handle.get_slice("gem")[at.row:at.row + 1]
        except (SafetensorError, OSError, ValueError) as exc:
            raise ObjretError(f"mining store shard {at.shard} is unreadable at frame {frame_id} ({exc})") from exc
        hw = tuple(int(v) for v in table["map_hw"][at.row])
        if len(codes) != hw[0] * hw[1] or zlib.crc32(codes.tobytes(), zlib.crc32(gem[0].tobytes())) != table["crc"][at.row]:
            raise ObjretError(f"mining store shard {at.shard} is damaged at frame {frame_id} (checksum mismatch): "
                              f"delete it and run build-index")
        return codes, hw

    def load_maps(self, frame_ids: Iterable[str]) -> dict[str, np.ndarray]:
        """``{frame_id: C x h x w float32}`` decoded maps (unit cells)."""
        frame_ids = list(frame_ids)
        if not frame_ids:
            return {}
        codec = self.codec
        out = {}
        for fid in frame_ids:
            codes, hw = self.codes(fid)
            out[fid] = codec.decode(codes, hw)
        return out

    def gem_vectors(self, frame_ids: list[str]) -> np.ndarray:
        """N x D float32 whole-frame GeM vectors, read shard by shard: a shard's whole tensor where many of its
        frames are wanted, else the wanted rows alone (a re-ranked shortlist touches a few rows of many shards)."""
        located = self._locate(frame_ids)
        out: np.ndarray | None = None
        by_shard: dict[Path, list[int]] = {}
        for i, at in enumerate(located):
            by_shard.setdefault(at.shard, []).append(i)
        for shard, positions in by_shard.items():
            handle, rows = self._handle(shard), [located[i].row for i in positions]
            try:
                if len(rows) >= WHOLE_TENSOR_SHARE * len(self._tables[shard]["frames"]):
                    block = handle.get_tensor("gem")[rows]
                else:
                    column = handle.get_slice("gem")
                    block = np.concatenate([column[r:r + 1] for r in rows])
            except (SafetensorError, OSError, ValueError) as exc:
                raise ObjretError(f"mining store shard {shard} is unreadable ({exc})") from exc
            if out is None:
                out = np.zeros((len(located), block.shape[1]), np.float32)
            out[positions] = block
        if out is None:   # no frame asked: no rows, of the stored width where there is a shard
            shards = self.shards()
            out = np.zeros((0, self._handle(shards[0]).get_slice("gem").get_shape()[1] if shards else 0), np.float32)
        return out

    def gem_rows(self, frame_ids: list[str]) -> "StoredRows":
        """The GeM vectors of ``frame_ids`` as rows read when indexed, never held whole."""
        return StoredRows(self.gem_vectors, frame_ids)

    def bytes_on_disk(self) -> int:
        return sum(p.stat().st_size for p in self.shards()) + (self.codec_path.stat().st_size if self.has_codec() else 0)
