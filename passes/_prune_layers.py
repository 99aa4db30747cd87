"""The weighted layers pruning reads and refits: their input rows, weight matrix and where they are written back."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from rewriter.channels import node_label
from rewriter.graph import GraphView, attributes, unique_name
from rewriter.layers import ConvGeometry, conv_geometry, conv_patches, conv_rows, rows


@dataclass
class Consumer:
    """A Conv (group 1, 1-D or 2-D), Gemm or MatMul whose input channels pruning removes."""

    label: str
    input: str
    output: str
    kind: str  # "conv" | "gemm" | "matmul"
    conv: ConvGeometry | None = None
    kernel: int = 1  # kernel positions (kh * kw): input columns per input channel

    def rows(self, x: np.ndarray) -> np.ndarray:
        return conv_patches(x, self.conv) if self.kind == "conv" else rows(x)

    def targets(self, y: np.ndarray) -> np.ndarray:
        """Output rows aligned with `rows` of the input (positions x output channels)."""
        return conv_rows(y) if self.kind == "conv" else rows(y)

    def columns(self, positions: list[int]) -> np.ndarray:
        """Input columns of the weight matrix fed by the given input-channel positions."""
        return np.asarray([p * self.kernel + j for p in positions for j in range(self.kernel)], dtype=np.int64)


def find_consumer(view: GraphView, node: onnx.NodeProto) -> Consumer | None:
    """The consumer view of a node, or None when pruning can slice it but not model it."""
    label = node_label(node)
    if node.op_type == "Conv":
        weight = view.shape(node.input[1])
        conv = None if weight is None else conv_geometry(node, weight)
        if conv is None or conv.group != 1:
            return None
        return Consumer(label, node.input[0], node.output[0], "conv", conv, math.prod(conv.kernel))
    if node.op_type == "Gemm" and not attributes(node).get("transA", 0):
        return Consumer(label, node.input[0], node.output[0], "gemm")
    if node.op_type == "MatMul":
        return Consumer(label, node.input[0], node.output[0], "matmul")
    return None


def weight_matrix(view: GraphView, node: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray | None]:
    """The layer as y = x W + b, W of shape (inputs x outputs), in float64."""
    w = view.constant(node.input[1]).astype(np.float64)
    bias = view.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if node.op_type == "Conv":
        return w.reshape(len(w), -1).T, None if bias is None else bias.astype(np.float64)
    if node.op_type == "Gemm":
        attrs = attributes(node)
        w = attrs.get("alpha", 1.0) * (w.T if attrs.get("transB", 0) else w)
        if bias is not None:
            bias = np.broadcast_to(attrs.get("beta", 1.0) * bias.astype(np.float64), (w.shape[1],)).copy()
        return w, bias
    return w, None


def has_bias_slot(node: onnx.NodeProto) -> bool:
    """Conv and Gemm can take a fitted bias; MatMul cannot without a new node."""
    return node.op_type in ("Conv", "Gemm")


def write_weights(model: onnx.ModelProto, node: onnx.NodeProto, w: np.ndarray, bias: np.ndarray | None) -> None:
    """Store W (inputs x outputs) and bias back into the node in its own layout and dtype."""
    view = GraphView(model)
    old = view.constant(node.input[1])
    if node.op_type == "Conv":
        value = w.T.reshape(old.shape[0], -1, *old.shape[2:])
    elif node.op_type == "Gemm":
        attrs = attributes(node)
        value = w / attrs.get("alpha", 1.0)
        value = value.T if attrs.get("transB", 0) else value
    else:
        value = w
    _set_input(model, node, 1, value.astype(old.dtype))
    if bias is not None:
        if node.op_type == "Gemm":
            bias = bias / attributes(node).get("beta", 1.0)
        _set_input(model, node, 2, bias.astype(old.dtype))


def _set_input(model: onnx.ModelProto, node: onnx.NodeProto, index: int, value: np.ndarray) -> None:
    name = unique_name(model, f"{node_label(node)}_w{index}_refit".replace("/", "_").strip("_"))
    model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
    while len(node.input) <= index:
        node.input.append("")
    node.input[index] = name


def sample_positions(total: int, count: int, rng) -> np.ndarray:
    """`count` distinct row indices out of `total` (all of them when there are fewer)."""
    if total <= count:
        return np.arange(total)
    return np.sort(rng.choice(total, size=count, replace=False))
