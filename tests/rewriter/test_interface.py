"""The written model keeps the user's dynamic dims wherever the rewritten graph is valid for them."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from rewriter import rewrite
from tests.helpers import CALIB, SAMPLES, make_model, run_ort, tensor, token_mlp_model, value


def _dims(v: onnx.ValueInfoProto) -> list:
    return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]


def test_svd_model_runs_at_batch_1_and_8_with_the_same_per_sample_outputs():
    result = rewrite(SAMPLES / "digits_mlp.onnx", passes=["svd"], calib=CALIB, options={"svd": {"rank_ratio": 0.5}})
    assert result.report["interface"]["restored"] == {"input[0]": "N"}
    assert _dims(result.model.graph.input[0])[0] == "N" and _dims(result.model.graph.output[0])[0] == "N"
    with np.load(CALIB) as data:
        batch = data["input"][:8]
    (together,) = run_ort(result.model, {"input": batch})
    one_by_one = np.concatenate([run_ort(result.model, {"input": batch[i:i + 1]})[0] for i in range(8)])
    np.testing.assert_allclose(together, one_by_one, rtol=1e-5, atol=1e-5)


def _reshape_model(merge_batch: bool) -> onnx.ModelProto:
    """x[N, 6, 10] -> Reshape to a constant shape -> MatMul; the constant holds the exported batch of 1."""
    target = [6, 10] if merge_batch else [1, 60]
    out = [6, 3] if merge_batch else [1, 3]
    w = np.random.default_rng(0).normal(size=(10 if merge_batch else 60, 3))
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["y"])]
    inits = [onnx.numpy_helper.from_array(np.array(target, np.int64), "shape"), tensor("w", w)]
    return make_model(nodes, [value("x", ["N", 6, 10])], [value("y", out)], inits)


def test_batch_folded_into_a_reshape_constant_is_opened_again(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_reshape_model(merge_batch=False), path)
    result = rewrite(path, calib="synthetic")
    assert result.report["interface"]["restored"] == {"x[0]": "N"}
    x = np.random.default_rng(1).normal(size=(4, 6, 10)).astype(np.float32)
    assert run_ort(result.model, {"x": x})[0].shape == (4, 3)
    # the fitted target gave way to the open one and is gone: onnxruntime would warn about it on every load
    assert sorted(t.name for t in result.model.graph.initializer) == ["shape_batch", "w"]


def test_a_batch_folded_into_rows_around_a_gemm_and_split_off_again_is_opened(tmp_path):
    """onnxslim's MatMul + Add -> Gemm fusion writes [1, T, C] -> [T, C] -> Gemm -> [1, T, H] with the batch of 1
    folded into both targets (PP-OCRv4's recogniser kept a static batch for it)."""
    path = tmp_path / "m.onnx"
    onnx.save(token_mlp_model(batch_one=True), path)
    result = rewrite(path, calib="synthetic")
    assert result.report["interface"]["restored"] == {"x[0]": "N"}
    x = np.random.default_rng(1).normal(size=(4, 6, 8)).astype(np.float32)
    (together,) = run_ort(result.model, {"x": x})
    one_by_one = np.concatenate([run_ort(result.model, {"x": x[i:i + 1]})[0] for i in range(4)])
    np.testing.assert_allclose(together, one_by_one, rtol=1e-5, atol=1e-5)


def test_a_graph_that_mixes_samples_keeps_its_batch_static_and_says_why(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_reshape_model(merge_batch=True), path)
    result = rewrite(path, calib="synthetic")
    interface = result.report["interface"]
    assert interface["restored"] == {} and "x[0]" in interface["kept_static"]
    assert interface["kept_static"]["x[0]"]
    assert _dims(result.model.graph.input[0])[0] == 1


def test_fully_convolutional_model_keeps_open_height_and_width(tmp_path):
    w = np.random.default_rng(2).normal(size=(4, 3, 3, 3))
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])]
    model = make_model(nodes, [value("x", ["N", 3, "H", "W"])], [value("y", ["N", 4, "H", "W"])], [tensor("w", w)])
    path = tmp_path / "conv.onnx"
    onnx.save(model, path)
    result = rewrite(path, calib="synthetic", input_shapes={"x": [1, 3, 32, 32]})
    assert result.report["interface"]["restored"] == {"x[0]": "N", "x[2]": "H", "x[3]": "W"}
    assert _dims(result.model.graph.output[0]) == ["N", 4, "H", "W"]
    x = np.random.default_rng(3).normal(size=(2, 3, 40, 24)).astype(np.float32)
    np.testing.assert_allclose(run_ort(result.model, {"x": x})[0], run_ort(model, {"x": x})[0], rtol=1e-4, atol=1e-4)
