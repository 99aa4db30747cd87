"""One-element constants of element-wise ops as scalars, before TVM imports the model.

Exporters write a per-tensor scale or shift as a constant of shape (1,) (PP-OCR's learnable affine blocks:
x * a + b after every activation). Relax's ConvertLayout cannot lay a rank-1 operand out against a blocked
NCHW[b]c tensor, so each such op sent the whole feature map back to NCHW and forth again (DBNet: about a
quarter of its run time in layout transforms). A rank-0 scalar broadcasts to exactly the same result
whenever the other operand has rank >= 1, and ConvertLayout passes scalars through.
"""

from __future__ import annotations

import math

import onnx
from onnx import numpy_helper

from rewriter.graph import GraphView

ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min"}


def scalar_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose one-element initializers read only by element-wise ops against tensors of rank >= 1 are
    rank-0; the model itself is returned when there is none."""
    view = GraphView(onnx.shape_inference.infer_shapes(model))
    declared = {v.name for v in [*model.graph.input, *model.graph.output]}  # such initializers keep their shape
    wanted = {init.name for init in model.graph.initializer
              if init.dims and math.prod(init.dims) == 1 and init.name not in declared
              and view.consumers(init.name)
              and all(_broadcasts(node, init.name, view) for node in view.consumers(init.name))}
    if not wanted:
        return model
    new = onnx.ModelProto()
    new.CopyFrom(model)
    for init in new.graph.initializer:
        if init.name in wanted:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).reshape(()), init.name))
    kept = [v for v in new.graph.value_info if v.name not in wanted]
    new.graph.ClearField("value_info")
    new.graph.value_info.extend(kept)
    return new


def _broadcasts(node: onnx.NodeProto, name: str, view: GraphView) -> bool:
    """True when `name` is an operand of an element-wise op whose other operands all have rank >= 1."""
    if node.op_type not in ELEMENTWISE or node.domain not in ("", "ai.onnx"):
        return False
    others = [i for i in node.input if i != name]
    return bool(others) and all(len(view.shape(i) or []) >= 1 for i in others)
