"""Pooling of dense maps into descriptors: whole-frame GeM and box templates."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align


def l2n(x: torch.Tensor, dim: int = -1, eps: float = 1e-6) -> torch.Tensor:
    return x / (x.norm(dim=dim, keepdim=True) + eps)


def gem(feature_map: np.ndarray | torch.Tensor, p: float = 3.0) -> np.ndarray:
    """Generalised-mean pooling of a C x h x w map over all positions, L2-normalised (Radenovic et al.)."""
    x = torch.as_tensor(np.asarray(feature_map, dtype=np.float32))
    pooled = x.clamp(min=1e-6).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)
    return l2n(pooled).numpy()


def box_to_cells(box_xywh, image_size: tuple[int, int], map_size: tuple[int, int]) -> tuple[float, float, float, float]:
    """A pixel box [x, y, w, h] of a W x H image -> the same box in cells of an h x w feature map."""
    (width, height), (map_h, map_w) = image_size, map_size
    sx, sy = map_w / width, map_h / height
    x, y, w, h = box_xywh
    return x * sx, y * sy, w * sx, h * sy


def template_grid(box_cells_wh: tuple[float, float], max_cells: int = 3) -> tuple[int, int]:
    """Template rows x columns for a box of w x h cells: its shape in cells, at most ``max_cells`` a side."""
    w, h = box_cells_wh
    return int(np.clip(round(h), 1, max_cells)), int(np.clip(round(w), 1, max_cells))


def box_template(feature_map: np.ndarray, box_xywh, image_size: tuple[int, int], max_cells: int = 3,
                 grid: tuple[int, int] | None = None) -> np.ndarray:
    """The query box pooled to a grid of at most ``max_cells`` per side: th x tw x C, each cell L2-normalised.

    The grid follows the box's shape in cells, so a tall pedestrian gives e.g. 3 x 1 and a one-cell object 1 x 1;
    ``grid`` imposes one (a mirrored view must match the original's layout).
    """
    fmap = torch.as_tensor(np.asarray(feature_map, dtype=np.float32))[None]
    x, y, w, h = box_to_cells(box_xywh, image_size, fmap.shape[-2:])
    th, tw = grid or template_grid((w, h), max_cells)
    rois = torch.tensor([[0, x, y, x + w, y + h]], dtype=torch.float32)
    cells = roi_align(fmap, rois, output_size=(th, tw), spatial_scale=1.0, sampling_ratio=2, aligned=True)[0]
    return l2n(cells.permute(1, 2, 0)).numpy()


def box_descriptor(feature_map: np.ndarray, box_xywh, image_size: tuple[int, int], p: float = 3.0) -> np.ndarray:
    """GeM of the map inside the box (at least one cell), L2-normalised: a box-level global descriptor."""
    fmap = torch.as_tensor(np.asarray(feature_map, dtype=np.float32))[None]
    x, y, w, h = box_to_cells(box_xywh, image_size, fmap.shape[-2:])
    side = max(2, int(np.ceil(max(w, h))))
    rois = torch.tensor([[0, x, y, x + max(w, 1.0), y + max(h, 1.0)]], dtype=torch.float32)
    cells = roi_align(fmap, rois, output_size=(side, side), sampling_ratio=2, aligned=True)[0]
    return gem(F.relu(cells), p)
