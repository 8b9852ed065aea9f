"""Ingest step: lake sources (folders, videos, s3:// prefixes) -> new frames in the work folder's lake manifest."""

from __future__ import annotations

from objret.errors import ObjretError
from objret.ingest.lake import MAX_PIXELS, MIN_SIDE, IngestResult
from objret.steps.workspace import Workspace


def ingest(ws: Workspace, sources: list[str], progress: bool = True) -> list[IngestResult]:
    lake_params = ws.params.section("lake")
    if not sources:
        raise ObjretError("no lake sources: name a folder, a video file or an s3:// prefix (lake.sources)")
    return [ws.lake.ingest(src, every_n=int(lake_params.get("video_every_n") or 1), fps=lake_params.get("video_fps"),
                           endpoint_url=ws.s3_endpoint_url, progress=progress,
                           max_pixels=int(lake_params.get("max_pixels") or MAX_PIXELS),
                           min_side=int(lake_params.get("min_side") or MIN_SIDE)) for src in sources]
