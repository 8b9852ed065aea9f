"""The small-object shortlist: the most distinctive cells of every frame's stride-16 map in a faiss index, voted
for by the query template's cells.

Region descriptors pooled at stride 32 cannot find an object of a few stride-8 cells (its region is mostly
background), and matching its template against every frame costs the whole lake. Instead each frame keeps its
``per_frame`` most distinctive cells (a cell is distinctive when it differs from the frame's mean cell: a pasted
cut-out on a street, a pedestrian on a pavement; bench: the 128 of ~1,200 cells of a 640 px frame keep the
recall of every cell), L2-normalised. The query box is pooled to a template of at most 3 x 3 cells on the same
map; each template cell searches the index, and a frame's vote is the sum over template cells of its best
cell's similarity (a cell that did not reach the frame adds the lowest similarity it found). Stride 16 rather
than the stride 8 that template matching reads: its cells see the object with some context, and on the bench
they find 0.45 of a pasted object's other copies in the first 150 frames of 1,526 where stride-8 cells find 0.38
(exhaustive template matching: 0.48). The cells live in a RegionIndex (flat, then IVF-PQ past ``index.flat_max``),
so new frames are added without a rebuild.
"""

from __future__ import annotations

import numpy as np
import torch

from objret.index.frame_scoring import FrameHit
from objret.index.region_index import RegionIndex
from objret.regions.pooling import box_template, box_to_cells, l2n, template_grid

CELLS_PER_KEY = 10   # cells each template cell retrieves, per frame wanted


def salient_cells(fmap: np.ndarray, per_frame: int) -> tuple[np.ndarray, np.ndarray]:
    """A frame's ``per_frame`` most distinctive cells: (n x C unit vectors, n x 4 boxes in cells x, y, w, h)."""
    x = l2n(torch.as_tensor(np.asarray(fmap, np.float32)), dim=0)
    w = x.shape[2]
    flat = x.flatten(1).T                                   # cells x C
    mean = l2n(flat.mean(dim=0), dim=0)
    top = torch.topk(1.0 - flat @ mean, min(per_frame, len(flat))).indices
    boxes = torch.stack([top % w, top // w, torch.ones_like(top), torch.ones_like(top)], 1).float()
    return flat[top].contiguous().numpy().astype(np.float32), boxes.numpy()


def template_keys(fmap: np.ndarray, box_xywh, image_size: tuple[int, int], max_cells: int) -> np.ndarray:
    """The query box's template cells on ``fmap`` (at most max_cells a side), n x C unit vectors."""
    _, _, w, h = box_to_cells(box_xywh, image_size, fmap.shape[-2:])
    template = box_template(fmap, box_xywh, image_size, grid=template_grid((w, h), max_cells))
    return np.ascontiguousarray(template.reshape(-1, template.shape[-1]), dtype=np.float32)


def vote(index: RegionIndex, keys: np.ndarray, k_frames: int) -> list[FrameHit]:
    """Frames by the template cells' votes (see the module's docstring), best first, at most ``k_frames``; a
    frame's box is its cell most similar to any key."""
    if not len(index) or not len(keys):
        return []
    ids, sims = index.search(keys, CELLS_PER_KEY * k_frames)
    owner = index.owner
    votes = np.zeros(index.n_frames, np.float64)
    best_sim = np.full(index.n_frames, -np.inf)
    best_cell = np.full(index.n_frames, -1, np.int64)
    reached = np.zeros(index.n_frames, bool)
    for key_ids, key_sims in zip(ids, sims):
        found = key_ids >= 0
        key_ids, key_sims = key_ids[found], key_sims[found]
        if not len(key_ids):
            continue
        frames = owner[key_ids]
        per_frame = np.full(index.n_frames, float(key_sims.min()))
        np.maximum.at(per_frame, frames, key_sims)
        votes += per_frame
        reached[frames] = True
        better = key_sims > best_sim[frames]
        first = np.unique(frames[better], return_index=True)[1]   # sims are sorted: a frame's first is its best
        best_sim[frames[better][first]] = key_sims[better][first]
        best_cell[frames[better][first]] = key_ids[better][first]
    boxes = index.boxes
    rows = np.flatnonzero(reached)[np.argsort(-votes[reached], kind="stable")][:k_frames]
    return [FrameHit(index.frame_ids[r], float(votes[r] / len(keys)), int(best_cell[r]),
                     tuple(float(v) for v in boxes[best_cell[r]])) for r in rows]
