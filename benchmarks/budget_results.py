"""The README's --budget table: prune+svd spent per unit from sensitivity curves, beside one uniform prune
ratio that reaches the same MACs, on the same held-out samples; and the second run's time (cached curves).

    python benchmarks/budget_results.py                          # digits ResNet, MobileNetV3, YOLOv8n
    python benchmarks/budget_results.py --models digits_resnet --fresh

`--fresh` points the sensitivity cache at an empty folder, so the first run's time includes the analysis.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
from common import SAMPLES, real_models, table

from rewriter import rewrite
from rewriter.canonical import canonicalize
from rewriter.loading import load_model
from rewriter.passes.prune import PrunePass

BUDGETS = {"digits_resnet": 0.5, "mobilenetv3_cls": 0.6, "yolov8n": 0.6}
PASSES = ["prune", "svd"]


def _models(names: list[str]) -> dict:
    found = {"digits_resnet": (SAMPLES / "digits_resnet.onnx", SAMPLES / "digits_calib.npz")}
    if set(names) - set(found):
        found.update(real_models())
    return {n: found[n] for n in names}


def _figures(report: dict) -> dict:
    fid = report["fidelity"]
    agree = fid.get("accuracy_after", fid.get("top1_agreement"))
    return {"macs": report["output"]["macs"] / report["input"]["macs"], "agree": agree,
            "cosine": fid["cosine"], "worst": fid["channel_cosine_min"], "drop": fid["drop"]}


def _row(name: str, label: str, f: dict, extra: list) -> list:
    agree = "–" if f["agree"] is None else f"{f['agree']:.3f}"
    return [name, label, f"{f['macs']:.3f}", agree, f"{f['cosine']:.4f}", f"{f['worst']:.4f}", f"{f['drop']:.4f}",
            *extra]


def measure(name: str, model, calib) -> list[list]:
    share = BUDGETS[name]
    start = time.perf_counter()
    first = rewrite(model, passes=PASSES, calib=calib, budget={"macs": share}).report
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    second = rewrite(model, passes=PASSES, calib=calib, budget={"macs": share}).report
    second_s = time.perf_counter() - start
    budget = second["budget"]
    assert all(c["cached"] for c in budget["sensitivity"].values()), "second run did not reuse the curves"
    cut = {p: len(units) for p, units in budget["allocation"].items()}
    with np.load(calib) as data:
        shapes = {k: [1, *data[k].shape[1:]] for k in data.files if k != "labels"}
    ratio = PrunePass().uniform_ratio(canonicalize(load_model(model), shapes), share)
    uniform = rewrite(model, passes=["prune"], calib=calib, options={"prune": {"ratio": ratio}}).report
    units = ", ".join(f"{p} {n}" for p, n in cut.items())
    return [_row(name, f"budget macs={share}: prune,svd per unit ({units})", _figures(first),
                 [f"{first_s:.0f}", f"{second_s:.0f}"]),
            _row(name, f"uniform prune ratio={ratio:.3f}", _figures(uniform), ["", ""])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(BUDGETS))
    parser.add_argument("--fresh", action="store_true", help="empty sensitivity cache: time the analysis")
    args = parser.parse_args()
    if args.fresh:
        os.environ["REWRITER_CACHE"] = tempfile.mkdtemp(prefix="rewriter-budget-")
    rows = []
    for name, (model, calib) in _models(args.models.split(",")).items():
        rows += measure(name, model, calib)
    print(table(["model", "setting", "MACs ×", "accuracy / top-1 agree", "cosine", "worst channel cos", "drop",
                 "first run s", "second run s"], rows))


if __name__ == "__main__":
    main()
