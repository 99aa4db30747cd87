"""The `--target arm` library runs under qemu-aarch64 (aarch64 Python + TVM runtime) and gives onnxruntime's
outputs on held-out samples. The aarch64 set-up is cached (~/.cache/rewriter/arm-qemu); where it cannot be had
(no root for apt-get, no network, not Debian bookworm, no cross compiler) the test is skipped with the reason."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from rewriter import rewrite
from rewriter.targets.presets import ARM_CROSS_CC, ARM_CROSS_PACKAGE
from rewriter.targets.qemu_runner import (
    QemuRunError,
    QemuUnavailableError,
    compare,
    elf_info,
    onnxruntime_outputs,
    prepare,
)
from tests.helpers import CALIB, SAMPLES

pytest.importorskip("tvm")

pytestmark = pytest.mark.slow

CALIB_SAMPLES = 64  # svd fits on these (fewer: a faster build); the last HELD_OUT samples are never seen by it
HELD_OUT = 8


@pytest.fixture(scope="module")
def arm64():
    if shutil.which(ARM_CROSS_CC) is None:
        pytest.skip(f"{ARM_CROSS_CC} not found (apt-get install {ARM_CROSS_PACKAGE}): no arm library to run")
    try:
        return prepare()
    except QemuUnavailableError as exc:
        pytest.skip(f"no aarch64 environment under qemu: {exc}")


def test_arm_library_matches_onnxruntime_under_qemu(arm64, tmp_path: Path) -> None:
    with np.load(CALIB) as data:
        inputs, labels = data["input"], data["labels"]
    calib = {"input": inputs[:CALIB_SAMPLES], "labels": labels[:CALIB_SAMPLES]}
    held_out = np.ascontiguousarray(inputs[-HELD_OUT:], dtype=np.float32)

    result = rewrite(SAMPLES / "digits_resnet.onnx", passes=["svd"], target="arm", calib=calib,
                     out_dir=tmp_path / "out")
    library, model = Path(result.artifacts["library"]), Path(result.artifacts["model"])
    assert "64-bit, e_machine 183 (AArch64)" in elf_info(library)

    try:
        got = arm64.run(library, held_out)
    except QemuRunError as exc:
        pytest.fail(f"the arm library failed under qemu: {exc}")
    ref = onnxruntime_outputs(model, held_out)

    assert got.shape == ref.shape == (HELD_OUT, 10)
    max_abs, max_rel, agree = compare(ref, got)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5,
                               err_msg=f"arm under qemu vs onnxruntime: max abs {max_abs:.3g}, rel {max_rel:.3g}")
    assert agree == HELD_OUT, f"top-1 agrees on {agree}/{HELD_OUT} held-out samples"



def test_arm_library_keeps_early_exits_under_qemu(arm64, tmp_path: Path) -> None:
    """The exit pass's If nodes survive the arm build: samples that leave early and samples that run the whole
    network both give onnxruntime's answer from the aarch64 library."""
    from rewriter.passes._exit_graph import probe_model
    from tests.helpers import run_ort

    with np.load(CALIB) as data:
        inputs, labels = data["input"], data["labels"]
    unseen = 4 * HELD_OUT
    calib = {"input": inputs[:-unseen], "labels": labels[:-unseen]}
    blends = (inputs[-unseen:-unseen // 2] + inputs[-unseen // 2:]) / 2  # two digits at once: the heads hesitate
    held_out = np.ascontiguousarray(np.concatenate([inputs[-unseen:], blends]), dtype=np.float32)

    result = rewrite(SAMPLES / "digits_resnet.onnx", passes=["exit"], target="arm", calib=calib,
                     out_dir=tmp_path / "out")
    library, model = Path(result.artifacts["library"]), Path(result.artifacts["model"])
    probe, _ = probe_model(result.model)
    exits = len(result.report["passes"][0]["notes"]["exits"])
    taken = [next((k for k, c in enumerate(run_ort(probe, {"input": x[None]})) if bool(c)), exits)
             for x in held_out]
    assert 0 in taken and exits in taken, taken  # some leave at the first exit, some run the whole network

    got = arm64.run(library, held_out)
    np.testing.assert_allclose(got, onnxruntime_outputs(model, held_out), rtol=1e-4, atol=1e-5)
