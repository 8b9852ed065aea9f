"""Where a failure report can make objret read: nowhere outside its configured roots.

A report names its frame by lake frame id, or by a URI. A URI the lake manifest knows resolves to that frame (its
pixels are read where the lake keeps them). Any other URI is read only when it lies under a root: a configured lake
source (``lake.sources``), a source the lake was ingested from, or the work folder. Anything else is refused with a
ReportError naming the field, before a byte is read.

Local paths are compared after resolving symlinks and '..', so a link inside a source that points out of it leads
nowhere, and the resolved path is what gets read. S3 URIs are compared by whole key segments: s3://b/cams holds
s3://b/cams/x.jpg but not s3://b/cams2/x.jpg. report_id, the only report field that names files objret writes
(run folders, ledger entries, review pages), is a plain file name by the schema.
"""

from __future__ import annotations

import os

from objret import storage
from objret.errors import ObjretError, ReportError
from objret.ingest.lake import Frame, FrameNotFoundError, Lake


def _real(path: str) -> str:
    return os.path.realpath(path)


def resolve_under(uri: str, roots: list[str]) -> str | None:
    """``uri`` as it is to be read (a local path with symlinks and '..' resolved) when it lies under one of
    ``roots``; None when it does not."""
    uri = str(uri)
    if storage.is_s3(uri):
        if {".", ".."} & set(uri[len("s3://"):].split("/")):
            return None  # some S3 servers normalise these away: no key may use them to climb out of a prefix
        for root in roots:
            root = str(root).rstrip("/")
            if root == "s3:":
                continue  # "s3://" is no prefix of anything
            if storage.is_s3(root) and (uri == root or uri.startswith(root + "/")):
                return uri
        return None
    if "\0" in uri:
        return None
    path = _real(uri)
    for root in roots:
        if not root or storage.is_s3(str(root)):
            continue
        base = _real(os.path.expanduser(str(root)))  # as Lake.ingest reads a source
        if path == base or path.startswith(base.rstrip(os.sep) + os.sep):
            return path
    return None


def workspace_roots(ws) -> list[str]:
    """A Workspace's roots: the work folder, the configured lake sources and every source the lake was ingested
    from (the CLI may ingest sources that params.yaml does not list)."""
    configured = ws.params.lake.sources
    return [str(ws.root), *(str(source) for source in configured), *ws.lake.sources()]


def resolve_report_frame(lake: Lake, report, roots: list[str]) -> tuple[Frame | None, str]:
    """The report's frame: (lake frame, its id or URI) when the lake knows it, else (None, the URI to read) for an
    image under one of ``roots``. ReportError naming frame.frame_id or frame.uri otherwise."""
    if report.frame_id:
        try:
            return lake.get(report.frame_id), report.frame_id
        except FrameNotFoundError:
            raise ReportError([f"frame.frame_id: no frame {report.frame_id} in the lake"]) from None
    try:
        frame = lake.find(report.frame_uri, report.frame_index)
    except ObjretError as exc:  # a relative name that matches several frames
        raise ReportError([f"frame.uri: {exc}"]) from exc
    if frame is not None:
        return frame, frame.uri
    if report.frame_index is not None:
        raise ReportError([f"frame.uri: {report.frame_uri!r} frame {report.frame_index} is not in the lake"])
    readable = resolve_under(report.frame_uri, roots)
    if readable is None:
        raise ReportError([f"frame.uri: {report.frame_uri!r} is not in the lake and lies outside the lake sources "
                           "and the work folder"])
    return None, readable
