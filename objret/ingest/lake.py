"""The lake: every frame objret can mine, listed in a manifest with a stable content-hash id.

Sources are a folder of images and videos (recursive), a video file (every Nth frame or a target rate) or
an S3 prefix of images. A file that does not decode, is cut short, or is too large or too small to be a frame
(``max_pixels``, ``min_side``) is reported by name and skipped; the rest is ingested. The manifest is
``<root>/manifest.sqlite``: one committed transaction per batch, so a killed ingestion keeps everything it
committed, and re-running it skips what is already there. Video frames are decoded once and stored as JPEG
under ``<root>/frames/<frame_id>.jpg``.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from objret import storage
from objret.errors import BadFrameError, ObjretError, StoreError
from objret.ingest.decode import IMAGE_EXTENSIONS, MAX_PIXELS, MIN_SIDE, VIDEO_EXTENSIONS, decode_image, is_image, is_video

BATCH_SIZE = 64  # frames per manifest transaction: a killed run redoes at most this many
JPEG_QUALITY = 95  # stored video frames: near-lossless, about a tenth of PNG's size
_S3_VIDEO_ERROR = "{uri}: videos on S3 are not supported yet (download the file and ingest it locally)"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS frames (
    frame_id    TEXT PRIMARY KEY,
    seq         INTEGER NOT NULL UNIQUE,
    uri         TEXT NOT NULL,
    image_uri   TEXT NOT NULL,
    source      TEXT NOT NULL,
    frame_index INTEGER,
    time_s      REAL,
    width       INTEGER NOT NULL,
    height      INTEGER NOT NULL
);
-- Every URI ever ingested, with the frame it holds: a duplicate file has a row here but not in frames.
CREATE TABLE IF NOT EXISTS uris (
    uri      TEXT PRIMARY KEY,
    frame_id TEXT NOT NULL REFERENCES frames(frame_id)
);
-- Videos whose ingestion completed with this sampling, so a re-ingest need not decode them again.
CREATE TABLE IF NOT EXISTS sources (
    uri     TEXT PRIMARY KEY,
    size    INTEGER NOT NULL,
    every_n INTEGER NOT NULL,
    fps     REAL,
    frames  INTEGER NOT NULL
);
"""
FRAME_COLUMNS = "frame_id, uri, image_uri, source, frame_index, time_s, width, height"


@dataclass(frozen=True)
class Frame:
    frame_id: str  # sha256 hex of the image file's bytes, or of a video frame's RGB pixels + shape
    uri: str  # the image file, or "<video uri>#frame=<index>"
    image_uri: str  # where the pixels are: the image file itself, or the stored JPEG of a video frame
    source: str  # what was ingested: the folder, S3 prefix, video or image file
    frame_index: int | None  # 0-based decoded frame index (videos only)
    time_s: float | None  # frame_index / the video's fps (videos only)
    width: int
    height: int


@dataclass
class IngestResult:
    source: str
    added: int = 0
    skipped: int = 0  # already in the manifest
    errors: list[tuple[str, str]] = field(default_factory=list)  # (uri, message) of each bad input


class FrameNotFoundError(ObjretError, KeyError):
    """No frame with this id in the lake."""

    __str__ = Exception.__str__  # KeyError would quote the message


def _image_frame(uri: str, source: str, endpoint_url: str | None, max_pixels: int = MAX_PIXELS,
                 min_side: int = MIN_SIDE) -> Frame:
    data = storage.read_bytes(uri, endpoint_url)
    image = decode_image(uri, data, max_pixels, min_side)
    width, height = image.size
    return Frame(hashlib.sha256(data).hexdigest(), uri, uri, source, None, None, width, height)


def _pixels_id(rgb: np.ndarray) -> str:
    digest = hashlib.sha256(np.ascontiguousarray(rgb).tobytes())
    digest.update("x".join(map(str, rgb.shape)).encode())  # same bytes, other shape: other frame
    return digest.hexdigest()


def _video_sampler(every_n: int, fps: float | None, video_fps: float):
    """keep(index) for decoded frame indices: every Nth, or the first frame at or after each 1/fps tick."""
    if fps is None:
        return lambda index: index % every_n == 0

    def tick(index: int) -> int:
        return math.floor(index * fps / video_fps + 1e-6)

    return lambda index: index == 0 or tick(index) > tick(index - 1)


class Lake:
    def __init__(self, root: str | Path):
        self.root = Path(os.path.abspath(Path(root).expanduser()))
        self.frames_dir = self.root / "frames"
        self.manifest_path = self.root / "manifest.sqlite"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with self._connect() as conn:
                conn.execute("PRAGMA journal_mode=WAL")  # readers never block the ingesting writer
                conn.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the lake manifest {self.manifest_path}: {exc}") from exc

    @contextlib.contextmanager
    def _connect(self):
        # One connection per call: a Lake can be shared between threads (Prefect task runners).
        conn = sqlite3.connect(self.manifest_path, timeout=60)
        try:
            conn.execute("PRAGMA synchronous=NORMAL")  # with WAL: durable against a killed process
            yield conn
        finally:
            conn.close()

    # ---- reading ------------------------------------------------------------------------------------

    def __len__(self) -> int:
        with self._connect() as conn:
            return conn.execute("SELECT COUNT(*) FROM frames").fetchone()[0]

    def frames(self) -> list[Frame]:
        with self._connect() as conn:
            return [Frame(*row) for row in conn.execute(f"SELECT {FRAME_COLUMNS} FROM frames ORDER BY seq")]

    def get(self, frame_id: str) -> Frame:
        with self._connect() as conn:
            row = conn.execute(f"SELECT {FRAME_COLUMNS} FROM frames WHERE frame_id = ?", (frame_id,)).fetchone()
        if row is None:
            raise FrameNotFoundError(f"no frame {frame_id!r} in the lake at {self.root}")
        return Frame(*row)

    def present(self, frame_ids: Sequence[str], chunk: int = 500) -> list[str]:
        """Those of ``frame_ids`` still in the lake, in their order; asked of the manifest a chunk at a time, so
        checking a million ids never holds a million-entry set."""
        out: list[str] = []
        with self._connect() as conn:
            for start in range(0, len(frame_ids), chunk):
                part = frame_ids[start:start + chunk]
                found = {row[0] for row in conn.execute(
                    f"SELECT frame_id FROM frames WHERE frame_id IN ({','.join('?' * len(part))})", list(part))}
                out += [f for f in part if f in found]
        return out

    def find(self, uri: str, frame_index: int | None = None) -> Frame | None:
        """The frame at ``uri`` (with ``frame_index``: that frame of the video ``uri``). A relative name
        such as "images/000001.jpg" or "vtest.avi" matches the URI that ends with "/" + it; a name that
        matches several frames raises ObjretError rather than picking one. A file ingested after an
        identical one resolves to that first frame (same content, same id)."""
        wanted = f"{uri}#frame={frame_index}" if frame_index is not None else str(uri)
        suffix = "/" + wanted
        with self._connect() as conn:
            row = conn.execute("SELECT frame_id FROM uris WHERE uri = ?", (wanted,)).fetchone()
            rows = [row] if row else conn.execute(
                "SELECT frame_id FROM uris WHERE substr(uri, -?) = ? ORDER BY uri", (len(suffix), suffix)
            ).fetchall()
        frame_ids = sorted({r[0] for r in rows})
        if len(frame_ids) > 1:
            raise ObjretError(f"{wanted!r} is ambiguous in the lake: it names {len(frame_ids)} frames")
        return self.get(frame_ids[0]) if frame_ids else None

    def sources(self) -> list[str]:
        """Every source frames were ingested from (folders, videos, image files, S3 prefixes)."""
        with self._connect() as conn:
            return [source for (source,) in conn.execute("SELECT DISTINCT source FROM frames ORDER BY source")]

    def version(self) -> str:
        """A short hash of the ordered frame ids: it changes whenever frames are added."""
        digest = hashlib.sha256()
        with self._connect() as conn:
            for (frame_id,) in conn.execute("SELECT frame_id FROM frames ORDER BY seq"):
                digest.update(frame_id.encode() + b"\n")
        return digest.hexdigest()[:12]

    # ---- ingestion ----------------------------------------------------------------------------------

    def record(self, frames: list[Frame]) -> IngestResult:
        """Add frames whose pixels are stored already (a lake generated from another, a manifest moved), in
        committed batches; a frame already in the lake is skipped."""
        result = IngestResult("record")
        with self._connect() as conn:
            batch = _Batch(conn, result)
            for frame in frames:
                batch.add(frame)
            batch.commit()
        return result

    def ingest(self, source: str, *, every_n: int, fps: float | None = None,
               endpoint_url: str | None = None, progress: bool = True, max_pixels: int = MAX_PIXELS,
               min_side: int = MIN_SIDE) -> IngestResult:
        """Add the frames of ``source`` (folder, video file, image file or s3:// prefix) that the lake
        does not hold yet. Bad files are reported in ``errors`` and skipped: images that do not decode, hold
        more than ``max_pixels`` or have a side under ``min_side`` pixels, videos that do not open (a video cut
        short keeps the frames before the cut)."""
        limits = (int(max_pixels), int(min_side))
        if every_n < 1:
            raise ObjretError(f"every_n must be at least 1, got {every_n}")
        if fps is not None and not fps > 0:
            raise ObjretError(f"fps must be positive, got {fps}")
        source = str(source)
        if storage.is_s3(source):
            return self._ingest_s3(source, endpoint_url, progress, limits)
        path = Path(source).expanduser()
        if not path.exists():
            raise StoreError(f"lake source not found: {source}")
        source = os.path.abspath(path)
        if path.is_dir():
            return self._ingest_folder(source, every_n, fps, progress, limits)
        if is_video(source):
            return self._ingest_video(source, every_n, fps, progress)
        if is_image(source):
            return self._ingest_images(source, [source], None, progress, limits)
        raise ObjretError(f"{source}: not a folder, an image ({', '.join(sorted(IMAGE_EXTENSIONS))}) "
                          f"or a video ({', '.join(sorted(VIDEO_EXTENSIONS))})")

    def _ingest_folder(self, folder: str, every_n: int, fps: float | None, progress: bool,
                       limits: tuple[int, int]) -> IngestResult:
        """The folder's images, then each of its videos as a video source (its frames' source is the video)."""
        own = str(self.root) + os.sep  # a lake inside the folder must not ingest its own stored frames
        uris = [uri for uri in storage.list_uris(folder) if not uri.startswith(own)]
        result = self._ingest_images(folder, [uri for uri in uris if is_image(uri)], None, progress, limits)
        for video in (uri for uri in uris if is_video(uri)):
            part = self._ingest_video(video, every_n, fps, progress)
            result.added += part.added
            result.skipped += part.skipped
            result.errors += part.errors
        return result

    def _ingest_s3(self, source: str, endpoint_url: str | None, progress: bool,
                   limits: tuple[int, int]) -> IngestResult:
        if is_image(source):
            return self._ingest_images(source, [source], endpoint_url, progress, limits)
        if is_video(source):
            return IngestResult(source, errors=[(source, _S3_VIDEO_ERROR.format(uri=source))])
        source = source.rstrip("/")
        uris = storage.list_uris(source, endpoint_url)
        if not uris:
            raise StoreError(f"lake source not found: nothing under {source}")
        videos = [uri for uri in uris if is_video(uri)]
        result = self._ingest_images(source, [uri for uri in uris if is_image(uri)], endpoint_url, progress, limits)
        result.errors += [(uri, _S3_VIDEO_ERROR.format(uri=uri)) for uri in videos]
        return result

    def _ingest_images(self, source: str, uris: list[str], endpoint_url: str | None, progress: bool,
                       limits: tuple[int, int] = (MAX_PIXELS, MIN_SIDE)) -> IngestResult:
        result = IngestResult(source)
        with self._connect() as conn:
            batch = _Batch(conn, result)
            for uri in tqdm(uris, desc=f"ingest {source}", unit="file", disable=not progress):
                if batch.has_uri(uri):
                    result.skipped += 1
                    continue
                try:
                    batch.add(_image_frame(uri, source, endpoint_url, *limits))
                except BadFrameError as exc:
                    result.errors.append((uri, str(exc)))
                except StoreError:
                    batch.commit()   # the store failed: keep the frames read so far, the next ingest goes on
                    raise
            batch.commit()
        return result

    def _ingest_video(self, uri: str, every_n: int, fps: float | None, progress: bool) -> IngestResult:
        result = IngestResult(uri)
        size = os.path.getsize(uri)
        with self._connect() as conn:
            done = conn.execute(
                "SELECT frames FROM sources WHERE uri = ? AND size = ? AND every_n = ? AND fps IS ?",
                (uri, size, every_n, fps),
            ).fetchone()
            if done:
                result.skipped = done[0]
                return result
            capture = cv2.VideoCapture(uri)
            try:
                self._decode_video(capture, conn, result, every_n, fps, progress)
            except BadFrameError as exc:
                result.errors.append((uri, str(exc)))
                return result
            finally:
                capture.release()
            with conn:  # complete: a re-ingest with the same sampling skips this video
                conn.execute("INSERT OR REPLACE INTO sources VALUES (?, ?, ?, ?, ?)",
                             (uri, size, every_n, fps, result.added + result.skipped))
        return result

    def _decode_video(self, capture, conn, result: IngestResult, every_n: int, fps: float | None,
                      progress: bool) -> None:
        """Decode every frame and store the sampled ones; BadFrameError (after committing the good
        frames) if the video does not open or ends before the frame count its header gives.

        A kept frame is stored only once the next frame has decoded (or the video ended whole): the last
        frame before a truncation may be cut off mid-frame."""
        uri = result.source
        if not capture.isOpened():
            raise BadFrameError(f"{uri}: cannot open video")
        video_fps = capture.get(cv2.CAP_PROP_FPS)
        expected = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))  # <= 0 when the container does not say
        if fps is not None and not video_fps > 0:
            raise BadFrameError(f"{uri}: the video has no frame rate, sample it with every_n instead of fps")
        keep = _video_sampler(every_n, fps, video_fps)
        batch = _Batch(conn, result)
        pending = None
        decoded = 0
        with tqdm(total=expected if expected > 0 else None, desc=f"ingest {uri}", unit="frame",
                  disable=not progress) as bar:
            while capture.grab():  # grab decodes; retrieve only converts, so skipped frames cost less
                if pending is not None:
                    batch.add(self._store_video_frame(*pending))
                    pending = None
                index = decoded
                decoded += 1
                bar.update()
                if not keep(index):
                    continue
                frame_uri = f"{uri}#frame={index}"
                if batch.has_uri(frame_uri):
                    result.skipped += 1
                    continue
                ok, bgr = capture.retrieve()
                if not ok:
                    decoded -= 1
                    break
                time_s = index / video_fps if video_fps > 0 else None
                pending = (bgr, frame_uri, uri, index, time_s)
        truncated = 0 < expected and decoded < expected
        if pending is not None and not truncated:
            batch.add(self._store_video_frame(*pending))
        batch.commit()
        if decoded == 0:
            raise BadFrameError(f"{uri}: cannot open video: no frame decodes")
        if truncated:
            raise BadFrameError(f"{uri}: truncated video, decoding stopped after {decoded} of {expected} "
                                f"frames (the last decoded frame is dropped as possibly incomplete)")

    def _store_video_frame(self, bgr: np.ndarray, frame_uri: str, video_uri: str, index: int,
                           time_s: float | None) -> Frame:
        frame_id = _pixels_id(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
        image_uri = str(self.frames_dir / f"{frame_id}.jpg")
        if not os.path.exists(image_uri):  # identical pixels are stored once
            ok, jpeg = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
            if not ok:
                raise BadFrameError(f"{frame_uri}: cannot encode the frame as JPEG")
            storage.write_bytes(image_uri, jpeg.tobytes())
        height, width = bgr.shape[:2]
        return Frame(frame_id, frame_uri, image_uri, video_uri, index, time_s, width, height)


class _Batch:
    """Frames waiting to be committed to the manifest in one transaction."""

    def __init__(self, conn: sqlite3.Connection, result: IngestResult):
        self.conn = conn
        self.result = result
        self.frames: list[Frame] = []

    def has_uri(self, uri: str) -> bool:
        return self.conn.execute("SELECT 1 FROM uris WHERE uri = ?", (uri,)).fetchone() is not None

    def add(self, frame: Frame) -> None:
        self.frames.append(frame)
        if len(self.frames) >= BATCH_SIZE:
            self.commit()

    def commit(self) -> None:
        with self.conn:  # one transaction: all of the batch or none of it
            for frame in self.frames:
                inserted = self.conn.execute(
                    f"INSERT OR IGNORE INTO frames (seq, {FRAME_COLUMNS}) VALUES "
                    "((SELECT COALESCE(MAX(seq), 0) + 1 FROM frames), ?, ?, ?, ?, ?, ?, ?, ?)",
                    (frame.frame_id, frame.uri, frame.image_uri, frame.source, frame.frame_index,
                     frame.time_s, frame.width, frame.height),
                ).rowcount
                # Same content under another URI: remember the URI, count the frame as already present.
                self.conn.execute("INSERT OR IGNORE INTO uris VALUES (?, ?)", (frame.uri, frame.frame_id))
                if inserted:
                    self.result.added += 1
                else:
                    self.result.skipped += 1
        self.frames = []
