"""The proving ground: YOLOv8n, the MobileNetV3 direction classifier and DBNet, fetched from PyPI wheels."""

from __future__ import annotations

import pytest

from rewriter import rewrite
from tests.helpers import assert_library_matches_onnxruntime, first_samples

pytestmark = pytest.mark.slow





def test_mobilenetv3_svd_x86(real, tmp_path):
    pytest.importorskip("tvm")
    model, calib = real["mobilenetv3_cls"]
    result = rewrite(model, passes=["svd"], target="x86", calib=first_samples(calib, 16), out_dir=tmp_path / "out",
                     options={"svd": {"rank_ratio": 0.5}})  # the build is under test: 12 samples fit, 4 held out
    report = result.report
    assert report["output"]["macs"] < 0.9 * report["input"]["macs"]
    skipped = report["passes"][0]["notes"]["skipped"]
    assert any("depthwise" in why for why in skipped.values())
    assert {"accuracy_before", "accuracy_after", "top1_agreement"} <= set(report["fidelity"])
    x = first_samples(calib, 2)["x"]
    assert_library_matches_onnxruntime(result.artifacts["library"], result.artifacts["model"], "x", x)


def test_dbnet_paddle_export_svd(real):
    model, calib = real["dbnet"]
    result = rewrite(model, passes=["svd"], calib=first_samples(calib, 6), holdout=0.34,
                     options={"svd": {"rank_ratio": 0.5}})
    report = result.report
    assert report["canonical_fidelity"]["rel_l2"] < 1e-4
    assert report["output"]["macs"] < 0.9 * report["input"]["macs"]
    assert report["output_shapes"] == {"sigmoid_0.tmp_0": [1, 1, 320, 320]}


def test_yolov8n_channel_cosine_catches_what_cosine_hides(real):
    model, calib = real["yolov8n"]
    result = rewrite(model, passes=["svd"], calib=first_samples(calib, 8), holdout=0.25,
                     options={"svd": {"rank_ratio": 0.5, "sequential": False}})  # the metric is under test, not the fit
    report = result.report
    assert report["canonical_fidelity"]["channel_cosine_min"] > 0.9999
    assert report["output"]["macs"] < 0.8 * report["input"]["macs"]
    fid = report["fidelity"]
    assert fid["channel_cosine_min"] < fid["cosine"]
    # The drop answers to the worst channel (and to the confident anchors' top class), not to the mean.
    assert fid["drop"] >= 1 - fid["channel_cosine_min"] > 1 - fid["cosine"]
    assert fid["outputs"]["output0"]["top1_positions"] > 0
