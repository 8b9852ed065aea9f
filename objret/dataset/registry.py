"""Versions of the retraining dataset, kept by DVC.

The registry is a DVC repository (no git needed) whose working copy holds the dataset folder::

    <registry>/.dvc/                 DVC's config and cache (every version's files, deduplicated)
    <registry>/retraining/           the dataset: annotations.json + images/ (objret.dataset.coco writes it)
    <registry>/retraining.dvc        the current version: its md5 is DVC's hash of the whole folder
    <registry>/versions/NNNNNN-<md5>.dvc   every version's .dvc file, in order
    <registry>/versions.jsonl        one line per version: number, md5, when, what push made it

Each push that changed the dataset is ``dvc add``-ed: a new version. ``dvc push`` sends its files to the
registry's remote (an S3 prefix, say) when one is set; ``checkout(md5)`` brings any version back (from the
cache, or pulled from the remote). One lock serialises writers: pushes from concurrent mining runs take turns.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
from dataclasses import dataclass
from pathlib import Path

import yaml
from filelock import FileLock

from objret import storage
from objret.errors import ObjretError, StoreError

DATASET_NAME = "retraining"
REMOTE_NAME = "objret"
MD5_PREFIX_MIN = 6   # shorter references are version numbers only


@dataclass
class DatasetVersion:
    number: int       # 1, 2, ... in the order they were made
    md5: str          # DVC's directory hash (without ".dir"): what `dvc` and the MLflow tag name
    dvc_file: str     # this version's .dvc file (copy it to <registry>/retraining.dvc and `dvc checkout`)
    pushed: bool      # sent to the DVC remote


class DatasetRegistry:
    def __init__(self, root: str | Path, remote: str | None = None, endpoint_url: str | None = None):
        self.root = Path(root).resolve()
        self.remote = remote
        self.endpoint_url = endpoint_url

    @property
    def dataset_dir(self) -> Path:
        return self.root / DATASET_NAME

    @property
    def versions_dir(self) -> Path:
        return self.root / "versions"

    def lock(self) -> FileLock:
        """Held by whoever changes the dataset folder or its versions (a push, a checkout)."""
        self.root.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.root / ".registry.lock"), timeout=600)

    @contextlib.contextmanager
    def _repo(self):
        from dvc.repo import Repo

        if not (self.root / ".dvc").is_dir():
            # The versions' .dvc files are records, not stages: DVC would see overlapping outputs. Written
            # before the init (which keeps it), so that a run killed in between still gets it next time.
            storage.write_bytes(str(self.root / ".dvcignore"), b"/versions/\n")
            Repo.init(str(self.root), no_scm=True).close()
        repo = Repo(str(self.root))
        try:
            if self.remote:
                with repo.config.edit() as config:
                    remote = {"url": self.remote}
                    if self.endpoint_url:
                        remote["endpointurl"] = self.endpoint_url
                    config["remote"][REMOTE_NAME] = remote   # credentials: the AWS chain, never the config
                    config["core"]["remote"] = REMOTE_NAME
            yield repo
        finally:
            repo.close()

    def versions(self) -> list[dict]:
        path = self.root / "versions.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def current_md5(self) -> str | None:
        dvc_file = self.root / f"{DATASET_NAME}.dvc"
        if not dvc_file.exists():
            return None
        return _md5_of(dvc_file)

    def commit(self, info: dict) -> DatasetVersion:
        """Record the dataset folder as it is now (call with ``lock()`` held, after the push wrote it)."""
        if not (self.dataset_dir / "annotations.json").is_file():
            raise ObjretError(f"no dataset to version in {self.dataset_dir}")
        for folder in (self.dataset_dir, self.dataset_dir / "images"):   # a killed push's temp files: not data
            storage.remove_stale_temps(folder)
        with self._repo() as repo:
            md5 = self._add(repo)
            known = {v["md5"]: v for v in self.versions()}
            if md5 in known:   # the same content as a version made before (e.g. a re-run): not a new one
                entry = known[md5]
            else:
                number = len(known) + 1
                self.versions_dir.mkdir(exist_ok=True)
                dvc_file = self.versions_dir / f"{number:06d}-{md5}.dvc"
                storage.write_bytes(str(dvc_file), (self.root / f"{DATASET_NAME}.dvc").read_bytes())
                entry = {"number": number, "md5": md5, "dvc_file": str(dvc_file.relative_to(self.root)),
                         "at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **info}
                # After the .dvc file exists; the whole log rewritten atomically, never a cut-off last line.
                log = self.root / "versions.jsonl"
                before = log.read_bytes() if log.exists() else b""
                storage.write_bytes(str(log), before + (json.dumps(entry, sort_keys=True) + "\n").encode())
            pushed = self._push_pending(repo) if self.remote else False
        return DatasetVersion(int(entry["number"]), md5, str(self.root / entry["dvc_file"]), pushed)

    def _add(self, repo) -> str:
        """``dvc add`` the dataset folder; its md5. DVC logs a file it failed to copy into its cache (a full disk)
        and goes on to write the .dvc file anyway: that is checked here, and the previous .dvc file put back, so
        that the current version never names objects the cache lacks."""
        dvc_file = self.root / f"{DATASET_NAME}.dvc"
        before = dvc_file.read_bytes() if dvc_file.exists() else None
        try:
            repo.add(str(self.dataset_dir))
            md5 = _md5_of(dvc_file)
            cache = repo.cache.local
            entries = json.loads(Path(cache.oid_to_path(f"{md5}.dir")).read_text())
            missing = [e["relpath"] for e in entries if not os.path.exists(cache.oid_to_path(e["md5"]))]
            if missing:
                raise StoreError(f"DVC could not copy {len(missing)} file(s) of {self.dataset_dir} (first: "
                                 f"{missing[0]}) into its cache {cache.path}, see its error above; the last "
                                 "version stays current")
            return md5
        except BaseException as exc:
            try:
                _put_back(dvc_file, before)
            except (OSError, StoreError) as restore:   # the next commit writes it again in any case
                exc.add_note(f"{dvc_file} could not be put back ({restore})")
            if isinstance(exc, OSError):
                raise StoreError(f"cannot version {self.dataset_dir}: {exc}; the last version stays current") from exc
            raise

    def _push_pending(self, repo) -> bool:
        """Send every version the remote lacks (those made while it was unreachable too), oldest first."""
        record = self.root / "pushed.json"
        pushed = set(json.loads(record.read_text())) if record.exists() else set()
        for version in self.versions():
            if version["md5"] in pushed:
                continue
            # A .dvc file names the objects to send; they come from the cache, whatever the folder holds.
            with self._named_current(version) as current:
                try:
                    repo.push(targets=[current], remote=REMOTE_NAME)
                except Exception as exc:   # dvc wraps the store's errors in its own types
                    raise StoreError(f"dataset version {version['md5']} is saved locally in {self.root} but could "
                                     f"not be sent to the DVC remote {self.remote} (the next push sends it): "
                                     f"{type(exc).__name__}: {exc}") from exc
            pushed.add(version["md5"])
            storage.write_bytes(str(record), json.dumps(sorted(pushed)).encode())
        return True

    @contextlib.contextmanager
    def _named_current(self, version: dict):
        """retraining.dvc names ``version`` for the duration (DVC's push and fetch take .dvc files as targets;
        the versions' own files are dvcignored records), then is put back as it was."""
        current = self.root / f"{DATASET_NAME}.dvc"
        current_bytes = current.read_bytes()
        try:
            storage.write_bytes(str(current), (self.root / version["dvc_file"]).read_bytes())   # atomic
            yield str(current)
        finally:
            storage.write_bytes(str(current), current_bytes)

    def find_version(self, ref: str | None = None) -> dict:
        """A version by number ("3") or md5 prefix (at least MD5_PREFIX_MIN characters, so that a version number
        that does not exist is never taken for the start of some md5); the current one when ``ref`` is None."""
        versions = self.versions()
        if ref is None:
            ref = self.current_md5()
            if ref is None:
                raise ObjretError(f"the dataset registry at {self.root} has no version yet: mine a report first")
        match = [v for v in versions if str(v["number"]) == ref] or \
            [v for v in versions if len(ref) >= MD5_PREFIX_MIN and v["md5"].startswith(ref)]
        if len(match) != 1:
            raise ObjretError(f"{'no' if not match else 'more than one'} dataset version matches {ref!r} in "
                              f"{self.root} (objret dataset versions lists them)")
        return match[0]

    def version_files(self, version: dict) -> dict[str, Path]:
        """Every file of ``version`` (path in the dataset folder -> its file in the DVC cache), read in place: the
        working copy is left alone. Objects the cache lacks are fetched from the remote first."""
        with self._repo() as repo:
            cache = repo.cache.local

            def manifest() -> list[dict] | None:
                path = Path(cache.oid_to_path(version["md5"] + ".dir"))
                return json.loads(path.read_text()) if path.is_file() else None

            entries = manifest()
            if entries is None or not all(Path(cache.oid_to_path(e["md5"])).is_file() for e in entries):
                if not self.remote:
                    raise ObjretError(f"dataset version {version['number']} ({version['md5']}) is not in the DVC "
                                      f"cache of {self.root} and no DVC remote is set (dataset.dvc_remote)")
                with self.lock(), self._named_current(version) as current:
                    try:
                        repo.fetch(targets=[current], remote=REMOTE_NAME)
                    except Exception as exc:   # dvc wraps the store's errors in its own types
                        raise StoreError(f"cannot fetch dataset version {version['md5']} from the DVC remote "
                                         f"{self.remote}: {type(exc).__name__}: {exc}") from exc
                entries = manifest()
            if entries is None:
                raise StoreError(f"dataset version {version['md5']} is not on the DVC remote {self.remote} either")
            return {e["relpath"]: Path(cache.oid_to_path(e["md5"])) for e in entries}

    def checkout(self, md5: str) -> Path:
        """Bring the dataset folder back to version ``md5`` (pulled from the remote when not in the cache)."""
        version = self.find_version(md5)
        with self.lock(), self._repo() as repo:
            storage.write_bytes(str(self.root / f"{DATASET_NAME}.dvc"), (self.root / version["dvc_file"]).read_bytes())
            target = str(self.root / f"{DATASET_NAME}.dvc")
            if self.remote:
                repo.pull(targets=[target], remote=REMOTE_NAME, force=True)
            else:
                repo.checkout(targets=[target], force=True)
        return self.dataset_dir


def _put_back(path: Path, before: bytes | None) -> None:
    """``path`` as it was (``before``; None: absent)."""
    if before is None:
        path.unlink(missing_ok=True)
    elif not path.exists() or path.read_bytes() != before:
        try:
            storage.write_bytes(str(path), before)
        except StoreError:   # a full disk: in place then (truncating frees the blocks it needs)
            path.write_bytes(before)


def _md5_of(dvc_file: Path) -> str:
    outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs") or []
    if len(outs) != 1 or "md5" not in outs[0]:
        raise ObjretError(f"{dvc_file} is not the .dvc file of one folder")
    return str(outs[0]["md5"]).removesuffix(".dir")
