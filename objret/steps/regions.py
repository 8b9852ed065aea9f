"""Regions step: cached maps (+ pixels for detector/DASR sources) -> each frame's regions and raw descriptors in the region store."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from objret import storage
from objret.config import DasrParams
from objret.ingest.decode import load_image
from objret.regions.sources import frame_regions, pool_regions
from objret.steps.workspace import Workspace


@dataclass
class RegionsResult:
    extracted: int
    already_stored: int
    regions: int
    directory: str


def regions(ws: Workspace, progress: bool = True, frame_ids: list[str] | None = None) -> RegionsResult:
    """Regions and raw descriptors of every cached frame not stored yet, from the sources in params.yaml
    (``frame_ids``: of these cached frames only, one chunk of a scale-out run, objret.steps.chunks)."""
    rp = ws.params.regions
    store = ws.region_store
    storage.remove_stale_temps(store.dir)   # batches that killed runs left half-written
    done = store.stored_ids()
    if frame_ids is None:
        cached = ws.cache.cached_ids()
        todo = [f for f in ws.lake.frames() if f.frame_id in cached and f.frame_id not in done]
    else:  # cached by other workers maybe: the cache's load() reads their shards, cached_ids() may not know them
        wanted = set(frame_ids)
        todo = [f for f in ws.lake.frames() if f.frame_id in wanted and f.frame_id not in done]
    sources = rp.sources
    detect = "detector" in sources   # the workspace's detector: the one a query box is seen by too
    batch = rp.batch
    count = 0
    for start in tqdm(range(0, len(todo), batch), desc="regions", unit="batch", disable=not progress):
        chunk = todo[start:start + batch]
        maps = ws.cache.load([f.frame_id for f in chunk], rp.layer)
        per_frame = {}
        for frame in chunk:
            fmap = maps[frame.frame_id]
            image = load_image(frame.image_uri, ws.s3_endpoint_url) if detect or "dasr" in sources else None
            detections = ws.detect(image) if detect else None
            dasr_boxes = _dasr_boxes(ws, image, rp.dasr) if "dasr" in sources else None
            found = frame_regions(fmap, rp, image_size=(frame.width, frame.height), detections=detections,
                                  dasr_boxes=dasr_boxes)
            per_frame[frame.frame_id] = (found, pool_regions(fmap, found.boxes, rp.pooling),
                                         tuple(fmap.shape[-2:]))
            count += len(found)
        store.write(per_frame)
    return RegionsResult(len(todo), len(done), count, str(store.dir))


def _dasr_boxes(ws: Workspace, image: np.ndarray, params: DasrParams) -> list[tuple[float, float, float, float]]:
    """DASR* boxes (001) of one frame in the frame's pixels (DASR works on the resized network input)."""
    from objret.features.backbone import preprocess
    from objret.regions.dasr import dasr_regions

    x = preprocess(image, ws.backbone.spec.preprocessing)
    found = dasr_regions(ws.backbone, x[None], to_layer=params.to_layer, max_peaks=params.max_peaks)[0]
    sx, sy = image.shape[1] / x.shape[-1], image.shape[0] / x.shape[-2]
    return [(r.box[0] * sx, r.box[1] * sy, r.box[2] * sx, r.box[3] * sy) for r in found]
