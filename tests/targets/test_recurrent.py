"""LSTM and GRU unrolled for TVM: the unrolled graph answers like onnxruntime's own LSTM/GRU, and builds."""

from __future__ import annotations

import zlib

import numpy as np
import onnx
import pytest
from onnx import helper

from rewriter.errors import ModelError
from rewriter.targets.recurrent import has_recurrent, unroll_recurrent
from tests.helpers import make_model, run_ort, tensor, value

SEQ, BATCH, INPUT, HIDDEN = 5, 2, 3, 4


def _recurrent(op: str, direction: str = "forward", bias: bool = False, states: bool = False,
               peepholes: bool = False, layout: int = 0, opset: int = 14, **attrs) -> onnx.ModelProto:
    rng = np.random.default_rng(zlib.crc32(repr((op, direction, bias, states, peepholes, attrs)).encode()))
    gates = 4 if op == "LSTM" else 3
    dirs = 2 if direction == "bidirectional" else 1
    inits = [tensor("W", rng.normal(size=(dirs, gates * HIDDEN, INPUT)) * 0.5),
             tensor("R", rng.normal(size=(dirs, gates * HIDDEN, HIDDEN)) * 0.5)]
    inputs = ["x", "W", "R", "B" if bias else "", "", "h0" if states else ""]
    if bias:
        inits.append(tensor("B", rng.normal(size=(dirs, 2 * gates * HIDDEN)) * 0.3))
    graph_inputs = [value("x", [BATCH, SEQ, INPUT] if layout else [SEQ, BATCH, INPUT])]
    state_shape = [BATCH, dirs, HIDDEN] if layout else [dirs, BATCH, HIDDEN]
    if states:
        graph_inputs.append(value("h0", state_shape))
    if op == "LSTM":
        inputs.append("c0" if states else "")
        if states:
            graph_inputs.append(value("c0", state_shape))
        if peepholes:
            inputs.append("P")
            inits.append(tensor("P", rng.normal(size=(dirs, 3 * HIDDEN)) * 0.3))
    while inputs and not inputs[-1]:
        inputs.pop()
    outputs = ["y", "y_h"] + (["y_c"] if op == "LSTM" else [])
    if layout:
        attrs["layout"] = layout  # the attribute exists from opset 14
    node = helper.make_node(op, inputs, outputs, hidden_size=HIDDEN, direction=direction, **attrs)
    y_shape = [BATCH, SEQ, dirs, HIDDEN] if layout else [SEQ, dirs, BATCH, HIDDEN]
    return make_model([node], graph_inputs, [value("y", y_shape)] + [value(n, state_shape) for n in outputs[1:]],
                      inits, opset=opset)


CASES = [
    ("LSTM", {}),
    ("LSTM", {"direction": "bidirectional", "bias": True, "states": True, "peepholes": True}),
    ("LSTM", {"direction": "reverse", "layout": 1, "bias": True}),
    ("LSTM", {"clip": 0.5, "bias": True}),
    ("GRU", {"bias": True}),
    ("GRU", {"direction": "bidirectional", "states": True, "linear_before_reset": 1, "bias": True}),
    ("GRU", {"direction": "reverse", "clip": 0.7}),
    ("GRU", {"layout": 1, "states": True}),
    ("LSTM", {"direction": "bidirectional", "bias": True, "opset": 12}),  # Split/Unsqueeze with attributes
]


def _feeds(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {v.name: rng.normal(size=[d.dim_value for d in v.type.tensor_type.shape.dim]).astype(np.float32)
            for v in model.graph.input}


@pytest.mark.parametrize("op, kwargs", CASES)
def test_unrolled_matches_onnxruntime(op, kwargs):
    model = _recurrent(op, **kwargs)
    unrolled = unroll_recurrent(model)
    assert has_recurrent(model) and not has_recurrent(unrolled)
    onnx.checker.check_model(unrolled, full_check=True)
    feeds = _feeds(model)
    for want, got in zip(_reference(op, kwargs, feeds), run_ort(unrolled, feeds), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def _reference(op: str, kwargs: dict, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """onnxruntime's own outputs; it has no batch-first (layout=1) kernels, so those run transposed."""
    if not kwargs.get("layout"):
        return run_ort(_recurrent(op, **kwargs), feeds)
    seq_first = _recurrent(op, **{k: v for k, v in kwargs.items() if k != "layout"})
    moved = {"x": feeds["x"].transpose(1, 0, 2), **{k: v.transpose(1, 0, 2) for k, v in feeds.items() if k != "x"}}
    y, *states = run_ort(seq_first, moved)
    return [y.transpose(2, 0, 1, 3), *(s.transpose(1, 0, 2) for s in states)]


def test_varying_sequence_lengths_are_refused():
    model = _recurrent("LSTM")
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array([SEQ, SEQ - 1], np.int32), "lens"))
    model.graph.node[0].input.extend(["", "lens"][len(model.graph.node[0].input) - 3:])
    node = model.graph.node[0]
    del node.input[:]
    node.input.extend(["x", "W", "R", "", "lens"])
    with pytest.raises(ModelError, match="sequence lengths"):
        unroll_recurrent(model)


def test_lstm_builds_for_x86_and_matches_onnxruntime(tmp_path):
    pytest.importorskip("tvm")
    import tvm
    from tvm import relax

    from rewriter.targets import build_artifact, resolve_target

    model = _recurrent("LSTM", direction="bidirectional", bias=True, states=True)
    spec = resolve_target("x86")
    build_artifact(model, spec, tmp_path / "m.so", 0, None, lambda _: None)
    feeds = _feeds(model)
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(tmp_path / "m.so")), tvm.cpu())
    got = vm["main"](*(tvm.runtime.tensor(feeds[n]) for n in ("x", "h0", "c0")))
    for want, out in zip(run_ort(model, feeds), got, strict=True):
        np.testing.assert_allclose(out.numpy(), want, rtol=1e-4, atol=1e-5)
