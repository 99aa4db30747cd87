"""Channel-dependency analysis: which channels of a model are coupled and must be removed together.

Every output channel of a weighted layer (Conv, ConvTranspose, Gemm, MatMul with a constant weight) is an
*atom*. Each tensor is described by the list of atoms along its channel axis, propagated through the graph by
one rule per op type: element-wise ops pass the list through, Concat joins lists, Split/Slice cut them,
depthwise Conv repeats them, Flatten repeats each atom once per spatial position. An element-wise op between
two computed tensors (a residual Add, the Mul of SiLU or of a squeeze-excite gate) *links* the atoms found at
the same position, in a networkx graph. A connected set of atoms is a *unit*: one channel that must leave
every tensor it lives in at once. Units that live in exactly the same tensors form a *group* (a layer's channels,
one half of a Split, a residual stream), the granularity at which passes decide how many channels to keep.
Anything the rules (rewriter.channel_rules) do not understand (an unknown op, a Reshape that mixes channels, a
graph output, a subgraph) *blocks* the atoms it touches, and a unit with one blocked atom cannot be removed.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import networkx as nx
import onnx

from .graph import GraphView, node_subgraphs

Atom = tuple[str, int]  # (tensor a layer produced, channel index in it)


@dataclass(frozen=True)
class Channels:
    """The atoms along a tensor's channel axis (non-negative axis index)."""

    axis: int
    atoms: tuple[Atom, ...]


@dataclass
class ChannelGroup:
    """Units (sets of linked atoms) that live in the same tensors; removed `units[i]` at a time."""

    key: str
    units: list[frozenset[Atom]]
    tensors: frozenset[str]
    producers: list[str]  # nodes whose output channels the group is made of
    consumers: list[str]  # weighted nodes that read the group's channels as their input channels
    members: list[str]  # every node that must be sliced when a unit leaves
    blocked: str | None = None

    @property
    def size(self) -> int:
        return len(self.units)


@dataclass
class ChannelGraph:
    """The analysis result. Build with `build_channel_graph(model)`; rebuild after any edit of the model."""

    view: GraphView
    tensors: dict[str, Channels] = field(default_factory=dict)
    links: nx.Graph = field(default_factory=nx.Graph)
    blocked: dict[Atom, str] = field(default_factory=dict)
    roles: dict[str, str] = field(default_factory=dict)  # node name -> "producer" | "consumer" | ...

    def positions(self, tensor: str, unit: frozenset[Atom]) -> list[int]:
        """Where the unit's atoms sit along a tensor's channel axis."""
        info = self.tensors.get(tensor)
        return [] if info is None else [i for i, a in enumerate(info.atoms) if a in unit]

    def kept_positions(self, tensor: str, removed: set[Atom]) -> list[int] | None:
        """Positions that stay on a tensor's channel axis once `removed` atoms leave; None if untracked."""
        info = self.tensors.get(tensor)
        return None if info is None else [i for i, a in enumerate(info.atoms) if a not in removed]

    def units(self) -> list[frozenset[Atom]]:
        return [frozenset(c) for c in nx.connected_components(self.links)]

    def groups(self) -> list[ChannelGroup]:
        """All groups, in graph order of their first tensor."""
        where: dict[Atom, set[str]] = defaultdict(set)
        for name, info in self.tensors.items():
            for atom in info.atoms:
                where[atom].add(name)
        by_tensors: dict[frozenset[str], list[frozenset[Atom]]] = defaultdict(list)
        for unit in self.units():
            by_tensors[frozenset().union(*(where[a] for a in unit))].append(unit)
        order = {name: i for i, name in enumerate(self._tensor_order())}
        groups = [self._group(tensors, units, order) for tensors, units in by_tensors.items()]
        return sorted(groups, key=lambda g: (min(order.get(t, 0) for t in g.tensors), g.key))

    def _tensor_order(self) -> list[str]:
        return [out for node in self.view.graph.node for out in node.output]

    def _group(self, tensors: frozenset[str], units: list[frozenset[Atom]], order: dict[str, int]) -> ChannelGroup:
        units = sorted(units, key=lambda u: min(u))
        members, producers, consumers = [], [], []
        for node in self.view.graph.node:
            touched = [n for n in (*node.input, *node.output) if n in tensors]
            if not touched:
                continue
            label = node_label(node)
            members.append(label)
            if any(o in tensors for o in node.output) and self.roles.get(label) in ("producer", "weighted"):
                producers.append(label)
            if node.input and node.input[0] in tensors and self.roles.get(label) in ("consumer", "weighted"):
                consumers.append(label)
        reasons = sorted({self.blocked[a] for u in units for a in u if a in self.blocked})
        first = min(tensors, key=lambda t: order.get(t, 0))
        key = f"{first}[{min(self.positions(first, units[0]))}]" if units else first
        return ChannelGroup(key, units, tensors, producers, consumers, members, "; ".join(reasons) or None)


def node_label(node: onnx.NodeProto) -> str:
    return node.name or f"{node.op_type}:{node.output[0]}"


def build_channel_graph(model: onnx.ModelProto) -> ChannelGraph:
    """Analyse a shape-inferred model (static shapes where channels matter)."""
    from .channel_rules import RULES, block_tensor, unknown  # the rules build on the types above

    cg = ChannelGraph(GraphView(model))
    for node in model.graph.node:
        rule = RULES.get(node.op_type, unknown)
        if _reads_subgraph(node):
            rule = unknown
        rule(cg, node)
    for out in model.graph.output:
        block_tensor(cg, out.name, f"reaches graph output {out.name}")
    return cg


def _reads_subgraph(node: onnx.NodeProto) -> bool:
    return next(node_subgraphs(node), None) is not None
