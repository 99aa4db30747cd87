"""Numeric side of the exit pass: head fits, confidence, thresholds and their cross-validated estimate.

Pure numpy / scikit-learn; nothing here knows about the graph. A head maps pooled features (n, d) to
logits (n, classes) through one affine map, so the graph applies it as a single Gemm.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

CRITERIA = ("max_prob", "margin", "entropy")
HEADS = ("ridge", "logistic")
RIDGE_ALPHAS = np.logspace(-3, 3, 13)
# A class the model never predicted on the fit samples gets this logit from a logistic head.
ABSENT_LOGIT = -30.0


@dataclass(frozen=True)
class Head:
    """logits = features @ weight + bias (weight: d x classes)."""

    weight: np.ndarray
    bias: np.ndarray

    def logits(self, features: np.ndarray) -> np.ndarray:
        return features @ self.weight + self.bias


def pooled(activation: np.ndarray) -> np.ndarray:
    """Global average pooling of (n, c, spatial...) maps; (n, d) vectors stay as they are."""
    if activation.ndim <= 2:
        return activation.reshape(len(activation), -1)
    return activation.reshape(*activation.shape[:2], -1).mean(axis=2)


def _standardise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean, scale = x.mean(axis=0), x.std(axis=0)
    return mean, np.where(scale > 1e-12, scale, 1.0)


def fit_head(features: np.ndarray, logits: np.ndarray, kind: str, seed: int) -> Head:
    """Fit one head on standardised features; the standardisation is folded into its weight and bias."""
    features = features.astype(np.float64)
    mean, scale = _standardise(features)
    z = (features - mean) / scale
    if kind == "ridge":
        weight, bias = _ridge(z, logits.astype(np.float64))
    else:
        weight, bias = _logistic(z, np.argmax(logits, axis=1), logits.shape[1], seed)
    weight = weight / scale[:, None]
    return Head(weight, bias - mean @ weight)


def _ridge(z: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ridge regression onto the model's own logits, the penalty chosen by leave-one-out error."""
    from sklearn.linear_model import RidgeCV

    model = RidgeCV(alphas=RIDGE_ALPHAS).fit(z, target)
    return model.coef_.T.copy(), np.asarray(model.intercept_, dtype=np.float64)


def _logistic(z: np.ndarray, labels: np.ndarray, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression onto the model's own top-1 answers (its log-probabilities as logits)."""
    from sklearn.linear_model import LogisticRegression

    seen = np.unique(labels)
    weight = np.zeros((z.shape[1], classes))
    bias = np.full(classes, ABSENT_LOGIT)
    if len(seen) == 1:  # the model gave one answer only: a constant head
        bias[seen[0]] = 0.0
        return weight, bias
    model = LogisticRegression(C=1.0, max_iter=1000, random_state=seed).fit(z, labels)
    coef, intercept = model.coef_, model.intercept_
    if len(seen) == 2:  # scikit-learn keeps one score for two classes: split it symmetrically
        coef, intercept = np.vstack([-coef / 2, coef / 2]), np.concatenate([-intercept / 2, intercept / 2])
    weight[:, seen], bias[seen] = coef.T, intercept
    return weight, bias


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


def confidence(logits: np.ndarray, criterion: str) -> np.ndarray:
    """Higher is more confident: max softmax probability, top-2 margin, or 1 - entropy / log(classes)."""
    p = softmax(logits.astype(np.float64))
    if criterion == "max_prob":
        return p.max(axis=1)
    if criterion == "margin":
        top = np.sort(p, axis=1)
        return top[:, -1] - top[:, -2]
    logp = np.log(np.clip(p, 1e-30, None))
    return 1.0 + (p * logp).sum(axis=1) / np.log(p.shape[1])


def threshold_for(conf: np.ndarray, agree: np.ndarray, target: float) -> tuple[float, int]:
    """The lowest threshold whose exiting samples (conf > threshold) agree with the model at `target`,
    even counting one more disagreement than observed (a margin for samples not seen).

    Returns (threshold, number exiting); the threshold sits halfway between two observed confidences,
    and is above every confidence (nobody exits) when no set reaches the target."""
    if len(conf) == 0:
        return np.inf, 0
    order = np.argsort(-conf, kind="stable")
    ranked, hits = conf[order], np.cumsum(agree[order])
    share = hits / np.arange(2, len(conf) + 2)
    # Only cut between distinct confidences, so the threshold separates exactly the counted samples.
    distinct = np.append(ranked[1:] < ranked[:-1], True)
    ok = np.flatnonzero((share >= target) & distinct)
    if len(ok) == 0:
        return float(ranked[0]) + 1e-6, 0
    k = int(ok[-1]) + 1
    below = ranked[k] if k < len(ranked) else ranked[-1] - 1e-3
    return float((ranked[k - 1] + below) / 2), k


@dataclass(frozen=True)
class ExitStats:
    """Where samples leave and whether their answers agree with the full model's top-1."""

    exits: np.ndarray  # per sample: index of the exit taken, len(thresholds) for the full model
    agree: np.ndarray  # per sample: the answer it gets agrees with the full model's top-1


def route(confs: Sequence[np.ndarray], agrees: Sequence[np.ndarray], thresholds: Sequence[float]) -> ExitStats:
    """Each sample leaves at the first exit whose confidence is above its threshold."""
    n = len(confs[0]) if confs else 0
    exits = np.full(n, len(thresholds))
    agree = np.ones(n, dtype=bool)
    for k in range(len(thresholds) - 1, -1, -1):  # the earliest exit wins: assign from the last one
        leave = confs[k] > thresholds[k]
        exits[leave] = k
        agree[leave] = agrees[k][leave]
    return ExitStats(exits, agree)


def choose_thresholds(
    confs: Sequence[np.ndarray], agrees: Sequence[np.ndarray], target: float
) -> list[float]:
    """Thresholds exit by exit, each chosen on the samples that reach it."""
    remaining = np.ones(len(confs[0]), dtype=bool)
    thresholds = []
    for conf, agree in zip(confs, agrees, strict=True):
        threshold, _ = threshold_for(conf[remaining], agree[remaining], target)
        thresholds.append(threshold)
        remaining &= conf <= threshold
    return thresholds


def fold_ids(n: int, folds: int, seed: int) -> np.ndarray:
    """A seeded assignment of n samples to folds."""
    return np.random.default_rng(seed).permutation(n) % folds


def out_of_fold_logits(features: np.ndarray, logits: np.ndarray, kind: str, folds: np.ndarray, seed: int):
    """Each sample's head logits from a head fitted without it (its fold left out)."""
    result = np.zeros_like(logits, dtype=np.float64)
    for fold in np.unique(folds):
        out = folds == fold
        head = fit_head(features[~out], logits[~out], kind, seed)
        result[out] = head.logits(features[out].astype(np.float64))
    return result


def cross_validated(
    confs: Sequence[np.ndarray], agrees: Sequence[np.ndarray], target: float, folds: np.ndarray
) -> ExitStats:
    """Thresholds chosen without each fold, applied to it: how the thresholds generalise to unseen samples."""
    exits = np.zeros(len(folds), dtype=int)
    agree = np.ones(len(folds), dtype=bool)
    for fold in np.unique(folds):
        out = folds == fold
        thresholds = choose_thresholds([c[~out] for c in confs], [a[~out] for a in agrees], target)
        stats = route([c[out] for c in confs], [a[out] for a in agrees], thresholds)
        exits[out], agree[out] = stats.exits, stats.agree
    return ExitStats(exits, agree)


def expected_macs(exits: np.ndarray, costs: Sequence[int], full: int) -> float:
    """Mean MACs per sample: costs[k] for samples leaving at exit k, `full` for the others."""
    table = np.asarray([*costs, full], dtype=np.float64)
    return float(table[exits].mean()) if len(exits) else float(full)
