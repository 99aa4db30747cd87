"""--rpc: a TVM RPC tracker and server on 127.0.0.1; --bench times the artifact on the remote device, and tuning
measures its candidates there. Unreachable trackers and unknown keys fail in one line, quickly, with nothing
written."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from rewriter import rewrite
from rewriter.errors import UsageError
from tests.helpers import CALIB, SAMPLES, run_ort

pytest.importorskip("tvm")
pytest.importorskip("tornado")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_key(port: int, key: str, deadline: float) -> None:
    from tvm import rpc

    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
            if key in rpc.connect_tracker("127.0.0.1", port).summary().get("queue_info", {}):
                return
        except OSError:
            pass  # not up yet
        time.sleep(0.5)
    raise TimeoutError(f"no RPC server with key {key} registered at the tracker")


def _start(*args: str, log: Path | None = None) -> subprocess.Popen:
    """A TVM RPC tool in its own process group, so that stopping it also stops the workers it spawns."""
    with open(log or os.devnull, "wb") as sink:
        return subprocess.Popen([sys.executable, "-m", *args], stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)


@pytest.fixture(scope="module")
def farm(tmp_path_factory):
    """A tracker and one x86 server on localhost; both (and their workers) stop when the tests end.
    Yields the tracker's HOST:PORT and the server's log (it logs every module a client loads)."""
    port = _free_port()
    log = tmp_path_factory.mktemp("rpc") / "server.log"
    procs = [_start("tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(port), "--port-end", "65535")]
    try:
        procs.append(_start("tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(_free_port()),
                            "--port-end", "65535", "--tracker", f"127.0.0.1:{port}", "--key", "local-x86", log=log))
        _wait_for_key(port, "local-x86", time.monotonic() + 120)
        yield f"127.0.0.1:{port}", log
    finally:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def tracker(farm) -> str:
    return farm[0]


def test_bench_times_the_artifact_on_a_remote_device(tracker, tmp_path):
    result = rewrite(SAMPLES / "digits_mlp.onnx", calib=CALIB, target="x86", bench=True, out_dir=tmp_path / "out",
                     rpc=tracker, device_key="local-x86")
    bench = result.report["bench"]
    assert bench["artifact_ms"] > 0
    assert {k: bench["remote"][k] for k in ("tracker", "device_key", "devices")} == {
        "tracker": tracker, "device_key": "local-x86", "devices": 1}
    assert bench["remote"]["max_abs_diff"] < 1e-4  # the device's answer is checked against onnxruntime


def test_unknown_key_and_unreachable_tracker_fail_fast(tracker, tmp_path):
    start = time.monotonic()
    with pytest.raises(UsageError, match="no device with key 'board'"):
        rewrite(SAMPLES / "digits_mlp.onnx", calib=CALIB, target="x86", bench=True, out_dir=tmp_path / "a",
                rpc=tracker, device_key="board")
    with pytest.raises(UsageError, match="cannot reach the RPC tracker"):
        rewrite(SAMPLES / "digits_mlp.onnx", calib=CALIB, target="x86", bench=True, out_dir=tmp_path / "b",
                rpc=f"127.0.0.1:{_free_port()}", device_key="local-x86")
    assert time.monotonic() - start < 120
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_rpc_needs_bench_and_a_key():
    with pytest.raises(UsageError, match="together"):
        rewrite(SAMPLES / "digits_mlp.onnx", rpc="127.0.0.1:9190")
    with pytest.raises(UsageError, match="add --bench or --tune-trials"):
        rewrite(SAMPLES / "digits_mlp.onnx", rpc="127.0.0.1:9190", device_key="x")


def test_cli_tuning_through_an_unknown_key_writes_nothing(tracker, tmp_path, capsys):
    """The CLI path: --rpc with --tune-trials reaches the remote runner's checks (no silent local tuning)."""
    from rewriter.cli import main

    code = main([str(SAMPLES / "digits_mlp.onnx"), "--target", "x86", "--tune-trials", "2", "--tuning-db",
                 str(tmp_path / "db"), "--rpc", tracker, "--device-key", "board", "-o", str(tmp_path / "out")])
    assert code == 2 and "no device with key 'board'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "db").exists()


# tuning on the remote device -------------------------------------------------------------------


def _static_mlp() -> onnx.ModelProto:
    model = onnx.load(SAMPLES / "digits_mlp.onnx")
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    return model


@pytest.mark.slow
def test_tuning_measures_the_candidates_on_the_remote_device(farm, tmp_path):
    """2 trials by MAC share go to the largest matmul: its rule-schedule seed and the search candidates are
    built here, loaded and timed by the RPC server (its log names each library), and applied to the artifact."""
    pytest.importorskip("psutil")
    pytest.importorskip("xgboost")
    import tvm

    from rewriter.targets import build_artifact, resolve_target

    tracker, server_log = farm
    loads_before = server_log.read_text().count("candidate.so")
    out = tmp_path / "model.so"
    report = build_artifact(_static_mlp(), resolve_target("x86"), out, tune_trials=2, tuning_db=str(tmp_path / "db"),
                            remote=(tracker, "local-x86"))
    tuning = report["tuning"]
    assert tuning["runner"] == f"rpc tracker {tracker} key local-x86"
    assert tuning["tasks_tuned"] == 1 and tuning["seeded"] == 1 and tuning["trials_run"] >= 1
    assert tuning["tasks_applied"] == 1 and tuning["records"] == tuning["trials_run"] + tuning["seeded"]
    # every committed record was measured by the server (failed candidates are loaded but not committed)
    assert server_log.read_text().count("candidate.so") - loads_before >= tuning["records"]
    vm = tvm.relax.VirtualMachine(tvm.runtime.load_module(str(out)), tvm.cpu())
    for x in np.load(CALIB)["input"][:3]:
        expected = run_ort(SAMPLES / "digits_mlp.onnx", {"input": x[None]})[0]
        got = vm["main"](tvm.runtime.tensor(x[None]))
        got = got.numpy() if hasattr(got, "numpy") else got[0].numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_tuning_with_an_unreachable_tracker_or_unknown_key_fails_before_lowering(tracker, tmp_path):
    from rewriter.targets import build_artifact, resolve_target

    start = time.monotonic()
    with pytest.raises(UsageError, match="cannot reach the RPC tracker"):
        build_artifact(_static_mlp(), resolve_target("x86"), tmp_path / "a.so", tune_trials=2,
                       tuning_db=str(tmp_path / "db_a"), remote=(f"127.0.0.1:{_free_port()}", "local-x86"))
    with pytest.raises(UsageError, match="no device with key 'board'"):
        build_artifact(_static_mlp(), resolve_target("x86"), tmp_path / "b.so", tune_trials=2,
                       tuning_db=str(tmp_path / "db_b"), remote=(tracker, "board"))
    assert time.monotonic() - start < 60
    assert sorted(tmp_path.iterdir()) == []  # no database folder, no artifact


def test_arm_tuning_needs_a_device_and_checks_it_in_one_line(tmp_path):
    """Without --rpc arm tuning is refused; with it the tracker is checked first (tuning on an aarch64 server
    under qemu: tests/targets/test_arm_qemu.py)."""
    from rewriter.targets.presets import ARM_CROSS_CC

    if shutil.which(ARM_CROSS_CC) is None:
        pytest.skip(f"{ARM_CROSS_CC} not installed")
    from rewriter.targets import build_artifact, resolve_target

    with pytest.raises(UsageError, match="needs an aarch64 device .* --rpc HOST:PORT --device-key KEY"):
        build_artifact(_static_mlp(), resolve_target("arm"), tmp_path / "a.so", tune_trials=2)
    with pytest.raises(UsageError, match="cannot reach the RPC tracker"):
        build_artifact(_static_mlp(), resolve_target("arm"), tmp_path / "b.so", tune_trials=2,
                       remote=(f"127.0.0.1:{_free_port()}", "board"))
    assert sorted(tmp_path.iterdir()) == []
