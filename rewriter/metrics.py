"""Counting parameters, multiply-accumulates and bytes of a shape-inferred model."""

from __future__ import annotations

import math

import onnx

from .graph import GraphView, attributes, node_subgraphs
from .loading import model_bytes


def count_params(model: onnx.ModelProto) -> int:
    return sum(math.prod(t.dims) for t in model.graph.initializer)


def count_bytes(model: onnx.ModelProto) -> int:
    """Size of the model file as it is saved (with its external data, for a model over 2 GB)."""
    return model_bytes(model)


def _conv_macs(view: GraphView, node: onnx.NodeProto) -> int:
    # Conv: each output element reads (C/group)*prod(k) inputs (weight (M, C/group, k...)).
    # ConvTranspose: each input element is scattered to (M/group)*prod(k) outputs (weight (C, M/group, k...)).
    side = view.static_shape(node.output[0] if node.op_type == "Conv" else node.input[0])
    weight = view.shape(node.input[1])
    if side is None or weight is None or None in weight:
        return 0
    return math.prod(side) * math.prod(weight[1:])


def _gemm_macs(view: GraphView, node: onnx.NodeProto) -> int:
    a = view.static_shape(node.input[0])
    out = view.static_shape(node.output[0])
    if a is None or out is None:
        return 0
    k = a[0] if attributes(node).get("transA", 0) else a[1]
    return math.prod(out) * k


def _matmul_macs(view: GraphView, node: onnx.NodeProto) -> int:
    a = view.static_shape(node.input[0])
    out = view.static_shape(node.output[0])
    if a is None or out is None:
        return 0
    return math.prod(out) * a[-1]


_MAC_RULES = {
    "Conv": _conv_macs,
    "ConvTranspose": _conv_macs,
    "Gemm": _gemm_macs,
    "MatMul": _matmul_macs,
}


def node_macs(view: GraphView, node: onnx.NodeProto) -> int:
    rule = _MAC_RULES.get(node.op_type)
    return rule(view, node) if rule else 0


def count_macs(model: onnx.ModelProto) -> int:
    """MACs of the top-level graph's Conv, ConvTranspose, Gemm and MatMul nodes.

    Subgraphs (If branches) are counted at their worst case: the larger branch."""
    view = GraphView(model)
    total = 0
    for node in model.graph.node:
        total += node_macs(view, node)
        if node.op_type == "If":
            total += max((_subgraph_macs(model, g) for g in _branches(node)), default=0)
    return total


def _branches(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    return [sub for _, sub in node_subgraphs(node)]


def _subgraph_macs(model: onnx.ModelProto, graph: onnx.GraphProto) -> int:
    # A branch sees the outer scope's shapes: view it with the outer value_info merged in.
    sub = onnx.ModelProto()
    sub.CopyFrom(model)
    sub.graph.ClearField("node")
    sub.graph.node.extend(graph.node)
    sub.graph.value_info.extend(graph.value_info)
    sub.graph.initializer.extend(graph.initializer)
    sub.graph.output.extend(graph.output)
    return count_macs(sub)


def summarize(model: onnx.ModelProto, path: str | None = None) -> dict:
    return {
        "path": path,
        "params": count_params(model),
        "macs": count_macs(model),
        "bytes": count_bytes(model),
    }
