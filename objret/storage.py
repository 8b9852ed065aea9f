"""Read and write bytes at a URI: a local path or ``s3://bucket/key``.

S3 goes through boto3 with the standard AWS credential chain; the endpoint comes from
``AWS_ENDPOINT_URL`` (boto3 reads it itself) or an explicit ``endpoint_url``. Local writes are atomic
(temp file + rename); S3 PUTs are atomic per object by the store's guarantee.

S3 calls are retried here, not inside botocore, so that one bounded policy covers a whole operation (a GET's
body, a listing's pages) and the error says what was tried: transient failures only (connection refused or
reset, timeouts, 5xx, throttling), RETRY_ATTEMPTS attempts with exponential backoff and jitter between them
(0.5, 1, 2, 4 s, each scaled by 0.5-1: 3.75-7.5 s of waiting in all). A stopped store (connection refused)
fails in about that time (5 s measured); a hung one (accepts connections, never answers) after
RETRY_ATTEMPTS * READ_TIMEOUT_S more (plus 1 s an attempt for a PUT: botocore waits that long for a
"100 Continue"): at most 5 * 31 + 7.5 = 162.5 s. Credentials or missing keys fail at once.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import socket
import tempfile
import time
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

from objret.errors import StoreError

_UMASK = os.umask(0)
os.umask(_UMASK)

RETRY_ATTEMPTS = 5       # attempts per S3 operation
RETRY_BASE_S = 0.5       # backoff before the 2nd attempt; doubled before each next one
CONNECT_TIMEOUT_S = 5    # per attempt
READ_TIMEOUT_S = 30      # per attempt: the longest wait for the store's next bytes
_TRANSIENT_CODES = {"RequestTimeout", "SlowDown", "Throttling", "ThrottlingException", "InternalError",
                    "ServiceUnavailable"}

# Temporary files are named <.final name>.tmp-<host>-<pid>-<random>.tmp: hidden from listings, and a later run
# on this host can tell a dead writer's leftovers from a live writer's (remove_stale_temps).
_HOST = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname()) or "host"
_TEMP = re.compile(r"\.tmp-(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)-[A-Za-z0-9_]+\.tmp$")


def temp_prefix(name: str) -> str:
    """The start of a temporary sibling's name for ``name`` (end it with a unique part and ".tmp")."""
    return f".{name}.tmp-{_HOST}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # another user's live process
        return True
    return True


def remove_stale_temps(folder: str | Path) -> int:
    """Delete the temporary files and folders that writers killed on this host left in ``folder`` (a kill -9
    between a temp write and its rename); a live writer's, or another host's, are left alone. Returns how many
    were removed. They are never read in any case: every reader skips dot-files."""
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return 0
    for entry in entries:
        match = _TEMP.search(entry.name) if entry.name.startswith(".") else None
        if match is None or match["host"] != _HOST or _alive(int(match["pid"])):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            Path(entry.path).unlink(missing_ok=True)
        removed += 1
    return removed


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise StoreError(f"not an s3 URI: {uri!r} (expected s3://bucket/prefix)")
    return parsed.netloc, parsed.path.lstrip("/")


def join(base: str, *parts: str) -> str:
    if is_s3(base):
        return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])
    return str(Path(base, *parts))


@lru_cache(maxsize=8)
def s3_client(endpoint_url: str | None = None):
    import boto3
    from botocore.config import Config

    # One attempt per call (total_max_attempts; botocore's max_attempts counts retries): _retrying() retries
    # whole operations. 32 pooled connections: the feature cache's reader threads (one per spare core) share it.
    config = Config(retries={"total_max_attempts": 1, "mode": "standard"}, connect_timeout=CONNECT_TIMEOUT_S,
                    read_timeout=READ_TIMEOUT_S, max_pool_connections=32)
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    # A fresh session: boto3's default one caches the credentials it first resolved, so cache_clear()
    # would not pick up changed keys.
    session = boto3.session.Session()
    return session.client("s3", endpoint_url=endpoint_url or None, region_name=region, config=config)


def _s3_error(action: str, uri: str, exc: Exception, tried: str = "") -> StoreError:
    # Name the location and the store's reason; never the credentials.
    return StoreError(f"cannot {action} {uri}: {type(exc).__name__}: {exc}{tried}")


def _transient(exc: Exception) -> bool:
    """Whether trying again may succeed: the store unreachable, slow or overloaded (not refused access)."""
    from botocore.exceptions import (
        ClientError,
        ConnectionError,
        HTTPClientError,
        IncompleteReadError,
    )

    if isinstance(exc, (ConnectionError, HTTPClientError, IncompleteReadError)):   # refused, reset, timed out
        return True
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return status >= 500 or status == 429 or exc.response.get("Error", {}).get("Code") in _TRANSIENT_CODES
    return False


def _retrying(action: str, uri: str, call):
    """``call()``, tried again after transient failures with exponential backoff (jittered, so that many
    clients do not retry in step); StoreError naming ``uri``, the attempts and the time spent when it gives up."""
    start = time.monotonic()
    for attempt in range(1, RETRY_ATTEMPTS + 1):
        try:
            return call()
        except Exception as exc:  # botocore raises many unrelated types
            if attempt == RETRY_ATTEMPTS or not _transient(exc):
                tried = (f" (gave up after {attempt} attempts in {time.monotonic() - start:.1f} s)"
                         if attempt > 1 else "")
                raise _s3_error(action, uri, exc, tried) from exc
            time.sleep(RETRY_BASE_S * 2 ** (attempt - 1) * random.uniform(0.5, 1.0))


def read_bytes(uri: str, endpoint_url: str | None = None) -> bytes:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        client = s3_client(endpoint_url)
        return _retrying("read", uri, lambda: client.get_object(Bucket=bucket, Key=key)["Body"].read())
    try:
        return Path(uri).read_bytes()
    except OSError as exc:
        raise StoreError(f"cannot read {uri}: {exc.strerror or exc}") from exc


def write_bytes(uri: str, data: bytes, endpoint_url: str | None = None) -> None:
    """Write all of ``data`` or nothing: readers never see a half-written file."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        _retrying("write", uri, lambda: s3_client(endpoint_url).put_object(Bucket=bucket, Key=key, Body=data))
        return
    path, tmp = Path(uri), None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path.name), suffix=".tmp")
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; the file should get the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):   # a full disk, a read-only folder: the file as it was is left alone
            raise StoreError(f"cannot write {uri}: {exc.strerror or exc}; it was left as it was") from exc
        raise


def _error_code(exc: Exception) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


def read_versioned(uri: str, endpoint_url: str | None = None) -> tuple[bytes | None, str | None]:
    """The bytes at ``uri`` and a token naming exactly this version of them (S3: the object's ETag; a file: the
    sha256 of its bytes), for ``write_if_unchanged``; (None, None) when there is nothing there."""
    if is_s3(uri):
        bucket, key = split_s3(uri)

        def get() -> tuple[bytes | None, str | None]:
            try:
                found = s3_client(endpoint_url).get_object(Bucket=bucket, Key=key)
            except Exception as exc:
                if _error_code(exc) in ("404", "NoSuchKey", "NotFound"):
                    return None, None
                raise
            return found["Body"].read(), found["ETag"]

        return _retrying("read", uri, get)
    try:
        data = Path(uri).read_bytes()
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        raise StoreError(f"cannot read {uri}: {exc.strerror or exc}") from exc
    return data, hashlib.sha256(data).hexdigest()


def write_if_unchanged(uri: str, data: bytes, token: str | None, endpoint_url: str | None = None) -> bool:
    """Write ``data`` at ``uri`` only while it is still the version ``token`` names (None: only while nothing is
    there); False, writing nothing, when another writer changed it since. S3: a conditional PUT (If-Match /
    If-None-Match: AWS S3, SeaweedFS and MinIO honour them; a store that ignores them gives no guard). A file:
    compared and replaced under a lock file beside it."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        condition = {"IfMatch": token} if token is not None else {"IfNoneMatch": "*"}

        def put() -> bool:
            try:
                s3_client(endpoint_url).put_object(Bucket=bucket, Key=key, Body=data, **condition)
            except Exception as exc:
                # 412: the ETag moved on; 409: AWS S3's answer to a conditional write racing another one.
                if _error_code(exc) in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                    return False
                raise
            return True

        return _retrying("write", uri, put)
    from filelock import FileLock

    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path.parent / f".{path.name}.lock"), timeout=60):
        if read_versioned(uri)[1] != token:
            return False
        write_bytes(uri, data)
        return True


def exists(uri: str, endpoint_url: str | None = None) -> bool:
    if is_s3(uri):
        bucket, key = split_s3(uri)

        def head() -> bool:
            try:
                s3_client(endpoint_url).head_object(Bucket=bucket, Key=key)
                return True
            except Exception as exc:
                if getattr(exc, "response", {}).get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return False
                raise

        return _retrying("check", uri, head)
    return Path(uri).exists()


def list_uris(prefix: str, endpoint_url: str | None = None) -> list[str]:
    """Every object (S3) or file (local, recursive) under ``prefix``, sorted."""
    if is_s3(prefix):
        bucket, key = split_s3(prefix)
        if key and not key.endswith("/"):
            key += "/"

        def listing() -> list[str]:   # from the first page again after a failure
            pages = s3_client(endpoint_url).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key)
            return [f"s3://{bucket}/{obj['Key']}" for page in pages for obj in page.get("Contents", [])]

        return sorted(_retrying("list", prefix, listing))
    root = Path(prefix)
    if not root.is_dir():
        raise StoreError(f"not a folder: {prefix}")
    return sorted(str(p) for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))


def delete(uri: str, endpoint_url: str | None = None) -> None:
    """Remove the file or object at ``uri``; nothing to do when it is not there."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        _retrying("delete", uri, lambda: s3_client(endpoint_url).delete_object(Bucket=bucket, Key=key))
        return
    try:
        Path(uri).unlink(missing_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot delete {uri}: {exc.strerror or exc}") from exc
