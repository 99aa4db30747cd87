"""Regenerate the bundled sample models (trained on scikit-learn's digits) and their calibration set.

    pip install torch==2.13.0 && python samples/make_samples.py

Writes, next to this file: digits_vgg.onnx, digits_resnet.onnx, digits_mobilenet.onnx,
digits_mlp.onnx (input ``input`` [N,1,8,8] float32 in [0,1], output ``logits`` [N,10], opset 17)
and digits_calib.npz (held-out digits: ``input`` float32 [n,1,8,8], ``labels`` int64 [n]).
Deterministic: fixed seeds, one thread, deterministic torch algorithms.
"""

from __future__ import annotations

import random
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

HERE = Path(__file__).resolve().parent
SEED = 0
N_HELD_OUT = 600
OPSET = 17


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]


class VGG(nn.Module):
    """Plain Conv-BN-ReLU stack, two max-pools, flatten, Gemm classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *conv_bn(1, 16), nn.ReLU(), *conv_bn(16, 32), nn.ReLU(), nn.MaxPool2d(2),  # 4x4
            *conv_bn(32, 64), nn.ReLU(), *conv_bn(64, 64), nn.ReLU(), nn.MaxPool2d(2),  # 2x2
        )
        self.classifier = nn.Linear(64 * 2 * 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class BasicBlock(nn.Module):
    """conv-bn-relu-conv-bn + shortcut (identity, or 1x1 conv + bn when strided/widened), relu."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(*conv_bn(cin, cout, 3, stride), nn.ReLU(), *conv_bn(cout, cout))
        self.shortcut: nn.Module = (
            nn.Sequential(*conv_bn(cin, cout, 1, stride)) if stride != 1 or cin != cout else nn.Identity()
        )
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(1, 32), nn.ReLU())
        self.blocks = nn.Sequential(BasicBlock(32, 32), BasicBlock(32, 64, stride=2), BasicBlock(64, 64))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, r: int = 4) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(c, c // r, 1)
        self.relu = nn.ReLU()
        self.expand = nn.Conv2d(c // r, c, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.expand(self.relu(self.reduce(self.pool(x)))))


class InvertedResidual(nn.Module):
    """1x1 expand, depthwise 3x3, squeeze-excite, hard-swish, 1x1 project, residual when shapes allow."""

    def __init__(self, cin: int, cout: int, expand: int, stride: int = 1) -> None:
        super().__init__()
        mid = cin * expand
        self.residual = stride == 1 and cin == cout
        self.body = nn.Sequential(
            *conv_bn(cin, mid, 1), nn.Hardswish(),
            *conv_bn(mid, mid, 3, stride, groups=mid), nn.Hardswish(),
            SqueezeExcite(mid),
            *conv_bn(mid, cout, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y


class MobileNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *conv_bn(1, 16), nn.Hardswish(),
            InvertedResidual(16, 16, 4),
            InvertedResidual(16, 24, 4, stride=2),  # 4x4
            InvertedResidual(24, 24, 4),
            *conv_bn(24, 128, 1), nn.Hardswish(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def load_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=N_HELD_OUT, stratify=y, random_state=SEED)
    return x_tr, y_tr, np.ascontiguousarray(x_te), y_te


def random_shift(x: np.ndarray, rng: np.random.Generator, max_shift: int = 1) -> np.ndarray:
    """Shift each image by up to ``max_shift`` pixels in each direction (zero fill)."""
    n, _, h, w = x.shape
    m = max_shift
    padded = np.pad(x, ((0, 0), (0, 0), (m, m), (m, m)))
    dy = rng.integers(0, 2 * m + 1, n)
    dx = rng.integers(0, 2 * m + 1, n)
    out = np.empty_like(x)
    for oy in range(2 * m + 1):
        for ox in range(2 * m + 1):
            sel = (dy == oy) & (dx == ox)
            out[sel] = padded[sel, :, oy:oy + h, ox:ox + w]
    return out


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, lr: float, seed: int) -> nn.Module:
    seed_everything(seed)
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = (len(x) + 63) // 64
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.05)
    model.train()
    for _ in range(epochs):
        order = rng.permutation(len(x))
        xa = random_shift(x[order], rng)
        ya = y[order]
        for i in range(0, len(x), 64):
            xb, yb = torch.from_numpy(xa[i:i + 64]), torch.from_numpy(ya[i:i + 64])
            opt.zero_grad()
            loss_fn(model(xb), yb).backward()
            opt.step()
            sched.step()
    return model.eval()


def export(model: nn.Module, path: Path, keep_bn: bool) -> onnx.ModelProto:
    """Export with the TorchScript exporter; ``keep_bn`` stops the eval-mode Conv+BN folding."""
    model.eval()
    dummy = torch.zeros(2, 1, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (dummy,), str(path), dynamo=False, opset_version=OPSET,
            input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
            training=torch.onnx.TrainingMode.PRESERVE if keep_bn else torch.onnx.TrainingMode.EVAL,
            do_constant_folding=True,
        )
    m = onnx.load(str(path))
    untie_initializers(m)
    m.doc_string = ""
    m.graph.doc_string = ""
    for node in m.graph.node:
        node.doc_string = ""
    del m.metadata_props[:]
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, str(path))
    return m


def untie_initializers(m: onnx.ModelProto) -> None:
    """The exporter shares equal-valued initializers through Identity nodes: give each its own copy."""
    inits = {t.name: t for t in m.graph.initializer}
    for node in [n for n in m.graph.node if n.op_type == "Identity" and n.input[0] in inits]:
        copy = onnx.TensorProto()
        copy.CopyFrom(inits[node.input[0]])
        copy.name = node.output[0]
        m.graph.initializer.append(copy)
        m.graph.node.remove(node)


def onnx_logits(path: Path, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(["logits"], {"input": x})[0])


def summary(m: onnx.ModelProto) -> tuple[int, dict[str, int]]:
    params = sum(int(np.prod(t.dims)) for t in m.graph.initializer)
    ops: dict[str, int] = {}
    for node in m.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return params, ops


SPECS: list[tuple[str, Callable[[], nn.Module], int, float, bool]] = [
    # name, constructor, epochs, max lr, keep BatchNormalization unfused in the graph
    ("vgg", VGG, 60, 3e-3, True),
    ("resnet", ResNet, 60, 3e-3, True),
    ("mobilenet", MobileNet, 80, 5e-3, False),
    ("mlp", MLP, 80, 2e-3, False),
]


def main() -> int:
    t0 = time.perf_counter()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    x_tr, y_tr, x_cal, y_cal = load_data()
    np.savez(HERE / "digits_calib.npz", input=x_cal.astype(np.float32), labels=y_cal.astype(np.int64))
    print(f"calibration set: {len(y_cal)} held-out digits, train: {len(y_tr)}")
    rows = []
    for i, (name, ctor, epochs, lr, keep_bn) in enumerate(SPECS):
        t = time.perf_counter()
        seed_everything(SEED + i)
        model = train(ctor(), x_tr, y_tr, epochs, lr, SEED + i)
        path = HERE / f"digits_{name}.onnx"
        m = export(model, path, keep_bn)
        logits = onnx_logits(path, x_cal)
        with torch.no_grad():
            ref = model(torch.from_numpy(x_cal)).numpy()
        err = float(np.abs(logits - ref).max())
        if err > 1e-3:
            raise SystemExit(f"{name}: onnxruntime output differs from torch eval output (max |diff| {err:.2e})")
        acc = float((logits.argmax(1) == y_cal).mean())
        params, ops = summary(m)
        if keep_bn and not ops.get("BatchNormalization"):
            raise SystemExit(f"{name}: BatchNormalization was folded away by the exporter")
        rows.append((name, acc, params, path.stat().st_size))
        print(f"{name:10s} onnx acc {acc:.4f}  params {params:7d}  {path.stat().st_size / 1024:6.1f} KiB  "
              f"|ort-torch| {err:.1e}  {time.perf_counter() - t:5.1f}s")
        print(f"           ops {dict(sorted(ops.items()))}")
    print(f"total {time.perf_counter() - t0:.1f}s")
    return 0 if all(acc >= 0.97 for _, acc, _, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
