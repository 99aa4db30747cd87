"""How closely a rewritten model answers like the original, on held-out samples.

Outputs arrive as one array per sample (as onnxruntime returns them), so outputs without a batch axis
or with a varying number of rows (NMS-style detectors) are compared sample by sample. Each output is
read along its own feature axis (see layouts.py): the worst per-channel cosine there (on a softmax class axis,
over the classes the models pick often enough for a cosine to mean something), top-1 agreement
per position along the class axis, the mean per-sample cosine and, on a CTC recogniser's score sequence, the
characters its reading edits all feed `drop`, the figure that --max-drop limits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from rapidfuzz.distance import Levenshtein

from .layouts import OutputLayout

# A channel whose energy in both models is below this share of the output's mean channel energy is silent:
# it cannot be damaged in a way that matters, so a 1e-7 where the original has 0 is not a cosine of 0.
SILENT_CHANNEL = 1e-6
# Sigmoid scores below this are background: their argmax is noise and is not scored (detectors' anchors).
SCORE_THRESHOLD = 0.25
IOU_MATCH = 0.5
# A class channel of a probability output is scored by its cosine only over this many positions where either model
# picks it (at 20, one flipped position costs it 0.025): below, a single flip reads as a lost class.
MIN_CLASS_SUPPORT = 20
# A class the original ranks first at more than this share of a score sequence's steps is a CTC blank: it fills
# the steps between characters (PP-OCRv4 on page lines: 35-95 % of a line's steps, 58 % over 64 lines). The
# sequence is then read as text, and text edited is fidelity lost even where 95 % of the steps agree.
BLANK_SHARE = 0.4
MAX_LISTED_CHANNELS = 4096  # per-channel cosines kept in the report (a recogniser may have 8,000 classes)

Samples = Sequence[np.ndarray]


def _cosine_rows(a: np.ndarray, b: np.ndarray, silent: float = 0.0) -> np.ndarray:
    """Cosine of matching rows; rows silent in both (norm <= `silent`) agree perfectly, one zero row not at all."""
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    dot = np.einsum("ij,ij->i", a, b)
    norms = na * nb
    cos = np.divide(dot, norms, out=np.zeros_like(dot), where=norms > 0)
    return np.where((na <= silent) & (nb <= silent), 1.0, cos)


def _pairs(ref: Samples, new: Samples) -> tuple[list[tuple[np.ndarray, np.ndarray]], int]:
    """Per-sample (ref, new) as float64 where their shapes match, and how many samples did not."""
    pairs, mismatched = [], 0
    for r, n in zip(ref, new, strict=True):
        if r.shape != n.shape:
            mismatched += 1
            continue
        pairs.append((np.asarray(r, dtype=np.float64), np.asarray(n, dtype=np.float64)))
    return pairs, mismatched


def _channels_first(value: np.ndarray, axis: int | None) -> np.ndarray:
    if axis is None:
        return value.reshape(1, -1)
    return np.moveaxis(value, axis, 0).reshape(value.shape[axis], -1)


def channel_cosines(pairs: list[tuple[np.ndarray, np.ndarray]], axis: int | None) -> np.ndarray:
    """Cosine per channel of the feature axis, over every sample and position."""
    a = np.concatenate([_channels_first(r, axis) for r, _ in pairs], axis=1)
    b = np.concatenate([_channels_first(n, axis) for _, n in pairs], axis=1)
    energy = np.einsum("ij,ij->i", a, a)
    silent = np.sqrt(SILENT_CHANNEL * max(float(energy.mean()), 1e-300))
    return _cosine_rows(a, b, silent)


def unscored_classes(pairs: list[tuple[np.ndarray, np.ndarray]], layout: OutputLayout) -> np.ndarray | None:
    """Probability channels (softmax along the feature axis) that the two models rank first or score at
    SCORE_THRESHOLD at fewer than MIN_CLASS_SUPPORT positions together (or a quarter of the positions, when that is
    fewer): a recogniser's thousands of unseen characters carry probabilities near 1e-6 whose cosine reads noise,
    and over a character seen at two steps one flipped step reads as a lost channel. Top-1 agreement counts those
    steps. None where the output is not such a class axis."""
    if layout.scores not in ("softmax", "probabilities") or layout.class_channels is not None:
        return None
    support, positions = None, 0
    for r, n in pairs:
        ref, new = _scores(r, layout), _scores(n, layout)
        hit = (ref >= SCORE_THRESHOLD) | (new >= SCORE_THRESHOLD)
        rows = np.arange(len(hit))
        hit[rows, ref.argmax(axis=1)] = True
        hit[rows, new.argmax(axis=1)] = True
        count = hit.sum(axis=0)
        support = count if support is None else support + count
        positions += len(hit)
    # over a few held-out samples (a classifier's 16 images) a class holding a quarter of them still counts
    return None if support is None else support < min(MIN_CLASS_SUPPORT, math.ceil(positions / 4))


def _scores(value: np.ndarray, layout: OutputLayout) -> np.ndarray:
    """[positions, classes] of the class scores, the class axis last."""
    scores = np.moveaxis(value, layout.feature_axis, -1)
    scores = scores.reshape(-1, scores.shape[-1])
    if layout.class_channels is not None:
        scores = scores[:, slice(*layout.class_channels)]
    return scores


def top1_agreement(pairs: list[tuple[np.ndarray, np.ndarray]], layout: OutputLayout) -> tuple[float, int] | None:
    """Share of positions (samples × anchors/time steps/pixels) whose top class is the same, and how many.

    Independent (sigmoid) scores count only where the original is confident: on a detector's background
    anchors every class is near zero and the argmax is noise."""
    agree, total = 0, 0
    for r, n in pairs:
        sr, sn = _scores(r, layout), _scores(n, layout)
        if sr.shape[1] < 2:
            return None
        keep = sr.max(axis=1) >= SCORE_THRESHOLD if layout.scores == "sigmoid" else slice(None)
        agree += int((sr[keep].argmax(axis=1) == sn[keep].argmax(axis=1)).sum())
        total += int(sr[keep].shape[0])
    return (agree / total, total) if total else None


def _step_paths(pairs: list[tuple[np.ndarray, np.ndarray]], layout: OutputLayout) -> list | None:
    """Both models' top class at each step, per sample, where the output is a sequence of class scores: besides
    the class axis exactly one axis longer than 1 (a recogniser's time steps). None for other outputs."""
    if layout.scores in (None, "sigmoid") or layout.class_channels is not None:
        return None
    paths = []
    for r, n in pairs:
        if sum(size > 1 for axis, size in enumerate(r.shape) if axis != layout.feature_axis) != 1:
            return None
        paths.append((_scores(r, layout).argmax(axis=1), _scores(n, layout).argmax(axis=1)))
    return paths


def _reading(path: np.ndarray, blank: int) -> list[int]:
    """Greedy CTC decoding: repeated classes merged, then blanks dropped."""
    merged = path[np.r_[True, path[1:] != path[:-1]]]
    return merged[merged != blank].tolist()


def reading_agreement(pairs: list[tuple[np.ndarray, np.ndarray]], layout: OutputLayout) -> dict | None:
    """How the greedy CTC readings of a recogniser's score sequences compare: the character error rate of the new
    model's reading against the original's (edits per character), the share of samples read the same, and the
    blank. None where the output is not a score sequence or no class dominates its steps as a blank does."""
    paths = _step_paths(pairs, layout)
    if not paths:
        return None
    counts = np.bincount(np.concatenate([r for r, _ in paths]))
    blank = int(counts.argmax())
    if counts[blank] <= BLANK_SHARE * counts.sum():
        return None
    edits = characters = same = 0
    for r, n in paths:
        ref, new = _reading(r, blank), _reading(n, blank)
        edits += Levenshtein.distance(ref, new)
        characters += len(ref)
        same += ref == new
    return {"reading_error": edits / max(characters, 1), "readings_same": same / len(paths),
            "reading_characters": characters, "reading_blank": blank}


def _detections(value: np.ndarray, layout: OutputLayout) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (x1, y1, x2, y2) and classes of the anchors scoring above the threshold."""
    features = _scores(value, OutputLayout(layout.feature_axis))
    scores = features[:, slice(*layout.class_channels)]
    keep = scores.max(axis=1) >= SCORE_THRESHOLD
    cx, cy, w, h = features[keep][:, slice(*layout.box_channels)].T
    w, h = np.abs(w), np.abs(h)
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    return boxes, scores[keep].argmax(axis=1)


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lo, hi = np.maximum(a[:, None, :2], b[None, :, :2]), np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=2)
    area = lambda x: np.prod(np.clip(x[:, 2:] - x[:, :2], 0, None), axis=1)  # noqa: E731
    iou = inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-12)
    return np.where(np.all(a[:, None, :] == b[None, :, :], axis=2), 1.0, iou)  # degenerate boxes match themselves


def detection_agreement(pairs: list[tuple[np.ndarray, np.ndarray]], layout: OutputLayout) -> float | None:
    """F1 of confident detections: a box matches one of the other model's with the same class and IoU ≥ 0.5."""
    matched_ref = matched_new = count_ref = count_new = 0
    for r, n in pairs:
        (br, cr), (bn, cn) = _detections(r, layout), _detections(n, layout)
        count_ref, count_new = count_ref + len(br), count_new + len(bn)
        if len(br) and len(bn):
            hit = (_iou(br, bn) >= IOU_MATCH) & (cr[:, None] == cn[None, :])
            matched_ref += int(hit.any(axis=1).sum())
            matched_new += int(hit.any(axis=0).sum())
    if count_ref + count_new == 0:
        return None
    recall, precision = matched_ref / max(count_ref, 1), matched_new / max(count_new, 1)
    return 2 * recall * precision / max(recall + precision, 1e-12)


def _output_figures(ref: Samples, new: Samples, layout: OutputLayout, labels: np.ndarray | None) -> dict:
    pairs, mismatched = _pairs(ref, new)
    per_sample = [_cosine_rows(r.reshape(1, -1), n.reshape(1, -1))[0] for r, n in pairs] + [0.0] * mismatched
    figures: dict = {"layout": layout.as_report(), "samples": len(ref), "cosine": float(np.mean(per_sample)),
                     "sample_cosine_min": float(np.min(per_sample))}
    if mismatched:
        figures["shape_mismatches"] = mismatched
    if not pairs:
        return {**figures, "channel_cosine_min": 0.0, "worst_channel": None, "rel_l2": 1.0}
    cosines = channel_cosines(pairs, layout.feature_axis)
    unscored = unscored_classes(pairs, layout)
    if unscored is not None:
        cosines[unscored] = 1.0
        figures["classes_scored"] = int((~unscored).sum())
    ref_norm = np.sqrt(sum(float(np.sum(r * r)) for r, _ in pairs))
    err_norm = np.sqrt(sum(float(np.sum((n - r) ** 2)) for r, n in pairs))
    figures.update(channel_cosine_min=float(cosines.min()), worst_channel=int(cosines.argmin()),
                   rel_l2=float(err_norm / max(ref_norm, 1e-30)),
                   channel_cosines=[round(float(c), 5) for c in cosines[:MAX_LISTED_CHANNELS]])
    if layout.has_classes and (found := top1_agreement(pairs, layout)) is not None:
        figures["top1_agreement"], figures["top1_positions"] = found
        if mismatched:
            figures["top1_agreement"] *= len(pairs) / len(ref)
    if (read := reading_agreement(pairs, layout)) is not None:
        figures.update(read)
        if mismatched:
            figures["readings_same"] *= len(pairs) / len(ref)
    if layout.box_channels and layout.class_channels and (det := detection_agreement(pairs, layout)) is not None:
        figures["detection_agreement"] = det
    if labels is not None and layout.has_classes and len(pairs) == len(ref) and all(r.size == r.shape[-1]
                                                                                    for r, _ in pairs):
        before = np.array([_scores(r, layout)[0].argmax() for r, _ in pairs])
        after = np.array([_scores(n, layout)[0].argmax() for _, n in pairs])
        figures["accuracy_before"] = float((before == labels).mean())
        figures["accuracy_after"] = float((after == labels).mean())
    return figures


def _drop(figures: dict) -> float:
    """The fidelity lost by one output: the worst of its channel, sample, top-1, reading and accuracy figures.

    Detection agreement is reported beside it, not in it: over a few held-out images it counts a handful
    of boxes, and one box more or less would swing it by far more than the model changed."""
    drops = [1.0 - figures["channel_cosine_min"], 1.0 - figures["cosine"]]
    if "top1_agreement" in figures:
        drops.append(1.0 - figures["top1_agreement"])
    if "reading_error" in figures:
        drops.append(figures["reading_error"])
    if "accuracy_after" in figures:
        drops.append(figures["accuracy_before"] - figures["accuracy_after"])
    return min(1.0, max(0.0, *drops))  # an anti-correlated channel (cosine < 0) is lost, not more than lost


def compare(
    names: Sequence[str],
    ref: Mapping[str, Samples],
    new: Mapping[str, Samples],
    layouts: Mapping[str, OutputLayout],
    labels: np.ndarray | None = None,
) -> dict:
    """Fidelity of `new` against `ref` ({output: per-sample arrays}), each output read by its layout.

    The top-level figures are the worst over the outputs; `outputs` holds each one's figures, its layout and why."""
    per_output = {}
    for name in names:
        figures = _output_figures(ref[name], new[name], layouts[name], labels)
        figures["drop"] = _drop(figures)
        per_output[name] = figures
    worst = min(names, key=lambda n: per_output[n]["channel_cosine_min"])
    result: dict = {
        "samples": len(ref[names[0]]),
        "cosine": min(f["cosine"] for f in per_output.values()),
        "channel_cosine_min": per_output[worst]["channel_cosine_min"],
        "channel_cosine_worst": {"output": worst, "channel": per_output[worst]["worst_channel"],
                                 "axis": layouts[worst].feature_axis},
        "rel_l2": max(f["rel_l2"] for f in per_output.values()),
    }
    scored = [n for n in names if "top1_agreement" in per_output[n]]
    if scored:
        result["top1_agreement"] = min(per_output[n]["top1_agreement"] for n in scored)
    read = [n for n in names if "reading_error" in per_output[n]]
    if read:
        result["reading_error"] = max(per_output[n]["reading_error"] for n in read)
        result["readings_same"] = min(per_output[n]["readings_same"] for n in read)
    detected = [per_output[n]["detection_agreement"] for n in names if "detection_agreement" in per_output[n]]
    if detected:
        result["detection_agreement"] = min(detected)
    labelled = next((per_output[n] for n in names if "accuracy_after" in per_output[n]), None)
    if labelled is not None:
        result["accuracy_before"], result["accuracy_after"] = labelled["accuracy_before"], labelled["accuracy_after"]
    result["drop"] = max(per_output[n]["drop"] for n in names)
    result["outputs"] = per_output
    return result
