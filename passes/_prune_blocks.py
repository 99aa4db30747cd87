"""Whole residual branches: find `y = x + branch(x)` and remove the branch, leaving `y = x`.

The calibration-only analogue of Huang & Wang's sparse structure selection (2017), which learns a scale per
residual branch and drops those that reach zero: here each branch's removal is scored by the output error it
causes on calibration samples, and the cheapest go.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from rewriter.channels import node_label
from rewriter.graph import GraphView

WEIGHTED = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
MAX_BRANCH_NODES = 64


@dataclass
class Branch:
    add: onnx.NodeProto
    skip: str  # the identity input, also the branch's only entry
    nodes: list[onnx.NodeProto]

    @property
    def label(self) -> str:
        return node_label(self.add)


def residual_branches(model: onnx.ModelProto) -> list[Branch]:
    """Every Add whose one input is a tensor that is also the sole entry of the subgraph computing the other."""
    view = GraphView(model)
    found = []
    for node in model.graph.node:
        if node.op_type != "Add" or len(node.input) != 2 or view.shape(node.input[0]) != view.shape(node.output[0]):
            continue
        for skip, branch in ((node.input[0], node.input[1]), (node.input[1], node.input[0])):
            nodes = _branch(view, skip, branch, node)
            if nodes and view.shape(skip) == view.shape(node.output[0]):
                found.append(Branch(node, skip, nodes))
                break
    return found


def _branch(view: GraphView, skip: str, out: str, add: onnx.NodeProto) -> list[onnx.NodeProto] | None:
    """The nodes between `skip` and `out`, if they read nothing else computed and feed nothing but the Add."""
    nodes, stack = {}, [out]
    while stack:
        name = stack.pop()
        if name == skip or view.is_initializer(name) or not name:
            continue
        node = view.producer(name)
        if node is None or len(nodes) > MAX_BRANCH_NODES:
            return None
        if id(node) not in nodes:
            nodes[id(node)] = node
            stack.extend(node.input)
    inside = {o for n in nodes.values() for o in n.output}
    for node in nodes.values():
        for o in node.output:
            readers = view.consumers(o)
            if view.is_graph_output(o) or any(r is not add and id(r) not in nodes for r in readers):
                return None
    if not any(n.op_type in WEIGHTED for n in nodes.values()) or out not in inside:
        return None
    order = {id(n): i for i, n in enumerate(view.graph.node)}
    return sorted(nodes.values(), key=lambda n: order[id(n)])


def without(model: onnx.ModelProto, branches: list[Branch]) -> onnx.ModelProto:
    """A copy where each branch's Add becomes Identity(skip) and the branch's nodes are gone."""
    gone = {node_label(n) for b in branches for n in b.nodes}
    adds = {b.label: b.skip for b in branches}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = []
    for node in out.graph.node:
        label = node_label(node)
        if label in gone:
            continue
        if label in adds:
            node = helper.make_node("Identity", [adds[label]], [node.output[0]], name=label)
        nodes.append(node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


def output_error(reference: list[dict[str, np.ndarray]], outputs: list[dict[str, np.ndarray]]) -> float:
    """Mean over outputs of the relative L2 error, pooled over samples."""
    errors = []
    for name in reference[0]:
        ref = np.concatenate([r[name].ravel() for r in reference])
        new = np.concatenate([o[name].ravel() for o in outputs])
        errors.append(float(np.linalg.norm(new - ref) / max(np.linalg.norm(ref), 1e-12)))
    return float(np.mean(errors))


def next_layers(model: onnx.ModelProto, branches: list[Branch]) -> list[onnx.NodeProto]:
    """Weighted nodes that read a removed branch's sum, directly or through ops without weights."""
    view = GraphView(model)
    found, seen = {}, set()
    stack = [b.add.output[0] for b in branches]
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        for reader in view.consumers(name):
            if reader.op_type in WEIGHTED:
                found[node_label(reader)] = reader
            else:
                stack.extend(reader.output)
    return list(found.values())
