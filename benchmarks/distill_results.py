"""The README's distill table: held-out fidelity of compressed models before and after `distill`.

    python benchmarks/distill_results.py                  # digits samples (minutes)
    python benchmarks/distill_results.py --real           # also YOLOv8n and the MobileNetV3 classifier
    python benchmarks/distill_results.py --real --only yolov8n --steps 150
    python benchmarks/distill_results.py --real --only mobilenetv3_cls --samples 256   # 64 held-out images
    python benchmarks/distill_results.py --real --only mobilenetv3_cls --compression pq --trace   # see below

Each row runs one pipeline (compression pass, then distill) through `rewriter.rewrite` and reads the report:
the figures are the pipeline's own held-out fidelity (samples distill never saw) after the compression pass and
after distill, with the steps distill ran and its wall time. Wall time depends on the machine's load.

--trace also scores the pipeline's held-out samples at each of distill's evaluations (distill itself never sees
them and chooses its state on its own split of the fit samples): what the states it passed through would have
kept, beside the one it chose. Tracing costs an extra run of both models on the held-out set per evaluation.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from pathlib import Path

import onnx
from common import SAMPLES, at_named_strength, real_models, table

import rewriter.passes._distill_train as distill_train
from rewriter import rewrite
from rewriter.calib import load_calibration, split

# (model, passes, options of the compression passes)
SAMPLE_RUNS = [
    ("digits_vgg", ["svd"], {"svd": {"rank_ratio": 0.25, "data_aware": False}}),
    ("digits_mobilenet", ["pq"], {"pq": {"k": 16, "block": 8, "max_error": 0}}),
    ("digits_resnet", ["binary"], {}),
]
REAL_RUNS = [
    ("yolov8n", ["prune"], {"prune": {"ratio": 0.3}}),
    ("yolov8n", ["pq"], {}),
    ("mobilenetv3_cls", ["pq"], {}),
    ("mobilenetv3_cls", ["pq"], {"pq": {"max_error": 0}}),  # the codes unbounded, as before pq.max_error
    ("mobilenetv3_cls", ["pq"], {"pq": {"k": 16, "block": 8, "max_error": 0}}),
    ("mobilenetv3_cls", ["binary"], {"binary": {"bases": 3}}),
]


def _fmt(fid: dict | None, key: str, pct: bool = False) -> str:
    if not fid or key not in fid:
        return "–"
    return f"{fid[key]:.1%}" if pct else f"{fid[key]:.3f}"


@contextlib.contextmanager
def _held_out_trace(path: Path, calib: Path, seed: int = 0):
    """While active, every distill evaluation also scores the pipeline's held-out samples (the same seeded split
    rewrite() makes); yields the list the figures are appended to."""
    _, held = split(load_calibration(calib, onnx.load(path)), 0.25, seed)
    trainers, figures, reference = [], [], {}
    init, score = distill_train.Trainer.__init__, distill_train.fidelity_drop

    def remember(self, *args, **kwargs):
        init(self, *args, **kwargs)
        trainers.append(self)

    def traced(names, ref, new, layouts):
        found = score(names, ref, new, layouts)
        trainer = trainers[-1]
        if "outputs" not in reference:
            reference["outputs"] = trainer._outputs(trainer.teacher, held)
        on_held = score(names, reference["outputs"], trainer._outputs(trainer.student, held), layouts)
        figures.append({"split": {k: found[k] for k in ("drop", "top1_agreement") if k in found},
                        "held_out": {k: on_held[k] for k in ("drop", "top1_agreement") if k in on_held}})
        return found

    distill_train.Trainer.__init__, distill_train.fidelity_drop = remember, traced
    try:
        yield figures
    finally:
        distill_train.Trainer.__init__, distill_train.fidelity_drop = init, score


def _row(name: str, path: Path, calib: Path, passes: list[str], options: dict, distill: dict,
         trace: bool = False) -> tuple[list, dict]:
    start = time.perf_counter()
    with _held_out_trace(path, calib) if trace else contextlib.nullcontext([]) as figures:
        result = rewrite(path, passes=[*passes, "distill"], calib=calib,
                         options={**at_named_strength(passes, options), "distill": distill})
    records = result.report["passes"]
    before, after, notes = records[-2]["fidelity"], records[-1]["fidelity"], records[-1]["notes"]
    ratio = records[0]["bytes_before"] / max(records[-1]["bytes_after"], 1)
    spec = "+".join(f"{p}({', '.join(f'{k}={v}' for k, v in options.get(p, {}).items())})" for p in passes)
    row = [name, spec, f"×{records[-1]['macs_after'] / records[0]['macs_before']:.2f}", f"/{ratio:.1f}",
           f"{_fmt(before, 'channel_cosine_min')} → {_fmt(after, 'channel_cosine_min')}",
           f"{_fmt(before, 'top1_agreement', True)} → {_fmt(after, 'top1_agreement', True)}",
           f"{_fmt(before, 'accuracy_after', True)} → {_fmt(after, 'accuracy_after', True)}",
           notes.get("steps", 0), f"{records[-1]['seconds'] / 60:.1f}", notes.get("stopped", notes.get("kept", ""))]
    detail = {"model": name, "passes": passes, "options": options, "distill": distill,
              "before": {k: before.get(k) for k in ("channel_cosine_min", "cosine", "top1_agreement", "drop")},
              "after": {k: after.get(k) for k in ("channel_cosine_min", "cosine", "top1_agreement", "drop")},
              "distill_notes": {k: v for k, v in notes.items() if k != "history"}, "history": notes.get("history"),
              "seconds_total": round(time.perf_counter() - start, 1), "held_out_trace": figures}
    if trace:  # the first evaluation is the starting model, the last the state distill kept
        key = "top1_agreement" if all("top1_agreement" in f["held_out"] for f in figures) else "drop"
        print(f"{name} held-out {key} at each distill evaluation: "
              + " ".join(f"{f['held_out'][key]:.3f}" for f in figures), flush=True)
    return row, detail


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", action="store_true", help="also the pretrained models")
    parser.add_argument("--only", default="", help="comma-separated model names to run")
    parser.add_argument("--compression", default="", help="comma-separated compression passes to run (default all)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--minutes", type=float, default=15.0)
    parser.add_argument("--loss", default="kd,feat")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--patience", type=int, default=4, help="evaluations without improvement before stopping")
    parser.add_argument("--samples", type=int, help="real models: calibration sets of N images (25 %% held out)")
    parser.add_argument("--options", help="JSON: only the runs whose pass options are exactly these, e.g. '{}'")
    parser.add_argument("--json", type=Path, help="write per-run details (history included) here")
    parser.add_argument("--trace", action="store_true", help="also score the held-out samples at every evaluation")
    args = parser.parse_args()
    distill = {"steps": args.steps, "batch": args.batch, "minutes": args.minutes, "loss": args.loss, "lr": args.lr,
               "threads": args.threads,
               "eval_every": args.eval_every, "patience": args.patience}
    runs = [(name, SAMPLES / f"{name}.onnx", SAMPLES / "digits_calib.npz", p, o) for name, p, o in SAMPLE_RUNS]
    if args.real:
        real = real_models(args.samples, Path(tempfile.mkdtemp(prefix="distill-calib-")) if args.samples else None)
        runs += [(name, *real[name], p, o) for name, p, o in REAL_RUNS]
    only = {n.strip() for n in args.only.split(",") if n.strip()}
    rows, details = [], []
    for name, path, calib, passes, options in runs:
        if only and name not in only or args.compression and passes[0] not in args.compression.split(","):
            continue
        if args.options is not None and options != json.loads(args.options):
            continue
        row, detail = _row(name, path, calib, passes, options, distill, args.trace)
        rows.append(row)
        details.append(detail)
        print(table(HEADER, [row]).splitlines()[-1], flush=True)
    print()
    print(f"distill: steps<={args.steps}, batch {args.batch}, lr {args.lr}, loss {args.loss}, "
          f"budget {args.minutes} min, {args.threads} thread(s)")
    print(table(HEADER, rows))
    if args.json:
        args.json.write_text(json.dumps(details, indent=1))


HEADER = ["model", "compression", "MACs", "size", "worst channel cosine", "top-1 agreement", "accuracy",
          "distill steps", "distill min", "stopped"]

if __name__ == "__main__":
    main()
