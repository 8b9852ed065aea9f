"""Deep template matching (Kothawade et al.): patch-wise cosine similarity of a query template over dense maps.

Each template cell is compared with every position of a frame's map (cosine), and the cell similarities are
averaged at the template's layout for every centre and scale of the footprint. The best centre and scale give
the frame's score and box, and the similarity surface is the frame's heat map.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from objret.pooling import l2n


class MapStack:
    """Many frames' maps of one layer, L2-normalised per position and zero-padded to one shape.

    Holding them as one tensor turns matching a template against the whole lake into a few batched ops.
    """

    def __init__(self, frame_ids: list[str], maps: list[np.ndarray], image_sizes: list[tuple[int, int]]):
        if not maps:
            raise ValueError("MapStack needs at least one map")
        self.frame_ids = list(frame_ids)
        self.image_sizes = np.asarray(image_sizes, dtype=np.float32)  # (width, height) in pixels
        self.map_sizes = np.asarray([m.shape[-2:] for m in maps])      # (h, w) in cells
        channels = maps[0].shape[0]
        max_h, max_w = self.map_sizes.max(axis=0)
        self.maps = torch.zeros(len(maps), channels, max_h, max_w)
        self.valid = torch.zeros(len(maps), max_h, max_w, dtype=torch.bool)
        for i, m in enumerate(maps):
            h, w = m.shape[-2:]
            self.maps[i, :, :h, :w] = l2n(torch.from_numpy(np.asarray(m, dtype=np.float32)), dim=0)
            self.valid[i, :h, :w] = True

    def __len__(self) -> int:
        return len(self.frame_ids)

    def subset(self, indices) -> "MapStack":
        sub = object.__new__(MapStack)
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        sub.frame_ids = [self.frame_ids[i] for i in idx.tolist()]
        sub.image_sizes, sub.map_sizes = self.image_sizes[idx.numpy()], self.map_sizes[idx.numpy()]
        sub.maps, sub.valid = self.maps[idx], self.valid[idx]
        return sub


@dataclass
class MatchResult:
    scores: np.ndarray     # N, best score per frame
    boxes: np.ndarray      # N x 4, [x, y, w, h] in each frame's pixels
    heatmaps: np.ndarray   # N x H x W (cells, padded), best score over scales per centre; -1 outside the frame


def match_template(template: np.ndarray, query_cells_hw: tuple[float, float], stack: MapStack,
                   scales=(1.0,), chunk: int = 512) -> MatchResult:
    """Match a th x tw x C template whose box spans ``query_cells_hw`` cells against every frame of ``stack``.

    For scale s the footprint spans s * query_cells_hw cells; template cell (i, j) is read at its place in the
    footprint by bilinear interpolation, so boxes smaller than a cell are matched at sub-cell offsets.
    """
    th, tw, _ = template.shape
    t = torch.from_numpy(np.ascontiguousarray(template.reshape(th * tw, -1), dtype=np.float32))
    n, _, height, width = stack.maps.shape
    # Centres on the cell grid; normalised coordinates as grid_sample expects (align_corners=False).
    ys = (torch.arange(height, dtype=torch.float32) + 0.5)
    xs = (torch.arange(width, dtype=torch.float32) + 0.5)
    scores = np.empty(n, np.float32)
    boxes = np.empty((n, 4), np.float32)
    heat = np.empty((n, height, width), np.float32)
    qh, qw = query_cells_hw
    for start in range(0, n, chunk):
        maps = stack.maps[start:start + chunk]
        sims = torch.einsum("kc,nchw->nkhw", t, maps)  # cosine of every template cell with every position
        best = torch.full((len(maps), height, width), -2.0)
        best_scale = torch.zeros((len(maps), height, width), dtype=torch.long)
        for si, scale in enumerate(scales):
            fh, fw = scale * qh, scale * qw
            total = torch.zeros(len(maps), height, width)
            for k in range(th * tw):
                i, j = divmod(k, tw)
                dy, dx = ((i + 0.5) / th - 0.5) * fh, ((j + 0.5) / tw - 0.5) * fw
                if abs(dy) < 1e-6 and abs(dx) < 1e-6:
                    total += sims[:, k]
                    continue
                gy = (ys + dy) / height * 2 - 1
                gx = (xs + dx) / width * 2 - 1
                grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1)
                total += F.grid_sample(sims[:, k:k + 1], grid.expand(len(maps), -1, -1, -1),
                                       mode="bilinear", padding_mode="zeros", align_corners=False)[:, 0]
            total /= th * tw
            better = total > best
            best = torch.where(better, total, best)
            best_scale = torch.where(better, torch.full_like(best_scale, si), best_scale)
        best = best.masked_fill(~stack.valid[start:start + chunk], -1.0)
        flat = best.flatten(1)
        top = flat.argmax(dim=1)
        scores[start:start + len(maps)] = flat.gather(1, top[:, None])[:, 0].numpy()
        heat[start:start + len(maps)] = best.numpy()
        cy, cx = (top // width).numpy() + 0.5, (top % width).numpy() + 0.5
        chosen = np.asarray(scales, np.float32)[best_scale.flatten(1).gather(1, top[:, None])[:, 0].numpy()]
        boxes[start:start + len(maps)] = _cells_to_pixels(
            cx, cy, chosen * qw, chosen * qh, stack.image_sizes[start:start + len(maps)],
            stack.map_sizes[start:start + len(maps)])
    return MatchResult(scores, boxes, heat)


def _cells_to_pixels(cx, cy, w, h, image_sizes, map_sizes) -> np.ndarray:
    sx = image_sizes[:, 0] / map_sizes[:, 1]
    sy = image_sizes[:, 1] / map_sizes[:, 0]
    x0 = np.clip((cx - w / 2) * sx, 0, image_sizes[:, 0])
    y0 = np.clip((cy - h / 2) * sy, 0, image_sizes[:, 1])
    x1 = np.clip((cx + w / 2) * sx, 0, image_sizes[:, 0])
    y1 = np.clip((cy + h / 2) * sy, 0, image_sizes[:, 1])
    return np.stack([x0, y0, x1 - x0, y1 - y0], axis=1)


def heatmap_for(result: MatchResult, index: int, stack: MapStack) -> np.ndarray:
    """The frame's heat map cropped to its own map size, scores in [0, 1] (negative cosine -> 0)."""
    h, w = stack.map_sizes[index]
    return np.clip(result.heatmaps[index, :h, :w], 0.0, 1.0)
