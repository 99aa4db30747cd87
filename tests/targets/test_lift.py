"""targets/lift.py: pq codes and packed binary signs stay compact in the x86 library and decode correctly."""

from __future__ import annotations

from unittest import mock

import numpy as np
import onnx
import pytest
from onnx import helper

from rewriter.canonical import canonicalize
from rewriter.pass_api import PassContext
from rewriter.passes.binary import BinaryPass
from rewriter.passes.pq import PqPass
from rewriter.pipeline import checked
from rewriter.targets import build_artifact, lift, resolve_target
from tests.helpers import make_model, run_ort, tensor, value

tvm = pytest.importorskip("tvm")
WIDTH = 512


def _wide_model() -> onnx.ModelProto:
    """x[1, 512] -> MatMul (1 MB of float32 weight) -> Relu -> Gemm -> y."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="wide"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "w2"], ["y"], name="head", transB=1)]
    inits = [tensor("w1", rng.normal(size=(WIDTH, WIDTH))), tensor("w2", rng.normal(size=(8, WIDTH)))]
    return canonicalize(make_model(nodes, [value("x", [1, WIDTH])], [value("y", [1, 8])], inits), {"x": [1, WIDTH]})


def _run_library(path, x: np.ndarray) -> np.ndarray:
    vm = tvm.relax.VirtualMachine(tvm.runtime.load_module(str(path)), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x))
    return got.numpy() if hasattr(got, "numpy") else got[0].numpy()


def test_compact_sources_are_only_the_decoder_inputs():
    model = checked(PqPass(data_aware=False).run(_wide_model(), PassContext(fit=None)).model, "pq")
    sources = lift.compact_sources(model)
    kinds = sorted({onnx.TensorProto.DataType.Name(t.data_type) for t in model.graph.initializer
                    if t.name in sources})
    assert kinds == ["FLOAT16", "UINT8"]  # codebooks, codes, and the small head stored in float16
    compact, arrays = lift.split_compact(model)
    assert len(arrays) == len(sources) and not set(sources) & {t.name for t in compact.graph.initializer}


@pytest.mark.slow
@pytest.mark.parametrize("rewrite", ["pq", "binary"])
def test_library_keeps_codes_not_dense_weights(rewrite, tmp_path):
    if rewrite == "pq":
        model = PqPass(data_aware=False).run(_wide_model(), PassContext(fit=None)).model
    else:
        model = BinaryPass(data_aware=False, include_first_last=True).run(_wide_model(), PassContext(fit=None)).model
    model = checked(model, rewrite)
    spec = resolve_target("x86")
    kept, folded = tmp_path / "kept.so", tmp_path / "folded.so"
    build_artifact(model, spec, kept)
    with mock.patch.object(lift, "split_compact", lambda m: (m, {})):
        build_artifact(model, spec, folded)
    assert folded.stat().st_size - kept.stat().st_size > 0.6 * WIDTH * WIDTH * 4  # the dense weight is gone
    x = np.random.default_rng(1).normal(size=(1, WIDTH)).astype(np.float32)
    expected = run_ort(model, {"x": x})[0]
    np.testing.assert_allclose(_run_library(kept, x), expected, rtol=1e-4, atol=1e-4)
