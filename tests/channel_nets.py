"""A tiny NCHW graph builder for channel-dependency and pruning tests."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from rewriter.canonical import canonicalize
from rewriter.pipeline import checked
from tests.helpers import make_model, tensor, value


class Net:
    """A tiny NCHW graph builder: every call adds one node and returns its output name."""

    def __init__(self, channels: int = 4, size: int = 6, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.size, self.channels = [], [], size, channels

    def const(self, name: str, array) -> str:
        self.inits.append(tensor(name, array))
        return name

    def op(self, op: str, inputs: list[str], out: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def conv(self, x: str, c_in: int, c_out: int, out: str, group: int = 1, k: int = 3) -> str:
        w = self.const(f"{out}_w", self.rng.normal(size=(c_out, c_in // group, k, k)) / np.sqrt(c_in * k))
        b = self.const(f"{out}_b", self.rng.normal(size=c_out) * 0.1)
        return self.op("Conv", ["x" if x == "x" else x, w, b], out, pads=[k // 2] * 4, group=group)

    def model(self, outputs: dict[str, list]) -> onnx.ModelProto:
        shape = [1, self.channels, self.size, self.size]
        m = make_model(self.nodes, [value("x", shape)], [value(n, s) for n, s in outputs.items()], self.inits)
        return checked(canonicalize(m, {"x": shape}), "test")

    def kill(self, conv: str, channels: list[int]) -> None:
        """Zero these output channels' weights and bias, so that after a ReLU they are exactly zero."""
        for i, init in enumerate(self.inits):
            if init.name in (f"{conv}_w", f"{conv}_b"):
                array = onnx.numpy_helper.to_array(init).copy()
                array[channels] = 0.0
                self.inits[i] = tensor(init.name, array)

    def split(self, x: str, sizes: list[int], outs: list[str]) -> list[str]:
        name = f"{outs[0]}_sizes"
        self.inits.append(onnx.numpy_helper.from_array(np.array(sizes, dtype=np.int64), name))
        self.nodes.append(helper.make_node("Split", [x, name], outs, name=f"{outs[0]}_split", axis=1))
        return outs
