"""Versioned artifact folders: one folder per save, a CURRENT pointer switched last.

A version is written into a temporary folder with a manifest (written last, with every file's size), renamed
whole, and only then named by CURRENT (one os.replace): a reader, or a crash, sees the previous version or the
new one, never a half-written one. Older versions are removed after the switch. The files are fsynced before
the rename, so that a power cut cannot leave a named version with empty files; the temporary folders of
writers killed on this host are removed by the next save.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from objret import storage
from objret.errors import ObjretError


def current_version(directory: str | Path) -> str | None:
    """The name of the current version folder of ``directory``, None when nothing was saved."""
    try:
        return (Path(directory) / "CURRENT").read_text().strip() or None
    except FileNotFoundError:
        return None


def save_version(directory: str | Path, prefix: str, write: Callable[[Path], None], manifest: dict) -> Path:
    """``write(folder)`` fills a new version, the manifest goes in last with the files' sizes; returns it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    storage.remove_stale_temps(directory)   # versions that killed saves left half-written
    tmp = directory / f"{storage.temp_prefix(prefix)}{time.time_ns()}.tmp"
    tmp.mkdir()
    try:
        write(tmp)
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        (tmp / "manifest.json").write_text(json.dumps({**manifest, "files": files}, indent=1))
        _fsync_folder(tmp)
        version = directory / f"{prefix}-{time.time_ns():020d}-{os.getpid()}"
        os.rename(tmp, version)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    storage.write_bytes(str(directory / "CURRENT"), version.name.encode())   # the switch: temp + rename
    current = current_version(directory)
    for old in directory.glob(f"{prefix}-*"):   # never the one CURRENT names, should another writer have won
        if old.name < version.name and old.name != current:
            shutil.rmtree(old, ignore_errors=True)
    return version


def _fsync_folder(folder: Path) -> None:
    for path in folder.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def load_manifest(directory: str | Path, what: str, fmt: int) -> tuple[Path, dict] | None:
    """The current version folder and its checked manifest (format, file sizes); None when none was saved;
    ObjretError naming ``what`` when it is damaged."""
    directory = Path(directory)
    name = current_version(directory)
    if name is None:
        return None
    version = directory / name
    try:
        manifest = json.loads((version / "manifest.json").read_text())
        if manifest.get("format") != fmt:
            raise ObjretError(f"format {manifest.get('format')!r}, expected {fmt}")
        for file, size in manifest["files"].items():
            actual = (version / file).stat().st_size
            if actual != size:
                raise ObjretError(f"{file} has {actual} bytes, the manifest says {size}")
    except (OSError, ValueError, KeyError, ObjretError) as exc:
        raise ObjretError(f"{what} in {version} is unusable ({exc}): run build-index again") from exc
    return version, manifest
