"""A read-only view of an ONNX graph: producers, consumers, constants and static shapes."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from functools import cached_property

import numpy as np
import onnx
from onnx import numpy_helper

# Layers a pre-quantised model computes in integers (dynamic quantisation and QOperator formats), and the reason
# every pass gives for leaving such a layer, or one whose weight comes from DequantizeLinear (QDQ), as it is.
QUANTISED_OPS = frozenset({"ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul", "QGemm"})
# Ops whose output mixes what they read through weights: between a layer and a graph output, one of these can
# absorb (a refit or compensation there corrects) the layer's error.
MIXING_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "Einsum", "LSTM", "GRU", "RNN"}) | QUANTISED_OPS
QUANTISED_WEIGHT = "quantised layer (weight from DequantizeLinear): left as the model's quantiser made it"


def quantised_op(op_type: str) -> str:
    """The reason a pass leaves an integer layer (QUANTISED_OPS) alone."""
    return f"quantised layer ({op_type}): left as the model's quantiser made it"


class GraphView:
    """Lookup tables over a (shape-inferred) model. Rebuild it after editing the model."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.graph = model.graph

    @cached_property
    def _producers(self) -> dict[str, onnx.NodeProto]:
        return {out: node for node in self.graph.node for out in node.output if out}

    @cached_property
    def _consumers(self) -> dict[str, list[onnx.NodeProto]]:
        table: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.graph.node:
            for name in node.input:
                if name:
                    table[name].append(node)
        return table

    @cached_property
    def _initializers(self) -> dict[str, onnx.TensorProto]:
        return {t.name: t for t in self.graph.initializer}

    @cached_property
    def _shapes(self) -> dict[str, list[int | None]]:
        shapes: dict[str, list[int | None]] = {}
        values = [*self.graph.input, *self.graph.value_info, *self.graph.output]
        for value in values:
            if value.type.HasField("tensor_type") and value.type.tensor_type.HasField("shape"):
                dims = value.type.tensor_type.shape.dim
                shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
        for tensor in self.graph.initializer:
            shapes[tensor.name] = list(tensor.dims)
        return shapes

    def producer(self, name: str) -> onnx.NodeProto | None:
        return self._producers.get(name)

    def consumers(self, name: str) -> list[onnx.NodeProto]:
        return list(self._consumers.get(name, []))

    def is_initializer(self, name: str) -> bool:
        return name in self._initializers

    def constant(self, name: str) -> np.ndarray | None:
        """The value of an initializer, or None for a computed tensor."""
        tensor = self._initializers.get(name)
        return None if tensor is None else numpy_helper.to_array(tensor)

    def shape(self, name: str) -> list[int | None] | None:
        return self._shapes.get(name)

    def static_shape(self, name: str) -> list[int] | None:
        shape = self.shape(name)
        if shape is None or any(d is None for d in shape):
            return None
        return [int(d) for d in shape]

    def weight_problem(self, name: str) -> str | None:
        """Why a layer's weight input cannot be rewritten (None when it is a plain constant).

        Pre-quantised models feed weights through DequantizeLinear: passes leave those layers alone."""
        if self.is_initializer(name):
            return None
        producer = self.producer(name)
        if producer is not None and producer.op_type == "DequantizeLinear":
            return QUANTISED_WEIGHT
        return "weight is not a constant"

    def is_graph_output(self, name: str) -> bool:
        return any(o.name == name for o in self.graph.output)

    def writes_output(self, node: onnx.NodeProto) -> bool:
        """Whether a graph output depends on the node through element-wise, shape and pooling ops alone (no
        MIXING_OPS between): a classifier's last Gemm, a detector's score convs."""
        outputs = {o.name for o in self.graph.output}
        seen, stack = set(), [n for n in node.output if n]
        while stack:
            name = stack.pop()
            if name in outputs:
                return True
            for reader in self.consumers(name):
                if reader.op_type not in MIXING_OPS:
                    stack.extend(o for o in reader.output if o and o not in seen)
                    seen.update(reader.output)
        return False


def node_subgraphs(node: onnx.NodeProto) -> Iterator[tuple[str, onnx.GraphProto]]:
    """The subgraphs one node holds directly (an If's branches, a Loop's body), with their attribute names."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.name, attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from ((attr.name, sub) for sub in attr.graphs)


def subgraphs(graph: onnx.GraphProto) -> Iterator[tuple[onnx.NodeProto, str, onnx.GraphProto]]:
    """Every subgraph below `graph` (If branches, Loop/Scan bodies, nested ones), with its node and attribute."""
    for node in graph.node:
        for name, sub in node_subgraphs(node):
            yield node, name, sub
            yield from subgraphs(sub)


def all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """The graph's nodes and those of every subgraph inside it."""
    yield from graph.node
    for _, _, sub in subgraphs(graph):
        yield from sub.node


def subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """The inputs of every node inside the node's subgraphs, at any depth (outer-scope names among them)."""
    names: set[str] = set()
    for _, graph in node_subgraphs(node):
        for inner in graph.node:
            names.update(inner.input)
            names |= subgraph_reads(inner)
    return names


def node_reads(node: onnx.NodeProto) -> set[str]:
    """A node's inputs, including the outer-scope tensors its subgraphs (If/Loop/Scan bodies) read."""
    return {n for n in [*node.input, *subgraph_reads(node)] if n}


def drop_unused_initializers(model: onnx.ModelProto) -> None:
    """Remove initializers no node reads; reads from inside subgraphs count (an If branch's weights stay)."""
    used = set().union(*(node_reads(node) for node in model.graph.node))
    used.update(o.name for o in model.graph.output)
    remove_initializers(model, {t.name for t in model.graph.initializer} - used)


def remove_initializers(model: onnx.ModelProto, names: set[str]) -> None:
    """Delete the named top-level initializers in place, from the end: rebuilding the list would copy every kept
    tensor (gigabytes for a large model)."""
    for index in reversed([i for i, t in enumerate(model.graph.initializer) if t.name in names]):
        del model.graph.initializer[index]


def attributes(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def unique_name(model: onnx.ModelProto, base: str) -> str:
    """A tensor/node name not used anywhere in the top-level graph."""
    taken = {t.name for t in model.graph.initializer}
    taken.update(v.name for v in model.graph.input)
    for node in model.graph.node:
        taken.update(node.input)
        taken.update(node.output)
        taken.add(node.name)
    if base not in taken:
        return base
    i = 1
    while f"{base}_{i}" in taken:
        i += 1
    return f"{base}_{i}"
