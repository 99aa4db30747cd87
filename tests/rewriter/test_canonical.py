"""Canonicalisation: static shapes, constants folded into initializers, structure otherwise kept."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from rewriter.canonical import canonicalize, parse_input_shape, resolve_input_shapes
from rewriter.errors import UsageError
from tests.helpers import assert_outputs_close, make_model, run_ort, tensor, value


def _paddle_like():
    """Weights in Constant nodes and a Reshape whose shape is computed at run time (as Paddle exports)."""
    w = np.random.default_rng(0).normal(size=(4, 3, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w, "w")),
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["bn"]),
        helper.make_node("Shape", ["bn"], ["shape"]),
        helper.make_node("Slice", ["shape", "zero", "one", "zero"], ["batch"]),
        helper.make_node("Concat", ["batch", "minus1"], ["newshape"], axis=0),
        helper.make_node("Reshape", ["bn", "newshape"], ["y"]),
    ]
    inits = [tensor(n, np.ones(4)) for n in "sbmv"] + [
        numpy_helper.from_array(np.array([0], np.int64), "zero"),
        numpy_helper.from_array(np.array([1], np.int64), "one"),
        numpy_helper.from_array(np.array([-1], np.int64), "minus1"),
    ]
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "F"])
    return make_model(nodes, [value("x", ["N", 3, "H", "W"])], [out], inits)


def test_constants_folded_shapes_fixed_bn_kept():
    model = _paddle_like()
    canon = canonicalize(model, {"x": [1, 3, 8, 8]})
    ops = [n.op_type for n in canon.graph.node]
    assert "Constant" not in ops and "Shape" not in ops
    assert "BatchNormalization" in ops  # structure a pass may slice stays visible
    assert any(t.name for t in canon.graph.initializer if list(t.dims) == [4, 3, 3, 3])
    dims = [d.dim_value for d in canon.graph.output[0].type.tensor_type.shape.dim]
    assert dims == [1, 4 * 8 * 8]
    x = np.random.default_rng(1).normal(size=(1, 3, 8, 8)).astype(np.float32)
    assert_outputs_close(run_ort(canon, {"x": x}), run_ort(model, {"x": x}))


def test_input_shapes_resolution():
    model = _paddle_like()
    assert resolve_input_shapes(model, feed_shapes={"x": (1, 3, 32, 48)}) == {"x": [1, 3, 32, 48]}
    assert resolve_input_shapes(model, given={"x": [1, 3, 16, 16]}) == {"x": [1, 3, 16, 16]}
    with pytest.raises(UsageError, match="dynamic dims"):
        resolve_input_shapes(model)
    with pytest.raises(UsageError, match="does not fit"):
        resolve_input_shapes(model, given={"x": [1, 4, 16, 16]})
    with pytest.raises(UsageError, match="unknown input"):
        resolve_input_shapes(model, given={"images": [1, 3, 16, 16]})


def test_parse_input_shape():
    assert parse_input_shape("images=1x3x320x320") == ("images", [1, 3, 320, 320])
    for bad in ("images", "images=1x3xHx320", "=1x3", "x=0x3"):
        with pytest.raises(UsageError):
            parse_input_shape(bad)
