"""How closely a rewritten model answers like the original, on held-out samples."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of matching rows; two all-zero rows agree perfectly, one zero row not at all."""
    dot = np.einsum("ij,ij->i", a, b)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    both_zero = (np.linalg.norm(a, axis=1) == 0) & (np.linalg.norm(b, axis=1) == 0)
    cos = np.divide(dot, norms, out=np.zeros_like(dot), where=norms > 0)
    return np.where(both_zero, 1.0, cos)


def _has_class_axis(output: np.ndarray) -> bool:
    return output.ndim == 2 and output.shape[1] > 1


def channel_cosines(ref: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Cosine per channel of the feature axis (axis 1), over samples and positions."""
    if ref.ndim < 2:
        return _cosine_rows(ref.reshape(1, -1), new.reshape(1, -1))
    a = np.moveaxis(ref, 1, 0).reshape(ref.shape[1], -1)
    b = np.moveaxis(new, 1, 0).reshape(new.shape[1], -1)
    return _cosine_rows(a, b)


def compare(
    names: Sequence[str],
    ref: dict[str, np.ndarray],
    new: dict[str, np.ndarray],
    labels: np.ndarray | None = None,
) -> dict:
    """Fidelity of `new` against `ref` (dicts of outputs, samples on axis 0).

    `drop` is what --max-drop limits: the worst of top-1 disagreement, 1 - worst channel
    cosine and, with labels, the accuracy lost."""
    ref64 = {n: ref[n].astype(np.float64) for n in names}
    new64 = {n: new[n].astype(np.float64) for n in names}
    samples = len(ref64[names[0]])
    cosine = min(
        float(_cosine_rows(ref64[n].reshape(samples, -1), new64[n].reshape(samples, -1)).mean()) for n in names
    )
    worst = {n: channel_cosines(ref64[n], new64[n]) for n in names}
    worst_name = min(names, key=lambda n: worst[n].min())
    rel_l2 = max(float(np.linalg.norm(new64[n] - ref64[n]) / max(np.linalg.norm(ref64[n]), 1e-30)) for n in names)
    result: dict = {
        "samples": samples,
        "cosine": cosine,
        "channel_cosine_min": float(worst[worst_name].min()),
        "channel_cosine_worst": {"output": worst_name, "channel": int(worst[worst_name].argmin())},
        "rel_l2": rel_l2,
    }
    first = names[0]
    drops = [1.0 - result["channel_cosine_min"]]
    if _has_class_axis(ref64[first]):
        agree = ref64[first].argmax(axis=1) == new64[first].argmax(axis=1)
        result["top1_agreement"] = float(agree.mean())
        drops.append(1.0 - result["top1_agreement"])
        if labels is not None:
            result["accuracy_before"] = float((ref64[first].argmax(axis=1) == labels).mean())
            result["accuracy_after"] = float((new64[first].argmax(axis=1) == labels).mean())
            drops.append(result["accuracy_before"] - result["accuracy_after"])
    result["drop"] = max(0.0, max(drops))
    return result
