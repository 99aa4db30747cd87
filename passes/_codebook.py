"""Numeric fits for weight codes (pq, binary): numpy in, numpy out, no graphs.

Shapes used throughout: a layer's weight as an output-major matrix M (N outputs x K inputs per output).
pq splits M into sub-vectors of size d laid out as V (B blocks, P outputs per block, d): every sub-vector
of block b multiplies the same d input columns, whose Gram matrix G[b] = X_b^T X_b (d x d) turns a weight
error e into the output error e^T G[b] e (Stock et al. 2019, with per-block activation statistics).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning

# Scores of this many (block, output, centroid) triples are held at once in the E-step.
CHUNK_ELEMENTS = 1 << 22


def plain_kmeans(v: np.ndarray, k: int, seed: int, max_iter: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Plain k-means on the sub-vectors (rows of v): (centroids k x d, codes)."""
    with warnings.catch_warnings():
        # Fewer distinct sub-vectors than k (a DFT basis, a sparse weight): the spare centroids repeat, and the
        # codes stay exact; sklearn's warning would break the progress lines.
        warnings.simplefilter("ignore", ConvergenceWarning)
        km = KMeans(n_clusters=k, n_init=1, max_iter=max_iter, random_state=seed).fit(v)
    return km.cluster_centers_.astype(np.float64), km.labels_.astype(np.int64)


def assign(v3: np.ndarray, grams: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, float]:
    """E-step: each sub-vector v of block b goes to argmin_c (v - c)^T G[b] (v - c).

    v3 (B, P, d), grams (B, d, d), centroids (k, d) -> codes (B, P) and the summed objective."""
    b, p, _ = v3.shape
    k = len(centroids)
    codes = np.empty((b, p), dtype=np.int64)
    total = 0.0
    step = max(1, CHUNK_ELEMENTS // max(p * k, 1))
    for start in range(0, b, step):
        g = grams[start : start + step]
        v = v3[start : start + step]
        gc = g @ centroids.T  # (bc, d, k)
        quad = np.einsum("kd,bdk->bk", centroids, gc)
        scores = quad[:, None, :] - 2.0 * (v @ gc)  # (bc, P, k), up to the constant v^T G v
        best = np.argmin(scores, axis=2)
        codes[start : start + step] = best
        const = float(np.sum(v * (v @ g)))
        total += float(np.take_along_axis(scores, best[..., None], axis=2).sum()) + float(const)
    return codes, total


def solve_centroids(
    v3: np.ndarray, grams: np.ndarray, codes: np.ndarray, previous: np.ndarray, ridge: float = 1e-6
) -> tuple[np.ndarray, np.ndarray]:
    """M-step: c_j = (sum_{i in S_j} G[b_i])^-1 sum_{i in S_j} G[b_i] v_i, the least-squares centroid of
    its members' output contributions. Returns (centroids, member counts); empty clusters keep `previous`."""
    b, p, d = v3.shape
    k = len(previous)
    flat = (np.arange(b)[:, None] * k + codes).ravel()
    counts_bk = np.bincount(flat, minlength=b * k).reshape(b, k).astype(np.float64)
    sums = np.stack([np.bincount(flat, weights=v3[..., i].ravel(), minlength=b * k) for i in range(d)], axis=1)
    sums = sums.reshape(b, k, d)
    lhs = np.einsum("bk,bde->kde", counts_bk, grams)
    rhs = np.einsum("bde,bke->kd", grams, sums)
    counts = counts_bk.sum(axis=0)
    scale = np.trace(lhs, axis1=1, axis2=2) / d
    lhs += (ridge * np.maximum(scale, 1e-30))[:, None, None] * np.eye(d)
    centroids = previous.copy()
    used = counts > 0
    centroids[used] = np.linalg.solve(lhs[used], rhs[used][..., None])[..., 0]
    return centroids, counts


def reseed_empty(centroids: np.ndarray, counts: np.ndarray, rng: np.random.Generator) -> int:
    """Re-seed each empty cluster by splitting the most populated one (c +/- e, e small). Returns how many."""
    empty = np.flatnonzero(counts == 0)
    counts = counts.copy()
    for j in empty:
        big = int(np.argmax(counts))
        scale = 1e-3 * max(float(np.linalg.norm(centroids[big])), 1e-12)
        noise = rng.normal(size=centroids.shape[1]) * scale / math.sqrt(centroids.shape[1])
        centroids[j] = centroids[big] + noise
        centroids[big] = centroids[big] - noise
        counts[j] = counts[big] / 2
        counts[big] /= 2
    return len(empty)


def activation_em(
    v3: np.ndarray, grams: np.ndarray, init: np.ndarray, iters: int, seed: int
) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """EM on the output objective sum_i (v_i - c_{a_i})^T G[b_i] (v_i - c_{a_i}), from `init` centroids.

    Returns the centroids, codes (B, P) of the best iterate and the objective after each E-step."""
    rng = np.random.default_rng(seed)
    centroids = init.astype(np.float64).copy()
    codes, objective = assign(v3, grams, centroids)
    best = (objective, centroids.copy(), codes)
    history = [objective]
    for _ in range(iters):
        centroids, counts = solve_centroids(v3, grams, codes, centroids)
        reseed_empty(centroids, counts, rng)
        new_codes, objective = assign(v3, grams, centroids)
        history.append(objective)
        if objective < best[0]:
            best = (objective, centroids.copy(), new_codes)
        if np.array_equal(new_codes, codes):
            break
        codes = new_codes
    return best[1], best[2], history


def weight_error(v3: np.ndarray, grams: np.ndarray, centroids: np.ndarray, codes: np.ndarray) -> float:
    """The output objective of given codes (same quantity `assign` minimises)."""
    e = v3 - centroids[codes]
    return float(np.sum(e * (e @ grams)))


def binarize(m: np.ndarray, bases: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy multi-basis binarisation of M (N x K): for each basis B = sign(R), alpha = mean |R| per
    output, R -= alpha B. Returns signs (N, bases, K) in {-1, +1} and alpha (N, bases)."""
    residual = m.astype(np.float64).copy()
    signs = np.empty((m.shape[0], bases, m.shape[1]))
    alpha = np.empty((m.shape[0], bases))
    for i in range(bases):
        s = np.where(residual >= 0, 1.0, -1.0)
        a = np.abs(residual).mean(axis=1)
        signs[:, i], alpha[:, i] = s, a
        residual -= a[:, None] * s
    return signs, alpha


def refit_alpha(
    signs: np.ndarray, target: np.ndarray, new: np.ndarray, cross: np.ndarray, start: np.ndarray, ridge: float = 1e-6
) -> np.ndarray:
    """Jointly refit every output's alphas on the layer outputs: argmin_a ||X' S^T a - X w||^2.

    signs (N, m, K), target w (N, K) in the original model, new = X'^T X', cross = X'^T X (K x K)."""
    z = np.einsum("nmk,kl->nml", signs, new)
    lhs = np.einsum("nml,npl->nmp", z, signs)  # S G S^T per output
    rhs = np.einsum("nmk,nk->nm", signs, target @ cross.T)
    scale = np.trace(lhs, axis1=1, axis2=2) / signs.shape[1]
    lhs += (ridge * np.maximum(scale, 1e-30))[:, None, None] * np.eye(signs.shape[1])
    rhs += (ridge * np.maximum(scale, 1e-30))[:, None] * start
    return np.linalg.solve(lhs, rhs[..., None])[..., 0]


def compensated_target(m: np.ndarray, new: np.ndarray, cross: np.ndarray, ridge: float = 1e-3) -> np.ndarray:
    """The output-major W' minimising ||X' W'^T - X M^T||^2 + lambda ||W' - M||^2: earlier layers' errors are
    absorbed, while input directions the calibration data never excites keep the original weights."""
    if np.array_equal(new, cross):
        return m
    damping = ridge * max(float(np.trace(new)) / len(new), 1e-30)
    return np.linalg.solve(new + damping * np.eye(len(new)), cross @ m.T + damping * m.T).T


RIDGES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # shrinkage of the compensated target towards the original weights


def fitted_target(
    m: np.ndarray, moments: tuple[np.ndarray, np.ndarray], count: int,
    held: tuple[np.ndarray, np.ndarray, np.ndarray] | None, held_count: int,
) -> tuple[np.ndarray, float | None]:
    """`compensated_target` over all rows (mean moments new, cross over `count` rows), its ridge chosen as
    the one whose target, fitted without the held-out rows (`held`: their mean new, cross, old), keeps
    those rows' outputs closest. None when nothing is compensated or no rows were held out."""
    new, cross = moments
    if np.array_equal(new, cross) or held is None or not 0 < held_count < count:
        return compensated_target(m, new, cross), None
    rest = count - held_count
    fit_new, fit_cross = ((a * count - b * held_count) / rest for a, b in ((new, held[0]), (cross, held[1])))
    errors = {r: output_error_rel(m, compensated_target(m, fit_new, fit_cross, r), *held) for r in RIDGES}
    best = min(RIDGES, key=lambda r: (errors[r], -r))
    return compensated_target(m, new, cross, best), best


def output_error_rel(w: np.ndarray, approx: np.ndarray, new: np.ndarray, cross: np.ndarray, old: np.ndarray) -> float:
    """||X' A^T - X W^T|| / ||X W^T|| for output-major W, A (N x K), from the input moments."""
    reference = float(np.sum(w * (w @ old.T)))
    error = float(np.sum(approx * (approx @ new.T))) - 2.0 * float(np.sum(approx * (w @ cross.T))) + reference
    return math.sqrt(max(error, 0.0) / max(reference, 1e-30))
