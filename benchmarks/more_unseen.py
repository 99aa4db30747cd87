"""The README's check of `--passes prune,pq,distill` at the defaults on more exporters and kinds of model
(`fetch_more_models`): PaddlePaddle's text-orientation classifier and PicoDet layout detector, and openwakeword
0.4.0's PyTorch log-mel front end, tf2onnx embedding network and If-gated wake-word MLP. Prints one markdown row
per model: MACs and file against the original, the pipeline's held-out drop, the settings the retries kept.

    python benchmarks/more_unseen.py                       # the four quick ones (about 15 minutes on 2 cores)
    python benchmarks/more_unseen.py --models layout       # the 800 x 608 detector (about an hour: pq is slow there)

Calibration: the classifier and the detector get crops of scikit-image's photographs and scanned pages (the
classifier's turned by 0/90/180/270 degrees); the audio models get synthetic voiced sounds (a gliding pitch with
harmonics, on and off, with noise), run through the original log-mel model as openwakeword feeds its networks.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time

import numpy as np
from common import table
from fetch_real_models import _skimage_image, default_cache, fetch_more_models, load_images  # noqa: E402

from rewriter import rewrite  # noqa: E402

IMAGENET = (np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225]))
RATE = 16000
FRAMES, HOP = 76, 8  # openwakeword: 76 log-mel frames per embedding, a new embedding every 8 frames
QUICK = ["orientation", "oww_melspectrogram", "oww_embedding", "oww_hey_jarvis"]


def _crops(count: int, width: int, height: int, pool: list, rng: np.random.Generator, turn: bool) -> np.ndarray:
    """Random crops (half to all of each side) resized to width x height, ImageNet-normalised NCHW."""
    out = []
    for k in range(count):
        image = pool[k % len(pool)].convert("RGB")
        w, h = image.size
        cw, ch = int(w * rng.uniform(0.5, 1)), int(h * rng.uniform(0.5, 1))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = image.crop((x, y, x + cw, y + ch))
        if turn and k % 4:
            crop = crop.rotate(90 * (k % 4), expand=True)
        pixels = np.asarray(crop.resize((width, height)), np.float32) / 255.0
        out.append(((pixels - IMAGENET[0]) / IMAGENET[1]).transpose(2, 0, 1))
    return np.stack(out).astype(np.float32)


def _voiced(seconds: float, rng: np.random.Generator) -> np.ndarray:
    """A gliding pitch with 19 harmonics, switched on and off, plus noise, at 16-bit scale."""
    t = np.arange(int(RATE * seconds)) / RATE
    pitch = rng.uniform(90, 250) * (1 + 0.1 * np.sin(2 * np.pi * rng.uniform(1, 4) * t))
    phase = 2 * np.pi * np.cumsum(pitch) / RATE
    envelope = np.clip(np.sin(2 * np.pi * rng.uniform(1, 5) * t + rng.uniform(0, 6)), 0, None)
    x = sum(np.sin(k * phase) / k * rng.uniform(0.2, 1) for k in range(1, 20)) * envelope
    x = x + rng.normal(0, rng.uniform(0.01, 0.2), len(t))
    return (x / np.abs(x).max() * rng.uniform(3000, 20000)).astype(np.float32)


def _log_mel(session, audio: np.ndarray) -> np.ndarray:
    """[frames, 32] as openwakeword scales the log-mel model's output for its networks."""
    return np.squeeze(session.run(None, {"input": audio[None]})[0]) / 10 + 2


def calibration(name: str, models: dict, count: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    if name in ("orientation", "layout"):
        pages = [_skimage_image("page.png"), _skimage_image("text.png")]
        if name == "orientation":
            return {"x": _crops(count, 224, 224, load_images() + pages * 4, rng, turn=True)}
        return {"image": _crops(count, 608, 800, pages * 6 + load_images(), rng, turn=False)}
    if name == "oww_melspectrogram":
        return {"input": np.stack([_voiced(1.0, rng) for _ in range(count)])}
    mel = ort.InferenceSession(str(models["oww_melspectrogram"]), providers=["CPUExecutionProvider"])
    if name == "oww_embedding":
        windows = []
        for _ in range(count):
            frames = _log_mel(mel, _voiced(2.0, rng))
            start = int(rng.integers(0, len(frames) - FRAMES))
            windows.append(frames[start: start + FRAMES, :, None])
        return {"input_1": np.stack(windows).astype(np.float32)}
    embed = ort.InferenceSession(str(models["oww_embedding"]), providers=["CPUExecutionProvider"])
    features = []
    for _ in range(count):  # 16 consecutive embeddings of 3 s of sound
        frames = _log_mel(mel, _voiced(3.0, rng))
        windows = np.stack([frames[j: j + FRAMES, :, None] for j in range(0, 16 * HOP, HOP)]).astype(np.float32)
        features.append(embed.run(None, {"input_1": windows})[0].reshape(16, 96))
    return {"x.1": np.stack(features).astype(np.float32)}


def _kept(report: dict) -> str:
    """The strength each compressing pass ended at, and whether distill's values were kept."""
    parts = []
    for record in report["passes"]:
        options = record["options"]
        if record["name"] in ("prune", "pq"):
            parts.append(f"{record['name']} {options['max_error']:g}" + (f"/{options['ratio']:g}"
                                                                         if record["name"] == "prune" else ""))
        elif record["name"] == "distill":
            parts.append("distill " + ("rolled back" if record.get("not_kept") or record["notes"].get("kept")
                                       else "kept"))
    return ", ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(QUICK), help=f"comma-separated, of {QUICK + ['layout']}")
    parser.add_argument("--samples", type=int, default=64, help="calibration samples (a quarter held out)")
    args = parser.parse_args()
    with contextlib.redirect_stdout(sys.stderr):
        models = fetch_more_models(default_cache())
    rows = []
    for name in args.models.split(","):
        calib = calibration(name, models, 48 if name == "layout" else args.samples, np.random.default_rng(0))
        start = time.perf_counter()
        result = rewrite(models[name], passes=["prune", "pq", "distill"], calib=calib)
        report = result.report
        rows.append([name, f"{report['output']['macs'] / report['input']['macs']:.3f}",
                     f"/{report['input']['bytes'] / report['output']['bytes']:.1f}",
                     f"{report['fidelity']['drop']:.4f}", _kept(report),
                     f"{(time.perf_counter() - start) / 60:.1f}"])
        print(f"{name}: done", file=sys.stderr, flush=True)
    print(table(["model", "MACs", "file", "held-out drop", "settings kept", "minutes"], rows))


if __name__ == "__main__":
    main()
