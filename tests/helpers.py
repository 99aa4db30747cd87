"""Shared test helpers: tiny models built with onnx.helper, op counts, output comparison."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples"
CALIB = SAMPLES / "digits_calib.npz"


def make_model(nodes, inputs, outputs, initializers=(), opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def tensor(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def value(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def mlp_model(seed: int = 0, dims=(16, 32, 8)) -> onnx.ModelProto:
    """x[N, d0] -> Gemm -> Relu -> MatMul -> y[N, d2]."""
    rng = np.random.default_rng(seed)
    d0, d1, d2 = dims
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2"),
    ]
    inits = [tensor("w1", rng.normal(size=(d1, d0))), tensor("b1", rng.normal(size=d1)),
             tensor("w2", rng.normal(size=(d1, d2)))]
    return make_model(nodes, [value("x", ["N", d0])], [value("y", ["N", d2])], inits)


def token_mlp_model(seed: int = 0, tokens: int = 6, dims=(8, 24), batch_one: bool = False) -> onnx.ModelProto:
    """A transformer's MLP as paddle2onnx and onnxslim write it: x[N, T, C] -> Reshape [N*T, C] -> Gemm ->
    Reshape [N, T, H] -> Relu -> Reshape [N*T, H] -> Gemm -> Reshape -> y[N, T, C]; `batch_one`: the targets
    hold an exported batch of 1 ([T, C], [1, T, H]) as onnxslim folds them."""
    rng = np.random.default_rng(seed)
    c, h = dims
    n = 1 if batch_one else -1
    rows = tokens if batch_one else -1
    shapes = {"to_rows": [rows, c], "to_tokens": [n, tokens, h], "to_rows2": [rows, h], "to_out": [n, tokens, c]}
    nodes = [
        helper.make_node("Reshape", ["x", "to_rows"], ["rows"], name="pre1"),
        helper.make_node("Gemm", ["rows", "w1", "b1"], ["h"], name="fc1"),
        helper.make_node("Reshape", ["h", "to_tokens"], ["ht"], name="post1"),
        helper.make_node("Relu", ["ht"], ["r"], name="relu"),
        helper.make_node("Reshape", ["r", "to_rows2"], ["rows2"], name="pre2"),
        helper.make_node("Gemm", ["rows2", "w2", "b2"], ["y_rows"], name="fc2"),
        helper.make_node("Reshape", ["y_rows", "to_out"], ["y"], name="post2"),
    ]
    inits = [tensor("w1", rng.normal(size=(c, h)) / np.sqrt(c)), tensor("b1", rng.normal(size=h) * 0.1),
             tensor("w2", rng.normal(size=(h, c)) / np.sqrt(h)), tensor("b2", rng.normal(size=c) * 0.1)]
    inits += [numpy_helper.from_array(np.array(v, dtype=np.int64), k) for k, v in shapes.items()]
    return make_model(nodes, [value("x", ["N", tokens, c])], [value("y", ["N", tokens, c])], inits)


def conv_model(seed: int = 0, channels=(3, 16, 32), size: int = 12, group2: int = 1) -> onnx.ModelProto:
    """x[N, c0, s, s] -> Conv3x3 -> Relu -> Conv3x3(stride 2, group2) -> y."""
    rng = np.random.default_rng(seed)
    c0, c1, c2 = channels
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2", "b2"], ["y"], name="conv2", pads=[1, 1, 1, 1], strides=[2, 2],
                         group=group2),
    ]
    inits = [tensor("w1", rng.normal(size=(c1, c0, 3, 3))), tensor("b1", rng.normal(size=c1)),
             tensor("w2", rng.normal(size=(c2, c1 // group2, 3, 3))), tensor("b2", rng.normal(size=c2))]
    half = (size + 1) // 2
    return make_model(nodes, [value("x", ["N", c0, size, size])], [value("y", ["N", c2, half, half])], inits)


def conv1d_model(seed: int = 0) -> onnx.ModelProto:
    """x[N, 4, 64] -> Conv1d k5 -> Relu -> Conv1d k3 stride 2 -> Relu -> Conv1d k3 dilation 2 -> Relu -> Conv1d k1 -> y
    (an audio / sequence front end: 1-D kernels, strides, dilations)."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["h1"], name="conv1", pads=[2, 2], kernel_shape=[5]),
        helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["h2"], name="conv2", pads=[1, 1], strides=[2]),
        helper.make_node("Relu", ["h2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["h3"], name="conv3", pads=[2, 2], dilations=[2]),
        helper.make_node("Relu", ["h3"], ["r3"], name="relu3"),
        helper.make_node("Conv", ["r3", "w4", "b4"], ["y"], name="conv4"),
    ]
    shapes = {"w1": (24, 4, 5), "w2": (32, 24, 3), "w3": (32, 32, 3), "w4": (6, 32, 1)}
    inits = []
    for k, (name, shape) in enumerate(shapes.items(), start=1):
        fan_in = shape[1] * shape[2]
        inits += [tensor(name, rng.normal(size=shape) * np.sqrt(2 / fan_in)),
                  tensor(f"b{k}", 0.1 * rng.normal(size=shape[0]))]
    return make_model(nodes, [value("x", ["N", 4, 64])], [value("y", ["N", 6, 32])], inits)


def smooth_signals(n: int, channels: int = 4, length: int = 64, seed: int = 0) -> np.ndarray:
    """Sums of sinusoids per channel: correlated in time, as sequences are."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0.0, 1.0, length)
    freq, phase, amp = (rng.uniform(lo, hi, (n, channels, 1)) for lo, hi in ((1, 6), (0, 1), (0.5, 2)))
    return (amp * np.sin(2 * np.pi * (freq * t + phase))).astype(np.float32)


def op_counts(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def assert_op_counts(model: onnx.ModelProto, **expected: int) -> None:
    counts = op_counts(model)
    for op, n in expected.items():
        assert counts[op] == n, f"{op}: expected {n}, found {counts[op]} ({dict(counts)})"


def run_ort(model: onnx.ModelProto | str | Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    sess = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def run_library(path: str | Path, x: np.ndarray) -> np.ndarray:
    """The first output of a library built by a CPU target (Relax VM) on one input."""
    import tvm

    vm = tvm.relax.VirtualMachine(tvm.runtime.load_module(str(path)), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(np.ascontiguousarray(x)))
    return out.numpy() if hasattr(out, "numpy") else out[0].numpy()


def assert_library_matches_onnxruntime(library: str | Path, model: str | Path, name: str, x: np.ndarray) -> None:
    """Sample by sample (batch 1): the library's first output is onnxruntime's on `model` (1e-4 relative)."""
    for i in range(len(x)):
        expected = run_ort(model, {name: x[i : i + 1]})[0]
        np.testing.assert_allclose(run_library(library, x[i : i + 1]), expected, rtol=1e-4, atol=1e-5)


def assert_outputs_close(a, b, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


def save_npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def set_initializer(model: onnx.ModelProto, name: str, array: np.ndarray) -> onnx.ModelProto:
    for i, t in enumerate(model.graph.initializer):
        if t.name == name:
            model.graph.initializer[i].CopyFrom(tensor(name, array))
            return model
    raise KeyError(name)


def first_samples(path: Path, n: int) -> dict[str, np.ndarray]:
    """The first n samples of every array of a calibration .npz."""
    with np.load(path) as data:
        return {k: data[k][:n] for k in data.files}
