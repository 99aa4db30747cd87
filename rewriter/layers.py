"""Layer arithmetic shared by passes: a Conv's geometry and its input patches (im2col)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from numpy.lib.stride_tricks import sliding_window_view

from .graph import attributes


@dataclass(frozen=True)
class ConvGeometry:
    """Geometry of a 1-D or 2-D Conv node with explicit padding. A 1-D Conv is held as a 2-D one of height 1
    (kernel (1, k)), so that one im2col serves both; `rank` and `node_attrs` give back its own form."""

    kernel: tuple[int, int]
    strides: tuple[int, int]
    pads: tuple[int, int, int, int]  # top, left, bottom, right (ONNX order)
    dilations: tuple[int, int]
    group: int
    rank: int = 2  # spatial axes of the node itself

    @property
    def own_kernel(self) -> tuple[int, ...]:
        return self.kernel[-self.rank:]

    def node_attrs(self) -> dict[str, list[int]]:
        """strides, pads and dilations as the node's own rank spells them."""
        if self.rank == 2:
            return {"strides": list(self.strides), "pads": list(self.pads), "dilations": list(self.dilations)}
        return {"strides": [self.strides[1]], "pads": [self.pads[1], self.pads[3]], "dilations": [self.dilations[1]]}


def conv_geometry(node: onnx.NodeProto, weight_shape: list[int]) -> ConvGeometry | None:
    """The node's geometry, or None when it is not a 1-D/2-D Conv with explicit or VALID padding."""
    if len(weight_shape) not in (3, 4):
        return None
    attrs = attributes(node)
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID", "NOTSET", "VALID"):
        return None
    rank = len(weight_shape) - 2
    strides = tuple(attrs.get("strides", [1] * rank))
    pads = tuple(attrs.get("pads", [0] * 2 * rank))
    dilations = tuple(attrs.get("dilations", [1] * rank))
    group = int(attrs.get("group", 1))
    if rank == 2:
        return ConvGeometry((weight_shape[2], weight_shape[3]), strides, pads, dilations, group)
    return ConvGeometry((1, weight_shape[2]), (1, strides[0]), (0, pads[0], 0, pads[1]), (1, dilations[0]), group, 1)


def conv_patches(x: np.ndarray, conv: ConvGeometry) -> np.ndarray:
    """Input patches of a Conv: (N, C, [H,] W) -> (N * positions, C * kernel), in the weight's order."""
    if conv.rank == 1:
        x = x[:, :, None, :]
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel, conv.strides, conv.dilations
    top, left, bottom, right = conv.pads
    padded = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    windows = sliding_window_view(padded, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(2, 3))
    windows = windows[:, :, ::sh, ::sw, ::dh, ::dw]
    n, c, ho, wo = windows.shape[:4]
    return windows.transpose(0, 2, 3, 1, 4, 5).reshape(n * ho * wo, c * kh * kw)


def conv_rows(y: np.ndarray) -> np.ndarray:
    """A Conv's output as rows aligned with `conv_patches` of its input: (N, C, ...) -> (positions, C)."""
    return np.moveaxis(y, 1, -1).reshape(-1, y.shape[1])


def rows(x: np.ndarray) -> np.ndarray:
    """Rows a Gemm/MatMul multiplies: all leading axes folded, the last kept."""
    return x.reshape(-1, x.shape[-1])
