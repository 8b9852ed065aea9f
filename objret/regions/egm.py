"""Salient regions of a 2-d saliency map by EGM, the expanding Gaussian mixture (paper 003 sec. 3.4, its ref. [2]).

The map is a function: position p_i (a cell centre) carries the Gaussian s_i(x) = S_i N(x | p_i, sigma I)
(eq. 3). Components q_k(x) = pi_k N(x | mu_k, Sigma_k) with diagonal Sigma_k (eq. 4) start as one per
position (q_k <- s_k) and are refined by rounds of E-, M- and P-steps:

* E (eq. 5): gamma_ik = <s_i, q_k> / sum_j <s_i, q_j>, with the closed-form L2 inner product of two
  Gaussians <N(.|a, A), N(.|b, B)> = N(a | b, A + B), so <s_i, q_k> = S_i pi_k N(p_i | mu_k, Sigma_k + sigma I)
  (S_i cancels in the ratio).
* M (eq. 6-8), each position weighted by its saliency S_i: the paper extends EGM from points to a function,
  so a position holds S_i of mass, not 1: n_k = sum_i S_i gamma_ik, pi_k = n_k / sum_i S_i,
  mu_k = sum_i S_i gamma_ik p_i / n_k, Sigma_k = sum_i S_i gamma_ik diag(p_i - mu_k)^2 / n_k.
  Eq. 8 is taken as printed: the samples' own sigma I is not added to Sigma_k (adding it, the second
  moment of s_i, made components grow until real maps ended with 1-2 regions covering most of the frame).
* P (purge, NMS-like): components in descending order of pi_k; component k's generalised responsibility
  for itself against the components already kept, r_k = <q_k, q_k> / (<q_k, q_k> + sum_{j kept} <q_k, q_j>),
  says how much of q_k is its own; k is dropped when its overlap 1 - r_k >= ``purge``. The inner products
  use the components as the E-step sees them, N(mu_k, Sigma_k + sigma I) (this also keeps a component that
  holds a single position, Sigma_k = 0, well defined). Of two identical components the second has overlap
  >= 0.5, so with purge <= 0.5 duplicates always go.

Rounds stop when the number of components has not changed for 5 rounds, when no mean moves by more than
0.01 cell, or after ``max_iter`` rounds. (EM drifts slowly once the regions are found: waiting for the means
to settle takes ~50 rounds and changes little.) Round 1, where every component is still its own s_k, is
computed as separable Gaussian filtering of the grid, which is exact and avoids l x l matrices.

Parameters are the paper's (sec. 4.1-4.2, tuned there for feature saliency: rho = 5, tau = 0.4, sigma = 2.5):
  tau:   the map is masked at tau before detection (003 sec. 4.1, "each saliency map is masked above
         threshold tau and element-wise raised to exponent rho"): positions below tau * max(S) are set to 0.
         Note: in 003, tau is this mask, not the purge threshold. Larger tau -> less of the map is
         covered; the number of regions is not monotone in tau (the map first breaks into islands).
         With rho = 5 the min_mass floor (5% of the peak mass, i.e. S < 0.55 max) already hides every
         position that tau <= 0.55 would mask, so there tau only matters above 0.55.
  rho:   the exponent applied after the mask (contrast between foreground and clutter).
  sigma: the scale of the per-position Gaussians, the covariance sigma I of eq. 3 (a variance, in cells^2).
  purge: the overlap threshold of the P-step (003 does not report it; 0.5 by default). Smaller -> fewer regions.
  min_mass: positions whose mass (masked, powered saliency) is below min_mass * its peak are not sampled;
         they would hold < 5% of a peak position's mass, and dropping them keeps the l x m matrices small.

A component becomes the box mu_k +- box_std * std_k per axis, widened by one cell (a position stands for a
whole cell, so a component holding one position gives its 1 x 1 cell), clipped to the map. box_std = 2 by
default: 003 does not say; a Gaussian holds 95% of its mass within +-2 std per axis.
A region's score is the mean of the input saliency over the cells its box touches (003 eq. 9).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_STABLE_ROUNDS = 5   # stop once the number of components has not changed for this many rounds
_MOVE_TOL = 1e-2     # cells: means that move less than this count as converged


@dataclass(frozen=True)
class Region:
    """A box in map cells (x, y = top-left corner; cell j spans [j, j + 1]) and its score."""

    x: float
    y: float
    w: float
    h: float
    score: float  # mean input saliency inside the box (003 eq. 9)


def _first_round(mass_grid: np.ndarray, sigma: float):
    """E- and M-step of round 1, when every component is still its own s_k (q_k = s_k).

    All components then sit on the grid with the same covariance sigma I, so <s_i, q_k> is a Gaussian of
    p_i - p_k with covariance 2 sigma I, and every sum over positions is a separable Gaussian filtering of
    the h x w grid: O(hw (h + w)) instead of l x l matrices (l ~ 1000 positions on a 40 x 30 map).
    Returns pi, mu, Sigma (diagonal, m x 2) of the components, in the order of np.nonzero(mass_grid).
    """
    h, w = mass_grid.shape
    ys, xs = np.arange(h) + 0.5, np.arange(w) + 0.5

    def kernel(c):  # unnormalised: the constant cancels in the responsibilities
        return np.exp(-((c[:, None] - c[None, :]) ** 2) / (4 * sigma))

    gy, gx = kernel(ys), kernel(xs)

    def blur(grid):  # sum_i grid_i g(p_i - p_k) at every grid position k (g is symmetric)
        return gy @ grid @ gx

    sampled = mass_grid > 0
    pick = np.nonzero(sampled)
    pi = mass_grid / mass_grid.sum()
    # S_i / sum_j pi_j g_ij: what position i hands out, in proportion to pi_k g_ik (eq. 5)
    share = np.divide(mass_grid, blur(pi), out=np.zeros_like(pi), where=sampled)
    X, Y = np.meshgrid(xs, ys)

    def per_component(grid):  # sum_i S_i gamma_ik grid_i for the sampled k
        return (pi * blur(share * grid))[pick]

    n = per_component(1.0)
    mu = np.stack([per_component(X), per_component(Y)], axis=1) / n[:, None]               # eq. 7
    second = np.stack([per_component(X ** 2), per_component(Y ** 2)], axis=1) / n[:, None]
    return n / mass_grid.sum(), mu, np.maximum(second - mu ** 2, 0.0)                      # eq. 6, 8


def _e_step(points, sigma, pi, mu, var):
    # eq. 5: <s_i, q_k> = S_i pi_k N(p_i | mu_k, Sigma_k + sigma I); S_i cancels in the normalisation
    total = var + sigma
    logits = np.log(pi)[None] - 0.5 * np.log(total.prod(-1))[None]
    for d in range(2):  # one axis at a time: l x m arrays, never l x m x 2
        logits = logits - (points[:, d, None] - mu[None, :, d]) ** 2 / (2 * total[None, :, d])
    logits -= logits.max(axis=1, keepdims=True)
    gamma = np.exp(logits)
    return gamma / gamma.sum(axis=1, keepdims=True)


def _m_step(points, mass, gamma):
    weighted = gamma * mass[:, None]                        # S_i gamma_ik
    n = weighted.sum(axis=0)
    alive = n > 1e-9 * mass.sum()                           # a component nobody is responsible for is gone
    weighted, n = weighted[:, alive], n[alive]
    pi = n / mass.sum()                                     # eq. 6
    mu = weighted.T @ points / n[:, None]                   # eq. 7
    second = weighted.T @ (points ** 2) / n[:, None]
    return pi, mu, np.maximum(second - mu ** 2, 0.0)        # eq. 8: E[(p - mu)^2] per axis


def purge_components(pi: np.ndarray, mu: np.ndarray, var: np.ndarray, *, sigma: float,
                     threshold: float = 0.5) -> np.ndarray:
    """The P-step: indices of the components kept, in descending order of pi.

    ``pi`` (m), ``mu`` (m x 2) and ``var`` (m x 2, the diagonal of Sigma_k) describe the components;
    a component is dropped when 1 - r_k >= threshold (module docstring).
    """
    order = np.argsort(-pi, kind="stable")
    pi, mu, var = pi[order], mu[order], var[order] + sigma  # the components as the E-step sees them

    def inner(j):
        # <q_j, q_k> / pi_k = pi_j N(mu_k | mu_j, Sigma_j + Sigma_k) for every k, closed form [2]
        total = var[j] + var
        q = ((mu[j] - mu) ** 2 / total).sum(-1)
        return pi[j] * np.exp(-0.5 * q) / (2 * np.pi * np.sqrt(total.prod(-1)))

    self_inner = (pi / (2 * np.pi * np.sqrt((2 * var).prod(-1)))).tolist()  # <q_k, q_k> / pi_k
    from_kept = np.zeros(len(pi))   # sum over kept j of <q_j, q_k> / pi_k, for every k (pi_k cancels in r_k)
    keep = []
    for k in range(len(pi)):
        overlap = from_kept[k] / (self_inner[k] + from_kept[k])  # 1 - generalised responsibility r_k
        if overlap < threshold:
            keep.append(k)
            from_kept += inner(k)  # rows for kept components only: O(m * kept), not O(m^2)
    return order[keep]


def _mean_inside(saliency: np.ndarray, boxes: list[tuple[float, float, float, float]]) -> list[float]:
    # eq. 9 over the cells a box touches, with an integral image
    h, w = saliency.shape
    integral = np.zeros((h + 1, w + 1))
    integral[1:, 1:] = saliency.cumsum(0).cumsum(1)
    out = []
    for x, y, bw, bh in boxes:
        x0, y0 = min(int(np.floor(x)), w - 1), min(int(np.floor(y)), h - 1)
        x1 = max(x0 + 1, min(w, int(np.ceil(x + bw))))
        y1 = max(y0 + 1, min(h, int(np.ceil(y + bh))))
        total = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
        out.append(float(total / ((x1 - x0) * (y1 - y0))))
    return out


def egm_regions(saliency: np.ndarray, *, sigma: float = 2.5, tau: float = 0.4, rho: float = 5.0,
                purge: float = 0.5, max_iter: int = 50, min_mass: float = 0.05,
                box_std: float = 2.0) -> list[Region]:
    """EGM regions of an h x w saliency map (003 sec. 3.4), in map cells, highest score first.

    ``tau`` masks the map below tau * max (003 sec. 4.1), ``rho`` is the exponent applied after that,
    ``sigma`` the covariance of each position's Gaussian (eq. 3, cells^2), ``purge`` the P-step's overlap
    threshold, ``max_iter`` the most E/M/P rounds, ``min_mass`` the sampling floor (fraction of the peak
    of the masked, powered map), ``box_std`` the box half-size in standard deviations.
    An all-zero map gives no region. See the module docstring for the details.
    """
    S = np.asarray(saliency, dtype=np.float64)
    if S.ndim != 2:
        raise ValueError(f"egm_regions wants an h x w map, got shape {S.shape}")
    S = np.where(np.isfinite(S), S, 0.0)
    peak = S.max(initial=0.0)
    if peak <= 0:
        return []
    h, w = S.shape
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    relative = S / peak
    weight = np.where((relative >= tau) & (relative > 0), relative ** rho, 0.0)  # 003 sec. 4.1: mask, exponent
    if weight.max() <= 0:
        return []                                             # tau above the peak: nothing left
    weight[weight < min_mass * weight.max()] = 0.0            # too light to be worth a component
    rows, cols = np.nonzero(weight)
    points = np.stack([cols + 0.5, rows + 0.5], axis=1)      # (x, y) of the cell centres
    mass = weight[rows, cols]

    pi, mu, var = _first_round(weight, sigma)                # q_k <- s_k, then E and M
    unchanged = 0
    for round_ in range(max_iter):
        before, moved = len(pi), True
        if round_ > 0:
            gamma = _e_step(points, sigma, pi, mu, var)
            new_pi, new_mu, var = _m_step(points, mass, gamma)
            moved = len(new_mu) != len(mu) or np.abs(new_mu - mu).max() > _MOVE_TOL
            pi, mu = new_pi, new_mu
        kept = purge_components(pi, mu, var, sigma=sigma, threshold=purge)
        pi, mu, var = pi[kept] / pi[kept].sum(), mu[kept], var[kept]
        unchanged = unchanged + 1 if len(kept) == before else 0
        if not moved or unchanged >= _STABLE_ROUNDS:
            break

    boxes = []
    for k in range(len(pi)):                                 # descending pi
        half = box_std * np.sqrt(var[k]) + 0.5                # +0.5: a position stands for its whole cell
        x0, y0 = np.maximum(mu[k] - half, 0.0)
        x1, y1 = np.minimum(mu[k] + half, [w, h])
        boxes.append((float(x0), float(y0), float(x1 - x0), float(y1 - y0)))
    regions = [Region(*box, score) for box, score in zip(boxes, _mean_inside(S, boxes))]
    return sorted(regions, key=lambda r: -r.score)
