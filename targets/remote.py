"""Remote devices through a TVM RPC tracker: timing an artifact (`--rpc HOST:PORT --device-key KEY --bench`) and
checking the tracker before tuning on its devices (`--tune-trials N`, see targets/tuning.py).

The tracker is TVM's own device-farm broker: boards run `python -m tvm.exec.rpc_server --tracker HOST:PORT
--key KEY`; we ask the tracker for one of them, upload the library, run it in the Relax VM there and time it
with the same statistics as a local run. Every step has a deadline: an unreachable tracker, an unknown key,
a busy farm or a device that drops mid-run give one line (exit 2 or 3), never a hang.
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import numpy as np

from rewriter.errors import ModelError, RewriterError, UsageError

CONNECT_TIMEOUT_S = 5.0
SESSION_TIMEOUT_S = 300.0


def parse_tracker(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"bad --rpc {text!r}: expected HOST:PORT of a TVM RPC tracker")
    return host, int(port)


def _free_devices(host: str, port: int, key: str) -> int:
    """How many devices the tracker holds for `key`; UsageError when it is unreachable or has none."""
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise UsageError(f"cannot reach the RPC tracker at {host}:{port}: {exc.strerror or exc}") from None
    from tvm import rpc

    summary = rpc.connect_tracker(host, port).summary()
    queue = summary.get("queue_info", {})
    if key not in queue:
        known = ", ".join(sorted(queue)) or "none"
        raise UsageError(f"the RPC tracker at {host}:{port} has no device with key {key!r} (keys: {known})")
    return int(queue[key].get("free", 0))


def check_device(tracker: str, key: str, timeout_s: float = 30.0) -> int:
    """UsageError in one line unless the tracker answers within `timeout_s` and knows `key`; returns the
    number of free devices. Asked before tuning on remote devices, so a mistake costs no compile time."""
    host, port = parse_tracker(tracker)
    found = _with_deadline(lambda: {"devices": _free_devices(host, port, key)}, timeout_s,
                           UsageError, f"the RPC tracker at {tracker}")
    return found["devices"]


def device_threads(tracker: str, key: str, timeout_s: float = 120.0) -> int:
    """The number of threads the TVM runtime uses on a device from the tracker (its `runtime.NumThreads`);
    UsageError for tracker/key problems, ModelError when the device fails or does not answer in time."""
    host, port = parse_tracker(tracker)

    def work() -> dict:
        from tvm import rpc

        session = rpc.connect_tracker(host, port).request(key, priority=1, session_timeout=timeout_s)
        threads = int(session.get_function("runtime.NumThreads")())
        del session  # ends the session, so that the device is free for the next request at once
        return {"threads": threads}

    return _with_deadline(work, timeout_s, ModelError, f"the device {key!r} from {tracker}")["threads"]


def _with_deadline(work, timeout_s: float, error: type[RewriterError], what: str, late: str = "did not answer") -> dict:
    """`work()` in a daemon thread (a silent tracker or hung device cannot keep us alive), as one-line
    errors: our own errors pass through, a timeout or any other failure becomes `error` naming `what`."""
    found: dict = {}

    def run() -> None:
        try:
            found.update(work())
        except Exception as exc:  # noqa: BLE001 - reported below as one line
            found["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise error(f"{what} {late} within {timeout_s:.0f} s")
    failure = found.pop("error", None)
    if isinstance(failure, RewriterError):
        raise failure
    if failure is not None:
        raise error(f"{what} failed: {_first_line(failure)}")
    return found


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _time_remote(path: Path, inputs: list[np.ndarray], host: str, port: int, key: str) -> dict:
    import tvm
    from tvm import relax, rpc

    remote = rpc.connect_tracker(host, port).request(key, priority=1, session_timeout=SESSION_TIMEOUT_S)
    remote.upload(str(path))
    library = remote.load_module(path.name)
    device = remote.cpu()
    vm = relax.VirtualMachine(library, device)
    args = [tvm.runtime.tensor(x, device) for x in inputs]
    outputs = vm["main"](*args)
    first = outputs if hasattr(outputs, "numpy") else outputs[0]
    timer = vm.time_evaluator("main", device, number=20, repeat=5, min_repeat_ms=100)
    return {"ms": float(timer(*args).median * 1e3), "first_output": first.numpy()}


def remote_timing(
    path: str | os.PathLike, inputs: list[np.ndarray], tracker: str, key: str, timeout_s: float = 600.0
) -> dict:
    """{"ms", "device_key", "tracker", "devices", "first_output"}: the artifact timed on a device from the
    tracker. UsageError for tracker/key problems, ModelError when the device fails or does not answer in time."""
    host, port = parse_tracker(tracker)

    def work() -> dict:
        return {"devices": _free_devices(host, port, key), **_time_remote(Path(path), inputs, host, port, key)}

    found = _with_deadline(work, timeout_s, ModelError, f"the device {key!r} from {tracker}", "did not finish timing")
    return {**found, "device_key": key, "tracker": tracker}
