"""Deeply activated salient regions: DASR and DASR* (001 sec. III).

1. A forward pass gives the target layer's map X (stride 32 by default); its channel mean X̄ signals objects.
2. Peaks of X̄: DASR* takes every position above the mean of X̄ (sec. III-B), DASR the 3x3 local maxima.
3. Each peak's "top neuron" (the channel mean at that position) gets probability 1, and the probability is
   back-propagated layer by layer with the excitation-backprop rule (eq. 2-3, Zhang et al. 2016/2018):

       P(A_x) = sum_j P(A_x | B_j) P(B_j),   P(A_x | B_j) = Z_j A_x F_xj  for A_x F_xj > 0 (0 otherwise)

   i.e. a winner B_j hands its probability to the inputs that excite it, in proportion to their share of its
   excitation (Z_j normalises the shares to 1; biases take no share).
4. The probability map M at the stopping layer (summed over channels, normalised to [0, 1]) is thresholded at
   tau, an ellipse is fitted from the second moments of the kept positions (eq. 4) and its circumscribed
   rectangle is the region's box.
5. DASR* keeps the regions by non-maximum suppression at IoU beta (0.3), in order of their peak's X̄ value.

Stopping layer: ``to_layer`` (regions.dasr.to_layer in params.yaml: stride16). The paper goes down to
the input pixels; we stop earlier because (a) the normalised image is signed, so the first convolution would
need the signed reading of eq. 3 rather than eq. 3 itself, (b) the layers below stride 8 run at 4-16x the
positions and would be the most expensive part of every peak's backward pass, and (c) going further down did
not give better boxes: on 60 coco_mini images at 320 px (efficientnet_lite0), the mean best IoU of the objects
covering >= 5% of the image was 0.38 (stride16), 0.38 (stride8), 0.38 (stride4) and 0.40 vs 0.40 for
"input" vs stride8 on the first 30 images. A stride-8 map (80 x 60 positions for a 640 px frame) is four times
finer than the stride-32 peaks, enough for a box. "stride16" (the last stride-16 block's output) is as accurate
there and about 3x cheaper; "stride8", "stride4" and "input" are available.

Threshold: tau = 0.2 by default, where the paper uses 0.1: on the same 60 images at stride 8, 0.2 gave a mean
best IoU of 0.38 vs 0.37 for large objects and 0.13 vs 0.10 for objects of 1-5% of the image (0.1 keeps a
wide halo of low probability around the peak, so boxes grow and NMS keeps fewer of them).

Cost: each peak costs about one backward pass of the layers above the stopping layer, so a frame costs
peaks x that, and both grow with the frame's area. Measured once on the shared 2-core CPU (1 thread), batch of
8 coco_mini frames at 640 x 480, 64 of ~150 above-mean peaks per frame: lite0 stride8 18 s per frame, lite2
stride8 25 s, lite2 stride16 8.6 s (a plain forward pass: 0.4-0.6 s). At 320 px lite0 takes ~1.5 s per frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from objret.boxes import iou_xywh
from objret.errors import ObjretError
from objret.regions.excitation import STOP_LAYERS, excitation_backprop, prepare_stages

_EPS = 1e-12


@dataclass(frozen=True)
class Region:
    """One salient region: box (x, y, w, h) in pixels of the network input, its peak and the peak's X̄ value."""

    box: tuple[float, float, float, float]
    score: float
    peak: tuple[int, int]  # (row, col) on the target layer's map
    mass: float            # probability that reached the stopping layer (1 minus what biases absorbed)


# ---------------------------------------------------------------------------------------------------------------
# Peaks, ellipses, NMS
# ---------------------------------------------------------------------------------------------------------------

def find_peaks(mean_map: torch.Tensor, peaks: str = "above_mean") -> list[tuple[float, int, int]]:
    """(X̄ value, row, col) of the peaks of one h x w mean map, strongest first.

    "above_mean": every position above the map's mean (DASR*, sec. III-B); "local_max": the 3x3 local
    maxima (DASR, sec. III-A)."""
    if peaks == "above_mean":
        keep = mean_map > mean_map.mean()
    elif peaks == "local_max":
        keep = mean_map >= F.max_pool2d(mean_map[None, None], 3, 1, 1)[0, 0]
    else:
        raise ObjretError(f"unknown peaks {peaks!r}: above_mean (DASR*) or local_max (DASR)")
    rows, cols = torch.nonzero(keep, as_tuple=True)
    found = [(float(mean_map[r, c]), int(r), int(c)) for r, c in zip(rows.tolist(), cols.tolist())]
    return sorted(found, key=lambda p: -p[0])


def _top_neuron_start(out: torch.Tensor, rows: list[int], cols: list[int]) -> torch.Tensor:
    """P(X) for a unit of probability on the channel-mean neuron at each sample's peak (eq. 3 with weights
    1/C, which cancel): the channels share it in proportion to their activation of the sign of the mean."""
    start = torch.zeros(out.shape, dtype=out.dtype, device=out.device)
    k = torch.arange(out.shape[0], device=out.device)
    column = out[k, :, rows, cols]                       # K x C
    aligned = (column * torch.sign(column.mean(1, keepdim=True))).clamp(min=0)
    start[k, :, rows, cols] = aligned / aligned.sum(1, keepdim=True).clamp(min=_EPS)
    return start


def ellipse_box(prob_map: np.ndarray, threshold: float, cell_size: tuple[float, float]):
    """Box (x, y, w, h) in pixels of the ellipse fitted to ``prob_map`` >= threshold * max (eq. 4).

    The positions kept give a mean and a covariance (unweighted second moments, eq. 4; each position is a
    cell, whose own spread adds 1/12 cell^2). A uniformly filled ellipse with semi-axis a has std a/2 along
    that axis, so the fitted ellipse is {d : d' cov^-1 d <= 4} and its circumscribed rectangle is
    mean +- 2 std along x and y. Returns None for an empty map."""
    peak = float(prob_map.max())
    if not peak > 0:
        return None
    rows, cols = np.nonzero(prob_map >= threshold * peak)
    cx, cy = cols.mean() + 0.5, rows.mean() + 0.5
    half_w, half_h = 2 * math.sqrt(cols.var() + 1 / 12), 2 * math.sqrt(rows.var() + 1 / 12)
    sx, sy = cell_size
    return (float((cx - half_w) * sx), float((cy - half_h) * sy), float(2 * half_w * sx), float(2 * half_h * sy))


def _clip_box(box, width: int, height: int):
    x0, y0 = max(0.0, box[0]), max(0.0, box[1])
    x1, y1 = min(float(width), box[0] + box[2]), min(float(height), box[1] + box[3])
    return (x0, y0, max(0.0, x1 - x0), max(0.0, y1 - y0))


def nms(regions: list[Region], beta: float) -> list[Region]:
    """Greedy NMS (sec. III-B): highest X̄ first; a region overlapping a kept one by IoU > beta is dropped."""
    kept: list[Region] = []
    for region in sorted(regions, key=lambda r: -r.score):
        if all(iou_xywh(region.box, k.box) <= beta for k in kept):
            kept.append(region)
    return kept


# ---------------------------------------------------------------------------------------------------------------
# DASR regions
# ---------------------------------------------------------------------------------------------------------------

def dasr_regions(backbone, images: torch.Tensor, *, to_layer: str, max_peaks: int, target_layer: str = "stride32",
                 peaks: str = "above_mean", threshold: float = 0.2, nms_beta: float | None = 0.3,
                 max_regions: int = 16, chunk_size: int = 16) -> list[list[Region]]:
    """DASR* (default) or DASR regions of each image of a preprocessed batch (N x 3 x H x W).

    ``threshold`` is tau on the max-normalised probability map (the paper uses 0.1, see the module notes);
    ``max_peaks`` caps the peaks back-propagated per image (strongest first: cost grows linearly with it);
    ``nms_beta`` None skips NMS. Boxes are (x, y, w, h) in pixels of the network input (W x H), clipped to it;
    scale them to the original frame yourself. One backward pass per ``chunk_size`` peaks of an image.
    """
    if to_layer not in STOP_LAYERS:
        raise ObjretError(f"unknown to_layer {to_layer!r}: one of {STOP_LAYERS}")
    prepared = prepare_stages(backbone)
    if target_layer not in backbone.spec.layers or target_layer not in prepared.layer_stage:
        raise ObjretError(f"DASR target layer {target_layer!r} is not a layer of backbone {backbone.spec.name}")
    stop, target = prepared.layer_stage[to_layer], prepared.layer_stage[target_layer]
    if stop >= target:
        raise ObjretError(f"DASR: to_layer {to_layer} must lie below target_layer {target_layer}")
    device = next(backbone.extractor.parameters()).device
    images = images.to(device, torch.float32)
    height, width = images.shape[-2:]

    # One forward pass per image up to the stopping layer, and on to the target layer for the peaks.
    lower = torch.nn.Sequential(*prepared.stages[:stop + 1])
    upper = torch.nn.Sequential(*prepared.stages[stop + 1:target + 1])
    with torch.no_grad():
        low = lower(images)
        mean_maps = upper(low).mean(1)
    found: list[list[Region]] = [[] for _ in range(len(images))]
    cell = (width / low.shape[-1], height / low.shape[-2])
    for n in range(len(images)):
        image_peaks = find_peaks(mean_maps[n], peaks)[:max_peaks]
        for begin in range(0, len(image_peaks), chunk_size):
            chunk = image_peaks[begin:begin + chunk_size]
            rows, cols = [p[1] for p in chunk], [p[2] for p in chunk]
            # The image's map expanded to one row per peak: one forward, and one backward for the chunk.
            shared = low[n:n + 1].expand(len(chunk), *low.shape[1:])
            p_low, _ = excitation_backprop(upper, shared, lambda out: _top_neuron_start(out, rows, cols))
            maps = p_low.sum(1).clamp(min=0).cpu().numpy()  # P per position of the stopping layer
            for (score, row, col), prob in zip(chunk, maps):
                box = ellipse_box(prob, threshold, cell)
                if box is not None:
                    found[n].append(Region(_clip_box(box, width, height), score, (row, col), float(prob.sum())))
    if nms_beta is not None:
        found = [nms(regions, nms_beta) for regions in found]
    return [sorted(regions, key=lambda r: -r.score)[:max_regions] for regions in found]
