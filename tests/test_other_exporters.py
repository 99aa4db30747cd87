"""Real models from other exporters than the proving ground's: a CNN + bidirectional LSTM text recogniser and
a YOLOX-style detector (ddddocr's wheel), PP-OCRv4's CNN + SVTR recogniser (paddle2onnx). The LSTM recogniser
builds for x86 through the LSTM unrolling and answers like onnxruntime; the fidelity of all is read along their
real feature axes."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from rewriter import rewrite
from rewriter.graph import node_reads
from tests.helpers import SAMPLES, run_ort

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def models():
    sys.path.insert(0, str(SAMPLES))
    from fetch_real_models import default_cache, fetch_extra_models

    return fetch_extra_models(default_cache())


def _text_lines(count: int, width: int) -> np.ndarray:
    """Grey text-line crops of scikit-image's page.png at the recogniser's 64-pixel height (its text lines, then
    word spans of them)."""
    from fetch_real_models import recogniser_spans

    return recogniser_spans(count, np.random.default_rng(0), width=width)


def test_lstm_recogniser_builds_for_x86_and_matches_onnxruntime(models, tmp_path):
    tvm = pytest.importorskip("tvm")
    from tvm import relax

    lines = _text_lines(8, 160)
    result = rewrite(models["ddddocr_rec"], target="x86", calib={"input1": lines}, out_dir=tmp_path / "out")
    layout = result.report["fidelity"]["outputs"]["387"]["layout"]
    assert layout["feature_axis"] == 2 and "Gemm" in layout["why"]  # [T, N, classes]: classes last
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(result.artifacts["library"])), tvm.cpu())
    for line in lines[:3]:
        (want,) = run_ort(models["ddddocr_rec"], {"input1": line[None]})
        got = vm["main"](tvm.runtime.tensor(line[None])).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
        assert np.array_equal(got.argmax(-1), want.argmax(-1))


def test_yolox_detector_is_read_along_its_last_axis(models):
    from PIL import Image
    from skimage import data

    images = [Image.fromarray(img).convert("RGB").resize((416, 416)) for img in (data.astronaut(), data.coffee())]
    x = np.stack([np.asarray(im, np.float32).transpose(2, 0, 1) for im in images])
    result = rewrite(models["ddddocr_det"], calib={"images": x})
    layout = result.report["fidelity"]["outputs"]["output"]["layout"]
    assert layout["feature_axis"] == 2 and layout["box_channels"] == [0, 4] and layout["scores"] == "sigmoid"


def test_svtr_recogniser_prunes_its_transformer_mlps_behind_reshapes(models):
    from fetch_real_models import rec_lines

    lines = rec_lines(24, np.random.default_rng(0))
    result = rewrite(models["ppocr_rec"], passes=["prune"], calib={"x": lines}, options={"prune": {"max_error": 0.2}})
    groups = result.report["passes"][0]["notes"]["groups"]
    mlps = [g for g in groups.values() if "skipped" not in g and any("MatMul" in c for c in g["consumers"])]
    assert len(mlps) == 2 and all(g["size_after"] < g["size_before"] for g in mlps)
    fid = result.report["fidelity"]
    assert 0 < fid["outputs"]["softmax_11.tmp_0"]["classes_scored"] < 200  # of 6,625 characters
    assert fid["top1_agreement"] > 0.8
    # its CTC blank is class 0, found from the steps; the reading's edits count in the drop
    assert fid["outputs"]["softmax_11.tmp_0"]["reading_blank"] == 0 and fid["drop"] >= fid["reading_error"]
    assert result.report["interface"]["restored"] == {"x[0]": "p2o.DynamicDimension.0"}  # through the Gemm reshapes
    read = set().union(*(node_reads(node) for node in result.model.graph.node))
    assert {t.name for t in result.model.graph.initializer} <= read  # nothing left for onnxruntime to warn about
    (probs,) = run_ort(result.model, {"x": lines[:2]})
    assert probs.shape == (2, 40, 6625)
