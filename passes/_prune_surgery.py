"""Graph side of pruning: remove a set of channel atoms from every node that holds them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from rewriter.channels import Atom, ChannelGraph, node_label
from rewriter.graph import attributes, subgraph_reads, unique_name


@dataclass
class Surgery:
    """One removal: the analysis of the model being edited, the atoms leaving, the edited copy."""

    cg: ChannelGraph
    removed: set[Atom]
    model: onnx.ModelProto

    def keep(self, tensor: str) -> np.ndarray | None:
        """Indices kept along a tensor's channel axis, or None when nothing leaves it."""
        kept = self.cg.kept_positions(tensor, self.removed)
        info = self.cg.tensors.get(tensor)
        if kept is None or len(kept) == len(info.atoms):
            return None
        return np.asarray(kept, dtype=np.int64)

    def array(self, name: str) -> np.ndarray:
        return self.cg.view.constant(name)

    def replace(self, node: onnx.NodeProto, index: int, value: np.ndarray) -> None:
        """Point input `index` at a new initializer (the old one may be shared with other nodes)."""
        name = unique_name(self.model, f"{node.input[index]}_pruned")
        self.model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        node.input[index] = name


def _take(value: np.ndarray, keep: np.ndarray | None, axis: int) -> np.ndarray:
    return value if keep is None else np.take(value, keep, axis=axis)


def _set_attr(node: onnx.NodeProto, name: str, value) -> None:
    for i, attr in enumerate(node.attribute):
        if attr.name == name:
            del node.attribute[i]
            break
    node.attribute.append(helper.make_attribute(name, value))


def _conv(s: Surgery, node: onnx.NodeProto) -> None:
    keep_in, keep_out = s.keep(node.input[0]), s.keep(node.output[0])
    if keep_in is None and keep_out is None:
        return
    w = s.array(node.input[1])
    if s.cg.roles.get(node_label(node)) == "depthwise":
        w = _take(w, keep_out, 0)
        _set_attr(node, "group", len(s.cg.kept_positions(node.input[0], s.removed)))
    elif node.op_type == "ConvTranspose":
        w = _take(_take(w, keep_in, 0), keep_out, 1)
    else:
        w = _take(_take(w, keep_out, 0), keep_in, 1)
    s.replace(node, 1, w)
    if len(node.input) > 2 and node.input[2] and keep_out is not None:
        s.replace(node, 2, s.array(node.input[2])[keep_out])


def _gemm(s: Surgery, node: onnx.NodeProto) -> None:
    keep_in, keep_out = s.keep(node.input[0]), s.keep(node.output[0])
    if keep_in is None and keep_out is None:
        return
    w = s.array(node.input[1])
    trans = attributes(node).get("transB", 0) if node.op_type == "Gemm" else 0
    w = _take(_take(w, keep_out, 0), keep_in, 1) if trans else _take(_take(w, keep_in, 0), keep_out, 1)
    s.replace(node, 1, w)
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] and keep_out is not None:
        bias = s.array(node.input[2])
        if bias.ndim and bias.shape[-1] > 1:
            s.replace(node, 2, _take(bias, keep_out, bias.ndim - 1))


def _norm(s: Surgery, node: onnx.NodeProto) -> None:
    keep = s.keep(node.output[0])
    if keep is not None:
        for index in range(1, len(node.input)):
            s.replace(node, index, s.array(node.input[index])[keep])


def _broadcast(s: Surgery, node: onnx.NodeProto) -> None:
    """Per-channel constants of element-wise ops lose the removed channels."""
    keep = s.keep(node.output[0])
    if keep is None:
        return
    info = s.cg.tensors[node.output[0]]
    out_rank = len(s.cg.view.shape(node.output[0]))
    for index, name in enumerate(node.input):
        if not name or not s.cg.view.is_initializer(name):
            continue
        value = s.array(name)
        at = value.ndim - (out_rank - info.axis)
        if at >= 0 and value.shape[at] == len(info.atoms) > 1:
            s.replace(node, index, _take(value, keep, at))


def _resize(s: Surgery, node: onnx.NodeProto) -> None:
    keep = s.keep(node.output[0])
    if keep is not None and len(node.input) > 3 and node.input[3]:
        sizes = s.array(node.input[3]).copy()
        sizes[s.cg.tensors[node.output[0]].axis] = len(keep)
        s.replace(node, 3, sizes)


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)


def _split(s: Surgery, node: onnx.NodeProto) -> None:
    if all(s.keep(out) is None for out in node.output) or s.cg.roles.get(node_label(node)) != "member":
        return
    sizes = np.array([len(s.cg.kept_positions(out, s.removed)) for out in node.output], dtype=np.int64)
    if _opset(s.model) < 13:
        _set_attr(node, "split", sizes.tolist())
        return
    for i, attr in enumerate(node.attribute):
        if attr.name == "num_outputs":
            del node.attribute[i]
            break
    if len(node.input) < 2:
        node.input.append("")
    name = unique_name(s.model, f"{node_label(node)}_split_pruned")
    s.model.graph.initializer.append(numpy_helper.from_array(sizes, name))
    node.input[1] = name


def _slice(s: Surgery, node: onnx.NodeProto) -> None:
    if s.keep(node.input[0]) is None or s.cg.roles.get(node_label(node)) != "member":
        return
    info = s.cg.tensors[node.input[0]]
    rank = len(s.cg.view.shape(node.input[0]))
    starts, ends = s.array(node.input[1]), s.array(node.input[2])
    axes = s.array(node.input[3]) if len(node.input) > 3 and node.input[3] else np.arange(len(starts))
    k = [int(a) % rank for a in axes].index(info.axis)
    start = slice(int(starts[k]), int(ends[k])).indices(len(info.atoms))[0]
    new_start = sum(1 for a in info.atoms[:start] if a not in s.removed)
    new_starts, new_ends = starts.copy(), ends.copy()
    new_starts[k] = new_start
    new_ends[k] = new_start + len(s.cg.kept_positions(node.output[0], s.removed))
    s.replace(node, 1, new_starts)
    s.replace(node, 2, new_ends)


def _reshape(s: Surgery, node: onnx.NodeProto) -> None:
    keep = s.keep(node.output[0])
    if keep is None or node.op_type != "Reshape":
        return
    shape = s.array(node.input[1]).copy()
    axis = s.cg.tensors[node.output[0]].axis
    if shape[axis] > 0:
        shape[axis] = len(keep)
        s.replace(node, 1, shape)


SLICERS: dict[str, Callable[[Surgery, onnx.NodeProto], None]] = {
    "Conv": _conv,
    "ConvTranspose": _conv,
    "Gemm": _gemm,
    "MatMul": _gemm,
    "BatchNormalization": _norm,
    "InstanceNormalization": _norm,
    **dict.fromkeys(("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu", "Where"), _broadcast),
    "Resize": _resize,
    "Split": _split,
    "Slice": _slice,
    "Reshape": _reshape,
}


def drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {name for node in model.graph.node for name in node.input}
    used |= set().union(*(subgraph_reads(node) for node in model.graph.node))  # If/Loop bodies read outer names
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def remove_atoms(model: onnx.ModelProto, cg: ChannelGraph, removed: set[Atom]) -> onnx.ModelProto:
    """A shape-inferred copy of `model` (the model `cg` analysed) without the `removed` atoms."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    surgery = Surgery(cg, removed, out)
    for node in out.graph.node:
        slicer = SLICERS.get(node.op_type)
        if slicer is not None:
            slicer(surgery, node)
    drop_unused_initializers(out)
    out.graph.ClearField("value_info")
    return onnx.shape_inference.infer_shapes(out)
