"""Ingest step: lake sources (folders, videos, s3:// prefixes) -> new frames in the work folder's lake manifest."""

from __future__ import annotations

from objret.errors import ObjretError
from objret.ingest.lake import IngestResult
from objret.steps.workspace import Workspace


def ingest(ws: Workspace, sources: list[str], progress: bool = True) -> list[IngestResult]:
    lp = ws.params.lake
    if not sources:
        raise ObjretError("no lake sources: name a folder, a video file or an s3:// prefix (lake.sources)")
    return [ws.lake.ingest(src, every_n=lp.video_every_n, fps=lp.video_fps, endpoint_url=ws.s3_endpoint_url,
                           progress=progress, max_pixels=lp.max_pixels, min_side=lp.min_side) for src in sources]
