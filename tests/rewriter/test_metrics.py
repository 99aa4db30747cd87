"""MAC, parameter and byte counts against hand-computed figures."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from rewriter.canonical import canonicalize
from rewriter.metrics import count_bytes, count_macs, count_params
from tests.helpers import make_model, tensor, value


def _single(op: str, x_shape, w_shape, out_shape, **attrs):
    w = np.zeros(w_shape, np.float32)
    node = helper.make_node(op, ["x", "w"], ["y"], **attrs)
    model = make_model([node], [value("x", x_shape)], [value("y", out_shape)], [tensor("w", w)])
    return canonicalize(model, {"x": x_shape})


@pytest.mark.parametrize(
    ("op", "x", "w", "y", "attrs", "macs"),
    [
        ("Conv", [1, 8, 10, 10], [16, 8, 3, 3], [1, 16, 10, 10], {"pads": [1, 1, 1, 1]}, 16 * 100 * 8 * 9),
        ("Conv", [1, 8, 10, 10], [16, 2, 3, 3], [1, 16, 5, 5], {"pads": [1, 1, 1, 1], "strides": [2, 2], "group": 4},
         16 * 25 * 2 * 9),
        ("Conv", [1, 8, 10, 10], [8, 1, 3, 3], [1, 8, 8, 8], {"group": 8}, 8 * 64 * 9),  # depthwise
        ("ConvTranspose", [1, 8, 5, 5], [8, 4, 2, 2], [1, 4, 10, 10], {"strides": [2, 2]}, 8 * 25 * 4 * 4),
        ("Gemm", [3, 20], [20, 7], [3, 7], {}, 3 * 20 * 7),
        ("Gemm", [3, 20], [7, 20], [3, 7], {"transB": 1}, 3 * 20 * 7),
        ("MatMul", [2, 5, 20], [20, 7], [2, 5, 7], {}, 2 * 5 * 20 * 7),
    ],
)
def test_macs(op, x, w, y, attrs, macs):
    assert count_macs(_single(op, x, w, y, **attrs)) == macs


def test_params_and_bytes():
    model = _single("Gemm", [3, 20], [20, 7], [3, 7])
    assert count_params(model) == 140
    assert count_bytes(model) == len(model.SerializeToString(deterministic=True))
    assert count_bytes(model) > 140 * 4
