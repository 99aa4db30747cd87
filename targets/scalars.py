"""One-element constants of element-wise ops as scalars, before TVM imports the model.

Exporters write a per-tensor scale or shift as a constant of shape (1,) (PP-OCR's learnable affine blocks:
x * a + b after every activation). Relax's ConvertLayout cannot lay a rank-1 operand out against a blocked
NCHW[b]c tensor, so each such op sent the whole feature map back to NCHW and forth again (DBNet: about a
quarter of its run time in layout transforms). A rank-0 scalar broadcasts to exactly the same result
whenever the other operand has rank >= 1, and ConvertLayout passes scalars through.
"""

from __future__ import annotations

import onnx
from onnx import numpy_helper

ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min"}


def scalar_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose one-element initializers read only by element-wise ops against tensors of rank >= 1 are
    rank-0; the model itself is returned when there is none."""
    graph = model.graph
    ranks = _ranks(model)
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    declared = {v.name for v in [*graph.input, *graph.output]}  # an initializer that is also an input keeps its shape
    targets = [init.name for init in graph.initializer
               if len(init.dims) >= 1 and _size(init) == 1 and init.name not in declared
               and readers.get(init.name) and all(_broadcasts(n, init.name, ranks) for n in readers[init.name])]
    if not targets:
        return model
    new = onnx.ModelProto()
    new.CopyFrom(model)
    wanted = set(targets)
    for init in new.graph.initializer:
        if init.name in wanted:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).reshape(()), init.name))
    kept = [v for v in new.graph.value_info if v.name not in wanted]
    new.graph.ClearField("value_info")
    new.graph.value_info.extend(kept)
    return new


def _size(init: onnx.TensorProto) -> int:
    size = 1
    for d in init.dims:
        size *= d
    return size


def _broadcasts(node: onnx.NodeProto, name: str, ranks: dict[str, int]) -> bool:
    """True when `name` is an operand of an element-wise op whose other operands all have rank >= 1."""
    if node.op_type not in ELEMENTWISE or node.domain not in ("", "ai.onnx"):
        return False
    others = [i for i in node.input if i != name]
    return bool(others) and all(ranks.get(i, 0) >= 1 for i in others)


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    ranks = {init.name: len(init.dims) for init in graph.initializer}
    for value in [*graph.input, *graph.value_info, *graph.output]:
        if value.type.tensor_type.HasField("shape"):
            ranks[value.name] = len(value.type.tensor_type.shape.dim)
    return ranks
