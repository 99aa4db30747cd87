"""Calibration arrays in both forms: batches of 1 (the input's rank) and whole inputs (one axis more), which
feed a recurrent state [layers, batch, hidden] and scalar inputs such as a sample rate (silero-vad's)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from rewriter import rewrite
from rewriter.calib import check_arrays
from rewriter.errors import UsageError
from tests.helpers import make_model, run_ort, tensor, value


def _stateful(seed: int = 0) -> onnx.ModelProto:
    """y = relu(x W1) W2 * (sr / 16000) + sum over layers of state (batch on axis 1 of the state)."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["o"], name="fc2"),
        helper.make_node("Cast", ["sr"], ["srf"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["srf", "base"], ["scale"]),
        helper.make_node("Mul", ["o", "scale"], ["scaled"]),
        helper.make_node("ReduceSum", ["state", "axes"], ["s"], keepdims=0),
        helper.make_node("Add", ["scaled", "s"], ["y"]),
    ]
    inits = [tensor("w1", rng.normal(size=(8, 32)) / 3), tensor("w2", rng.normal(size=(32, 4)) / 6),
             tensor("base", np.array(16000.0)), numpy_helper.from_array(np.array([0], np.int64), "axes")]
    sr = helper.make_tensor_value_info("sr", TensorProto.INT64, [])
    return make_model(nodes, [value("x", ["N", 8]), value("state", [2, "N", 4]), sr], [value("y", ["N", 4])], inits)


def _arrays(n: int = 64) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {"x": rng.normal(size=(n, 8)).astype(np.float32),
            "state": rng.normal(size=(n, 2, 1, 4)).astype(np.float32) * 0.1,
            "sr": np.full(n, 16000, np.int64)}


def test_whole_inputs_are_fed_as_they_are_and_batches_as_batches_of_one():
    calib = check_arrays(_arrays(), None, _stateful(), "test")
    assert calib.whole == {"state", "sr"}
    feed = calib.feed(3)
    assert feed["x"].shape == (1, 8) and feed["state"].shape == (2, 1, 4) and feed["sr"].shape == ()
    assert isinstance(feed["sr"], np.ndarray)
    assert calib.feed_shapes() == {"x": (1, 8), "state": (2, 1, 4), "sr": ()}
    assert calib.take(np.arange(5)).whole == calib.whole
    run_ort(_stateful(), feed)  # onnxruntime takes the feed as it is


def test_a_wrong_rank_names_both_forms():
    arrays = {**_arrays(), "state": np.zeros((64, 4), np.float32)}
    with pytest.raises(UsageError, match=r"batches of 1 \(rank 3\) or as whole inputs \(rank 4\)"):
        check_arrays(arrays, None, _stateful(), "test")


def test_a_whole_input_must_fit_the_declared_dims():
    arrays = {**_arrays(), "state": np.zeros((64, 3, 1, 4), np.float32)}
    with pytest.raises(UsageError, match="state"):
        check_arrays(arrays, None, _stateful(), "test")


@pytest.mark.parametrize("passes", [["prune"], ["pq"], ["svd", "distill"]])
def test_passes_run_on_a_model_with_state_and_scalar_inputs(passes):
    if "distill" in passes:
        pytest.importorskip("torch")
    result = rewrite(_stateful(), passes=passes, calib=_arrays(), options={"distill": {"steps": 20}})
    assert result.report["passes"][0]["changed"]
    assert result.report["input_shapes"] == {"x": [1, 8], "state": [2, 1, 4], "sr": []}
    onnx.checker.check_model(result.model, full_check=True)


def test_synthetic_data_feeds_whole_inputs_of_the_given_shapes():
    result = rewrite(_stateful(), passes=["pq"], calib="synthetic", input_shapes={"x": [1, 8], "state": [2, 1, 4]})
    assert result.report["input_shapes"]["state"] == [2, 1, 4]
