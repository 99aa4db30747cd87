"""Graph side of the exit pass: heads as ONNX nodes and the nested `If` control nodes around the tail.

The rewritten graph, for exits 1..K at cut tensors t1..tK (each a dominator of the output):

    segment 1 -> head 1 -> If(all samples done at exit 1)
                             then: early answer 1
                             else: segment 2 -> head 2 -> If(all done at exit 1 or 2)
                                                            then: early answer 2
                                                            else: ... last segment -> full answer
                                                          -> Where(done by exit 2, early 2, that)
                                   -> Where(done by exit 1, early 1, that)

A batch skips the tail only when every sample in it is confident; the Where nodes give each sample the
answer it would get alone (its first confident exit), so batched and per-sample outputs are equal. A
sample is confident at an exit when its head's confidence is above the exit's threshold.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from rewriter.dominators import ancestor_nodes
from rewriter.graph import node_subgraphs


@dataclass(frozen=True)
class ExitSpec:
    """One exit: where it reads, its affine head, its confidence threshold."""

    tensor: str
    rank: int
    weight: np.ndarray  # d x classes
    bias: np.ndarray
    threshold: float


@dataclass(frozen=True)
class Answer:
    """How a head's logits become an answer shaped like the model's output."""

    finish: str | None  # "Softmax", "LogSoftmax", "Sigmoid" or None (the output is logits)
    dtype: int  # TensorProto element type of the output


class _Names:
    """Fresh tensor and node names, unique across the model and all its subgraphs."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.taken = set(_all_names(model.graph))

    def __call__(self, base: str) -> str:
        name, i = base, 1
        while name in self.taken:
            name, i = f"{base}_{i}", i + 1
        self.taken.add(name)
        return name


def _all_names(graph: onnx.GraphProto):
    yield from (t.name for t in graph.initializer)
    yield from (v.name for v in [*graph.input, *graph.output])
    for node in graph.node:
        yield node.name
        yield from node.output
        for _, sub in node_subgraphs(node):
            yield from _all_names(sub)


class _Builder:
    """Appends nodes and initializers with fresh names."""

    def __init__(self, model: onnx.ModelProto, answer: Answer) -> None:
        self.names = _Names(model)
        self.answer = answer
        self.dtype = helper.tensor_dtype_to_np_dtype(answer.dtype)
        self.initializers: list[onnx.TensorProto] = []
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)

    def const(self, base: str, value: np.ndarray) -> str:
        name = self.names(base)
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, out: list[onnx.NodeProto], op: str, inputs: list[str], base: str, **attrs) -> str:
        output = self.names(base)
        out.append(helper.make_node(op, inputs, [output], name=self.names(f"{base}_node"), **attrs))
        return output


def _head_nodes(b: _Builder, k: int, spec: ExitSpec, criterion: str, done: str | None, out: list) -> dict[str, str]:
    """Head k's nodes: pooled features -> logits -> answer; a per-sample score (> 0: done by exit k) and
    'every sample done'."""
    p = f"exit{k}/"
    features = spec.tensor
    if spec.rank > 2:
        features = b.node(out, "GlobalAveragePool", [features], p + "pool")
        features = b.node(out, "Flatten", [features], p + "features", axis=1)
    weight = b.const(p + "weight", spec.weight.astype(b.dtype))
    bias = b.const(p + "bias", spec.bias.astype(b.dtype))
    logits = b.node(out, "Gemm", [features, weight, bias], p + "logits")
    early = logits
    if b.answer.finish is not None:
        axis = {} if b.answer.finish == "Sigmoid" else {"axis": 1}
        early = b.node(out, b.answer.finish, [logits], p + "answer", **axis)
    excess = _excess_nodes(b, p, logits, criterion, spec.weight.shape[1], spec.threshold, out)
    # score > 0: the sample is confident at this exit or an earlier one; the batch leaves when all are
    score = excess
    if done is not None:  # max(done, excess) as done + relu(excess - done): TVM imports a two-input Max as a stack
        gain = b.node(out, "Relu", [b.node(out, "Sub", [excess, done], p + "gain_raw")], p + "gain")
        score = b.node(out, "Add", [done, gain], p + "score")
    lowest = b.node(out, "ReduceMin", [score], p + "lowest_score", keepdims=0)
    cond = b.node(out, "Greater", [lowest, b.const(p + "zero", np.array(0.0, b.dtype))], p + "all_done")
    return {"early": early, "done": score, "cond": cond}


def _excess_nodes(
    b: _Builder, p: str, logits: str, criterion: str, classes: int, threshold: float, out: list
) -> str:
    """(N, 1) confidence minus the threshold, from the head's softmax (the formulas of _exit_heads.confidence),
    in as few nodes as possible: the early path runs them for every sample."""
    prob = b.node(out, "Softmax", [logits], p + "prob", axis=1)
    if criterion == "entropy":  # 1 - H / log(C) - threshold
        logp = b.node(out, "LogSoftmax", [logits], p + "logprob", axis=1)
        plogp = b.node(out, "Mul", [prob, logp], p + "plogp")
        scale = b.const(p + "entropy_scale", np.full((classes, 1), 1.0 / np.log(classes), b.dtype))
        neg = b.node(out, "MatMul", [plogp, scale], p + "neg_entropy")
        return b.node(out, "Add", [neg, b.const(p + "offset", np.array(1.0 - threshold, b.dtype))], p + "excess")
    # No TopK: TVM lowers it to an extern call (tvm.contrib.sort.topk) that a device's runtime-only TVM lacks.
    top1 = _row_max(b, out, prob, p + "top1")
    if criterion == "margin":  # the runner-up: the row's maximum with the first argmax position masked out
        first = b.node(out, "ArgMax", [prob], p + "argmax", axis=1, keepdims=1)
        positions = b.const(p + "positions", np.arange(classes, dtype=np.int64)[None, :])
        at_first = b.node(out, "Equal", [positions, first], p + "at_argmax")
        rest = b.node(out, "Where", [at_first, b.const(p + "below", np.array(-1.0, b.dtype)), prob], p + "rest")
        top1 = b.node(out, "Sub", [top1, _row_max(b, out, rest, p + "top2")], p + "margin")
    return b.node(out, "Add", [top1, b.const(p + "offset", np.array(-threshold, b.dtype))], p + "excess")


def _row_max(b: _Builder, out: list, x: str, base: str) -> str:
    """(N, 1) maximum over axis 1 (ReduceMax takes its axes as an input from opset 18)."""
    if b.opset >= 18:
        return b.node(out, "ReduceMax", [x, b.const(base + "_axes", np.array([1], np.int64))], base, keepdims=1)
    return b.node(out, "ReduceMax", [x], base, axes=[1], keepdims=1)


def _branch(nodes: list[onnx.NodeProto], output: str, name: str, dtype: int) -> onnx.GraphProto:
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(output, dtype, None)])


def build_exit_model(
    model: onnx.ModelProto, output: str, exits: list[ExitSpec], criterion: str, answer: Answer
) -> onnx.ModelProto:
    """`model` (one output) rewritten with nested If control nodes at `exits` (in graph order)."""
    b = _Builder(model, answer)
    nodes = list(model.graph.node)
    full = b.names(f"{output}/full")
    before: set[int] = set()
    segments = []
    for spec in exits:
        upto = ancestor_nodes(model, [spec.tensor])
        segments.append([nodes[i] for i in sorted(upto - before)])
        before |= upto
    last = [_renamed(nodes[i], output, full) for i in sorted(ancestor_nodes(model, [output]) - before)]
    scopes: list[list[onnx.NodeProto]] = []
    heads, done = [], None
    for k, (spec, segment) in enumerate(zip(exits, segments, strict=True), start=1):
        scope = list(segment)
        heads.append(_head_nodes(b, k, spec, criterion, done, scope))
        done = heads[-1]["done"]
        scopes.append(scope)
    answer_name = full
    inner = last
    for k in range(len(exits), 0, -1):  # wrap from the innermost scope outwards
        head = heads[k - 1]
        # Samples done at an earlier exit are answered by an outer Where, so "done by k" selects like "left at k".
        mask = b.node(inner, "Greater", [head["done"], b.const(f"exit{k}/zero_", np.array(0.0, b.dtype))],
                      f"exit{k}/done")
        picked = b.node(inner, "Where", [mask, head["early"], answer_name], f"exit{k}/answer_or_rest")
        then: list[onnx.NodeProto] = []
        then_out = b.node(then, "Identity", [head["early"]], f"exit{k}/early")
        else_graph = _branch(inner, picked, f"exit{k}_rest", answer.dtype)
        then_graph = _branch(then, then_out, f"exit{k}_early", answer.dtype)
        answer_name = output if k == 1 else b.names(f"exit{k}/result")
        scope = scopes[k - 1]
        scope.append(helper.make_node("If", [head["cond"]], [answer_name], name=b.names(f"exit{k}/if"),
                                      then_branch=then_graph, else_branch=else_graph))
        inner = scope
    new = onnx.ModelProto()
    new.CopyFrom(model)
    new.graph.ClearField("node")
    new.graph.node.extend(inner)
    new.graph.initializer.extend(b.initializers)
    new.graph.ClearField("value_info")
    return new


def exit_conditions(model: onnx.ModelProto) -> list[str]:
    """The condition tensors of the nested If nodes, outermost first (following else-branches)."""
    conditions, graph = [], model.graph
    while True:
        ifs = [n for n in graph.node if n.op_type == "If"]
        if not ifs:
            return conditions
        node = ifs[-1]
        conditions.append(node.input[0])
        graph = next(a.g for a in node.attribute if a.name == "else_branch")


def probe_model(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """A flat copy of an exit model whose outputs are every exit's condition (all heads evaluated),
    to read which exit each sample takes: the first whose condition is true."""
    conditions = exit_conditions(model)
    flat: list[onnx.NodeProto] = []

    def hoist(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            if node.op_type == "If":
                hoist(next(a.g for a in node.attribute if a.name == "else_branch"))
            else:
                flat.append(node)

    hoist(model.graph)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.ClearField("node")
    probe.graph.ClearField("value_info")
    probe.graph.node.extend(flat)
    keep = ancestor_nodes(probe, conditions)
    kept = [probe.graph.node[i] for i in sorted(keep)]
    probe.graph.ClearField("node")
    probe.graph.node.extend(kept)
    probe.graph.ClearField("output")
    probe.graph.output.extend(helper.make_tensor_value_info(c, TensorProto.BOOL, []) for c in conditions)
    return probe, conditions


def _renamed(node: onnx.NodeProto, old: str, new: str) -> onnx.NodeProto:
    """A copy of `node` reading and writing `new` where it read or wrote `old`."""
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    copy.input[:] = [new if i == old else i for i in copy.input]
    copy.output[:] = [new if o == old else o for o in copy.output]
    return copy
