"""LSTM and GRU for TVM builds: unrolled into standard ONNX ops before import.

TVM 0.27's Relax ONNX importer has no LSTM or GRU. Builds use one static shape, so the sequence length is known
and each recurrent node can be unrolled into MatMul/Add/Split/activation ops that the importer, fusion and the
schedules all understand, without patching TVM. The written model.onnx keeps its LSTM/GRU nodes; only what TVM
compiles is unrolled. Forward, reverse and bidirectional, with or without initial states, biases, peepholes
(LSTM), `linear_before_reset` (GRU), `clip`, `layout` 0 and 1; sequence lengths only when they equal the full
length (anything else is refused with one line).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from rewriter.errors import ModelError
from rewriter.graph import GraphView, attributes, drop_unused_initializers

RECURRENT = ("LSTM", "GRU")
_DEFAULT_ACTS = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"]}
_SIMPLE_ACTS = {"Sigmoid", "Tanh", "Relu"}


def has_recurrent(model: onnx.ModelProto) -> bool:
    return any(node.op_type in RECURRENT for node in model.graph.node)


class _Emitter:
    """Appends nodes and constants to a model with names that cannot collide."""

    def __init__(self, model: onnx.ModelProto, prefix: str, taken: set[str]) -> None:
        self.model, self.prefix, self.taken, self.nodes, self.count = model, prefix, taken, [], 0
        # Split/Squeeze/Unsqueeze take their sizes and axes as inputs from opset 13, as attributes before
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
        self.index_consts: dict[tuple, str] = {}

    def ints(self, values: list[int]) -> str:
        """One shared int64 constant per distinct list (split sizes, axes)."""
        key = tuple(values)
        if key not in self.index_consts:
            self.index_consts[key] = self.const("ints", np.array(values, np.int64))
        return self.index_consts[key]

    def split(self, x: str, sizes: list[int], axis: int) -> list[str]:
        if self.opset >= 13:
            return self.op("Split", [x, self.ints(sizes)], outputs=len(sizes), axis=axis)
        return self.op("Split", [x], outputs=len(sizes), axis=axis, split=sizes)

    def unsqueeze(self, x: str, axis: int, op: str = "Unsqueeze") -> str:
        if self.opset >= 13:
            return self.one(op, [x, self.ints([axis])])
        return self.one(op, [x], axes=[axis])

    def name(self, base: str) -> str:
        while True:
            self.count += 1
            name = f"{self.prefix}/{base}_{self.count}"
            if name not in self.taken:
                self.taken.add(name)
                return name

    def const(self, base: str, array: np.ndarray) -> str:
        name = self.name(base)
        self.model.graph.initializer.append(numpy_helper.from_array(np.array(array, order="C"), name))
        return name

    def op(self, op_type: str, inputs: list[str], base: str | None = None, outputs: int = 1, **attrs) -> list[str]:
        outs = [self.name(f"{base or op_type}") for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.name(f"{base or op_type}_node"), **attrs))
        return outs

    def one(self, op_type: str, inputs: list[str], base: str | None = None, **attrs) -> str:
        return self.op(op_type, inputs, base, 1, **attrs)[0]


def _activation(emit: _Emitter, kind: str, alpha: float | None, beta: float | None) -> Callable[[str], str]:
    if kind in _SIMPLE_ACTS:
        return lambda x: emit.one(kind, [x])
    if kind == "HardSigmoid":
        return lambda x: emit.one("HardSigmoid", [x], alpha=0.2 if alpha is None else alpha,
                                  beta=0.5 if beta is None else beta)
    if kind == "LeakyRelu":
        return lambda x: emit.one("LeakyRelu", [x], alpha=0.01 if alpha is None else alpha)
    raise ModelError(f"recurrent activation {kind} is not supported for TVM builds")


def _activations(emit: _Emitter, node: onnx.NodeProto, attrs: dict, per_dir: int, dirs: int) -> list[list]:
    names = [a.decode() if isinstance(a, bytes) else a for a in attrs.get("activations", [])]
    names = names or _DEFAULT_ACTS[node.op_type] * dirs
    alphas, betas = list(attrs.get("activation_alpha", [])), list(attrs.get("activation_beta", []))
    acts = []
    for i, kind in enumerate(names):
        alpha, beta = (alphas[i] if i < len(alphas) else None), (betas[i] if i < len(betas) else None)
        acts.append(_activation(emit, kind, alpha, beta))
    return [acts[d * per_dir:(d + 1) * per_dir] for d in range(dirs)]


def _weights(view: GraphView, node: onnx.NodeProto, index: int, what: str) -> np.ndarray | None:
    if len(node.input) <= index or not node.input[index]:
        return None
    value = view.constant(node.input[index])
    if value is None:
        raise ModelError(f"{node.op_type} {node.name!r}: {what} must be a constant for TVM builds")
    return value


def _check_lengths(view: GraphView, node: onnx.NodeProto, seq: int) -> None:
    if len(node.input) > 4 and node.input[4]:
        lengths = view.constant(node.input[4])
        if lengths is None or not np.all(lengths == seq):
            raise ModelError(f"{node.op_type} {node.name!r}: per-sample sequence lengths are not supported for TVM "
                             f"builds (only the full length {seq})")


def _state(emit: _Emitter, node: onnx.NodeProto, index: int, direction: int, batch: int, hidden: int, dtype) -> str:
    """The initial state of one direction as [batch, hidden]: given ([dirs, batch, hidden], or batch first when
    layout=1), or zeros."""
    if len(node.input) > index and node.input[index]:
        axis = 1 if attributes(node).get("layout", 0) else 0
        return emit.one("Gather", [node.input[index], emit.const("dir", np.array(direction, np.int64))], axis=axis)
    return emit.const("zeros", np.zeros((batch, hidden), dtype))


def _step_inputs(emit: _Emitter, x: str, w: np.ndarray, bias: np.ndarray | None, seq: int) -> list[str]:
    """X @ W^T (+ bias) for all steps at once, then one [batch, gates * hidden] slice per step."""
    projected = emit.one("MatMul", [x, emit.const("wT", np.ascontiguousarray(w.T))])
    if bias is not None:
        projected = emit.one("Add", [projected, emit.const("b", bias)])
    return [emit.unsqueeze(s, 0, op="Squeeze") for s in emit.split(projected, [1] * seq, axis=0)]


def _lstm_direction(emit, node, attrs, view, d, backwards, x, seq, batch, hidden, acts, dtype):
    """One direction of an LSTM: its per-step outputs, final h and final c. `d` indexes its weights."""
    w, r = _weights(view, node, 1, "W")[d], _weights(view, node, 2, "R")[d]
    b = _weights(view, node, 3, "B")
    bias = None if b is None else b[d, :4 * hidden] + b[d, 4 * hidden:]
    peep = _weights(view, node, 7, "P")
    xs = _step_inputs(emit, x, w, bias, seq)
    h, c = _state(emit, node, 5, d, batch, hidden, dtype), _state(emit, node, 6, d, batch, hidden, dtype)
    f_act, g_act, h_act = acts
    r_t, clip = emit.const("rT", np.ascontiguousarray(r.T)), attrs.get("clip")
    bounds = [emit.const("lo", np.array(-clip, dtype)), emit.const("hi", np.array(clip, dtype))] if clip else []
    order = range(seq - 1, -1, -1) if backwards else range(seq)
    outputs: list[str | None] = [None] * seq
    for t in order:
        pre = emit.one("Add", [xs[t], emit.one("MatMul", [h, r_t])])
        if clip is not None:
            pre = emit.one("Clip", [pre, *bounds])
        i, o, f, g = emit.split(pre, [hidden] * 4, axis=1)
        if peep is not None:
            i = emit.one("Add", [i, emit.one("Mul", [c, emit.const("pi", peep[d, :hidden])])])
            f = emit.one("Add", [f, emit.one("Mul", [c, emit.const("pf", peep[d, 2 * hidden:])])])
        if attrs.get("input_forget", 0):
            raise ModelError(f"LSTM {node.name!r}: input_forget is not supported for TVM builds")
        c = emit.one("Add", [emit.one("Mul", [f_act(f), c]), emit.one("Mul", [f_act(i), g_act(g)])])
        if peep is not None:
            o = emit.one("Add", [o, emit.one("Mul", [c, emit.const("po", peep[d, hidden:2 * hidden])])])
        h = emit.one("Mul", [f_act(o), h_act(c)])
        outputs[t] = h
    return outputs, h, c


def _gru_direction(emit, node, attrs, view, d, backwards, x, seq, batch, hidden, acts, dtype):
    """One direction of a GRU: its per-step outputs, final h and None. `d` indexes its weights."""
    w, r = _weights(view, node, 1, "W")[d], _weights(view, node, 2, "R")[d]
    b = _weights(view, node, 3, "B")
    wb = None if b is None else b[d, :3 * hidden]
    rb = np.zeros(3 * hidden, dtype) if b is None else b[d, 3 * hidden:]
    xs = _step_inputs(emit, x, w, wb, seq)
    h = _state(emit, node, 5, d, batch, hidden, dtype)
    f_act, g_act = acts
    r_zr = emit.const("rT_zr", np.ascontiguousarray(r[:2 * hidden].T))
    r_h = emit.const("rT_h", np.ascontiguousarray(r[2 * hidden:].T))
    rb_zr, rb_h = emit.const("rb_zr", rb[:2 * hidden]), emit.const("rb_h", rb[2 * hidden:])
    linear_before_reset, clip = attrs.get("linear_before_reset", 0), attrs.get("clip")
    one = emit.const("one", np.array(1, dtype))
    order = range(seq - 1, -1, -1) if backwards else range(seq)
    outputs: list[str | None] = [None] * seq
    for t in order:
        xz, xr, xh = emit.split(xs[t], [hidden] * 3, axis=1)
        hz, hr = emit.split(emit.one("Add", [emit.one("MatMul", [h, r_zr]), rb_zr]), [hidden] * 2, axis=1)
        z_pre, r_pre = emit.one("Add", [xz, hz]), emit.one("Add", [xr, hr])
        if clip is not None:
            lo, hi = emit.const("lo", np.array(-clip, dtype)), emit.const("hi", np.array(clip, dtype))
            z_pre, r_pre = emit.one("Clip", [z_pre, lo, hi]), emit.one("Clip", [r_pre, lo, hi])
        z, reset = f_act(z_pre), f_act(r_pre)
        if linear_before_reset:
            recur = emit.one("Mul", [reset, emit.one("Add", [emit.one("MatMul", [h, r_h]), rb_h])])
        else:
            recur = emit.one("Add", [emit.one("MatMul", [emit.one("Mul", [reset, h]), r_h]), rb_h])
        h_pre = emit.one("Add", [xh, recur])
        if clip is not None:
            h_pre = emit.one("Clip", [h_pre, lo, hi])
        candidate = g_act(h_pre)
        h = emit.one("Add", [emit.one("Mul", [emit.one("Sub", [one, z]), candidate]), emit.one("Mul", [z, h])])
        outputs[t] = h
    return outputs, h, None


def _unroll(model: onnx.ModelProto, view: GraphView, node: onnx.NodeProto, taken: set[str]) -> list[onnx.NodeProto]:
    """The nodes that compute `node`'s outputs step by step."""
    attrs = attributes(node)
    shape = view.static_shape(node.input[0])
    if shape is None:
        raise ModelError(f"{node.op_type} {node.name!r}: its input needs a static shape for TVM builds")
    emit = _Emitter(model, node.name or node.output[0], taken)
    x = node.input[0]
    if attrs.get("layout", 0):
        x = emit.one("Transpose", [x], perm=[1, 0, 2])
        shape = [shape[1], shape[0], shape[2]]
    seq, batch, _ = shape
    hidden = int(attrs["hidden_size"])
    direction = attrs.get("direction", b"forward")
    direction = direction.decode() if isinstance(direction, bytes) else direction
    dirs = 2 if direction == "bidirectional" else 1
    dtype = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == node.input[1])).dtype
    _check_lengths(view, node, seq)
    per_dir = 3 if node.op_type == "LSTM" else 2
    acts = _activations(emit, node, attrs, per_dir, dirs)
    run = _lstm_direction if node.op_type == "LSTM" else _gru_direction
    ys, hs, cs = [], [], []
    for d in range(dirs):
        backwards = direction == "reverse" or d == 1
        steps, h, c = run(emit, node, attrs, view, d, backwards, x, seq, batch, hidden, acts[d], dtype)
        ys.append(emit.one("Concat", [emit.unsqueeze(s, 0) for s in steps], axis=0))  # [seq, batch, hidden]
        hs.append(emit.unsqueeze(h, 0))
        cs.append(emit.unsqueeze(c, 0) if c else None)
    y = emit.one("Concat", [emit.unsqueeze(yd, 1) for yd in ys], axis=1)  # [seq, dirs, batch, hidden]
    finals = {0: y, 1: emit.one("Concat", hs, axis=0)}
    if node.op_type == "LSTM":
        finals[2] = emit.one("Concat", cs, axis=0)
    if attrs.get("layout", 0):
        finals[0] = emit.one("Transpose", [finals[0]], perm=[2, 0, 1, 3])
        finals[1] = emit.one("Transpose", [finals[1]], perm=[1, 0, 2])
        if 2 in finals:
            finals[2] = emit.one("Transpose", [finals[2]], perm=[1, 0, 2])
    for index, name in enumerate(node.output):
        if name:
            emit.nodes.append(helper.make_node("Identity", [finals[index]], [name], name=emit.name("out")))
    return emit.nodes


def unroll_recurrent(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` with every LSTM and GRU node unrolled over its static sequence length."""
    unrolled = onnx.ModelProto()
    unrolled.CopyFrom(model)
    view = GraphView(unrolled)
    taken = {t.name for t in unrolled.graph.initializer} | {v.name for v in unrolled.graph.input}
    taken |= {n for node in unrolled.graph.node for n in [*node.input, *node.output, node.name]}
    nodes = []
    for node in list(unrolled.graph.node):
        nodes.extend(_unroll(unrolled, view, node, taken) if node.op_type in RECURRENT else [node])
    del unrolled.graph.node[:]
    unrolled.graph.node.extend(nodes)
    unrolled.graph.ClearField("value_info")
    drop_unused_initializers(unrolled)  # W and R now live transposed, per direction
    return onnx.shape_inference.infer_shapes(unrolled)
