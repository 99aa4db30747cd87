"""Layer arithmetic shared by passes: a Conv's geometry and its input patches (im2col)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from numpy.lib.stride_tricks import sliding_window_view

from .graph import attributes


@dataclass(frozen=True)
class Conv2d:
    """Geometry of a 2-D Conv node with explicit padding."""

    kernel: tuple[int, int]
    strides: tuple[int, int]
    pads: tuple[int, int, int, int]  # top, left, bottom, right (ONNX order)
    dilations: tuple[int, int]
    group: int


def conv2d_geometry(node: onnx.NodeProto, weight_shape: list[int]) -> Conv2d | None:
    """The node's geometry, or None when it is not a 2-D Conv with explicit or VALID padding."""
    if len(weight_shape) != 4:
        return None
    attrs = attributes(node)
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID", "NOTSET", "VALID"):
        return None
    return Conv2d(
        kernel=(weight_shape[2], weight_shape[3]),
        strides=tuple(attrs.get("strides", [1, 1])),
        pads=tuple(attrs.get("pads", [0, 0, 0, 0])),
        dilations=tuple(attrs.get("dilations", [1, 1])),
        group=int(attrs.get("group", 1)),
    )


def conv_patches(x: np.ndarray, conv: Conv2d) -> np.ndarray:
    """Input patches of a Conv: (N, C, H, W) -> (N * Ho * Wo, C * kh * kw), in the weight's order."""
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel, conv.strides, conv.dilations
    top, left, bottom, right = conv.pads
    padded = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    windows = sliding_window_view(padded, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(2, 3))
    windows = windows[:, :, ::sh, ::sw, ::dh, ::dw]
    n, c, ho, wo = windows.shape[:4]
    return windows.transpose(0, 2, 3, 1, 4, 5).reshape(n * ho * wo, c * kh * kw)


def rows(x: np.ndarray) -> np.ndarray:
    """Rows a Gemm/MatMul multiplies: all leading axes folded, the last kept."""
    return x.reshape(-1, x.shape[-1])
