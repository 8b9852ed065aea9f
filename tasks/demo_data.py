"""The real demo video: PETS 2009 S2L1 as shipped in Debian's opencv-doc package (no internet download)."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

from objret.errors import ObjretError

PETS_MD5 = "d401fe2028f78dd585e2ade0a0d678c0"  # vtest.avi of opencv-doc 4.6.0, per the bench README
PETS_MEMBER = "usr/share/doc/opencv-doc/examples/data/vtest.avi"
SAMPLE_REPORT = Path(__file__).resolve().parents[1] / "objret" / "samples" / "pets_pedestrian_report.json"


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def pets_video(data_dir: str | Path) -> Path:
    """``data_dir/vtest.avi``, fetched once from Debian's opencv-doc package with apt-get download."""
    target = Path(data_dir) / "vtest.avi"
    if target.is_file() and _md5(target) == PETS_MD5:
        return target
    if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
        raise ObjretError("the PETS demo video comes from Debian's opencv-doc package, but apt-get/dpkg-deb are "
                          "missing: name another lake source (a folder, a video file or an s3:// prefix)")
    with tempfile.TemporaryDirectory() as tmp:
        fetched = subprocess.run(["apt-get", "download", "opencv-doc"], cwd=tmp, capture_output=True, text=True)
        if fetched.returncode != 0:
            # A fresh machine has no package lists yet; refresh them once and retry.
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True)
            fetched = subprocess.run(["apt-get", "download", "opencv-doc"], cwd=tmp, capture_output=True, text=True)
        debs = list(Path(tmp).glob("opencv-doc_*.deb"))
        if fetched.returncode != 0 or not debs:
            raise ObjretError(f"apt-get download opencv-doc failed: {fetched.stderr.strip()[-300:]}")
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(Path(tmp, "x"))], check=True)
        extracted = Path(tmp, "x", PETS_MEMBER)
        if not extracted.is_file():
            raise ObjretError(f"{debs[0].name} holds no {PETS_MEMBER}")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(extracted, target.with_suffix(".tmp"))
        target.with_suffix(".tmp").replace(target)
    if _md5(target) != PETS_MD5:
        print(f"note: {target} differs from the bench's copy (md5 {_md5(target)})")
    return target
