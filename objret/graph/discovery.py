"""Object discovery (paper 003 sec. 3.8-3.9): OS.EGM regions and the global descriptor built on them.

* **OS.EGM** (003 sec. 3.8, 4): the EGM detector of objret.regions.egm (the one the ``egm`` region source runs on the
  feature saliency, "FS.EGM") run on the frame's *object saliency* map instead (objret.graph.centrality.
  object_saliency, eq. 14: the frame's patches weighted by the centrality of their nearest regions in the
  lake's region graph). Its parameters are the paper's for object saliency (sec. 4.2): rho = 2, sigma = 2 and
  tau = 0 ("the saliency maps obtained with OS are exactly zero at background regions"); purge as for FS.EGM.
* **Descriptor** (003 sec. 3.9): each region of the frame max-pooled (eq. 10) and L2-normalised, the
  descriptors summed, and the sum whitened (w, sec. 3.5; objret.regions.whitening.Whitening, which L2-normalises,
  centres, whitens, projects and L2-normalises again) or, without a whitening, L2-normalised. As in R-MAC,
  whitening is applied to the aggregated vector, not per region. Frames with no OS.EGM region (an all-zero
  object saliency map) fall back to the whole frame: their descriptor is the frame's whitened MAC.

The query side (003 sec. 4.1): "Detection is applied to dataset images only, while we use the provided
bounding boxes on the query side": a query's descriptor is the same descriptor of its box as the only region
(``query_descriptor``), which is also each stored region's own vector (``region_vectors``): that is how a frame's
box is chosen at query time (the frame's OS.EGM region nearest the query).

Storage (``save_discovery`` / ``load_discovery``): one version folder per computation beside the region graph
it was computed from, switched in by a ``CURRENT`` pointer (as objret.graph.store does), holding plain arrays
(no pickle) and a manifest naming the graph version and the parameters.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import numpy as np

from objret.config import EgmParams
from objret.errors import ObjretError
from objret.regions.egm import egm_regions
from objret.regions.sources import SOURCES, FrameRegions, cells_to_pixels, pool_regions, whole_region
from objret.versions import load_manifest, save_version

FORMAT = 1


def os_egm_regions(feature_map: np.ndarray, object_saliency_map: np.ndarray, egm: EgmParams) -> FrameRegions:
    """OS.EGM: EGM regions (objret.regions.egm.egm_regions) of an h x w object saliency map, as regions (boxes in cells)
    of the C x h x w ``feature_map`` it was computed on, source ``os_egm``, scored by their mean object saliency
    (003 eq. 9 on S), highest first. ``egm``: sigma, tau, rho, purge (params.yaml's graph.discovery.egm: 003 sec.
    4.2's rho = 2, sigma = 2, tau = 0 for object saliency; the purge threshold is not reported there).
    An all-zero (or all non-finite) map gives no region."""
    S = np.asarray(object_saliency_map, np.float64)
    if S.ndim != 2 or S.shape != tuple(np.shape(feature_map)[-2:]):
        raise ObjretError(f"object saliency of shape {S.shape} does not match the feature map "
                          f"{tuple(np.shape(feature_map))}")
    found = egm_regions(S, sigma=egm.sigma, tau=egm.tau, rho=egm.rho, purge=egm.purge)
    boxes = np.asarray([[r.x, r.y, r.w, r.h] for r in found], np.float32).reshape(-1, 4)
    return FrameRegions(boxes, np.full(len(boxes), SOURCES.index("os_egm"), np.int8),
                        np.asarray([r.score for r in found], np.float32))


def _boxes_of(regions) -> np.ndarray:
    boxes = regions.boxes if isinstance(regions, FrameRegions) else regions
    return np.asarray(boxes, np.float32).reshape(-1, 4)


def encode(vectors: np.ndarray, whitening=None) -> np.ndarray:
    """Vectors -> the descriptor space: ``whitening.apply`` (objret.regions.whitening.Whitening), or L2 only."""
    x = np.atleast_2d(np.asarray(vectors, np.float32))
    if whitening is not None:
        if x.shape[1] != whitening.mean.shape[0]:
            raise ObjretError(f"the whitening takes {whitening.mean.shape[0]}-d vectors, the max-pooled regions are "
                              f"{x.shape[1]}-d (regions.pooling avgmax?)")
        return np.asarray(whitening.apply(x), np.float32)
    return (x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-12)).astype(np.float32)


def region_vectors(feature_map: np.ndarray, regions, whitening=None) -> np.ndarray:
    """Each region's own descriptor (R x d): max-pooled, L2-normalised, then whitened or L2-normalised: the
    descriptor of a frame that had this region only, and so comparable with ``query_descriptor``."""
    boxes = _boxes_of(regions)
    if not len(boxes):
        return np.zeros((0, _out_dim(feature_map, whitening)), np.float32)
    return encode(pool_regions(feature_map, boxes, "max"), whitening)


def discovery_descriptor(feature_map: np.ndarray, regions, whitening=None) -> np.ndarray:
    """The global descriptor of a frame from its regions (003 sec. 3.9), a d vector of unit norm.

    ``regions``: a FrameRegions or an R x 4 array of boxes (x, y, w, h in cells of ``feature_map``). Each
    region of the C x h x w map is max-pooled (eq. 10) and L2-normalised, the R descriptors are summed, and the
    sum is whitened with ``whitening`` (an objret.regions.whitening.Whitening: L2, centre, whiten, project, L2) or, when
    None, L2-normalised. A frame with no region falls back to the whole frame (one region: the map's MAC).
    """
    boxes = _boxes_of(regions)
    if not len(boxes):
        boxes = whole_region(tuple(np.shape(feature_map)[-2:])).boxes
    total = pool_regions(feature_map, boxes, "max").sum(axis=0)
    return encode(total[None], whitening)[0]


def query_descriptor(feature_map: np.ndarray, box_cells, whitening=None) -> np.ndarray:
    """A query's descriptor: its box (x, y, w, h in cells of ``feature_map``) as the only region (003 sec. 4.1)."""
    return discovery_descriptor(feature_map, np.asarray(box_cells, np.float32).reshape(1, 4), whitening)


def _out_dim(feature_map, whitening) -> int:
    return int(whitening.dim) if whitening is not None else int(np.shape(feature_map)[0])


# ---- storage ---------------------------------------------------------------------------------------------------

@dataclass
class FrameDiscovery:
    """What the discovery step keeps of one frame."""

    regions: FrameRegions        # OS.EGM regions, boxes in cells of the layer's map
    descriptor: np.ndarray       # d, the 003 sec. 3.9 descriptor
    region_vectors: np.ndarray   # R x d, each region's own descriptor (to pick a frame's box for a query)
    map_hw: tuple[int, int]


def pack(per_frame: dict[str, FrameDiscovery]) -> dict[str, np.ndarray]:
    """Frames (in the dict's order) -> the flat arrays a stored version holds."""
    ids = list(per_frame)
    items = [per_frame[f] for f in ids]
    dim = len(items[0].descriptor) if items else 0
    return {
        "frame_ids": np.array(ids, dtype="S64"),
        "descriptors": np.stack([i.descriptor for i in items]).astype(np.float32) if items
        else np.zeros((0, 0), np.float32),
        "counts": np.array([len(i.regions) for i in items], np.int32),
        "map_hw": np.array([i.map_hw for i in items], np.int32).reshape(-1, 2),
        "boxes": np.concatenate([i.regions.boxes for i in items]).astype(np.float32).reshape(-1, 4) if items
        else np.zeros((0, 4), np.float32),
        "scores": np.concatenate([i.regions.scores for i in items]).astype(np.float32) if items
        else np.zeros(0, np.float32),
        "region_vectors": np.concatenate([i.region_vectors.reshape(-1, dim) for i in items]).astype(np.float16)
        if items else np.zeros((0, 0), np.float16),
    }


def concat_arrays(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    parts = [p for p in parts if len(p["frame_ids"])]
    if not parts:
        return pack({})
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def write_arrays(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
    """One .npz of plain arrays, written whole or not at all."""
    from objret import storage

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    storage.write_bytes(str(path), buffer.getvalue())


def read_arrays(path: str | Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


@dataclass
class StoredDiscovery:
    """One saved version: the OS.EGM regions and 003 sec. 3.9 descriptors of every frame of a graph's index."""

    directory: Path
    manifest: dict

    @property
    def version(self) -> str:
        return self.directory.name

    @cached_property
    def arrays(self) -> dict[str, np.ndarray]:
        arrays = read_arrays(self.directory / "discovery.npz")
        n, r = len(arrays["frame_ids"]), int(arrays["counts"].sum())
        if (len(arrays["descriptors"]) != n or len(arrays["map_hw"]) != n or len(arrays["boxes"]) != r
                or len(arrays["scores"]) != r or len(arrays["region_vectors"]) != r):
            raise ObjretError(f"OS.EGM descriptors in {self.directory} are inconsistent: run build-index again")
        return arrays

    @cached_property
    def frame_ids(self) -> list[str]:
        return self.arrays["frame_ids"].astype(str).tolist()

    def frame(self, frame_id: str) -> FrameDiscovery:
        """One frame's stored regions and descriptors (KeyError when the version does not hold it)."""
        row = self.frame_ids.index(frame_id)
        a = self.arrays
        start = int(a["counts"][:row].sum())
        stop = start + int(a["counts"][row])
        regions = FrameRegions(a["boxes"][start:stop], np.full(stop - start, SOURCES.index("os_egm"), np.int8),
                               a["scores"][start:stop])
        return FrameDiscovery(regions, a["descriptors"][row], a["region_vectors"][start:stop].astype(np.float32),
                              tuple(int(v) for v in a["map_hw"][row]))


def load_discovery(directory: str | Path) -> StoredDiscovery | None:
    """The current version in ``directory``; None when none was saved; ObjretError when it is damaged."""
    found = load_manifest(directory, "OS.EGM descriptors", FORMAT)
    return None if found is None else StoredDiscovery(*found)


def save_discovery(directory: str | Path, arrays: dict[str, np.ndarray], manifest: dict) -> StoredDiscovery:
    """Write a new version (arrays, then the manifest) and point CURRENT at it; older versions are removed."""
    save_version(directory, "d", lambda folder: write_arrays(folder / "discovery.npz", arrays),
                 {"format": FORMAT, **manifest})
    return load_discovery(directory)


# ---- what the mining method reads --------------------------------------------------------------------------------

@dataclass
class DiscoveryVectors:
    """The lake's OS.EGM descriptors aligned with a MapStack (row i = stack frame i), for method ``discovery``."""

    descriptors: np.ndarray      # N x d (rows of frames missing from the store: zeros, ``present`` False)
    present: np.ndarray          # N bool
    region_vectors: np.ndarray   # R x d, each OS.EGM region's own descriptor
    owner: np.ndarray            # R int, stack row of each region
    boxes: np.ndarray            # R x 4, pixels of the owning frame
    layer: str                   # the map the descriptors were pooled from (regions.layer)
    whitening: object | None = None

    def subset(self, rows) -> "DiscoveryVectors":
        rows = np.asarray(rows, np.int64)
        new_row = np.full(len(self.descriptors), -1, np.int64)
        new_row[rows] = np.arange(len(rows))
        keep = new_row[self.owner] >= 0
        return replace(self, descriptors=self.descriptors[rows], present=self.present[rows],
                       region_vectors=self.region_vectors[keep], owner=new_row[self.owner[keep]],
                       boxes=self.boxes[keep])

    def query(self, feature_maps: dict, box, image_size) -> np.ndarray:
        """The descriptor of a query box (x, y, w, h pixels of a frame of ``image_size``) from its maps."""
        from objret.regions.pooling import box_to_cells

        fmap = feature_maps[self.layer]
        return query_descriptor(fmap, box_to_cells(box, image_size, fmap.shape[-2:]), self.whitening)


def discovery_vectors(stored: StoredDiscovery, frames, layer: str, whitening=None) -> DiscoveryVectors:
    """``stored``'s descriptors for lake ``frames`` (records with frame_id, width, height), in that order."""
    a = stored.arrays
    row_of = {fid: i for i, fid in enumerate(stored.frame_ids)}
    dim = a["descriptors"].shape[1] if a["descriptors"].ndim == 2 and len(a["descriptors"]) else 0
    starts = np.concatenate([[0], np.cumsum(a["counts"])]).astype(np.int64)
    descriptors = np.zeros((len(frames), dim), np.float32)
    present = np.zeros(len(frames), bool)
    vectors, owner, boxes = [], [], []
    for i, frame in enumerate(frames):
        row = row_of.get(frame.frame_id)
        if row is None:
            continue
        present[i] = True
        descriptors[i] = a["descriptors"][row]
        start, stop = starts[row], starts[row + 1]
        vectors.append(a["region_vectors"][start:stop].astype(np.float32))
        owner.append(np.full(stop - start, i, np.int64))
        boxes.append(cells_to_pixels(a["boxes"][start:stop], tuple(a["map_hw"][row]), (frame.width, frame.height)))
    return DiscoveryVectors(descriptors, present,
                            np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32),
                            np.concatenate(owner) if owner else np.zeros(0, np.int64),
                            np.concatenate(boxes).astype(np.float32) if boxes else np.zeros((0, 4), np.float32),
                            layer, whitening)
