"""Graph side of the low-rank splits: which layers can be split and the nodes that replace them."""

from __future__ import annotations

import math
from dataclasses import dataclass

import networkx as nx
import numpy as np
import onnx
from onnx import helper, numpy_helper

from rewriter.graph import GraphView, attributes, unique_name
from rewriter.layers import ConvGeometry, conv_geometry, conv_patches, rows

FLOATS = (np.float16, np.float32, np.float64)
WEIGHTED_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


@dataclass
class Layer:
    node: onnx.NodeProto
    kind: str  # "gemm", "matmul", "conv" (channel split) or "spatial"
    w: np.ndarray  # the K x N matrix (for "spatial" the 4-D Conv weight)
    macs: int  # MACs of the layer as it is
    positions: int  # output positions that each weight column is applied at
    conv: ConvGeometry | None = None
    mid_positions: int = 0  # spatial split: positions of the k x 1 layer's output (full input width)

    @property
    def label(self) -> str:
        return self.node.name or f"{self.node.op_type}:{self.node.output[0]}"

    def rows(self, x: np.ndarray) -> np.ndarray:
        return conv_patches(x, self.conv) if self.kind == "conv" else rows(x)

    @property
    def full_rank(self) -> int:
        if self.kind == "spatial":
            o, i, kh, kw = self.w.shape
            return min(i * kh, o * kw)
        return min(self.w.shape)

    def saving(self, rank: int) -> int:
        """MACs saved by a split at `rank` (0 when the split would not pay)."""
        return max(self.macs - self.split_macs(rank), 0)

    def split_macs(self, rank: int) -> int:
        if self.kind == "spatial":
            o, i, kh, kw = self.w.shape
            return rank * (self.mid_positions * i * kh + self.positions * o * kw)
        k, n = self.w.shape
        return self.positions * rank * (k + n)


def find_layer(view: GraphView, node: onnx.NodeProto, conv_mode: str) -> Layer | str:
    """A Layer to split, or the reason the node is left alone."""
    if len(node.input) < 2:
        return "weight is not a constant"
    if (problem := view.weight_problem(node.input[1])) is not None:
        return problem
    weight = view.constant(node.input[1])
    if weight.dtype.type not in FLOATS:
        return f"weight dtype {weight.dtype} is not float"
    out = view.static_shape(node.output[0])
    if out is None:
        return "output shape unknown"
    attrs = attributes(node)
    if node.op_type == "Gemm":
        if attrs.get("transA", 0):
            return "transA=1 is not split"
        w = attrs.get("alpha", 1.0) * (weight.T if attrs.get("transB", 0) else weight)
        return Layer(node, "gemm", w.astype(np.float64), out[0] * w.size, out[0])
    if node.op_type == "MatMul":
        if weight.ndim != 2:
            return "batched MatMul weight"
        positions = math.prod(out[:-1])
        return Layer(node, "matmul", weight.astype(np.float64), positions * weight.size, positions)
    conv = conv_geometry(node, list(weight.shape))
    if conv is None:
        return "only 1-D/2-D Conv with explicit padding is split"
    if conv.group != 1:
        return "grouped/depthwise Conv is not split"
    positions = math.prod(out[2:])
    macs = positions * weight.size
    if conv_mode == "spatial":
        if conv.rank != 2 or min(conv.kernel) < 2:
            return "spatial split needs a 2-D k x k kernel with k > 1"
        x = view.static_shape(node.input[0])
        if x is None:
            return "input shape unknown"
        return Layer(node, "spatial", weight.astype(np.float64), macs, positions, conv, out[2] * x[3])
    w = weight.reshape(weight.shape[0], -1).T.astype(np.float64)
    return Layer(node, "conv", w, macs, positions, conv)


def is_head(view: GraphView, node: onnx.NodeProto) -> bool:
    """True when some path from the node reaches a graph output without crossing another weighted layer."""
    stack, seen = list(node.output), set()
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        if view.is_graph_output(name):
            return True
        for consumer in view.consumers(name):
            if consumer.op_type not in WEIGHTED_OPS:
                stack.extend(consumer.output)
    return False


def add_initializer(model: onnx.ModelProto, base: str, value: np.ndarray, dtype: np.dtype) -> str:
    name = unique_name(model, base)
    model.graph.initializer.append(numpy_helper.from_array(value.astype(dtype), name))
    return name


def replacement(model: onnx.ModelProto, layer: Layer, first: np.ndarray, second: np.ndarray, dtype) -> list:
    """The two nodes that replace the layer; the second keeps the original output name."""
    node, attrs = layer.node, attributes(layer.node)
    base = layer.node.name or layer.node.output[0]
    a = add_initializer(model, f"{base}_svd_a", first, dtype)
    b = add_initializer(model, f"{base}_svd_b", second, dtype)
    mid = unique_name(model, f"{base}_svd_mid")
    x, out, rest = node.input[0], node.output[0], list(node.input[2:])
    names = (unique_name(model, f"{base}_svd_1"), unique_name(model, f"{base}_svd_2"))
    if layer.kind == "gemm":
        beta = {"beta": attrs.get("beta", 1.0)} if rest else {}
        return [helper.make_node("Gemm", [x, a], [mid], name=names[0]),
                helper.make_node("Gemm", [mid, b, *rest], [out], name=names[1], **beta)]
    if layer.kind == "matmul":
        return [helper.make_node("MatMul", [x, a], [mid], name=names[0]),
                helper.make_node("MatMul", [mid, b], [out], name=names[1])]
    conv = layer.conv
    if layer.kind == "conv":
        first_attrs = conv.node_attrs()
        second_attrs: dict = {}
    else:
        (sh, sw), (dh, dw), (top, left, bottom, right) = conv.strides, conv.dilations, conv.pads
        first_attrs = {"strides": [sh, 1], "pads": [top, 0, bottom, 0], "dilations": [dh, 1]}
        second_attrs = {"strides": [1, sw], "pads": [0, left, 0, right], "dilations": [1, dw]}
    return [helper.make_node("Conv", [x, a], [mid], name=names[0], **first_attrs),
            helper.make_node("Conv", [mid, b, *rest], [out], name=names[1], **second_attrs)]


def factor_weights(layer: Layer, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Matrix factors A (K x r), B (r x N) in the layout each node kind expects."""
    if layer.kind in ("gemm", "matmul"):
        return a, b
    kernel, rank = layer.conv.own_kernel, a.shape[1]
    return a.T.reshape(rank, -1, *kernel), b.T.reshape(-1, rank, *[1] * len(kernel))


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def replace_node(model: onnx.ModelProto, old: onnx.NodeProto, new: list[onnx.NodeProto]) -> None:
    nodes = list(model.graph.node)
    at = next(i for i, n in enumerate(nodes) if n is old or n == old)
    nodes[at : at + 1] = new
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def live_node(model: onnx.ModelProto, output: str) -> onnx.NodeProto:
    """The graph's current node producing `output` (edits re-create the node list)."""
    return next(n for n in model.graph.node if output in n.output)


def initializer_array(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def independent_waves(model: onnx.ModelProto, layers: list[Layer]) -> list[list[Layer]]:
    """Layers grouped by depth in the layer dependency graph: no layer in a group feeds another,
    so their inputs can be captured together and each group sees every earlier group's rewrite."""
    graph = nx.DiGraph()
    producers = {out: node.output[0] for node in model.graph.node for out in node.output if out}
    for node in model.graph.node:
        graph.add_node(node.output[0])
        graph.add_edges_from((producers[name], node.output[0]) for name in node.input if name in producers)
    keys = {layer.node.output[0]: layer for layer in layers}
    depth: dict[str, int] = {}
    for key in nx.topological_sort(graph):
        if key in keys:
            earlier = [depth[a] for a in nx.ancestors(graph, key) if a in keys]
            depth[key] = 1 + max(earlier, default=-1)
    waves: dict[int, list[Layer]] = {}
    for key, layer in keys.items():
        waves.setdefault(depth[key], []).append(layer)
    return [waves[d] for d in sorted(waves)]
