"""The README's sample table: accuracy on the held-out digits, params, MACs and size of each sample."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from common import SAMPLE_NAMES, SAMPLES, table

from rewriter.canonical import canonicalize
from rewriter.loading import load_model
from rewriter.metrics import count_macs, count_params


def main() -> None:
    data = np.load(SAMPLES / "digits_calib.npz")
    rows = []
    for name in SAMPLE_NAMES:
        path = SAMPLES / f"{name}.onnx"
        model = load_model(path)
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        accuracy = (sess.run(None, {"input": data["input"]})[0].argmax(1) == data["labels"]).mean()
        macs = count_macs(canonicalize(model, {"input": [1, 1, 8, 8]}))
        rows.append([f"`{name}.onnx`", f"{accuracy:.2%}", f"{count_params(model):,}", f"{macs:,}",
                     f"{path.stat().st_size / 1024:.0f} KiB"])
    print(f"Accuracy on the {len(data['labels'])} held-out digits of `samples/digits_calib.npz` (onnxruntime):\n")
    print(table(["model", "accuracy", "params", "MACs", "file"], rows))


if __name__ == "__main__":
    main()
