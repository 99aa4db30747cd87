"""The `--target arm` library runs under qemu-aarch64 (aarch64 Python + TVM runtime) and gives onnxruntime's
outputs on held-out samples; the same aarch64 Python runs TVM's RPC server, on which `--target arm --rpc` tunes
and times. The aarch64 set-up is cached (~/.cache/rewriter/arm-qemu); where it cannot be had (no root for
apt-get, no network, not Debian bookworm, no cross compiler) the tests are skipped with the reason."""

from __future__ import annotations

import math
import os
import shutil
import signal
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
    start_rpc_server,
)
from tests.helpers import CALIB, SAMPLES

pytest.importorskip("tvm")

pytestmark = pytest.mark.slow

ARM_KEY = "qemu-aarch64"
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


@pytest.fixture(scope="module")
def arm_farm(arm64, tmp_path_factory):
    """A tracker on 127.0.0.1 and TVM's RPC server on the aarch64 Python under qemu, registered with key
    ARM_KEY; both (and the server's workers) stop when the tests end. Yields the tracker's HOST:PORT and the
    server's log (it logs every module a client loads)."""
    pytest.importorskip("tornado")  # the tracker's
    from tests.targets.test_remote import _free_port, _start

    port = _free_port()
    log = tmp_path_factory.mktemp("arm_rpc") / "server.log"
    tracker = _start("tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(port), "--port-end", "65535")
    try:
        try:
            server = start_rpc_server(arm64, f"127.0.0.1:{port}", ARM_KEY, port=_free_port(), port_end=65535,
                                      log=log)
        except QemuUnavailableError as exc:
            pytest.skip(f"no aarch64 RPC server under qemu: {exc}")
        with server:
            yield f"127.0.0.1:{port}", log
    finally:
        os.killpg(tracker.pid, signal.SIGKILL)
        tracker.wait(timeout=30)


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



@pytest.mark.parametrize("graph", ["fpn_neck", "upsampling_head", "clip_activations", "distribution_focal_head"])
def test_arm_layout_rewrites_match_onnxruntime_under_qemu(arm64, tmp_path: Path, graph: str) -> None:
    """The CPU rewrites (blocked resize/concat, transposed conv as 1x1 conv + shuffle, clips, softmax across
    channels) on aarch64."""
    import onnx

    from tests.helpers import run_ort
    from tests.targets import test_schedules

    model = getattr(test_schedules, graph)(*(("nearest", "asymmetric") if graph == "fpn_neck" else ()))
    onnx.save(model, tmp_path / "m.onnx")
    result = rewrite(tmp_path / "m.onnx", target="arm", out_dir=tmp_path / "out")
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(3).standard_normal([2, *shape[1:]]).astype(np.float32)
    got = arm64.run(Path(result.artifacts["library"]), x)
    ref = np.concatenate([run_ort(model, {"x": x[i:i + 1]})[0] for i in range(len(x))])
    np.testing.assert_allclose(got.reshape(ref.shape), ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))


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


def test_arm_tuning_and_bench_through_rpc_on_an_aarch64_server(arm64, arm_farm, tmp_path: Path) -> None:
    """`--target arm --rpc --tune-trials 2 --bench`: the rule-schedule seed and the search candidates are
    cross-linked here, loaded and timed by the aarch64 server (its log names each library) with finite times,
    the records are applied to the artifact, which the same server then times; under qemu the artifact gives
    onnxruntime's outputs."""
    pytest.importorskip("psutil")
    pytest.importorskip("xgboost")
    from rewriter.targets.tuning import load_database

    tracker, server_log = arm_farm
    loads_before = server_log.read_text().count("candidate.so")
    result = rewrite(SAMPLES / "digits_mlp.onnx", target="arm", calib=CALIB, tune_trials=2,
                     tuning_db=str(tmp_path / "db"), out_dir=tmp_path / "out", rpc=tracker, device_key=ARM_KEY,
                     bench=True)
    tuning = result.report["target"]["tuning"]
    assert tuning["runner"] == f"rpc tracker {tracker} key {ARM_KEY}"
    assert tuning["tasks_tuned"] == 1 and tuning["seeded"] == 1 and tuning["trials_run"] >= 1
    assert tuning["tasks_applied"] == 1 and tuning["records"] == tuning["trials_run"] + tuning["seeded"]
    records = load_database(tmp_path / "db").get_all_tuning_records()
    seconds = [[float(t) for t in record.run_secs or []] for record in records]
    assert len(seconds) == tuning["records"]
    assert all(times and all(math.isfinite(t) and 0 < t < 1 for t in times) for times in seconds), seconds
    # every committed record was measured by the aarch64 server (failed candidates are loaded, not committed)
    assert server_log.read_text().count("candidate.so") - loads_before >= tuning["records"]

    bench = result.report["bench"]
    assert bench["artifact_ms"] > 0
    assert {k: bench["remote"][k] for k in ("tracker", "device_key", "devices")} == {
        "tracker": tracker, "device_key": ARM_KEY, "devices": 1}
    assert bench["remote"]["max_abs_diff"] < 1e-4  # the artifact's answer on the aarch64 server, checked
    library, model = Path(result.artifacts["library"]), Path(result.artifacts["model"])
    loads = [line for line in server_log.read_text().splitlines() if "load_module" in line]
    assert loads[-1].endswith("/" + library.name), loads[-1]  # the bench ran the artifact on the server
    assert "64-bit, e_machine 183 (AArch64)" in elf_info(library)

    with np.load(CALIB) as data:
        held_out = np.ascontiguousarray(data["input"][-HELD_OUT:], dtype=np.float32)
    got, ref = arm64.run(library, held_out), onnxruntime_outputs(model, held_out)
    max_abs, max_rel, agree = compare(ref, got)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5,
                               err_msg=f"tuned arm under qemu vs onnxruntime: max abs {max_abs:.3g}, rel {max_rel:.3g}")
    assert agree == HELD_OUT
