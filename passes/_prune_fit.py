"""Numeric side of pruning: LASSO channel selection (He et al. 2017), weight-magnitude scores, ridge refits.

Pure functions on numpy arrays; nothing here knows about the graph or onnxruntime.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

RIDGES = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


def contributions(x: np.ndarray, w: np.ndarray, columns: list[np.ndarray], pairs: int, rng) -> tuple:
    """Each unit's contribution to a layer's output at `pairs` random (row, output) entries.

    x: input rows (R x K), w: weight (K x N), columns[u]: the input columns channel unit u owns.
    Returns Z (pairs x units) and the group's total contribution y = Z.sum(1)."""
    r = rng.integers(0, len(x), size=pairs)
    o = rng.integers(0, w.shape[1], size=pairs)
    products = x[r].astype(np.float64) * w[:, o].T  # (pairs, K)
    z = np.stack([products[:, cols].sum(axis=1) for cols in columns], axis=1)
    return z, z.sum(axis=1)


def lasso_select(z: np.ndarray, y: np.ndarray, keeps: list[int]) -> list[np.ndarray]:
    """For each count in `keeps`, the columns of Z that LASSO (non-negative coefficients) retains when its penalty
    is lowered until at least that many coefficients are non-zero; ties and shortfalls are broken by contribution
    energy. One regularisation path serves every count. Returns the sorted kept indices per count."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import lasso_path

    energy = np.sqrt(np.mean(z**2, axis=0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        _, coefs, _ = lasso_path(z, y, positive=True, alphas=80, eps=1e-4, max_iter=2000)
    counts = np.count_nonzero(coefs > 0, axis=0)
    chosen = []
    for keep in keeps:
        at = int(np.argmax(counts >= keep)) if np.any(counts >= keep) else coefs.shape[1] - 1
        order = np.lexsort((-energy, -coefs[:, at]))  # primary: coefficient, secondary: energy
        chosen.append(np.sort(order[:keep]))
    return chosen


def reconstruction_error(z: np.ndarray, y: np.ndarray, kept: np.ndarray) -> float:
    """||y - Z_kept b|| / ||y|| with b the least-squares scale per kept unit (He et al.'s reconstruction): what
    removing the other units costs the consumers' outputs, before the refit (which has more freedom) lowers it."""
    if len(kept) == z.shape[1]:
        return 0.0
    b, *_ = np.linalg.lstsq(z[:, kept], y, rcond=None)
    return float(np.linalg.norm(y - z[:, kept] @ b) / max(float(np.linalg.norm(y)), 1e-30))


def magnitude_select(scores: np.ndarray, keep: int) -> np.ndarray:
    """The `keep` largest scores (stable: earlier index wins ties)."""
    order = np.argsort(-scores, kind="stable")
    return np.sort(order[:keep])


@dataclass
class Moments:
    """X^T X, X^T Y and sum(Y^2) of a refit, kept apart for fit and held-out rows."""

    k: int
    n: int
    gram: list[np.ndarray] = field(default_factory=list)
    cross: list[np.ndarray] = field(default_factory=list)
    energy: list[float] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.gram = [np.zeros((self.k, self.k)) for _ in range(2)]
        self.cross = [np.zeros((self.k, self.n)) for _ in range(2)]
        self.energy, self.rows = [0.0, 0.0], [0, 0]
        self._pending: list[list[tuple[np.ndarray, np.ndarray]]] = [[], []]
        self._queued = [0, 0]

    def add(self, x: np.ndarray, y: np.ndarray, held: bool) -> None:
        """Queue rows; products are formed in batches (many small updates cost more than one large one)."""
        i = int(held)
        self._pending[i].append((x, y))
        self.rows[i] += len(x)
        self._queued[i] += len(x)
        if self._queued[i] >= 4096:
            self._flush(i)

    def _flush(self, i: int) -> None:
        if not self._pending[i]:
            return
        x = np.concatenate([p[0] for p in self._pending[i]]).astype(np.float64)
        y = np.concatenate([p[1] for p in self._pending[i]]).astype(np.float64)
        self._pending[i], self._queued[i] = [], 0
        self.gram[i] += x.T @ x
        self.cross[i] += x.T @ y
        self.energy[i] += float(np.sum(y**2))

    def done(self) -> Moments:
        self._flush(0)
        self._flush(1)
        return self


def _solve(gram: np.ndarray, cross: np.ndarray, start: np.ndarray, ridge: float) -> np.ndarray:
    damping = ridge * max(float(np.trace(gram)) / len(gram), 1e-12)
    return np.linalg.solve(gram + damping * np.eye(len(gram)), cross + damping * start)


def _error(gram: np.ndarray, cross: np.ndarray, energy: float, w: np.ndarray) -> float:
    return float(np.sum(w * (gram @ w)) - 2.0 * np.sum(w * cross) + energy)


def ridge_refit(m: Moments, start: np.ndarray) -> tuple[np.ndarray, dict]:
    """argmin_W ||X W - Y||^2 + lambda ||W - W0||^2, lambda chosen on the held-out rows (the start W0 itself,
    i.e. no refit, is a candidate); the chosen lambda is then refitted on all rows."""
    m = m.done()
    if m.rows[1] == 0 or m.rows[0] == 0:
        return start, {"refit": "skipped: too few samples to hold some out"}
    scores = {"none": _error(m.gram[1], m.cross[1], m.energy[1], start)}
    solve = _ridge_solver(m.gram[0], m.cross[0], start)  # one eigendecomposition serves every lambda
    for ridge in RIDGES:
        scores[ridge] = _error(m.gram[1], m.cross[1], m.energy[1], solve(ridge))
    best = min(scores, key=scores.get)
    info = {"ridge": best, "held_out_error": _share(scores[best], m.energy[1]),
            "held_out_error_unfitted": _share(scores["none"], m.energy[1]), "rows": sum(m.rows)}
    if best == "none":
        return start, info
    return _solve(m.gram[0] + m.gram[1], m.cross[0] + m.cross[1], start, best), info


def _ridge_solver(gram: np.ndarray, cross: np.ndarray, start: np.ndarray):
    values, vectors = np.linalg.eigh(gram)
    scale = max(float(np.trace(gram)) / len(gram), 1e-12)
    qc, qw = vectors.T @ cross, vectors.T @ start

    def solve(ridge: float) -> np.ndarray:
        d = ridge * scale
        return vectors @ ((qc + d * qw) / (np.maximum(values, 0.0) + d)[:, None])

    return solve


def _share(error: float, energy: float) -> float:
    return float(np.sqrt(max(error, 0.0) / max(energy, 1e-30)))
