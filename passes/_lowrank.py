"""Numeric fits for low-rank splits: numpy in, numpy out, no graphs."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Moments:
    """Second moments of a layer's input rows: x from the original model, x' from the rewritten one."""

    new: np.ndarray  # E[x' x'^T]
    cross: np.ndarray  # E[x' x^T]
    old: np.ndarray  # E[x x^T]
    # The same moments over the fit rows and over held-out rows (samples set aside), to choose the ridge on.
    split: tuple[Moments, Moments] | None = None

    @classmethod
    def same(cls, cov: np.ndarray) -> Moments:
        """Inputs unchanged by earlier rewrites: all three moments are the covariance."""
        return cls(cov, cov, cov)

    @property
    def unchanged(self) -> bool:
        return self.new is self.old


def right_basis(w: np.ndarray, cov: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Singular values and right singular vectors (columns) of W, or of S W when cov = S^T S is given.

    They are the eigenpairs of W^T C W (N x N), so no square root of the K x K covariance is needed."""
    gram = w.T @ w if cov is None else w.T @ (cov @ w)
    values, vectors = np.linalg.eigh((gram + gram.T) / 2)
    order = np.argsort(values)[::-1][: min(w.shape)]  # the rank is at most min(K, N)
    return np.sqrt(np.maximum(values[order], 0.0)), vectors[:, order]


def pick_rank(s: np.ndarray, rank_ratio: float, energy: float | None, min_rank: int = 1) -> int:
    """Rank from a share of the full rank, or the smallest rank keeping `energy` of sum(s^2)."""
    full = len(s)
    if energy is not None:
        kept = np.cumsum(s**2) / max(float(np.sum(s**2)), 1e-30)
        rank = int(np.searchsorted(kept, energy - 1e-12) + 1)
    else:
        rank = math.ceil(rank_ratio * full)
    return int(min(full, max(min_rank, rank)))


def lowrank_factor(w: np.ndarray, rank: int, cov: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """W (K x N) ~ A (K x r) @ B (r x N), best in ||S (W - A B)||; B has orthonormal rows."""
    _, v = right_basis(w, cov)
    basis = v[:, :rank]
    return w @ basis, basis.T


def compensated_target(w: np.ndarray, moments: Moments, ridge: float = 1e-3) -> np.ndarray:
    """The full-rank W' minimising ||X' W' - X W||^2 + lambda ||W' - W||^2: earlier layers' errors are
    absorbed here, while directions the calibration inputs never excite keep the original weights."""
    if moments.unchanged:
        return w
    k = len(w)
    damping = ridge * max(float(np.trace(moments.new)) / k, 1e-30)
    return np.linalg.solve(moments.new + damping * np.eye(k), moments.cross @ w + damping * w)


RIDGES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # shrinkage towards the original weights, relative to the input scale


def fitted_target(w: np.ndarray, moments: Moments, rank_of) -> tuple[np.ndarray, float | None]:
    """The compensated target over all rows, with the ridge whose split (at the rank `rank_of(s)` gives)
    keeps the held-out rows' outputs closest when fitted on the other rows: calibration sets are small, and
    a fit that follows them too closely loses more than it corrects. None when nothing needs compensating."""
    if moments.unchanged or moments.split is None:
        return compensated_target(w, moments), None
    fit, held = moments.split
    errors = {}
    for ridge in RIDGES:
        target = compensated_target(w, fit, ridge)
        s, basis = right_basis(target, fit.new)
        kept = basis[:, : rank_of(s)]
        errors[ridge] = output_error(w, target @ kept @ kept.T, held)
    best = min(RIDGES, key=lambda r: (errors[r], -r))
    return compensated_target(w, moments, best), best


def output_error(w: np.ndarray, approx: np.ndarray, moments: Moments) -> float:
    """Relative error ||X' W~ - X W|| / ||X W|| of the approximation W~, from the moments alone."""
    reference = float(np.sum(w * (moments.old @ w)))
    error = float(np.sum(approx * (moments.new @ approx)) - 2 * np.sum(approx * (moments.cross @ w))) + reference
    return math.sqrt(max(error, 0.0) / max(reference, 1e-30))


def spatial_factor(weight: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """W (O, I, kh, kw) ~ sum_r H[o, r, x] V[r, i, y]: V (r, I, kh, 1) then H (O, r, 1, kw)."""
    o, i, kh, kw = weight.shape
    m = weight.transpose(1, 2, 0, 3).reshape(i * kh, o * kw)
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    root = np.sqrt(s[:rank])
    vertical = (u[:, :rank] * root).T.reshape(rank, i, kh, 1)
    horizontal = (root[:, None] * vt[:rank]).reshape(rank, o, 1, kw).transpose(1, 0, 2, 3)
    return vertical, horizontal


def ridge_refit(gram: np.ndarray, cross: np.ndarray, start: np.ndarray, ridge: float = 1e-3) -> np.ndarray:
    """argmin_H ||P H - Y||^2 + lambda ||H - H0||^2, from P^T P (gram) and P^T Y (cross)."""
    k = len(gram)
    damping = ridge * max(float(np.trace(gram)) / k, 1e-30)
    return np.linalg.solve(gram + damping * np.eye(k), cross + damping * start)


def residual_share(gram: np.ndarray, cross: np.ndarray, y_energy: float, h: np.ndarray) -> float:
    """||P H - Y|| / ||Y|| from the same moments and sum(Y^2)."""
    error = float(np.sum(h * (gram @ h)) - 2 * np.sum(h * cross)) + y_energy
    return math.sqrt(max(error, 0.0) / max(y_energy, 1e-30))
