"""Pre-quantised models: canonicalisation keeps them valid, passes leave quantised layers alone and say so, QDQ
graphs build (QDQ computed in float, exactly as onnxruntime's unfused reference), QOperator ops are refused."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from rewriter import rewrite
from rewriter.errors import ModelError
from tests.helpers import CALIB, SAMPLES


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_dynamic, quantize_static

    with np.load(CALIB) as data:
        images = data["input"][:16]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"input": images[i:i + 1]} for i in range(len(images))])

        def get_next(self):
            return next(self.items, None)

    folder = tmp_path_factory.mktemp("quantized")
    paths = {name: folder / f"{name}.onnx" for name in ("qdq", "qop", "dynamic")}
    quantize_static(str(SAMPLES / "digits_resnet.onnx"), str(paths["qdq"]), Reader(), quant_format=QuantFormat.QDQ)
    quantize_static(str(SAMPLES / "digits_resnet.onnx"), str(paths["qop"]), Reader(),
                    quant_format=QuantFormat.QOperator)
    quantize_dynamic(str(SAMPLES / "digits_mlp.onnx"), str(paths["dynamic"]))
    return paths


def test_passes_leave_quantised_layers_alone_and_say_so(quantized):
    result = rewrite(quantized["qdq"], passes=["svd"], calib=CALIB)
    skipped = result.report["passes"][0]["notes"]["skipped"]
    assert result.report["passes"][0]["changed"] == []
    assert sum("quantised layer" in why for why in skipped.values()) >= 5
    assert result.report["fidelity"]["drop"] < 1e-6


def test_qdq_builds_for_x86_as_float_compute(quantized, tmp_path):
    tvm = pytest.importorskip("tvm")
    from tvm import relax

    result = rewrite(quantized["qdq"], target="x86", calib=CALIB, out_dir=tmp_path / "out")
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(result.artifacts["library"])), tvm.cpu())
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # DQ -> float op -> Q, unfused
    session = ort.InferenceSession(str(quantized["qdq"]), options, providers=["CPUExecutionProvider"])
    with np.load(CALIB) as data:
        for x in data["input"][:4]:
            want = session.run(None, {"input": x[None]})[0]
            got = vm["main"](tvm.runtime.tensor(x[None])).numpy()
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_qoperator_model_is_refused_naming_the_ops(quantized, tmp_path):
    pytest.importorskip("tvm")
    assert rewrite(quantized["qop"], calib=CALIB).report["fidelity"]["drop"] < 1e-6  # target none: passes through
    with pytest.raises(ModelError, match="QLinearConv"):
        rewrite(quantized["qop"], target="x86", calib=CALIB, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_dynamic_quantisation_keeps_the_batch_static_and_says_why(quantized):
    result = rewrite(quantized["dynamic"], calib=CALIB)
    assert result.report["interface"]["restored"] == {}
    assert "per-sample" in result.report["interface"]["kept_static"]["input[0]"]
