"""pq and binary on the digits ResNet sample: size, labelled accuracy on held-out digits, the x86 build."""

from __future__ import annotations

import numpy as np
import pytest

from rewriter import rewrite
from rewriter.errors import GuardrailError
from rewriter.registry import available_passes
from tests.helpers import CALIB, SAMPLES, assert_library_matches_onnxruntime

pytestmark = pytest.mark.slow
RESNET = SAMPLES / "digits_resnet.onnx"


def _accuracy_lost(report: dict) -> float:
    fid = report["fidelity"]
    return fid["accuracy_before"] - fid["accuracy_after"]


def test_pq_resnet_is_8x_smaller_keeps_accuracy_and_builds_small(tmp_path):
    pytest.importorskip("tvm")
    result = rewrite(RESNET, passes=["pq"], calib=CALIB, target="x86", out_dir=tmp_path / "out",
                     options={"pq": {"max_error": 0.2}})  # the default bound, not retried milder
    report, notes = result.report, result.report["passes"][0]["notes"]
    model_bytes = result.artifacts["model"].stat().st_size
    assert RESNET.stat().st_size >= 8 * model_bytes
    assert _accuracy_lost(report) <= 0.02
    assert notes["mean_output_error"] < notes["mean_output_error_kmeans"]  # activation-aware EM wins
    # The library keeps the codes, not dense float32 weights (those alone would take ~600 kB).
    assert result.artifacts["library"].stat().st_size < 600_000
    x = np.load(CALIB)["input"][:2]
    assert_library_matches_onnxruntime(result.artifacts["library"], result.artifacts["model"], "input", x)


def test_binary_resnet_one_basis_and_three_bases():
    one = rewrite(RESNET, passes=["binary"], calib=CALIB, options={"binary": {"bases": 1}}).report
    assert one["passes"][0]["notes"]["binarised_ratio"] >= 25
    three = rewrite(RESNET, passes=["binary"], calib=CALIB, options={"binary": {"bases": 3}}).report
    assert _accuracy_lost(three) <= 0.03
    assert three["fidelity"]["cosine"] > one["fidelity"]["cosine"]


def test_pq_composes_after_a_structural_pass():
    first = "prune" if "prune" in available_passes() else "svd"
    pinned = {"prune": {"max_error": 0.2}, "pq": {"max_error": 0.2}}  # default strengths, not retried milder
    result = rewrite(SAMPLES / "digits_mlp.onnx", passes=[first, "pq"], calib=CALIB,
                     options={k: v for k, v in pinned.items() if k in (first, "pq")})
    records = result.report["passes"]
    assert [r["name"] for r in records] == [first, "pq"]
    assert records[1]["notes"]["forms"]["pq"] >= 1
    assert records[1]["bytes_after"] < records[0]["bytes_after"] / 4
    assert _accuracy_lost(result.report) <= 0.05


def test_guardrail_refuses_what_the_codes_wreck():
    with pytest.raises(GuardrailError):
        rewrite(SAMPLES / "digits_mlp.onnx", passes=["pq"], calib=CALIB, max_drop=1e-4,
                options={"pq": {"k": 2, "data_aware": False}})
