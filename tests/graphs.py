"""Random ONNX graphs of the shapes real models have: conv chains, residual adds, concats and splits, depthwise and
grouped convs, squeeze-excite blocks, BN, SiLU/HardSwish, Gemm heads, opsets 13–21.

Every structural choice goes through `choose(options)`, so hypothesis can draw (and shrink) them and a benchmark
can draw them from a numpy generator. Weights come from a numpy generator seeded by one more choice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

Choose = Callable[[Sequence[Any]], Any]
OPSETS = (13, 14, 15, 17, 19, 21)
BLOCKS = ("conv", "conv_bn", "depthwise", "grouped", "residual", "concat", "split", "se", "strided")


class _Builder:
    def __init__(self, choose: Choose, opset: int, seed: int) -> None:
        self.choose, self.opset = choose, opset
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def name(self, base: str) -> str:
        self.count += 1
        return f"{base}{self.count}"

    def const(self, base: str, array: np.ndarray) -> str:
        name = self.name(base)
        array = np.asarray(array)
        array = array.astype(np.float32) if array.dtype.kind == "f" else array
        self.inits.append(numpy_helper.from_array(array, name))
        return name

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"n_{out}", **attrs))
        return out

    def conv(self, x: str, c_in: int, c_out: int, k: int = 3, stride: int = 1, group: int = 1,
             bias: bool = True) -> str:
        w = self.rng.normal(size=(c_out, c_in // group, k, k)).astype(np.float32) / np.sqrt(c_in // group * k * k)
        inputs = [x, self.const("w", w)] + ([self.const("b", self.rng.normal(size=c_out).astype(np.float32) * 0.1)]
                                            if bias else [])
        return self.node("Conv", inputs, kernel_shape=[k, k], pads=[k // 2] * 4, strides=[stride, stride], group=group)

    def act(self, x: str, c: int) -> str:
        kind = self.choose(["relu", "silu", "hardswish", "leaky", "clip"])
        if kind == "silu":
            return self.node("Mul", [x, self.node("Sigmoid", [x])])
        if kind == "hardswish" and self.opset >= 14:
            return self.node("HardSwish", [x])
        if kind == "leaky":
            return self.node("LeakyRelu", [x], alpha=0.1)
        if kind == "clip":
            bounds = [self.const("lo", np.array(0, np.float32)), self.const("hi", np.array(6, np.float32))]
            return self.node("Clip", [x, *bounds])
        return self.node("Relu", [x])

    def bn(self, x: str, c: int) -> str:
        params = [self.rng.uniform(0.5, 1.5, c), self.rng.normal(size=c) * 0.1, self.rng.normal(size=c) * 0.1,
                  self.rng.uniform(0.5, 1.5, c)]
        return self.node("BatchNormalization", [x, *(self.const("bn", p.astype(np.float32)) for p in params)])

    def block(self, x: str, c: int, size: int) -> tuple[str, int, int]:
        kind = self.choose(BLOCKS)
        widths = [4, 8, 12, 16]
        if kind in ("conv", "conv_bn"):
            out = self.choose(widths)
            y = self.conv(x, c, out, self.choose([1, 3]), bias=kind == "conv")
            return self.act(self.bn(y, out) if kind == "conv_bn" else y, out), out, size
        if kind == "strided" and size >= 4:
            out = self.choose(widths)
            return self.act(self.conv(x, c, out, 3, stride=2), out), out, (size + 1) // 2
        if kind == "depthwise":
            return self.act(self.conv(x, c, c, 3, group=c), c), c, size
        if kind == "grouped" and c % 2 == 0:
            out = self.choose([g for g in widths if g % 2 == 0])
            return self.act(self.conv(x, c, out, 3, group=2), out), out, size
        if kind == "residual":
            mid = self.choose(widths)
            y = self.conv(self.act(self.conv(x, c, mid, 1), mid), mid, c, 3)
            return self.node("Add", [x, y]), c, size
        if kind == "concat":
            a, b = self.choose(widths), self.choose(widths)
            y = self.node("Concat", [self.act(self.conv(x, c, a, 1), a), self.conv(x, c, b, 3)], axis=1)
            return y, a + b, size
        if kind == "split" and c % 2 == 0:
            parts = self.node_multi("Split", [x, self.const("split", np.array([c // 2, c // 2], np.int64))], 2, axis=1)
            half = c // 2
            return self.node("Concat", [parts[0], self.act(self.conv(parts[1], half, half, 3), half)], axis=1), c, size
        if kind == "se":
            squeeze = max(2, c // 4)
            s = self.node("GlobalAveragePool", [x])
            s = self.node("Relu", [self.conv(s, c, squeeze, 1)])
            s = self.node("HardSigmoid", [self.conv(s, squeeze, c, 1)], alpha=1 / 6, beta=0.5)
            return self.node("Mul", [x, s]), c, size
        return self.act(self.conv(x, c, c, 3), c), c, size

    def node_multi(self, op: str, inputs: list[str], count: int, **attrs) -> list[str]:
        outs = [self.name(op.lower()) for _ in range(count)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=f"n_{outs[0]}", **attrs))
        return outs


def random_graph(choose: Choose) -> onnx.ModelProto:
    """One random, checker-valid model with input `x` [N, C, S, S] and one output `y`."""
    opset = choose(OPSETS)
    build = _Builder(choose, opset, choose(range(1000)))
    c, size = choose([1, 3, 4]), choose([6, 8, 11])
    x, channels, current = "x", c, size
    for _ in range(choose([1, 2, 3, 4])):
        x, channels, current = build.block(x, channels, current)
    head = choose(["gemm", "conv_map"])
    if head == "gemm":
        pooled = build.node("Flatten", [build.node("GlobalAveragePool", [x])])
        classes = choose([2, 5, 10])
        w = build.rng.normal(size=(classes, channels)).astype(np.float32) / np.sqrt(channels)
        y = build.node("Gemm", [pooled, build.const("fc", w), build.const("fcb", np.zeros(classes, np.float32))],
                       transB=1)
        out_shape = ["N", classes]
    else:
        y = build.conv(x, channels, 2, 1)
        out_shape = ["N", 2, current, current]
    build.nodes.append(helper.make_node("Identity", [y], ["y"], name="output"))
    graph = helper.make_graph(build.nodes, "generated", [helper.make_tensor_value_info("x", 1, ["N", c, size, size])],
                              [helper.make_tensor_value_info("y", 1, out_shape)], build.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


# exit needs about 100 fit samples to show 0.99 agreement at an exit: fewer would only test its refusal
CALIBRATION_SAMPLES = {"exit": 160}


def calibration(model: onnx.ModelProto, samples: int = 24, seed: int = 0) -> dict[str, np.ndarray]:
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    return {"x": np.random.default_rng(seed).normal(size=(samples, *dims)).astype(np.float32)}


def try_pass(model: onnx.ModelProto, name: str, options: dict | None = None) -> str:
    """Run one pass on a generated graph; return 'changed', 'unchanged' or 'refused: <message>'.

    Raises AssertionError for what must never happen: an invalid graph, a crash (exit 1), outputs that are not
    finite or change shape, or a graph said to be unchanged that answers differently."""
    from rewriter import rewrite
    from rewriter.errors import RewriterError

    try:
        result = rewrite(model, passes=[name], calib=calibration(model, CALIBRATION_SAMPLES.get(name, 24)),
                         options={name: options or {}})
    except RewriterError as exc:
        assert exc.exit_code in (2, 3), f"{name}: exit {exc.exit_code}: {exc}"
        assert "\n" not in str(exc), f"{name}: a refusal must be one line: {exc}"
        return f"refused: {exc}"
    onnx.checker.check_model(result.model, full_check=True)
    x = np.random.default_rng(99).normal(size=calibration(model, 1)["x"].shape).astype(np.float32)
    before, after = _run(model, x), _run(result.model, x)
    assert after.shape == before.shape and np.all(np.isfinite(after)), f"{name}: bad output {after.shape}"
    if not result.report["passes"][0]["changed"]:
        np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(before).max())))
        return "unchanged"
    return "changed"


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]
