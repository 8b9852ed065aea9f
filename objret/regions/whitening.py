"""PCA-whitening learned without labels on the lake's region descriptors (Jegou & Chum 2012; 003 sec. 3.5).

Pipeline, the same for lake regions and queries: L2 -> centre -> whiten -> project to ``dim`` -> L2.
Saved as a small versioned .npz (plain arrays, no pickle).
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from objret import storage
from objret.errors import ObjretError


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return x / (np.linalg.norm(x, axis=axis, keepdims=True) + 1e-12)


@dataclass
class Whitening:
    mean: np.ndarray        # (c,)
    projection: np.ndarray  # (c, d): eigenvectors scaled by 1/sqrt(eigenvalue)

    @property
    def dim(self) -> int:
        return self.projection.shape[1]

    def apply(self, x: np.ndarray) -> np.ndarray:
        x = np.atleast_2d(np.asarray(x, np.float32))
        return l2_normalize((l2_normalize(x) - self.mean) @ self.projection).astype(np.float32)

    def version(self) -> str:
        h = hashlib.sha256(self.mean.tobytes() + self.projection.tobytes()).hexdigest()
        return h[:12]

    def save(self, uri: str) -> str:
        buffer = io.BytesIO()
        np.savez(buffer, mean=self.mean, projection=self.projection)
        storage.write_bytes(uri, buffer.getvalue())
        return self.version()

    @classmethod
    def load(cls, uri: str) -> "Whitening":
        try:
            with np.load(io.BytesIO(storage.read_bytes(uri)), allow_pickle=False) as data:
                return cls(data["mean"], data["projection"])
        except (KeyError, ValueError, OSError) as exc:
            raise ObjretError(f"not a whitening file: {uri} ({exc})") from exc


def fit_whitening(descriptors: np.ndarray, dim: int | None, shrinkage: float = 0.0) -> Whitening:
    """PCA-whitening of L2-normalised descriptors to ``dim`` dimensions (None: all of them); ``shrinkage`` in [0, 1) damps the small eigenvalues
    (eigenvalue**(1 - shrinkage) in the denominator) so that noise directions are not blown up."""
    x = l2_normalize(np.asarray(descriptors, np.float64))
    if len(x) < 2:
        raise ObjretError("whitening needs at least two descriptors")
    mean = x.mean(axis=0)
    _, singular, vt = np.linalg.svd(x - mean, full_matrices=False)
    eigenvalues = singular ** 2 / len(x)
    dim = min(dim or len(eigenvalues), len(eigenvalues))
    keep = eigenvalues[:dim] > 1e-12
    scale = (eigenvalues[:dim][keep] + 1e-12) ** (-0.5 * (1 - shrinkage))
    projection = vt[:dim][keep].T * scale
    return Whitening(mean.astype(np.float32), projection.astype(np.float32))


def load_if_exists(path: str | Path) -> Whitening | None:
    return Whitening.load(str(path)) if Path(path).exists() else None
