"""Cut tensors: what every input -> output path passes through, with the MACs spent before them."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from rewriter.canonical import canonicalize
from rewriter.dominators import cut_points, cut_tensors, node_inputs
from tests.helpers import SAMPLES, make_model, tensor, value


def _residual_model() -> onnx.ModelProto:
    """x -> conv a -> relu r -> (conv b -> relu c) + r -> s -> conv d -> y."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "wa"], ["a"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("Conv", ["r", "wb"], ["b"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["b"], ["c"]),
        helper.make_node("Add", ["c", "r"], ["s"]),
        helper.make_node("Conv", ["s", "wd"], ["y"]),
    ]
    inits = [tensor(n, rng.normal(size=(4, 4 if n != "wa" else 1, 3, 3))) for n in ("wa", "wb", "wd")]
    return make_model(nodes, [value("x", [1, 1, 6, 6])], [value("y", [1, 4, 4, 4])], inits)


def test_residual_branches_are_not_cut_points():
    assert cut_tensors(_residual_model()) == ["x", "a", "r", "s", "y"]


def test_cut_points_carry_shapes_and_prefix_macs():
    model = onnx.shape_inference.infer_shapes(_residual_model())
    points = {p.tensor: p for p in cut_points(model)}
    assert set(points) == {"a", "r", "s"}  # the input and the output are not cut points
    one_conv = 4 * 1 * 9 * 36
    assert points["a"].macs == points["r"].macs == one_conv
    assert points["s"].macs == one_conv + 4 * 4 * 9 * 36
    assert points["s"].shape == (1, 4, 6, 6)


def test_subgraph_reads_count_as_inputs():
    branch = helper.make_graph([helper.make_node("Identity", ["outer"], ["o"])], "b", [],
                               [helper.make_tensor_value_info("o", TensorProto.FLOAT, None)])
    node = helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=branch)
    assert node_inputs(node) == {"cond", "outer"}


def test_resnet_sample_cut_points_are_block_boundaries():
    model = canonicalize(onnx.load(SAMPLES / "digits_resnet.onnx"), {"input": [1, 1, 8, 8]})
    names = [p.tensor for p in cut_points(model)]
    assert "/blocks/blocks.0/relu/Relu_output_0" in names
    assert not any("body" in n or "shortcut" in n for n in names)  # inside a residual block: never
