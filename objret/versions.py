"""Versioned artifact folders: one folder per save, a CURRENT pointer switched last.

A version is written into a temporary folder with a manifest (written last, with every file's size and sha256),
renamed whole, and only then named by CURRENT (one os.replace): a reader, or a crash, sees the previous version
or the new one, never a half-written one. Older versions are removed after the switch. The files are fsynced
before the rename, so that a power cut cannot leave a named version with empty files; the temporary folders of
writers killed on this host are removed by the next save. A write that fails (a full disk) leaves the previous
version current and raises StoreError naming the folder.

A reader checks every file's size and sha256 against the manifest, so a truncated or altered file is named,
never used. Hashing runs at ~1.8 GB/s here; so that a memory-mapped index of a big lake is not read whole by
every mining process, the files' identity (inode, size, mtime, ctime) is remembered after a successful check in
a hidden ``.verified-<version>.json`` beside CURRENT, and the hashes are checked again whenever it changes
(any write to a file changes its ctime, which no user call can set back).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from objret import storage
from objret.errors import ObjretError, StoreError


def current_version(directory: str | Path) -> str | None:
    """The name of the current version folder of ``directory``, None when nothing was saved."""
    try:
        return (Path(directory) / "CURRENT").read_text().strip() or None
    except FileNotFoundError:
        return None


def save_version(directory: str | Path, prefix: str, write: Callable[[Path], None], manifest: dict) -> Path:
    """``write(folder)`` fills a new version, the manifest goes in last with the files' sizes and sha256; returns
    it. StoreError naming ``directory`` when it cannot be written (the current version stays as it was)."""
    directory = Path(directory)
    tmp = version = None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        storage.remove_stale_temps(directory)   # versions that killed saves left half-written
        tmp = directory / f"{storage.temp_prefix(prefix)}{time.time_ns()}.tmp"
        tmp.mkdir()
        write(tmp)
        files = {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in sorted(tmp.iterdir())}
        (tmp / "manifest.json").write_text(json.dumps({**manifest, "files": files}, indent=1))
        _fsync_folder(tmp)
        version = directory / f"{prefix}-{time.time_ns():020d}-{os.getpid()}"
        os.rename(tmp, version)
        storage.write_bytes(str(directory / "CURRENT"), version.name.encode())   # the switch: temp + rename
    except BaseException as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            if version is not None and current_version(directory) != version.name:
                shutil.rmtree(version, ignore_errors=True)
        if isinstance(exc, (OSError, RuntimeError)):   # RuntimeError: how faiss's writers report a failed fwrite
            raise StoreError(f"cannot write a new version in {directory} ({_reason(exc)}); the current version "
                             f"({current_version(directory)}) is unchanged") from exc
        raise
    current = current_version(directory)
    for old in directory.glob(f"{prefix}-*"):   # never the one CURRENT names, should another writer have won
        if old.name < version.name and old.name != current:
            shutil.rmtree(old, ignore_errors=True)
    _remember_verified(directory, version)
    return version


def _reason(exc: Exception) -> str:
    """Why a write failed, with the file's name (its folder is a temporary one, gone by now)."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {Path(exc.filename).name}" if exc.filename else exc.strerror
    # faiss: "Error in ... 'ret == (size * 4)' failed: write error in <file>: 65491 != 2572800 (<strerror>)"
    found = re.search(r"write error in (\S+): .*\(([^()]+)\)\s*$", str(exc))
    if found:
        return f"{found[2]}: {Path(found[1]).name}"
    return str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _identity(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _stamp_path(version: Path) -> Path:
    return version.parent / f".verified-{version.name}.json"


def _remember_verified(directory: Path, version: Path) -> None:
    """Note the files of ``version`` as checked (best effort: a reader without write access checks each time)."""
    for old in directory.glob(".verified-*.json"):
        if not (directory / old.name[len(".verified-"):-len(".json")]).is_dir():
            old.unlink(missing_ok=True)
    try:
        stamp = {p.name: _identity(p) for p in sorted(version.iterdir())}
        storage.write_bytes(str(_stamp_path(version)), json.dumps(stamp).encode())
    except (OSError, StoreError):
        pass


def verify_files(version: Path, files: dict) -> None:
    """Raise ObjretError naming the first file of ``version`` that differs from the manifest's ``files``
    (``{name: {"bytes", "sha256"}}``; manifests written before checksums carry sizes only)."""
    try:
        stamp = json.loads(_stamp_path(version).read_text())
    except (OSError, ValueError):
        stamp = {}
    unchecked = False
    for name, expected in files.items():
        path = version / name
        size = expected["bytes"] if isinstance(expected, dict) else expected
        actual = path.stat().st_size
        if actual != size:
            raise ObjretError(f"{path} has {actual} bytes, the manifest says {size} (truncated or altered)")
        if isinstance(expected, dict) and stamp.get(name) != _identity(path):
            if file_sha256(path) != expected["sha256"]:
                raise ObjretError(f"{path} does not match its sha256 in the manifest (altered or damaged)")
            unchecked = True
    if unchecked:
        _remember_verified(version.parent, version)


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
        verify_files(version, manifest["files"])
    except (OSError, ValueError, KeyError, ObjretError) as exc:
        raise ObjretError(f"{what} in {version} is unusable ({exc}): run build-index again") from exc
    return version, manifest
