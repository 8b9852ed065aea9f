"""Read and write bytes at a URI: a local path or ``s3://bucket/key``.

S3 goes through boto3 with the standard AWS credential chain; the endpoint comes from
``AWS_ENDPOINT_URL`` (boto3 reads it itself) or an explicit ``endpoint_url``. Local writes are atomic
(temp file + rename); S3 PUTs are atomic per object by the store's guarantee.
"""

from __future__ import annotations

import os
import tempfile
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

from objret.errors import StoreError


_UMASK = os.umask(0)
os.umask(_UMASK)


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

    config = Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=5, read_timeout=30)
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    # A fresh session: boto3's default one caches the credentials it first resolved, so cache_clear()
    # would not pick up changed keys.
    session = boto3.session.Session()
    return session.client("s3", endpoint_url=endpoint_url or None, region_name=region, config=config)


def _s3_error(action: str, uri: str, exc: Exception) -> StoreError:
    # Name the location and the store's reason; never the credentials.
    return StoreError(f"cannot {action} {uri}: {type(exc).__name__}: {exc}")


def read_bytes(uri: str, endpoint_url: str | None = None) -> bytes:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            return s3_client(endpoint_url).get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as exc:  # botocore raises many unrelated types
            raise _s3_error("read", uri, exc) from exc
    try:
        return Path(uri).read_bytes()
    except OSError as exc:
        raise StoreError(f"cannot read {uri}: {exc.strerror or exc}") from exc


def write_bytes(uri: str, data: bytes, endpoint_url: str | None = None) -> None:
    """Write all of ``data`` or nothing: readers never see a half-written file."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            s3_client(endpoint_url).put_object(Bucket=bucket, Key=key, Body=data)
        except Exception as exc:
            raise _s3_error("write", uri, exc) from exc
        return
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; the file should get the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def exists(uri: str, endpoint_url: str | None = None) -> bool:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            s3_client(endpoint_url).head_object(Bucket=bucket, Key=key)
            return True
        except Exception as exc:
            if getattr(exc, "response", {}).get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise _s3_error("check", uri, exc) from exc
    return Path(uri).exists()


def list_uris(prefix: str, endpoint_url: str | None = None) -> list[str]:
    """Every object (S3) or file (local, recursive) under ``prefix``, sorted."""
    if is_s3(prefix):
        bucket, key = split_s3(prefix)
        if key and not key.endswith("/"):
            key += "/"
        out = []
        try:
            pages = s3_client(endpoint_url).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key)
            for page in pages:
                out += [f"s3://{bucket}/{obj['Key']}" for obj in page.get("Contents", [])]
        except Exception as exc:
            raise _s3_error("list", prefix, exc) from exc
        return sorted(out)
    root = Path(prefix)
    if not root.is_dir():
        raise StoreError(f"not a folder: {prefix}")
    return sorted(str(p) for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
