"""A lake's frames by id, each read from its manifest when looked up (objret.ingest.lake)."""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator, Mapping

from objret.errors import StoreError
from objret.ingest.lake import FRAME_COLUMNS, Frame, FrameNotFoundError, Lake


class FrameTable(Mapping[str, Frame]):
    """A lake's frames by id, each read from the manifest when looked up. A mining process looks up the few
    hundred frames a report re-ranks and outputs; a dict of every Frame would hold ~0.5 kB a frame (0.5 GB at
    1M frames). One read connection per thread and process, opened on first use (a connection must not cross a
    fork or be shared between threads)."""

    def __init__(self, lake: Lake):
        self.lake = lake
        self._local = threading.local()

    def __reduce__(self):   # pickled (a Dask worker's copy) without its connections
        return FrameTable, (self.lake,)

    def _conn(self) -> sqlite3.Connection:
        held = getattr(self._local, "held", None)
        if held is None or held[0] != os.getpid():
            try:
                held = (os.getpid(), sqlite3.connect(self.lake.manifest_path, timeout=60))
            except sqlite3.Error as exc:
                raise StoreError(f"cannot open the lake manifest {self.lake.manifest_path}: {exc}") from exc
            self._local.held = held
        return held[1]

    def __getitem__(self, frame_id: str) -> Frame:
        row = self._conn().execute(f"SELECT {FRAME_COLUMNS} FROM frames WHERE frame_id = ?", (frame_id,)).fetchone()
        if row is None:
            raise FrameNotFoundError(f"no frame {frame_id!r} in the lake at {self.lake.root}")
        return Frame(*row)

    def __contains__(self, frame_id: object) -> bool:
        if not isinstance(frame_id, str):
            return False
        return self._conn().execute("SELECT 1 FROM frames WHERE frame_id = ?", (frame_id,)).fetchone() is not None

    def __iter__(self) -> Iterator[str]:
        return (row[0] for row in self._conn().execute("SELECT frame_id FROM frames ORDER BY seq").fetchall())

    def __len__(self) -> int:
        return self._conn().execute("SELECT COUNT(*) FROM frames").fetchone()[0]
