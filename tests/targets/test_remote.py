"""--rpc: a TVM RPC tracker and server on 127.0.0.1; --bench times the artifact on the remote device. Unreachable
trackers and unknown keys fail in one line, quickly, with nothing written."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from rewriter import rewrite
from rewriter.errors import UsageError
from tests.helpers import CALIB, SAMPLES

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


def _start(*args: str) -> subprocess.Popen:
    """A TVM RPC tool in its own process group, so that stopping it also stops the workers it spawns."""
    return subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


@pytest.fixture(scope="module")
def tracker():
    """A tracker and one x86 server on localhost; both (and their workers) stop when the tests end."""
    port = _free_port()
    procs = [_start("tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(port), "--port-end", "65535")]
    try:
        procs.append(_start("tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(_free_port()),
                            "--port-end", "65535", "--tracker", f"127.0.0.1:{port}", "--key", "local-x86"))
        _wait_for_key(port, "local-x86", time.monotonic() + 120)
        yield f"127.0.0.1:{port}"
    finally:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def test_bench_times_the_artifact_on_a_remote_device(tracker, tmp_path):
    result = rewrite(SAMPLES / "digits_mlp.onnx", calib=CALIB, target="x86", bench=True, out_dir=tmp_path / "out",
                     rpc=tracker, device_key="local-x86")
    bench = result.report["bench"]
    assert bench["artifact_ms"] > 0
    assert bench["remote"] == {"tracker": tracker, "device_key": "local-x86", "devices": 1}


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
    with pytest.raises(UsageError, match="add --bench"):
        rewrite(SAMPLES / "digits_mlp.onnx", rpc="127.0.0.1:9190", device_key="x")
