"""Fidelity figures, including the per-channel cosine that large outputs cannot hide."""

from __future__ import annotations

import numpy as np

from rewriter.fidelity import compare


def test_identical_outputs():
    ref = {"y": np.random.default_rng(0).normal(size=(20, 10))}
    fid = compare(["y"], ref, ref)
    assert fid["cosine"] > 0.999999 and fid["channel_cosine_min"] > 0.999999
    assert fid["top1_agreement"] == 1.0 and fid["rel_l2"] == 0.0 and fid["drop"] < 1e-9


def test_damaged_scores_hidden_by_box_coordinates_are_caught():
    """A YOLO-like output (N, 4 boxes + 2 scores, anchors): boxes in pixels dominate the whole cosine."""
    rng = np.random.default_rng(1)
    ref = np.concatenate([rng.uniform(0, 320, size=(8, 4, 100)), rng.uniform(0, 1, size=(8, 2, 100))], axis=1)
    new = ref.copy()
    new[:, 4:] = rng.uniform(0, 1, size=(8, 2, 100))  # class scores replaced by noise
    fid = compare(["out"], {"out": ref}, {"out": new})
    assert fid["cosine"] > 0.99
    assert fid["channel_cosine_min"] < 0.9
    assert fid["channel_cosine_worst"]["channel"] in (4, 5)
    assert fid["drop"] > 0.1


def test_accuracy_with_labels_and_top1():
    ref = np.eye(4)[[0, 1, 2, 3]] + 0.1
    new = np.eye(4)[[0, 1, 2, 0]] + 0.1
    labels = np.array([0, 1, 2, 2])
    fid = compare(["y"], {"y": ref}, {"y": new}, labels)
    assert fid["top1_agreement"] == 0.75
    assert fid["accuracy_before"] == 0.75 and fid["accuracy_after"] == 0.75
