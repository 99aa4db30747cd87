"""Cut tensors: tensors that every path from the model's inputs to its outputs passes through.

A tensor t dominates the outputs when every input -> output path goes through it; the rest of the graph
then depends on the inputs only through t (and on constants), so the graph can be split there into a
prefix (everything t needs) and a tail (everything else the outputs need). Early-exit heads and
whole-graph partitioning use these points. Computed with networkx's dominator tree on a graph whose
vertices are tensors and nodes, with one virtual source before the inputs and one sink after the outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import onnx

from .canonical import graph_inputs
from .graph import GraphView, node_subgraphs
from .metrics import node_macs

_SOURCE, _SINK = ("source", ""), ("sink", "")


def node_inputs(node: onnx.NodeProto) -> set[str]:
    """A node's inputs, including outer-scope tensors its subgraphs (If/Loop bodies) read."""
    names = {n for n in node.input if n}
    for _, graph in node_subgraphs(node):
        local = {o for inner in graph.node for o in inner.output}
        local.update(t.name for t in graph.initializer)
        local.update(v.name for v in graph.input)
        for inner in graph.node:
            names |= node_inputs(inner) - local
    return names


def flow_graph(model: onnx.ModelProto) -> nx.DiGraph:
    """source -> inputs -> nodes <-> tensors -> outputs -> sink, as one networkx DiGraph."""
    flow = nx.DiGraph()
    flow.add_nodes_from([_SOURCE, _SINK])
    for value in graph_inputs(model):
        flow.add_edge(_SOURCE, ("tensor", value.name))
    for index, node in enumerate(model.graph.node):
        for name in node_inputs(node):
            flow.add_edge(("tensor", name), ("node", index))
        for name in node.output:
            if name:
                flow.add_edge(("node", index), ("tensor", name))
    for value in model.graph.output:
        flow.add_edge(("tensor", value.name), _SINK)
    return flow


def cut_tensors(model: onnx.ModelProto) -> list[str]:
    """Every tensor that all input -> output paths pass through, from the inputs to the outputs."""
    flow = flow_graph(model)
    if not nx.has_path(flow, _SOURCE, _SINK):
        return []
    idom = nx.immediate_dominators(flow, _SOURCE)
    chain, vertex = [], idom[_SINK]
    while vertex != _SOURCE:
        if vertex[0] == "tensor":
            chain.append(vertex[1])
        vertex = idom[vertex]
    return chain[::-1]


def ancestor_nodes(model: onnx.ModelProto, names: list[str]) -> set[int]:
    """Indices of the top-level nodes that the tensors `names` depend on (constant subgraphs included)."""
    producers = {out: i for i, node in enumerate(model.graph.node) for out in node.output if out}
    found: set[int] = set()
    stack = [producers[n] for n in names if n in producers]
    while stack:
        index = stack.pop()
        if index in found:
            continue
        found.add(index)
        stack.extend(producers[n] for n in node_inputs(model.graph.node[index]) if n in producers)
    return found


@dataclass(frozen=True)
class CutPoint:
    """A cut tensor, its static shape at the fitted input shape, and the MACs it takes to compute it."""

    tensor: str
    shape: tuple[int, ...] | None
    macs: int


def cut_points(model: onnx.ModelProto) -> list[CutPoint]:
    """The cut tensors of a shape-inferred model with their shapes and prefix MACs, inputs and outputs excluded."""
    view = GraphView(model)
    ends = {v.name for v in graph_inputs(model)} | {o.name for o in model.graph.output}
    points = []
    for name in cut_tensors(model):
        if name in ends:
            continue
        shape = view.static_shape(name)
        macs = sum(node_macs(view, model.graph.node[i]) for i in ancestor_nodes(model, [name]))
        points.append(CutPoint(name, None if shape is None else tuple(shape), macs))
    return points
