"""Batches for the distill pass: seeded splits, augmentation of unlabelled inputs, batched or per-sample runs.

The teacher labels whatever it is shown, so any input transform that keeps inputs plausible is valid:
horizontal flips, shifted crops, Gaussian noise and mixup of two samples (each on float inputs only; flips
and crops on NCHW images only).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from rewriter.calib import Calibration, sample_feed
from rewriter.errors import ModelError

NOISE_SHARE = 0.03  # noise std as a share of each input's std over the calibration set
CROP_SHARE = 0.125  # largest shift of a crop, as a share of the image side
MIXUP_ALPHA = 0.4


def split_fit(fit: Calibration, share: float, cap: int, seed: int) -> tuple[Calibration, Calibration]:
    """A seeded train/validation split of the fit samples (the pipeline's held-out set is never touched)."""
    n = len(fit)
    order = np.random.default_rng(seed).permutation(n)
    n_val = min(n - 1, cap, max(1, round(n * share)))
    return fit.take(np.sort(order[n_val:])), fit.take(np.sort(order[:n_val]))


def augment(feeds: Mapping[str, np.ndarray], kinds: Sequence[str], stds: Mapping[str, float],
            rng: np.random.Generator, whole: frozenset[str] = frozenset()) -> dict[str, np.ndarray]:
    """Augmented copies of a batch; flips and crops only on NCHW images given as batches of 1 (an input given
    whole per sample may hold its batch on any axis)."""
    out = {}
    for name, x in feeds.items():
        if x.dtype.kind != "f" or not kinds:
            out[name] = x
            continue
        x = x.copy()
        image = x.ndim == 4 and name not in whole
        if "flip" in kinds and image:
            flip = rng.random(len(x)) < 0.5
            x[flip] = x[flip][..., ::-1]
        if "crop" in kinds and image:
            x = _shifted_crops(x, rng)
        if "mixup" in kinds and len(x) > 1:
            lam = rng.beta(MIXUP_ALPHA, MIXUP_ALPHA, len(x)).astype(x.dtype).reshape(-1, *[1] * (x.ndim - 1))
            lam = np.maximum(lam, 1 - lam)  # the sample stays the larger part of its mix
            x = lam * x + (1 - lam) * x[rng.permutation(len(x))]
        if "noise" in kinds:
            x = x + rng.normal(0.0, NOISE_SHARE * stds[name], x.shape).astype(x.dtype)
        out[name] = np.ascontiguousarray(x)
    return out


def _shifted_crops(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each image shifted by up to CROP_SHARE of its side, the border repeated (same shape in and out)."""
    h, w = x.shape[2:]
    ph, pw = max(1, int(h * CROP_SHARE)), max(1, int(w * CROP_SHARE))
    padded = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), mode="edge")
    out = np.empty_like(x)
    for i, (dy, dx) in enumerate(zip(rng.integers(0, 2 * ph + 1, len(x)), rng.integers(0, 2 * pw + 1, len(x)),
                                     strict=True)):
        out[i] = padded[i, :, dy: dy + h, dx: dx + w]
    return out


def run_graph(graph: torch.nn.Module, feeds: Mapping[str, np.ndarray], keep: Sequence[str],
              batched: bool, whole: frozenset[str] = frozenset()) -> dict[str, torch.Tensor]:
    """The graph on a batch: in one run when the graph takes batches, else sample by sample, concatenated on
    axis 0. A tensor whose batch axis is not first (a recogniser's sequence-major [T, N, C]) is concatenated
    there all the same: the losses then read its first axis as more positions, which is what it is."""
    if batched:
        return graph(_tensors(feeds), keep)
    return join_runs(run_samples(graph, feeds, keep, whole))


def join_runs(runs: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Sample-by-sample runs as one batch: each tensor concatenated on its first axis."""
    return {name: torch.cat([r[name].reshape(1) if r[name].dim() == 0 else r[name] for r in runs])
            for name in runs[0]}


def run_samples(graph: torch.nn.Module, feeds: Mapping[str, np.ndarray], keep: Sequence[str] = (),
                whole: frozenset[str] = frozenset()) -> list[dict[str, torch.Tensor]]:
    """The graph on each sample of a batch alone, fed as the Calibration feeds it."""
    tensors = _tensors(feeds)
    n = len(next(iter(tensors.values())))
    return [graph(sample_feed(tensors, i, whole), keep) for i in range(n)]


def _tensors(feeds: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()}


def takes_batches(graph: torch.nn.Module, feeds: Mapping[str, np.ndarray], keep: Sequence[str]) -> bool:
    """Whether a batch of samples gives the same values as the samples one by one (a graph canonicalised to
    batch 1 may bake the 1 in where the interpreter cannot see it)."""
    if len(next(iter(feeds.values()))) < 2:
        return False
    with torch.no_grad():
        try:
            together = run_graph(graph, feeds, keep, batched=True)
        except (ModelError, RuntimeError):  # a batch of 1 baked into a Reshape the interpreter runs as written
            return False
        alone = run_graph(graph, feeds, keep, batched=False)
    for name, value in alone.items():
        other = together[name]
        if other.shape != value.shape:
            return False
        scale = float(value.abs().max()) if value.numel() and value.is_floating_point() else 1.0
        if not torch.allclose(other.double(), value.double(), rtol=1e-3, atol=1e-4 * max(scale, 1e-6)):
            return False
    return True


def per_sample(values: torch.Tensor) -> list[np.ndarray]:
    """(B, ...) -> B arrays of (1, ...), as onnxruntime returns them for one sample."""
    array = values.detach().numpy()
    return [array[i: i + 1] for i in range(len(array))]
