"""Keep weight-decoding subgraphs (pq codebooks + codes, bit-packed binary signs, float16 storage) compact
in the TVM build.

Relax's FoldConstant would evaluate a decoder whose inputs are all constants at compile time and store the
dense float32 weight in the library, undoing the compression. So the compact arrays enter the Relax module
as function parameters while it is legalised, folded and fused, and are bound back as constants only after
those passes: the library stores the compact arrays and the decoder runs inside `main`, whose signature
stays the model's own inputs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from rewriter.errors import ModelError

# Storage types narrower than the float32 weights they are decoded into.
COMPACT_TYPES = {TensorProto.UINT8, TensorProto.INT8, TensorProto.FLOAT16}
DECODE_OPS = {"Cast", "Gather", "BitShift"}
PREFIX = "rewriter_compact_"


def compact_sources(model: onnx.ModelProto) -> list[str]:
    """Initializers stored in a compact type and read only by decoding ops (Cast, Gather, BitShift)."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    found = []
    for tensor in model.graph.initializer:
        nodes = readers.get(tensor.name, [])
        if tensor.data_type in COMPACT_TYPES and nodes and all(n.op_type in DECODE_OPS for n in nodes):
            found.append(tensor.name)
    return found


def split_compact(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A copy whose compact initializers are graph inputs (named for Relax), and their values by that name."""
    names = compact_sources(model)
    if not names or any(n.op_type == "If" for n in model.graph.node):
        return model, {}
    renamed = {name: f"{PREFIX}{i}" for i, name in enumerate(names)}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    arrays, kept = {}, []
    for tensor in out.graph.initializer:
        if tensor.name in renamed:
            arrays[renamed[tensor.name]] = numpy_helper.to_array(tensor)
        else:
            kept.append(tensor)
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    for node in out.graph.node:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
    for name, array in arrays.items():
        elem = helper.np_dtype_to_tensor_dtype(array.dtype)
        out.graph.input.append(helper.make_tensor_value_info(name, elem, list(array.shape)))
    return out, arrays


def bind_compact(mod: Any, arrays: dict[str, np.ndarray]) -> Any:
    """Bind the compact arrays into `main` as constants, after folding and fusion have run."""
    if not arrays:
        return mod
    import tvm
    from tvm import relax

    params = {str(p.name): p for p in mod["main"].params}
    missing = sorted(set(arrays) - set(params))
    if missing:
        raise ModelError(f"TVM import lost the compact weight inputs {missing[:3]}")
    binding = {params[name]: tvm.runtime.tensor(array) for name, array in arrays.items()}
    return relax.transform.BindParams("main", binding)(mod)
