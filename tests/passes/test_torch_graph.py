"""The distill pass's PyTorch interpreter op by op against onnxruntime: recurrent ops, the long tail of exported
models' ops, QDQ quantisation; gradients through LSTM/GRU; real models (slow)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from rewriter.errors import ModelError
from tests.helpers import run_ort

torch = pytest.importorskip("torch")
from rewriter.passes._torch_graph import TorchGraph, trainable_names  # noqa: E402


def _rand(*shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _graph(nodes, feeds: dict, inits: dict, opset: int = 17) -> onnx.ModelProto:
    """`nodes` over inputs `feeds` and initializers `inits`; every output of the last node is a graph output,
    typed by ONNX shape inference."""
    nodes = nodes if isinstance(nodes, list) else [nodes]
    inputs = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape))
              for k, v in feeds.items()]
    outputs = [helper.make_empty_tensor_value_info(o) for o in nodes[-1].output if o]
    initializers = [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()]
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, initializers),
                              opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)


def _interpret(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    graph = TorchGraph(model, trainable_names(model))
    with torch.no_grad():
        out = graph({k: torch.from_numpy(v) for k, v in feeds.items()})
    return [out[o.name].numpy() for o in model.graph.output]


def _check(model: onnx.ModelProto, feeds: dict, rtol: float = 1e-4) -> None:
    """Floats equal to `rtol` relative (of the output's scale), integers and booleans exactly."""
    for got, want in zip(_interpret(model, feeds), run_ort(model, feeds), strict=True):
        assert got.shape == want.shape
        if np.issubdtype(want.dtype, np.floating):
            np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * max(1.0, float(np.abs(want).max())))
        else:
            np.testing.assert_array_equal(got, want)


# --- recurrent ops -------------------------------------------------------------------------------------------

T, B, IN, H = 5, 2, 3, 4
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def _recurrent(op: str, direction: str, full: bool = False, **attrs) -> tuple:
    """(model, feeds) of one recurrent node; `full` adds bias, initial states, peepholes (LSTM), sequence_lens."""
    d, g = (2 if direction == "bidirectional" else 1), GATES[op]
    x = _rand(T, B, IN, seed=1)
    inits = {"W": _rand(d, g * H, IN, seed=2) * 0.5, "R": _rand(d, g * H, H, seed=3) * 0.5}
    names = ["x", "W", "R"]
    if full:
        inits |= {"B": _rand(d, 2 * g * H, seed=4), "lens": np.full(B, T, dtype=np.int32),
                  "h0": _rand(d, B, H, seed=5)}
        names += ["B", "lens", "h0"]
        if op == "LSTM":
            inits |= {"c0": _rand(d, B, H, seed=6), "P": _rand(d, 3 * H, seed=7)}
            names += ["c0", "P"]
    outs = ["Y", "Y_h", "Y_c"] if op == "LSTM" else ["Y", "Y_h"]
    node = helper.make_node(op, names, outs, hidden_size=H, direction=direction, **attrs)
    return _graph(node, {"x": x}, inits, opset=14), {"x": x}


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
def test_recurrent_ops_match_onnxruntime(op, direction):
    _check(*_recurrent(op, direction))
    _check(*_recurrent(op, direction, full=True))


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_recurrent_layout_1_is_layout_0_batch_first(op):
    """onnxruntime refuses layout=1; the interpreter's batch-first run must be its layout-0 run transposed."""
    model, feeds = _recurrent(op, "bidirectional", full=True)
    want = run_ort(model, feeds)
    node = model.graph.node[0]
    node.attribute.append(helper.make_attribute("layout", 1))
    for t in model.graph.initializer:
        if t.name in ("h0", "c0"):
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).transpose(1, 0, 2).copy(), t.name))
    got = _interpret(model, {"x": feeds["x"].transpose(1, 0, 2).copy()})
    np.testing.assert_allclose(got[0], want[0].transpose(2, 0, 1, 3), rtol=1e-5, atol=1e-5)
    for g, w in zip(got[1:], want[1:], strict=True):
        np.testing.assert_allclose(g, w.transpose(1, 0, 2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op, attrs", [
    ("LSTM", {"clip": 0.5}),
    ("LSTM", {"activations": ["Sigmoid", "Relu", "Tanh", "Sigmoid", "Tanh", "Relu"]}),
    ("GRU", {"linear_before_reset": 1}),
    ("GRU", {"linear_before_reset": 1, "clip": 0.3, "activations": ["Sigmoid", "Relu"] * 2}),
    ("RNN", {"activations": ["Relu", "Tanh"]}),
])
def test_recurrent_attributes_match_onnxruntime(op, attrs):
    _check(*_recurrent(op, "bidirectional", full=True, **attrs))


def test_recurrent_only_y_h_requested():
    model, feeds = _recurrent("LSTM", "forward", full=True)
    node = model.graph.node[0]
    node.output[:] = ["", "Y_h"]
    model = _graph(node, feeds, {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}, opset=14)
    _check(model, feeds)


@pytest.mark.parametrize("op, attrs, match", [
    ("LSTM", {"activations": ["Sigmoid", "Elu", "Tanh"]}, "elu"),
    ("LSTM", {"input_forget": 1}, "input_forget"),
])
def test_recurrent_refusals_are_model_errors(op, attrs, match):
    model, feeds = _recurrent(op, "forward", **attrs)
    with pytest.raises(ModelError, match=match):
        _interpret(model, feeds)


def test_short_sequence_lens_are_refused():
    model, feeds = _recurrent("GRU", "forward", full=True)
    lens = next(t for t in model.graph.initializer if t.name == "lens")
    lens.CopyFrom(numpy_helper.from_array(np.array([T, T - 1], dtype=np.int32), "lens"))
    with pytest.raises(ModelError, match="sequence_lens"):
        _interpret(model, feeds)


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_gradients_reach_recurrent_weights(op):
    model, feeds = _recurrent(op, "bidirectional", full=True)
    graph = TorchGraph(model, trainable_names(model))
    assert {"W", "R", "B"} <= set(graph.params)
    out = graph({"x": torch.from_numpy(feeds["x"])})
    sum(v.square().sum() for v in out.values()).backward()
    for name in ("W", "R", "B", *(["P"] if op == "LSTM" else [])):
        grad = graph.params[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
