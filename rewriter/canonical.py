"""Canonicalisation run before any pass: static input shapes, folded constants, inferred shapes."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import ModelError, UsageError
from .loading import attach, detach, is_large

# Folds that would change the user's layer structure are left to the passes: BN and scale
# layers stay visible so that pruning can slice them as members of a channel group.
_KEPT_STRUCTURE = ("FusionConvBN", "FusionConvTransposeBN", "FusionConvMul", "FusionConvTransposeMul")
# A model over protobuf's 2 GB limit is slimmed as a lean copy whose initializers of this size or more carry no
# data. The fusions that rewrite weight values (MatMul+Add -> Gemm transposes the weight) cannot run on that
# copy and are left out: such a model keeps MatMul+Add.
_DETACH_MIN_BYTES = 2**20
_READS_WEIGHTS = ("FusionGemm", "FusionGemmMul")
# Domains onnxruntime's CPU provider implements; anything else is a custom operator.
STANDARD_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft"}


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Real inputs: graph inputs that are not initializers (old exporters list both)."""
    inits = {t.name for t in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in inits]


def declared_shape(value: onnx.ValueInfoProto) -> list[int | str]:
    dims = value.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]


def parse_input_shape(text: str) -> tuple[str, list[int]]:
    """'images=1x3x320x320' -> ('images', [1, 3, 320, 320])."""
    name, sep, dims = text.partition("=")
    try:
        shape = [int(d) for d in dims.lower().split("x")]
    except ValueError:
        shape = []
    if not sep or not name or not shape or min(shape) <= 0:
        raise UsageError(f"bad --input-shape {text!r}: expected NAME=1x3xHxW with positive sizes")
    return name, shape


def resolve_input_shapes(
    model: onnx.ModelProto,
    given: Mapping[str, Sequence[int]] | None = None,
    feed_shapes: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, list[int]]:
    """One static shape per input: --input-shape first, then a calibration sample's (batch 1),
    then the declared shape; a lone dynamic leading dim is taken as batch 1."""
    given = dict(given or {})
    feed_shapes = dict(feed_shapes or {})
    names = [v.name for v in graph_inputs(model)]
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise UsageError(f"--input-shape names unknown input(s) {unknown}; model inputs are {names}")
    shapes: dict[str, list[int]] = {}
    for value in graph_inputs(model):
        declared = declared_shape(value)
        if value.name in given:
            shape = list(given[value.name])
        elif value.name in feed_shapes:
            shape = list(feed_shapes[value.name])
        else:
            shape = [1 if i == 0 and not isinstance(d, int) else d for i, d in enumerate(declared)]
        _check_compatible(value.name, declared, shape)
        shapes[value.name] = shape
    return shapes


def _check_compatible(name: str, declared: list[int | str], shape: list) -> None:
    if not all(isinstance(d, int) and d > 0 for d in shape):
        raise UsageError(
            f"input {name!r} has dynamic dims {declared}: give --input-shape {name}=1x... or --calib data"
        )
    if len(shape) != len(declared):
        raise UsageError(f"input {name!r} has rank {len(declared)} but shape {shape} was given")
    for want, got in zip(declared, shape, strict=True):
        if isinstance(want, int) and want > 0 and want != got:
            raise UsageError(f"input {name!r} is declared {declared}; shape {shape} does not fit it")


def _constants_to_initializers(model: onnx.ModelProto) -> None:
    """Move tensor-valued Constant nodes into initializers (exporters like Paddle keep weights there)."""
    keep = []
    for node in model.graph.node:
        attr = {a.name: a for a in node.attribute}
        if node.op_type == "Constant" and "value" in attr and len(node.output) == 1:
            array = numpy_helper.to_array(attr["value"].t)
            model.graph.initializer.append(numpy_helper.from_array(np.asarray(array), node.output[0]))
        else:
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)


def _keep_output_types(original: onnx.ModelProto, slim: onnx.ModelProto) -> None:
    """onnxslim drops an output's shape it cannot infer (after Loop, say); the checker needs one: keep the user's."""
    declared = {o.name: o for o in original.graph.output}
    for output in slim.graph.output:
        if not output.type.tensor_type.HasField("shape") and output.name in declared:
            output.type.CopyFrom(declared[output.name].type)


def check_operators(model: onnx.ModelProto) -> None:
    """Custom-domain operators cannot be run, checked or rewritten here: say which one, once."""
    for node in model.graph.node:
        if node.domain not in STANDARD_DOMAINS:
            op = f"{node.domain}.{node.op_type}"
            raise ModelError(f"node {node.name or node.output[0]!r} uses the custom operator {op}; "
                             "only standard ONNX operators are supported")


def canonicalize(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]]) -> onnx.ModelProto:
    """Fix the input shapes, fold constant and shape subgraphs (onnxslim), infer all shapes."""
    check_operators(model)
    import onnxslim
    from onnxslim.core.pattern.registry import DEFAULT_FUSION_PATTERNS

    large = is_large(model)
    detached = detach(model, _DETACH_MIN_BYTES) if large else None
    kept = _KEPT_STRUCTURE + (_READS_WEIGHTS if large else ())
    skip = [p for p in DEFAULT_FUSION_PATTERNS if p in kept]
    # a scalar input has nothing to fix (and onnxslim cannot parse an empty shape)
    spec = [f"{name}:{','.join(str(d) for d in shape)}" for name, shape in input_shapes.items() if len(shape)]
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            slim = onnxslim.slim(detached.model if large else model, input_shapes=spec, skip_fusion_patterns=skip)
    except Exception as exc:  # onnxslim raises many kinds; the user needs one line
        raise ModelError(f"could not fold the model's constants: {type(exc).__name__}: {exc}") from exc
    if slim is None:
        raise ModelError("could not fold the model's constants (onnxslim returned nothing)")
    _constants_to_initializers(slim)
    _keep_output_types(model, slim)
    slim.graph.ClearField("value_info")
    try:
        inferred = onnx.shape_inference.infer_shapes(slim, check_type=True, strict_mode=True, data_prop=True)
    except Exception as exc:
        raise ModelError(f"shape inference failed after canonicalisation: {exc}") from exc
    inferred.producer_name = "rewriter"
    inferred.producer_version = ""
    return attach(inferred, detached.sources) if large else inferred
