"""Which axis of each model output holds its features, and whether (and where) it carries class scores.

Fidelity is only meaningful along the right axis: a classifier's [N, C], a YOLOv8 head's [N, 4+C, anchors],
a YOLOX head's [N, anchors, 5+C], a CTC recogniser's [N, T, C] and a segmentation map's [N, 1, H, W] all
put their channels in different places. The layout is read from the graph first (the op that makes the
output: Softmax/LogSoftmax axis, a Concat of box and score branches, a Transpose), then from the values
(probabilities that sum to one along an axis), then from the shape; `--output-axis NAME=AXIS[:scores]`
overrides it. Axes here are the output's own axes, as onnxruntime returns it for one sample.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import onnx

from .errors import UsageError
from .graph import GraphView, attributes

# Ops that keep every axis where it is (and the meaning of the values along it).
_PASS_THROUGH = {"Identity", "Cast", "Dropout"}
_RESHAPING = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Cast"}
_SCORE_OPS = {"Softmax": "softmax", "LogSoftmax": "log-softmax", "Sigmoid": "sigmoid"}
SCORE_KINDS = ("softmax", "log-softmax", "sigmoid", "probabilities", "labels", "given")


@dataclass(frozen=True)
class OutputLayout:
    """How to read one output: feature axis, class-score channels along it, and why."""

    feature_axis: int | None  # None: no channel axis (scalars, vectors without batch)
    scores: str | None = None  # how class scores are normalised (one of SCORE_KINDS), None: not class scores
    class_channels: tuple[int, int] | None = None  # [start, stop) of the score channels along feature_axis
    box_channels: tuple[int, int] | None = None  # [start, stop) of 4 box coordinates, for detection agreement
    why: str = ""

    @property
    def has_classes(self) -> bool:
        return self.scores is not None

    def as_report(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


def parse_output_axis(text: str) -> tuple[str, int, bool | None]:
    """'logits=1' / 'out=2:scores' / 'emb=1:features' -> (name, axis, carries class scores or None)."""
    name, sep, rest = text.rpartition("=")
    axis_text, _, kind = rest.partition(":")
    try:
        axis = int(axis_text)
    except ValueError:
        axis = None
    if not sep or not name or axis is None or kind not in {"", "scores", "features"}:
        raise UsageError(f"bad --output-axis {text!r}: expected NAME=AXIS, NAME=AXIS:scores or NAME=AXIS:features")
    return name, axis, None if not kind else kind == "scores"


def infer_layouts(
    model: onnx.ModelProto,
    samples: Mapping[str, Sequence[np.ndarray]],
    labels: np.ndarray | None = None,
    given: Mapping[str, tuple[int, bool | None]] | None = None,
) -> dict[str, OutputLayout]:
    """One layout per output of `model` (shape-inferred), reading `samples` (per-sample reference values)."""
    given = dict(given or {})
    names = [o.name for o in model.graph.output]
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise UsageError(f"--output-axis names unknown output(s) {unknown}; model outputs are {names}")
    view = GraphView(model)
    layouts = {}
    label_output = _label_output(names, samples, labels)
    if labels is not None and len(labels) and label_output is None:
        raise UsageError(f"calibration labels go up to {int(np.max(labels))} but no output has one row of that "
                         "many class scores per sample")
    for name in names:
        shape = samples[name][0].shape
        if name in given:
            layouts[name] = _given(name, len(shape), *given[name], samples[name])
            continue
        layout = _from_graph(view, name, shape) or _from_values(samples[name]) or _from_shape(shape)
        if layout.scores is None and name == label_output:
            layout = OutputLayout(layout.feature_axis, "labels", None, None,
                                  f"{layout.why}; class scores: the calibration labels index this axis")
        layouts[name] = layout
    return layouts


def _given(name: str, rank: int, axis: int, scores: bool | None, values: Sequence[np.ndarray]) -> OutputLayout:
    if not -rank <= axis < rank:
        raise UsageError(f"--output-axis {name}={axis} is out of range for an output of rank {rank}")
    axis %= rank
    if scores is None:  # the user named the axis only: look at the values for class scores
        found = _from_values(values)
        scores = found is not None and found.feature_axis == axis
        kind = found.scores if scores and found else None
    else:
        kind = "given" if scores else None
    return OutputLayout(axis, kind, None, None, "set by --output-axis")


def _label_output(names: list[str], samples: Mapping[str, Sequence[np.ndarray]], labels) -> str | None:
    """The first output with one row of scores per sample that the labels can index."""
    if labels is None or not len(labels):
        return None
    top = int(np.max(labels))
    for name in names:
        value = samples[name][0]
        if value.size >= top + 1 and value.ndim >= 1 and value.size == value.shape[-1]:
            return name
    return None


def _normalise(axis: int, rank: int) -> int:
    return axis % rank if rank else 0


def _from_graph(view: GraphView, name: str, shape: tuple[int, ...], depth: int = 0) -> OutputLayout | None:
    """Follow the producing op back through layout-neutral ops and Transposes."""
    node, rank = view.producer(name), len(shape)
    if node is None or depth > 8 or rank == 0:
        return None
    attrs = attributes(node)
    if node.op_type in _PASS_THROUGH:
        return _from_graph(view, node.input[0], shape, depth + 1)
    if node.op_type == "Sigmoid":  # independent scores: the axis comes from the shape's convention
        base = _from_shape(shape)
        several = base.feature_axis is not None and shape[base.feature_axis] > 1
        kind = "sigmoid scores" if several else "one-channel sigmoid map"
        return OutputLayout(base.feature_axis, "sigmoid" if several else None, None, None, f"{kind}; {base.why}")
    if node.op_type in ("Softmax", "LogSoftmax"):
        axis = _normalise(attrs.get("axis", -1), rank)
        return OutputLayout(axis, _SCORE_OPS[node.op_type], None, None, f"{node.op_type} over axis {axis}")
    if node.op_type == "Transpose":
        perm = list(attrs["perm"]) if "perm" in attrs else list(range(rank))[::-1]
        inner = _from_graph(view, node.input[0], tuple(shape[perm.index(i)] for i in range(rank)), depth + 1)
        if inner is None or inner.feature_axis is None:
            return None
        axis = perm.index(inner.feature_axis)
        return OutputLayout(axis, inner.scores, inner.class_channels, inner.box_channels,
                            f"{inner.why}, moved to axis {axis} by Transpose")
    if node.op_type == "Concat":
        axis = _normalise(attrs["axis"], rank)
        return _from_concat(view, node, axis, rank, depth) or _from_parts(view, node, axis, depth)
    if node.op_type == "Reshape":
        inner = _inner(view, node.input[0], depth)
        before = view.static_shape(node.input[0])
        if inner and inner.feature_axis is not None and before and \
                list(before[:inner.feature_axis + 1]) == list(shape[:inner.feature_axis + 1]):
            return OutputLayout(inner.feature_axis, inner.scores, inner.class_channels, inner.box_channels,
                                f"{inner.why}, kept by a Reshape of the later axes")
    return _from_layer_units(view, node, shape)


def _inner(view: GraphView, name: str, depth: int) -> OutputLayout | None:
    shape = view.static_shape(name)
    return _from_graph(view, name, tuple(shape), depth + 1) if shape else None


def _from_parts(view: GraphView, node: onnx.NodeProto, axis: int, depth: int) -> OutputLayout | None:
    """A Concat along positions (a detector's scales) of parts that share one layout keeps that layout."""
    parts = [_inner(view, name, depth) for name in node.input]
    first = parts[0]
    if first is None or first.feature_axis in (None, axis) or any(p != first for p in parts[1:]):
        return None
    return OutputLayout(first.feature_axis, first.scores, first.class_channels, first.box_channels,
                        f"{first.why}; {len(parts)} parts concatenated along axis {axis}")


def _from_layer_units(view: GraphView, node: onnx.NodeProto, shape: tuple[int, ...]) -> OutputLayout | None:
    """Back through reshapes and bias adds to the weighted layer that made the output: its output units are the
    features, on the one axis of that size (a recogniser's [T, N, classes] from a Gemm, say)."""
    for _ in range(8):
        if node is None:
            return None
        units = _units(view, node)
        if units is not None:
            axes = [a for a, size in enumerate(shape) if size == units]
            if len(axes) != 1:
                return None
            return OutputLayout(axes[0], why=f"the {units} output units of {node.op_type} "
                                             f"{node.name or node.output[0]!r} (axis {axes[0]})")
        if node.op_type not in _RESHAPING and not (node.op_type in ("Add", "Mul") and _has_constant(view, node)):
            return None
        node = view.producer(node.input[0]) if not view.is_initializer(node.input[0]) else view.producer(
            node.input[1])
    return None


def _units(view: GraphView, node: onnx.NodeProto) -> int | None:
    """Output features of a Conv/Gemm/MatMul with a constant weight."""
    if len(node.input) < 2 or view.constant(node.input[1]) is None:
        return None
    weight = view.constant(node.input[1])
    if node.op_type == "Conv" or (node.op_type == "Gemm" and attributes(node).get("transB", 0)):
        return int(weight.shape[0])
    if node.op_type in ("Gemm", "MatMul") and weight.ndim >= 2:
        return int(weight.shape[-1])
    return None


def _has_constant(view: GraphView, node: onnx.NodeProto) -> bool:
    return any(view.is_initializer(name) for name in node.input)


def _from_concat(view: GraphView, node: onnx.NodeProto, axis: int, rank: int, depth: int) -> OutputLayout | None:
    """A Concat of a score branch (Sigmoid/Softmax) and other branches (boxes) along its channel axis."""
    offsets, branches = 0, []
    for name in node.input:
        shape = view.shape(name)
        if not shape or len(shape) != rank or shape[axis] is None:
            return None
        inner = view.producer(name)
        kind = _score_kind(view, inner, depth)
        branches.append((offsets, offsets + shape[axis], kind))
        offsets += shape[axis]
    scored = [b for b in branches if b[2]]
    if not scored or len(scored) == len(branches):
        return None  # all-score or no-score concats say nothing about which channels are classes
    start, stop, kind = max(scored, key=lambda b: b[1] - b[0])
    boxes = next(((a, b) for a, b, k in branches if not k and b - a == 4), None)
    why = f"Concat over axis {axis} of box and score branches (scores: channels {start}..{stop - 1}, {kind})"
    return OutputLayout(axis, kind, (start, stop), boxes, why)


def _score_kind(view: GraphView, node: onnx.NodeProto | None, depth: int) -> str | None:
    while node is not None and node.op_type in _PASS_THROUGH | {"Reshape", "Transpose"} and depth < 8:
        node, depth = view.producer(node.input[0]), depth + 1
    return _SCORE_OPS.get(node.op_type) if node is not None else None


def _from_values(values: Sequence[np.ndarray]) -> OutputLayout | None:
    """Probabilities (or log-probabilities) that sum to one along an axis mark that axis as classes."""
    first = values[0]
    for axis in range(first.ndim):
        if first.shape[axis] < 2:
            continue
        if all(_sums_to_one(v, axis) for v in values[:8]):
            return OutputLayout(axis, "probabilities", None, None, f"values sum to one along axis {axis}")
        if all(v.size and np.all(v <= 1e-6) and _sums_to_one(np.exp(v), axis) for v in values[:8]):
            return OutputLayout(axis, "log-softmax", None, None, f"exp(values) sums to one along axis {axis}")
    return None


def _sums_to_one(value: np.ndarray, axis: int) -> bool:
    value = np.asarray(value, dtype=np.float64)
    if value.size == 0 or value.min() < -1e-6 or value.max() > 1 + 1e-6:
        return False
    return bool(np.allclose(value.sum(axis=axis), 1.0, atol=1e-3))


def _from_shape(shape: tuple[int, ...]) -> OutputLayout:
    """No evidence in the graph or the values: the usual convention for the rank (stated as such)."""
    rank = len(shape)
    if rank == 0:
        return OutputLayout(None, why="scalar output")
    if rank == 1:
        return OutputLayout(0, why="vector output: its only axis")
    if rank == 3 and shape[0] == 1:
        axis = 1 if shape[1] <= shape[2] else 2
        return OutputLayout(axis, why=f"the smaller of the last two axes ({axis})")
    return OutputLayout(1, why="axis 1 by the NC... convention")
