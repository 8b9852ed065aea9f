"""Feature saliency (FS) of one activation map: paper 003 sec. 3.3, eq. 1-2, normalised as CroW [17].

What is computed, exactly, for a map A of shape C x h x w:

1. A <- max(A, 0). The paper assumes a non-negative map (sec. 3.2). EfficientNet-Lite's stride-16/32 maps
   are block outputs after a linear projection (no activation), so about half of their values are negative
   (down to about -40); ResNet maps are post-ReLU. Clamping keeps the positive evidence only.
2. a_j = fraction of the h*w positions where channel j is non-zero (after the clamp).
3. b_j = log( sum_k (a_k + eps) / (a_j + eps) )                                    (eq. 1)
   an idf-like weight: channels that fire at few positions weigh more.
4. F = sum_j b_j A_j                                                               (eq. 2), h x w
5. CroW's normalisation: F <- (F / ||F||_a)^(1/b) with a = 2, b = 2 (CroW's defaults).
6. F <- F / max(F), so the map lies in [0, 1] and a threshold means "fraction of the peak" on every image.
   This makes step 5's division by ||F||_a a no-op on the result (any positive factor cancels); it is kept
   so that the code reads as CroW. The effective map is sqrt(F / max F). The square root makes the map
   flat (on bench frames: ~0.7 on objects, ~0.65 elsewhere); EGM's exponent rho restores the contrast.

An all-zero map (no positive activation anywhere) gives an all-zero saliency.
"""

from __future__ import annotations

import numpy as np


def feature_saliency(feature_map: np.ndarray, *, eps: float = 1e-6, a: float = 2.0, b: float = 2.0) -> np.ndarray:
    """C x h x w activation map -> h x w feature saliency in [0, 1] (003 eq. 1-2, CroW normalisation).

    ``eps`` is eq. 1's epsilon; ``a`` and ``b`` are CroW's norm and power (F / ||F||_a)^(1/b).
    See the module docstring for every step.
    """
    A = np.maximum(np.asarray(feature_map, dtype=np.float32), 0.0)  # fp16 -> fp32, non-negative (sec. 3.2)
    if A.ndim != 3:
        raise ValueError(f"feature_saliency wants a C x h x w map, got shape {A.shape}")
    c, h, w = A.shape
    nonzero = (A > 0).reshape(c, -1).mean(axis=1)                 # a_j
    # b_j, eq. 1; b_j >= 0 because the sum includes a_j + eps, so F below is non-negative
    weights = np.log((nonzero + eps).sum() / (nonzero + eps))
    F = np.tensordot(weights, A, axes=1)                          # eq. 2: sum_j b_j A_j -> h x w
    norm = float((F ** a).sum()) ** (1.0 / a)
    if norm <= 0 or not np.isfinite(norm):
        return np.zeros((h, w), np.float32)
    F = (F / norm) ** (1.0 / b)                                   # CroW spatial-weight normalisation
    return (F / F.max()).astype(np.float32)                       # [0, 1]
