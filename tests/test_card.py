"""The card's commands, as a user types them: prune,pq for arm on a sample, and svd on the MLP built for x86."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest

from tests.helpers import CALIB, SAMPLES, run_ort

tvm = pytest.importorskip("tvm")


def test_card_command_x86(tmp_path):
    cmd = [sys.executable, "-m", "rewriter.cli", str(SAMPLES / "digits_mlp.onnx"), "--passes", "svd",
           "--target", "x86", "--calib", str(CALIB), "-o", str(tmp_path / "out")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.x86.so", "report.html", "report.json"]
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
    report = json.loads((out / "report.json").read_text())
    assert report["target"]["name"] == "x86" and report["target"]["artifact"] == "model.x86.so"
    assert report["output"]["macs"] < report["input"]["macs"]

    x = np.load(CALIB)["input"][:4]
    lib = tvm.runtime.load_module(str(out / "model.x86.so"))
    vm = tvm.relax.VirtualMachine(lib, tvm.cpu())
    for i in range(len(x)):
        expected = run_ort(out / "model.onnx", {"input": x[i : i + 1]})[0]
        got = vm["main"](tvm.runtime.tensor(x[i : i + 1]))
        got = got.numpy() if hasattr(got, "numpy") else got[0].numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_card_command_prune_pq_arm(tmp_path):
    """`rewrite model.onnx --passes prune,pq --target arm`: an aarch64 library from a pruned, quantised model."""
    cmd = [sys.executable, "-m", "rewriter.cli", str(SAMPLES / "digits_vgg.onnx"), "--passes", "prune,pq",
           "--target", "arm", "--calib", str(CALIB), "-o", str(tmp_path / "out")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if shutil.which("aarch64-linux-gnu-gcc") is None:  # the one clear error, nothing written
        assert done.returncode == 2 and "gcc-aarch64-linux-gnu" in done.stderr, done.stderr
        assert not (tmp_path / "out").exists()
        return
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out"
    library = (out / "model.arm.so").read_bytes()
    assert library[:4] == b"\x7fELF" and int.from_bytes(library[18:20], "little") == 183  # EM_AARCH64
    report = json.loads((out / "report.json").read_text())
    assert [p["name"] for p in report["passes"]] == ["prune", "pq"]
    assert report["output"]["macs"] < report["input"]["macs"] and report["output"]["bytes"] < report["input"]["bytes"]
