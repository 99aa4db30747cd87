"""Per-op rules of the channel-dependency analysis: how each op type carries, links or blocks channel atoms.

One function per op family, collected in RULES (op_type -> rule); an op without a rule blocks the channels it reads.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import onnx

from .channels import Atom, ChannelGraph, Channels, node_label
from .graph import QUANTISED_OPS, QUANTISED_WEIGHT, attributes, quantised_op, subgraph_reads

UNARY = {
    "Relu", "Clip", "HardSwish", "HardSigmoid", "Sigmoid", "LeakyRelu", "Tanh", "Elu", "Selu", "Celu", "Softplus",
    "Softsign", "Mish", "Gelu", "Erf", "Identity", "Dropout", "Neg", "Abs", "Exp", "Log", "Sqrt", "Reciprocal",
    "Floor", "Ceil", "Round", "Sign", "Not", "IsNaN", "ThresholdedRelu", "Cast", "Sin", "Cos",
}
SPATIAL = {"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"}
BINARY = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu", "Where"}
NORMS = {"BatchNormalization", "InstanceNormalization"}
REDUCE = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL2", "ReduceL1", "ReduceProd"}


# --- helpers shared by the rules -------------------------------------------------------------------------------


def _fresh(cg: ChannelGraph, tensor: str, count: int, axis: int, blocked: str | None = None) -> None:
    atoms = tuple((tensor, i) for i in range(count))
    cg.links.add_nodes_from(atoms)
    if blocked:
        cg.blocked.update(dict.fromkeys(atoms, blocked))
    cg.tensors[tensor] = Channels(axis, atoms)


def block_tensor(cg: ChannelGraph, tensor: str, why: str) -> None:
    info = cg.tensors.get(tensor)
    if info is not None:
        for atom in info.atoms:
            cg.blocked.setdefault(atom, why)


def _block_inputs(cg: ChannelGraph, node: onnx.NodeProto, why: str) -> None:
    for name in node.input:
        block_tensor(cg, name, why)


def _rank(cg: ChannelGraph, name: str) -> int | None:
    shape = cg.view.shape(name)
    return None if shape is None else len(shape)


def _pass(cg: ChannelGraph, node: onnx.NodeProto, axis_map: Callable[[int], int | None] = lambda a: a) -> None:
    """Output 0 carries input 0's atoms (axis mapped), or nothing when the mapping refuses."""
    info = cg.tensors.get(node.input[0]) if node.input else None
    if info is None:
        return
    axis = axis_map(info.axis)
    if axis is None:
        _block_inputs(cg, node, f"{node.op_type} {node_label(node)} mixes channels")
        return
    cg.tensors[node.output[0]] = Channels(axis, info.atoms)


def _link(cg: ChannelGraph, a: Channels, b: Channels) -> None:
    cg.links.add_edges_from(zip(a.atoms, b.atoms, strict=True))


def _dim(cg: ChannelGraph, name: str, axis: int) -> int | None:
    shape = cg.view.shape(name)
    return None if shape is None or axis >= len(shape) else shape[axis]


def unknown(cg: ChannelGraph, node: onnx.NodeProto) -> None:
    why = f"{node.op_type} {node_label(node)} is not understood"
    _block_inputs(cg, node, why)
    for name in subgraph_reads(node):
        block_tensor(cg, name, why)


def _quantised(cg: ChannelGraph, node: onnx.NodeProto, why: str, axis: int | None = None) -> None:
    """A pre-quantised layer: neither its input nor its output channels may be pruned, and the groups say why."""
    _block_inputs(cg, node, why)
    out = cg.view.shape(node.output[0])
    axis = (1 if out is not None and len(out) > 1 else 0) if axis is None else axis
    if out is not None and 0 <= axis < len(out) and isinstance(out[axis], int):
        _fresh(cg, node.output[0], out[axis], axis, why)


def _integer_layer(cg: ChannelGraph, node: onnx.NodeProto) -> None:
    out = cg.view.shape(node.output[0])
    matmul = node.op_type in ("MatMulInteger", "QLinearMatMul")
    _quantised(cg, node, quantised_op(node.op_type), len(out) - 1 if matmul and out else None)


def _quantise(cg: ChannelGraph, node: onnx.NodeProto) -> None:
    """QuantizeLinear/DequantizeLinear/DynamicQuantizeLinear: channels do not cross a quantiser."""
    _block_inputs(cg, node, f"quantised tensor ({node.op_type} {node_label(node)})")


def _dequantised_weight(cg: ChannelGraph, node: onnx.NodeProto, axis: int | None = None) -> bool:
    """True (and the layer blocked as quantised) when the node's weight comes from DequantizeLinear."""
    if len(node.input) < 2 or cg.view.weight_problem(node.input[1]) != QUANTISED_WEIGHT:
        return False
    _quantised(cg, node, QUANTISED_WEIGHT, axis)
    return True


# --- rules: weighted layers --------------------------------------------------------------------------------------


def _conv(cg: ChannelGraph, node: onnx.NodeProto) -> None:
    weight = cg.view.constant(node.input[1]) if len(node.input) > 1 else None
    out = cg.view.shape(node.output[0])
    label = node_label(node)
    if weight is None and _dequantised_weight(cg, node):
        return
    if weight is None or out is None or len(out) < 3:
        unknown(cg, node)
        return
    group = int(attributes(node).get("group", 1))
    cin = weight.shape[0] if node.op_type == "ConvTranspose" else weight.shape[1] * group
    info = cg.tensors.get(node.input[0])
    if group > 1 and group == cin and node.op_type == "Conv" and info is not None:
        multiplier = weight.shape[0] // group  # depthwise: output channel j reads input channel j // m
        cg.tensors[node.output[0]] = Channels(1, tuple(a for a in info.atoms for _ in range(multiplier)))
        cg.roles[label] = "depthwise"
        return
    if group > 1:
        _block_inputs(cg, node, f"grouped Conv {label} (group={group})")
        _fresh(cg, node.output[0], out[1], 1, f"grouped Conv {label} (group={group})")
        return
    if info is not None and info.axis != 1:
        _block_inputs(cg, node, f"{label} reads a tensor whose channels are not on axis 1")
    cg.roles[label] = "weighted" if info is not None else "producer"
    _fresh(cg, node.output[0], out[1], 1)


def _gemm(cg: ChannelGraph, node: onnx.NodeProto) -> None:
    attrs = attributes(node)
    weight = cg.view.constant(node.input[1])
    out = cg.view.shape(node.output[0])
    label = node_label(node)
    if weight is None and _dequantised_weight(cg, node):
        return
    if weight is None or out is None or attrs.get("transA", 0) or len(out) != 2:
        unknown(cg, node)
        return
    if len(node.input) > 2 and not cg.view.is_initializer(node.input[2]):
        unknown(cg, node)
        return
    info = cg.tensors.get(node.input[0])
    if info is not None and info.axis != 1:
        _block_inputs(cg, node, f"{label} reads channels off its contracted axis")
    cg.roles[label] = "weighted" if info is not None else "producer"
    _fresh(cg, node.output[0], out[1], 1)


def _matmul(cg: ChannelGraph, node: onnx.NodeProto) -> None:
    weight = cg.view.constant(node.input[1])
    out = cg.view.shape(node.output[0])
    label = node_label(node)
    if weight is None and out and _dequantised_weight(cg, node, len(out) - 1):
        return
    if weight is None or weight.ndim != 2 or out is None:
        unknown(cg, node)
        return
    info = cg.tensors.get(node.input[0])
    if info is not None and info.axis != len(cg.view.shape(node.input[0])) - 1:
        _block_inputs(cg, node, f"{label} reads channels off its contracted axis")
    cg.roles[label] = "weighted" if info is not None else "producer"
    _fresh(cg, node.output[0], out[-1], len(out) - 1)


# --- rules: channel-wise ops -------------------------------------------------------------------------------------


def _unary(cg: ChannelGraph, node: onnx.NodeProto) -> None:
    _pass(cg, node)


def _spatial(cg: ChannelGraph, node: onnx.NodeProto) -> None:
    _pass(cg, node, lambda a: a if a == 1 else None)


def _norm(cg: ChannelGraph, node: onnx.NodeProto) -> None:
    if not all(cg.view.is_initializer(n) for n in node.input[1:] if n) or len(node.output) > 1 and node.output[1]:
        unknown(cg, node)
        return
    _pass(cg, node, lambda a: a if a == 1 else None)
    cg.roles[node_label(node)] = "member"


def _aligned(cg: ChannelGraph, name: str, out_rank: int, out_axis: int) -> int | None:
    """The size of `name` along the output's channel axis after broadcasting (None when unknown)."""
    shape = cg.view.shape(name)
    if shape is None:
        return None
    at = len(shape) - (out_rank - out_axis)
    return 1 if at < 0 else shape[at]


def _binary(cg: ChannelGraph, node: onnx.NodeProto) -> None:
    """Element-wise op with broadcasting: computed inputs carrying channels are linked position by position;
    constants must be per-channel (sliced) or broadcast along the channel axis."""
    out_rank = _rank(cg, node.output[0])
    names = [n for n in node.input if n]
    tracked = [(n, cg.tensors[n]) for n in names if n in cg.tensors]
    if out_rank is None or not tracked:
        if tracked:
            unknown(cg, node)
        return
    axes = {out_rank - (_rank(cg, n) - info.axis) for n, info in tracked}
    counts = {len(info.atoms) for _, info in tracked}
    if len(axes) != 1 or len(counts) != 1:
        unknown(cg, node)
        return
    axis, count = axes.pop(), counts.pop()
    if _dim(cg, node.output[0], axis) != count:
        unknown(cg, node)  # a tracked size-1 channel axis broadcast against a wider tensor
        return
    for name in names:
        if name in cg.tensors:
            continue
        size = _aligned(cg, name, out_rank, axis)
        if size != 1 and not (size == count and cg.view.is_initializer(name)):
            unknown(cg, node)
            return
    first = tracked[0][1]
    for _, info in tracked[1:]:
        _link(cg, first, info)
    cg.tensors[node.output[0]] = Channels(axis, first.atoms)
    cg.roles[node_label(node)] = "member"


def _reduce(cg: ChannelGraph, node: onnx.NodeProto) -> None:
    attrs = attributes(node)
    axes = attrs.get("axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        value = cg.view.constant(node.input[1])
        axes = None if value is None else value.tolist()
    rank = _rank(cg, node.input[0])
    info = cg.tensors.get(node.input[0])
    if info is None:
        return
    if axes is None or rank is None or not attrs.get("keepdims", 1):
        unknown(cg, node)
        return
    _pass(cg, node, lambda a: None if a in {x % rank for x in axes} else a)


def _softmax(cg: ChannelGraph, node: onnx.NodeProto) -> None:
    rank = _rank(cg, node.input[0])
    axis = attributes(node).get("axis", -1)
    _pass(cg, node, lambda a: None if rank is None or a == axis % rank else a)


def _transpose(cg: ChannelGraph, node: onnx.NodeProto) -> None:
    perm = attributes(node).get("perm")
    rank = _rank(cg, node.input[0])
    perm = list(reversed(range(rank))) if perm is None and rank is not None else perm
    _pass(cg, node, lambda a: None if perm is None else list(perm).index(a))


def _resize(cg: ChannelGraph, node: onnx.NodeProto) -> None:
    info = cg.tensors.get(node.input[0])
    if info is None:
        return
    scales = cg.view.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    sizes = cg.view.constant(node.input[3]) if len(node.input) > 3 and node.input[3] else None
    if (scales is not None and scales.size and scales[info.axis] != 1) or (
        sizes is not None and sizes.size and sizes[info.axis] != len(info.atoms)
    ) or (scales is None and sizes is None and node.op_type == "Resize"):
        unknown(cg, node)
        return
    _pass(cg, node)
    cg.roles[node_label(node)] = "member"


def _pad(cg: ChannelGraph, node: onnx.NodeProto) -> None:
    info = cg.tensors.get(node.input[0])
    if info is None:
        return
    pads = attributes(node).get("pads")
    if pads is None and len(node.input) > 1:
        value = cg.view.constant(node.input[1])
        pads = None if value is None else value.tolist()
    rank = _rank(cg, node.input[0])
    axes_given = len(node.input) > 3 and node.input[3]
    if pads is None or rank is None or axes_given or pads[info.axis] or pads[info.axis + rank]:
        unknown(cg, node)
        return
    _pass(cg, node)


def _concat(cg: ChannelGraph, node: onnx.NodeProto) -> None:
    rank = _rank(cg, node.output[0])
    names = [n for n in node.input if n]
    if rank is None or not any(n in cg.tensors for n in names):
        return
    axis = attributes(node)["axis"] % rank
    infos = [cg.tensors.get(n) for n in names]
    channel_axes = {i.axis for i in infos if i is not None}
    if channel_axes == {axis}:
        atoms: list[Atom] = []
        for name, info in zip(names, infos, strict=True):
            if info is None:  # a computed input without channel atoms: its channels stay, blocked
                extra = f"{node.output[0]}#{name}"
                _fresh(cg, extra, _dim(cg, name, axis) or 0, axis, f"Concat {node_label(node)} input {name}")
                info = cg.tensors.pop(extra)
            atoms.extend(info.atoms)
        cg.tensors[node.output[0]] = Channels(axis, tuple(atoms))
        cg.roles[node_label(node)] = "member"
        return
    _binary(cg, node)  # concatenated along another axis: channels are shared position by position


def _split_sizes(cg: ChannelGraph, node: onnx.NodeProto, total: int) -> list[int] | None:
    attrs = attributes(node)
    if len(node.input) > 1 and node.input[1]:
        value = cg.view.constant(node.input[1])
        return None if value is None else [int(v) for v in value]
    if "split" in attrs:
        return [int(v) for v in attrs["split"]]
    parts = len(node.output)
    return [total // parts] * parts if total % parts == 0 else None


def _split(cg: ChannelGraph, node: onnx.NodeProto) -> None:
    info = cg.tensors.get(node.input[0])
    rank = _rank(cg, node.input[0])
    if info is None or rank is None:
        return
    axis = attributes(node).get("axis", 0) % rank
    if axis != info.axis:
        for out in node.output:
            cg.tensors[out] = info
        return
    sizes = _split_sizes(cg, node, len(info.atoms))
    if sizes is None or sum(sizes) != len(info.atoms):
        unknown(cg, node)
        return
    start = 0
    for out, size in zip(node.output, sizes, strict=True):
        cg.tensors[out] = Channels(axis, info.atoms[start : start + size])
        start += size
    cg.roles[node_label(node)] = "member"


def _slice(cg: ChannelGraph, node: onnx.NodeProto) -> None:
    info = cg.tensors.get(node.input[0])
    rank = _rank(cg, node.input[0])
    if info is None or rank is None:
        return
    consts = [cg.view.constant(n) if n else None for n in node.input[1:5]]
    starts, ends = consts[0], consts[1]
    if starts is None or ends is None or any(c is None for c, n in zip(consts, node.input[1:5], strict=False) if n):
        unknown(cg, node)
        return
    axes = consts[2] if len(consts) > 2 and consts[2] is not None else np.arange(len(starts))
    steps = consts[3] if len(consts) > 3 and consts[3] is not None else np.ones(len(starts), np.int64)
    axes = [int(a) % rank for a in axes]
    if info.axis not in axes:
        _pass(cg, node)
        return
    k = axes.index(info.axis)
    if steps[k] != 1:
        unknown(cg, node)
        return
    cut = slice(*slice(int(starts[k]), int(ends[k])).indices(len(info.atoms)))
    cg.tensors[node.output[0]] = Channels(info.axis, info.atoms[cut])
    cg.roles[node_label(node)] = "member"


def _reshape(cg: ChannelGraph, node: onnx.NodeProto) -> None:
    """Reshapes that keep every axis up to the channel axis keep the channels; flattening (N, C, ...) into
    (N, C * S) repeats each channel S times; a channel axis that is last and stays last with its size (the
    (N, T, C) <-> (N * T, C) around a Gemm that exporters and onnxslim's MatMul fusion write) moves to the
    last axis; anything else mixes channels and blocks them."""
    info = cg.tensors.get(node.input[0])
    src, dst = cg.view.static_shape(node.input[0]), cg.view.static_shape(node.output[0])
    if info is None:
        return
    if node.op_type == "Reshape" and len(node.input) > 1 and cg.view.constant(node.input[1]) is None:
        unknown(cg, node)
        return
    if src is None or dst is None:
        unknown(cg, node)
        return
    a = info.axis
    if len(dst) > a and dst[: a + 1] == src[: a + 1]:
        _pass(cg, node)
    elif a == 1 and len(dst) == 2 and dst[0] == src[0]:
        spread = math.prod(src[2:])
        cg.tensors[node.output[0]] = Channels(1, tuple(x for x in info.atoms for _ in range(spread)))
    elif a == len(src) - 1 and dst and dst[-1] == src[-1] and _writes_last_dim(cg, node, len(src)):
        cg.tensors[node.output[0]] = Channels(len(dst) - 1, info.atoms)
    else:
        unknown(cg, node)
        return
    cg.roles[node_label(node)] = "member"


def _writes_last_dim(cg: ChannelGraph, node: onnx.NodeProto, src_rank: int) -> bool:
    """The Reshape's target names its last size (or -1), so slicing can rewrite it; a 0 copies the input's size
    at that index, which is the channel count only when the rank does not change."""
    if node.op_type != "Reshape":
        return True
    target = cg.view.constant(node.input[1])
    return target[-1] != 0 or len(target) == src_rank


def _shape_only(cg: ChannelGraph, node: onnx.NodeProto) -> None:
    """Shape/Size read how many channels a tensor has: removing any would change the result."""
    _block_inputs(cg, node, f"{node.op_type} {node_label(node)} reads the channel count")


RULES: dict[str, Callable[[ChannelGraph, onnx.NodeProto], None]] = {
    **dict.fromkeys(UNARY, _unary),
    **dict.fromkeys(SPATIAL, _spatial),
    **dict.fromkeys(BINARY, _binary),
    **dict.fromkeys(NORMS, _norm),
    **dict.fromkeys(REDUCE, _reduce),
    "Conv": _conv,
    "ConvTranspose": _conv,
    "Gemm": _gemm,
    "MatMul": _matmul,
    "Softmax": _softmax,
    "LogSoftmax": _softmax,
    "Transpose": _transpose,
    "Resize": _resize,
    "Upsample": _resize,
    "Pad": _pad,
    "Concat": _concat,
    "Split": _split,
    "Slice": _slice,
    "Reshape": _reshape,
    "Flatten": _reshape,
    "Shape": _shape_only,
    "Size": _shape_only,
    **dict.fromkeys(QUANTISED_OPS, _integer_layer),
    **dict.fromkeys(("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"), _quantise),
}
