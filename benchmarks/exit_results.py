"""The README's exit table: where held-out samples leave, how often their answer agrees with the original
model, expected MACs, and mean batch-1 latency of the original and rewritten models in onnxruntime and in
the x86 TVM library, samples fed one by one.

    python benchmarks/exit_results.py            # digits ResNet-style sample
    python benchmarks/exit_results.py --real     # also the MobileNetV3 text-direction classifier
    TVM_NUM_THREADS=2 python benchmarks/exit_results.py   # both runtimes on 2 threads (default 1)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# One thread by default, for TVM and onnxruntime alike: at batch 1 these models are too small to gain from
# more, and on a shared machine a thread pool's waits swamp them. TVM reads it at start: set it before import.
THREADS = int(os.environ.setdefault("TVM_NUM_THREADS", "1"))

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
from common import SAMPLES, real_models, table  # noqa: E402

from rewriter import rewrite  # noqa: E402
from rewriter.calib import load_calibration, split  # noqa: E402
from rewriter.loading import load_model, serialize  # noqa: E402
from rewriter.passes._exit_graph import probe_model  # noqa: E402
from rewriter.progress import set_quiet  # noqa: E402

ROUNDS = 7


def _session(model_bytes: bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def _vm(library: Path):
    import tvm
    from tvm import relax

    return relax.VirtualMachine(tvm.runtime.load_module(str(library)), tvm.cpu())


def _latencies(variants: dict, feeds: list) -> dict[str, float]:
    """Mean time per sample, samples fed one by one: the variants take turns on every sample (so that load
    from other processes hits them alike), and the median over rounds of each variant's mean is kept."""
    for run in variants.values():  # warm up
        for feed in feeds[:5]:
            run(feed)
    rounds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(ROUNDS):
        spent = dict.fromkeys(variants, 0.0)
        for feed in feeds:
            for name, run in variants.items():
                start = time.perf_counter()
                run(feed)
                spent[name] += time.perf_counter() - start
        for name in variants:
            rounds[name].append(spent[name] / len(feeds) * 1e3)
    return {name: statistics.median(times) for name, times in rounds.items()}


def _held_out(model_path: Path, calib: Path) -> tuple[list[dict], int]:
    """The API's held-out split (seed 0, holdout 0.25): samples the pass never saw."""
    _, held = split(load_calibration(calib, load_model(model_path)), 0.25, 0)
    return list(held.samples()), len(held)


def _exits_taken(model, feeds: list[dict]) -> np.ndarray:
    probe, _ = probe_model(model)
    sess = _session(serialize(probe))
    taken = []
    for feed in feeds:
        conds = [bool(c) for c in sess.run(None, feed)]
        taken.append(next((k for k, c in enumerate(conds) if c), len(conds)))
    return np.array(taken)


def evaluate(name: str, model_path: Path, calib: Path, options: dict) -> tuple[list, list]:
    """One model: (exit rows, summary row)."""
    with tempfile.TemporaryDirectory() as tmp:
        base = rewrite(model_path, calib=calib, target="x86", out_dir=Path(tmp) / "base")
        new = rewrite(model_path, passes=["exit"], calib=calib, options={"exit": options}, target="x86",
                      out_dir=Path(tmp) / "exit")
        feeds, held = _held_out(model_path, calib)
        notes = new.report["passes"][0]["notes"]
        taken = _exits_taken(new.model, feeds) if notes["exits"] else np.zeros(held, dtype=int)
        sessions = {"original": _session(serialize(base.model)), "exit": _session(serialize(new.model))}
        answers = {k: np.concatenate([s.run(None, f)[0] for f in feeds]) for k, s in sessions.items()}
        agree = np.argmax(answers["original"], axis=1) == np.argmax(answers["exit"], axis=1)
        vms = {"original": _vm(base.artifacts["library"]), "exit": _vm(new.artifacts["library"])}
        tvm_feeds = [[_tensor(v) for v in f.values()] for f in feeds]
        ort_ms = _latencies({k: (lambda f, s=s: s.run(None, f)) for k, s in sessions.items()}, feeds)
        tvm_ms = _latencies({k: (lambda f, vm=vm: vm["main"](*f)) for k, vm in vms.items()}, tvm_feeds)
    total = notes["macs_total"]
    costs = [e["macs"] for e in notes["exits"]] + [notes.get("full_macs", total)]
    rows = []
    for k, e in enumerate(notes["exits"] + [{"tensor": "(full model)", "macs": costs[-1], "threshold": None}]):
        leaving = taken == k
        rows.append([name, e["tensor"], f"{e['macs'] / total:.3f}",
                     "–" if e["threshold"] is None else f"{e['threshold']:.3f}",
                     f"{leaving.mean():.1%}", f"{agree[leaving].mean():.1%}" if leaving.any() else "–",
                     f"{e.get('held_out_share', float('nan')):.1%}" if "held_out_share" in e else "–"])
    expected = float(np.mean([costs[k] for k in taken]))
    summary = [name, held, len(notes["exits"]), f"{agree.mean():.1%}", f"{expected / total:.3f}",
               f"{notes.get('expected_macs_fraction', 1.0):.3f}",
               f"{ort_ms['original']:.3f} → {ort_ms['exit']:.3f} ({ort_ms['exit'] / ort_ms['original']:.2f}x)",
               f"{tvm_ms['original']:.3f} → {tvm_ms['exit']:.3f} ({tvm_ms['exit'] / tvm_ms['original']:.2f}x)"]
    return rows, summary


def _tensor(x: np.ndarray):
    import tvm

    return tvm.runtime.tensor(x, tvm.cpu())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", action="store_true", help="include the MobileNetV3 direction classifier")
    args = parser.parse_args()
    set_quiet(True)
    models = [("digits_resnet", SAMPLES / "digits_resnet.onnx", SAMPLES / "digits_calib.npz", {})]
    if args.real:
        path, calib = real_models()["mobilenetv3_cls"]
        models.append(("mobilenetv3_cls", path, calib, {}))
        models.append(("mobilenetv3_cls, agreement=0.95", path, calib, {"agreement": 0.95}))
    exit_rows, summaries = [], []
    for name, path, calib, options in models:
        print(f"{name} ...", file=sys.stderr, flush=True)
        rows, summary = evaluate(name, path, calib, options)
        exit_rows += rows
        summaries.append(summary)
    print(table(["model", "exit at", "MACs up to it", "threshold", "held-out share", "agreement there",
                 "cross-validated share (fit split)"], exit_rows))
    print()
    print(table(["model", "held-out samples", "exits", "top-1 agreement", "expected MACs (held-out)",
                 "expected MACs (cross-validated)", "onnxruntime ms/sample", "TVM x86 ms/sample"], summaries))


if __name__ == "__main__":
    main()
