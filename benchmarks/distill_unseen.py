"""The README's check of `--passes prune,pq,distill` on models from other exporters: ddddocr's CNN + BiLSTM text
recogniser on word spans of scikit-image's scanned page (`--samples`, default 64), its YOLOX-style detector on 48
click-captcha-like images (characters drawn on crops of scikit-image's photographs), and PP-OCRv4's recogniser
(paddle2onnx, CNN + SVTR transformer, softmax over 6,625 characters) on the same page's lines.
Prints each pass's MACs, bytes and held-out fidelity (the pipeline's own).

    python benchmarks/distill_unseen.py rec            # the recogniser (a few minutes)
    python benchmarks/distill_unseen.py ppocr_rec      # PP-OCRv4's recogniser
    python benchmarks/distill_unseen.py det --steps 60 # the detector
    python benchmarks/distill_unseen.py rec --passes prune --budget macs=0.704   # per-group prune to a budget
    python benchmarks/distill_unseen.py rec --options '{"pq": {"max_error": 0.15}}'  # more pass options
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
from common import REPO

sys.path.insert(0, str(REPO))

from fetch_real_models import default_cache, fetch_extra_models, rec_lines, recogniser_spans  # noqa: E402

from rewriter import rewrite  # noqa: E402

FIGURES = ("drop", "cosine", "channel_cosine_min", "top1_agreement", "reading_error", "readings_same",
           "detection_agreement")


def _photographs() -> list[np.ndarray]:
    from skimage import data

    return [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.immunohistochemistry(),
            data.hubble_deep_field()]


def _photo_crop(image: np.ndarray, rng: np.random.Generator):
    """A square crop of half to all of the photograph's short side, resized to 416 x 416 (a PIL image)."""
    from PIL import Image

    h, w = image.shape[:2]
    side = int(rng.integers(min(h, w) // 2, min(h, w)))
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    return Image.fromarray(image[y:y + side, x:x + side]).convert("RGB").resize((416, 416))


def photo_crops(count: int, rng: np.random.Generator) -> np.ndarray:
    """Crops of scikit-image's photographs (NCHW, 416 x 416)."""
    images = _photographs()
    return np.stack([np.asarray(_photo_crop(images[k % len(images)], rng), np.float32).transpose(2, 0, 1)
                     for k in range(count)])


def click_captchas(count: int, rng: np.random.Generator) -> np.ndarray:
    """What ddddocr's detector is for: photo crops with 3-6 characters drawn on each (random size, colour and
    position; Pillow's own font). Bare photographs leave its objectness below 0.05 almost everywhere, so a fidelity
    figure on them reads noise."""
    from PIL import ImageDraw, ImageFont

    images = _photographs()
    glyphs = "ABCDEFGHJKLMNPQRSTUVWXYZabdefghkmnqrt23456789"
    out = []
    for k in range(count):
        crop = _photo_crop(images[k % len(images)], rng)
        draw = ImageDraw.Draw(crop)
        for _ in range(int(rng.integers(3, 7))):
            font = ImageFont.load_default(size=int(rng.integers(28, 72)))
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            draw.text((int(rng.integers(0, 350)), int(rng.integers(0, 350))), glyphs[int(rng.integers(len(glyphs)))],
                      font=font, fill=colour, stroke_width=2, stroke_fill=(255, 255, 255))
        out.append(np.asarray(crop, np.float32).transpose(2, 0, 1))
    return np.stack(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=["rec", "det", "ppocr_rec"])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--samples", type=int, default=64, help="recognisers: lines in the calibration set")
    parser.add_argument("--passes", default="prune,pq,distill")
    parser.add_argument("--budget", help="KEY=VALUE, e.g. macs=0.704: --budget of the rewrite")
    parser.add_argument("--options", default="{}", help="JSON {pass: {option: value}} merged over the defaults")
    args = parser.parse_args()
    budget = None
    if args.budget:
        key, value = args.budget.split("=")
        budget = {key: float(value)}
    models = fetch_extra_models(default_cache())
    if args.model == "det":
        calib, path = {"images": click_captchas(48, np.random.default_rng(0))}, models["ddddocr_det"]
    elif args.model == "ppocr_rec":
        calib, path = {"x": rec_lines(args.samples, np.random.default_rng(0))}, models["ppocr_rec"]
    else:
        calib, path = {"input1": recogniser_spans(args.samples, np.random.default_rng(0))}, models["ddddocr_rec"]
    options = {"distill": {"steps": args.steps, "batch": 4, "minutes": 8, "eval_every": 10}}
    for name, given in json.loads(args.options).items():
        options[name] = {**options.get(name, {}), **given}
    start = time.perf_counter()
    # the recogniser's [T, N, 8210] output is raw CTC logits: say so, as a user would, so that top-1 is read per step
    axes = {"387": "2:scores"} if args.model == "rec" else None
    result = rewrite(path, passes=args.passes.split(","), calib=calib, options=options, output_axes=axes,
                     budget=budget)
    for record in result.report["passes"]:
        fid = record["fidelity"]
        figures = {k: round(fid[k], 4) for k in FIGURES if isinstance(fid.get(k), float)}
        print(record["name"], "MACs", record.get("macs_after"), "bytes", record.get("bytes_after"), figures)
        for tried in record.get("tried", []):  # the gentler settings the pipeline retried it with
            print("  tried", tried["options"], "drop", round(tried["drop"], 4), "MACs", tried["macs_after"],
                  "bytes", tried["bytes_after"], "s", round(tried["seconds"]))
    fid = result.report["fidelity"]
    if "readings_same" in fid:  # greedy CTC readings of the held-out lines, as the pipeline compares them
        print(f"held-out lines read as the same string: {round(fid['readings_same'] * fid['samples'])} of "
              f"{fid['samples']}, characters edited {fid['reading_error']:.4f}")
    if budget:
        spent = result.report["budget"]
        cuts = sorted(round(v, 2) for units in spent["allocation"].values() for v in units.values())
        print("budget", spent["achieved"], "chosen", spent["chosen"], "cuts", cuts)
    print(f"minutes {(time.perf_counter() - start) / 60:.1f}")


if __name__ == "__main__":
    main()
