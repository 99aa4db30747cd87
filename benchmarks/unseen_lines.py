"""The MobileNetV3 direction classifier checked on text lines whose source line the fit never saw.

    python benchmarks/unseen_lines.py                                   # prune under --budget macs=0.8, seeds 0-2
    python benchmarks/unseen_lines.py --passes pq,distill --seeds 0 --options '{"distill": {"steps": 600}}'

The calibration sets of `samples/fetch_real_models.py` cut their lines from the 19 text lines of scikit-image's
page.png (every line once, then random word spans of them, each upright and turned 180°), so the pipeline's
held-out lines share their text with fit lines. Here the 19 source lines are split first (seeded): spans of 14
make the calibration file (256 lines, both ways up: 512 images), spans of the other 5 the check (128 lines, 256
images), run in onnxruntime beside the original model. Prints the pipeline's own held-out top-1 agreement and
the one on the unseen lines, with labelled accuracy before and after.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
from common import REPO, at_named_strength

sys.path.insert(0, str(REPO / "samples"))

import fetch_real_models as fetch  # noqa: E402

from rewriter import rewrite  # noqa: E402
from rewriter.loading import serialize  # noqa: E402

FIT_SOURCES = 14


def _scores(model, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model if isinstance(model, str) else serialize(model),
                                   providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))])


def run(seed: int, passes: list[str], options: dict, budget: dict | None, folder: Path) -> dict:
    sources = fetch.text_lines(fetch._skimage_image("page.png"))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(sources))
    fit_x, fit_y = fetch.direction_set([sources[i] for i in order[:FIT_SOURCES]], 256, rng)
    check_x, check_y = fetch.direction_set([sources[i] for i in order[FIT_SOURCES:]], 128, rng)
    calib = folder / f"fit_{seed}.npz"
    np.savez(calib, x=fit_x, labels=fit_y)
    with contextlib.redirect_stdout(sys.stderr):  # the fetch log must not mix into the results
        model = str(fetch.fetch_models(fetch.default_cache())["mobilenetv3_cls"])
    result = rewrite(model, passes=passes, calib=calib, options=at_named_strength(passes, options), budget=budget,
                     seed=seed)
    report = result.report
    before, after = _scores(model, check_x).argmax(1), _scores(result.model, check_x).argmax(1)
    return {"seed": seed, "macs": round(report["output"]["macs"] / report["input"]["macs"], 3),
            "bytes": report["output"]["bytes"],
            "pipeline_held_out_top1": report["fidelity"].get("top1_agreement"),
            "unseen_lines_top1": float(np.mean(before == after)), "unseen_images": len(check_x),
            "accuracy_before": float(np.mean(before == check_y)), "accuracy_after": float(np.mean(after == check_y))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", default="prune")
    parser.add_argument("--budget", default="macs=0.8", help="KEY=VALUE or 'none'")
    parser.add_argument("--options", default="{}", help="JSON options per pass")
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args()
    budget = None if args.budget == "none" else {k: float(v) for k, v in (args.budget.split("="),)}
    folder = Path(tempfile.mkdtemp(prefix="unseen-lines-"))
    for seed in (int(s) for s in args.seeds.split(",")):
        print(json.dumps(run(seed, args.passes.split(","), json.loads(args.options), budget, folder)), flush=True)


if __name__ == "__main__":
    main()
