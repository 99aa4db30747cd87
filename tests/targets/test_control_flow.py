"""Graphs with If nodes lower to Relax with their control flow kept, and answer like onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from tests.helpers import make_model, run_ort, tensor, value

tvm = pytest.importorskip("tvm")


def _if_model() -> tuple:
    """y = relu(conv(x)); if sum(y) > 20: y * 2 else: conv(y - 1); the condition is an output too."""
    rng = np.random.default_rng(0)
    then_nodes = [helper.make_node("Mul", ["/a/y", "two"], ["then_out"])]
    else_nodes = [
        helper.make_node("Sub", ["/a/y", "one"], ["/b/d"]),
        helper.make_node("Conv", ["/b/d", "w2"], ["else_out"], pads=[1, 1, 1, 1]),
    ]
    out_info = [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, None)]
    then_graph = helper.make_graph(then_nodes, "then", [], out_info)
    else_graph = helper.make_graph(else_nodes, "else", [], [helper.make_tensor_value_info(
        "else_out", TensorProto.FLOAT, None)])
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["/a/c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["/a/c"], ["/a/y"]),
        helper.make_node("ReduceSum", ["/a/y"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "limit"], ["cond"]),
        helper.make_node("If", ["cond"], ["y"], then_branch=then_graph, else_branch=else_graph),
    ]
    inits = [tensor("w1", rng.normal(size=(4, 2, 3, 3))), tensor("w2", rng.normal(size=(4, 4, 3, 3))),
             tensor("two", np.array(2.0)), tensor("one", np.array(1.0)), tensor("limit", np.array(20.0))]
    outputs = [value("y", [1, 4, 5, 5]), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])]
    return make_model(nodes, [value("x", [1, 2, 5, 5])], outputs, inits)


def test_if_becomes_relax_if_and_both_branches_match_onnxruntime(tmp_path):
    from tvm import relax, runtime

    from rewriter.targets import build_artifact, resolve_target
    from rewriter.targets.lower import import_onnx

    model = _if_model()
    assert "if " in import_onnx(model)["main"].script()
    library = tmp_path / "m.so"
    build_artifact(model, resolve_target("x86"), library)
    vm = relax.VirtualMachine(runtime.load_module(str(library)), runtime.cpu())
    rng = np.random.default_rng(1)
    taken = set()
    for scale in (0.01, 3.0):  # small inputs take the else branch, large ones the then branch
        x = (scale * rng.normal(size=(1, 2, 5, 5))).astype(np.float32)
        expected, cond = run_ort(model, {"x": x})
        got, got_cond = vm["main"](runtime.tensor(x))
        taken.add(bool(cond))
        assert bool(got_cond.numpy()) == bool(cond)
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4, atol=1e-4)
    assert taken == {True, False}
