"""objret.regions.whitening: PCA-whitening learned on real region descriptors (R-MAC regions of bench frames), and its
versioned save/load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from objret.features.backbone import build_backbone
from objret.errors import ObjretError, StoreError
from objret.features.cache import extract_maps
from objret.ingest.decode import load_image
from objret.regions.store import RegionStore
from objret.regions.sources import FrameRegions, pool_regions, uniform_regions, whole_region
from objret.regions.whitening import Whitening, fit_whitening, l2_normalize, load_if_exists

pytestmark = pytest.mark.usefixtures("one_torch_thread", "one_blas_thread")

DIM = 64


@pytest.fixture(scope="module")
def one_blas_thread():
    """SVDs and matmuls on one OpenBLAS thread: on the shared 2-core machine, spinning BLAS threads competing
    with other jobs turned a 0.3 s fit into 10 s."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
        yield


@pytest.fixture(scope="module")
def descriptors(bench_dir):
    """Average-pooled whole + uniform regions of 30 real frames (10 PETS: every 3rd of the test bench's; its 9
    TUD-Stadtmitte frames, its first KITTI frame, its first 10 COCO photos by id) on lite0 stride-32 maps at
    320 px: about 650 descriptors of 320 dimensions. Also the frame of each row."""
    def names(set_name: str) -> list[str]:
        return [f"{set_name}/images/{p.name}" for p in sorted((bench_dir / set_name / "images").glob("*.jpg"))]

    files = (names("pets09_s2l1")[::3][:10] + names("tud_stadtmitte")[:9] + names("kitti_0005")[:1]
             + ["coco_mini/" + im["file_name"] for im in
                sorted(json.loads((bench_dir / "coco_mini" / "annotations.json").read_text())["images"],
                       key=lambda im: im["id"])[:10]])
    assert len(files) == 30
    backbone = build_backbone("efficientnet_lite0", layers=("stride32",), max_side=320)
    maps = extract_maps(backbone, [(f, load_image(str(bench_dir / f))) for f in files], device=torch.device("cpu"))
    rows, owner = [], []
    for i, f in enumerate(files):
        fmap = maps[f]["stride32"]
        boxes = FrameRegions.concat([whole_region(fmap.shape[-2:]), uniform_regions(fmap.shape[-2:])]).boxes
        rows.append(pool_regions(fmap, boxes, "avg"))
        owner += [i] * len(boxes)
    x = np.concatenate(rows)
    assert x.shape[1] == 320 and len(x) > 500
    return x, np.array(owner)


@pytest.fixture(scope="module")
def fitted(descriptors):
    return fit_whitening(descriptors[0], DIM)


def _covariance(y: np.ndarray) -> np.ndarray:
    y = y - y.mean(axis=0)
    return y.T @ y / len(y)


def test_whitened_training_data_has_identity_covariance(descriptors, fitted):
    x = l2_normalize(descriptors[0].astype(np.float64))
    np.testing.assert_allclose(fitted.mean, x.mean(axis=0), atol=1e-6)
    assert fitted.projection.shape == (320, DIM) and fitted.dim == DIM
    projected = (x - fitted.mean) @ fitted.projection.astype(np.float64)
    np.testing.assert_allclose(_covariance(projected), np.eye(DIM), atol=2e-3)
    # The directions kept are the top-DIM principal axes: their eigenvalues are the largest of the data's.
    eigenvalues = np.sort(np.linalg.eigvalsh(_covariance(x)))[::-1]
    kept = 1.0 / np.linalg.norm(fitted.projection.astype(np.float64), axis=0) ** 2  # |v / sqrt(l)|^2 = 1 / l
    np.testing.assert_allclose(kept, eigenvalues[:DIM], rtol=1e-3)


def test_identity_covariance_on_correlated_gaussian_data():
    rng = np.random.default_rng(0)
    mixing = rng.standard_normal((40, 40)) * np.logspace(0, -2, 40)  # axes of very different spread
    x = rng.standard_normal((5000, 40)) @ mixing.T + 3.0
    assert np.abs(np.corrcoef(x, rowvar=False) - np.eye(40)).max() > 0.3  # really correlated
    w = fit_whitening(x, dim=None)
    assert w.dim == 40
    projected = (l2_normalize(x) - w.mean) @ w.projection.astype(np.float64)
    np.testing.assert_allclose(_covariance(projected), np.eye(40), atol=2e-3)
    # Fewer samples than dimensions: only the directions the data spans are kept (rank n - 1).
    few = fit_whitening(x[:10], dim=32)
    assert few.dim == 9


def test_apply_gives_unit_vectors_of_the_requested_dim(descriptors, fitted):
    x = descriptors[0]
    out = fitted.apply(x)
    assert out.shape == (len(x), DIM) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    # The pipeline as documented: L2 -> centre -> project -> L2, so the input's scale does not matter.
    expected = l2_normalize((l2_normalize(x.astype(np.float64)) - fitted.mean) @ fitted.projection)
    np.testing.assert_allclose(out, expected, atol=1e-5)
    np.testing.assert_allclose(fitted.apply(7.5 * x), out, atol=1e-5)
    assert fitted.apply(x[0]).shape == (1, DIM)  # one vector
    for dim in (8, 128):
        assert fit_whitening(x, dim).apply(x[:3]).shape == (3, dim)


def test_whitening_removes_the_shared_direction_of_real_descriptors(descriptors, fitted):
    """Raw pooled CNN descriptors of unrelated frames are far from orthogonal (they share the mean activation);
    after whitening, regions of different frames are close to orthogonal on average."""
    x, owner = descriptors
    other = owner[:, None] != owner[None, :]
    raw = l2_normalize(x) @ l2_normalize(x).T
    white = fitted.apply(x) @ fitted.apply(x).T
    assert raw[other].mean() > 0.15  # 0.22 on these frames
    assert abs(white[other].mean()) < 0.03  # -0.01
    assert np.abs(white[other]).mean() < 0.5 * np.abs(raw[other]).mean()
    # The same region of the same frame still matches itself exactly.
    np.testing.assert_allclose(np.diag(white), 1.0, atol=1e-5)


def test_shrinkage_changes_the_projection(descriptors, fitted):
    x = l2_normalize(descriptors[0].astype(np.float64))
    shrunk = fit_whitening(descriptors[0], DIM, shrinkage=0.5)
    np.testing.assert_allclose(shrunk.mean, fitted.mean)
    assert shrunk.projection.shape == fitted.projection.shape
    assert not np.allclose(shrunk.projection, fitted.projection)
    assert shrunk.version() != fitted.version()
    # Eigenvalue**(1 - s) in the denominator: projected variances become eigenvalue**s, still uncorrelated,
    # so the strong axes keep more weight than under full whitening (identity).
    eigenvalues = np.sort(np.linalg.eigvalsh(_covariance(x)))[::-1][:DIM]
    cov = _covariance((x - shrunk.mean) @ shrunk.projection.astype(np.float64))
    np.testing.assert_allclose(np.diag(cov), eigenvalues ** 0.5, rtol=2e-3)
    assert np.abs(cov - np.diag(np.diag(cov))).max() < 1e-3 * np.diag(cov).max()
    # Same axes, rescaled: column k of the shrunk projection is the full one times eigenvalue_k**0.25.
    np.testing.assert_allclose(shrunk.projection, fitted.projection * eigenvalues.astype(np.float32) ** 0.25,
                               rtol=2e-3, atol=1e-6)
    assert not np.allclose(shrunk.apply(descriptors[0][:5]), fitted.apply(descriptors[0][:5]))


def test_save_and_load_give_identical_outputs(descriptors, fitted, tmp_path):
    path = tmp_path / "whitening" / "w.npz"
    version = fitted.save(str(path))
    assert version == fitted.version() and len(version) == 12
    loaded = Whitening.load(str(path))
    assert loaded.version() == version
    np.testing.assert_array_equal(loaded.mean, fitted.mean)
    np.testing.assert_array_equal(loaded.projection, fitted.projection)
    np.testing.assert_array_equal(loaded.apply(descriptors[0]), fitted.apply(descriptors[0]))
    assert load_if_exists(path).version() == version
    assert load_if_exists(tmp_path / "missing.npz") is None
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]  # written atomically


def test_a_file_that_is_not_a_whitening_is_refused(descriptors, tmp_path):
    # An npz of other arrays: a stored region batch.
    regions = FrameRegions.concat([whole_region((8, 10)), uniform_regions((8, 10))])
    batch = RegionStore(tmp_path / "regions").write(
        {"f": (regions, np.ones((len(regions), 4), np.float32), (8, 10))})
    text = tmp_path / "notes.npz"
    text.write_text("not numpy at all")
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, mean=np.array([{"a": 1}], dtype=object), projection=np.eye(2))
    for path in (batch, text, pickled):
        with pytest.raises(ObjretError, match="not a whitening file"):
            Whitening.load(str(path))
    with pytest.raises(StoreError):  # a StoreError is an ObjretError too
        Whitening.load(str(tmp_path / "missing.npz"))
    with pytest.raises(ObjretError, match="two descriptors"):
        fit_whitening(descriptors[0][:1], dim=None)
