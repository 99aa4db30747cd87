"""The long tail of ONNX ops for the distill pass's interpreter: each a small function (attrs, *inputs) in `OPS`.

Each follows onnxruntime's CPU kernels where the ONNX spec leaves room (Resize's rounding, ties in ArgMax/TopK,
QuantizeLinear's saturation), because the interpreter is checked against onnxruntime. What cannot match it is
refused with a ModelError naming the op and the attribute.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from onnx import helper

from rewriter.errors import ModelError


def ints(t: torch.Tensor) -> list[int]:
    return [int(v) for v in t.reshape(-1).tolist()]


def text(value) -> str:
    """An ONNX string attribute (bytes) as str."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _along(v: torch.Tensor, axis: int, rank: int) -> torch.Tensor:
    """A 1-D tensor shaped to broadcast along `axis` of a rank-`rank` tensor."""
    return v.reshape([-1 if i == axis else 1 for i in range(rank)])


# --- reductions, indices, logic ---------------------------------------------------------------------------------

def _reduce_axes(attrs: dict, x: torch.Tensor, axes) -> list[int] | None:
    """Axes from the input (opset 13+ ReduceSum, 18+ the others) or the attribute; None: reduce nothing."""
    axes = ints(axes) if axes is not None else list(attrs.get("axes", []))
    if not axes:
        return None if attrs.get("noop_with_empty_axes", 0) else list(range(x.dim()))
    return sorted(a % x.dim() for a in axes)


def _reduce_with(fn: Callable) -> Callable:
    """fn(x, axes, keepdim) over the reduce op's axes."""
    def run(attrs, x, axes=None):
        dims = _reduce_axes(attrs, x, axes)
        return x if dims is None else fn(x, dims, bool(attrs.get("keepdims", 1)))
    return run


def _prod(x, dims, keep):
    for d in sorted(dims, reverse=True):
        x = x.prod(d, keepdim=keep)
    return x


def _arg(attrs, x, largest: bool):
    axis = attrs.get("axis", 0) % x.dim()
    keep = bool(attrs.get("keepdims", 1))
    fn = torch.argmax if largest else torch.argmin
    if not attrs.get("select_last_index", 0):
        return fn(x, axis, keepdim=keep)
    return x.shape[axis] - 1 - fn(x.flip(axis), axis, keepdim=keep)  # torch picks the first of ties


def _topk(attrs, x, k=None):
    k = int(k.reshape(-1)[0]) if k is not None else attrs["k"]
    out = torch.topk(x, k, dim=attrs.get("axis", -1), largest=bool(attrs.get("largest", 1)), sorted=True)
    return [out.values, out.indices]


def _cumsum(attrs, x, axis):
    axis = int(axis.reshape(-1)[0]) % x.dim()
    if attrs.get("reverse", 0):
        x = x.flip(axis)
    out = x.cumsum(axis)
    if attrs.get("exclusive", 0):
        out = out - x
    return out.flip(axis) if attrs.get("reverse", 0) else out


def _wrap(index: torch.Tensor, size) -> torch.Tensor:
    index = index.long()
    return torch.where(index < 0, index + size, index)


def _gather_elements(attrs, x, index):
    axis = attrs.get("axis", 0) % x.dim()
    return torch.gather(x, axis, _wrap(index, x.shape[axis]))


def _nd_index(x: torch.Tensor, index: torch.Tensor, first: int) -> tuple:
    """The columns of GatherND/ScatterND indices, negatives wrapped, addressing x from axis `first`."""
    return tuple(_wrap(index[..., i], x.shape[first + i]) for i in range(index.shape[-1]))


def _gather_nd(attrs, x, index):
    b = attrs.get("batch_dims", 0)
    batch = math.prod(x.shape[:b])
    flat_x = x.reshape(batch, *x.shape[b:])
    flat_i = index.reshape(batch, *index.shape[b:])
    rows = torch.arange(batch).reshape(batch, *[1] * (flat_i.dim() - 2)).expand(flat_i.shape[:-1])
    out = flat_x[(rows, *_nd_index(flat_x, flat_i, 1))]
    return out.reshape(*x.shape[:b], *index.shape[b:-1], *x.shape[b + index.shape[-1]:])


def _scatter_nd(attrs, x, index, updates):
    reduction = text(attrs.get("reduction", b"none"))
    if reduction not in ("none", "add"):
        raise ModelError(f"distill: ScatterND reduction={reduction} is not supported (none, add are)")
    return x.index_put(_nd_index(x, index, 0), updates, accumulate=reduction == "add")


_SCATTER_REDUCE = {"mul": "prod", "max": "amax", "min": "amin"}


def _scatter_elements(attrs, x, index, updates):
    axis = attrs.get("axis", 0) % x.dim()
    index = _wrap(index, x.shape[axis])
    reduction = text(attrs.get("reduction", b"none"))
    if reduction == "none":
        return torch.scatter(x, axis, index, updates)
    if reduction == "add":
        return torch.scatter_add(x, axis, index, updates)
    return torch.scatter_reduce(x, axis, index, updates, _SCATTER_REDUCE[reduction], include_self=True)


def _one_hot(attrs, index, depth, values):
    depth = int(depth.reshape(-1)[0])
    hot = F.one_hot(_wrap(index, depth), depth).bool()
    out = torch.where(hot, values[1], values[0])
    return out.movedim(-1, attrs.get("axis", -1) % out.dim())


def _trilu(attrs, x, k=None):
    k = int(k.reshape(-1)[0]) if k is not None else 0
    return torch.triu(x, k) if attrs.get("upper", 1) else torch.tril(x, k)


def _eye_like(attrs, x):
    rows, cols = x.shape
    eye = torch.arange(cols)[None, :] - torch.arange(rows)[:, None] == attrs.get("k", 0)
    dtype = torch_dtype(attrs["dtype"]) if "dtype" in attrs else x.dtype
    return eye.to(dtype)


def torch_dtype(onnx_type: int) -> torch.dtype:
    return torch.from_numpy(np.zeros(0, dtype=helper.tensor_dtype_to_np_dtype(onnx_type))).dtype


def _nms(attrs, boxes, scores, max_out=None, iou=None, threshold=None):
    """Greedy per (batch, class) as onnxruntime: scores above the threshold, best first (ties: lower index),
    dropping boxes whose IoU with a kept one exceeds the threshold. Indices carry no gradient."""
    limit = int(max_out.reshape(-1)[0]) if max_out is not None and max_out.numel() else 0
    iou_max = float(iou.reshape(-1)[0]) if iou is not None and iou.numel() else 0.0
    floor = float(threshold.reshape(-1)[0]) if threshold is not None and threshold.numel() else -math.inf
    corners = _corners(boxes.detach().float().numpy(), attrs.get("center_point_box", 0))
    picked = []
    for b, klass in np.ndindex(*scores.shape[:2]):
        s = scores[b, klass].detach().float().numpy()
        order = [i for i in np.argsort(-s, kind="stable") if s[i] > floor]
        for i in _greedy(corners[b], order, iou_max, limit):
            picked.append([b, klass, i])
    return torch.tensor(picked, dtype=torch.int64).reshape(-1, 3)


def _corners(boxes: np.ndarray, center: int) -> np.ndarray:
    """[..., 4] as (y1, x1, y2, x2) with y1 <= y2, x1 <= x2."""
    if center:
        xc, yc, w, h = np.moveaxis(boxes, -1, 0)
        return np.stack([yc - h / 2, xc - w / 2, yc + h / 2, xc + w / 2], -1)
    y1, x1, y2, x2 = np.moveaxis(boxes, -1, 0)
    return np.stack([np.minimum(y1, y2), np.minimum(x1, x2), np.maximum(y1, y2), np.maximum(x1, x2)], -1)


def _greedy(corners: np.ndarray, order: list[int], iou_max: float, limit: int) -> list[int]:
    area = (corners[:, 2] - corners[:, 0]) * (corners[:, 3] - corners[:, 1])
    kept: list[int] = []
    for i in order:
        if len(kept) == limit:
            break
        if kept:
            k = np.array(kept)
            lo = np.maximum(corners[k, :2], corners[i, :2])
            hi = np.minimum(corners[k, 2:], corners[i, 2:])
            inter = np.prod(np.clip(hi - lo, 0, None), -1)
            union = area[k] + area[i] - inter
            overlap = np.where((area[k] > 0) & (area[i] > 0) & (union > 0), inter / np.where(union > 0, union, 1), 0)
            if (overlap > iou_max).any():
                continue
        kept.append(i)
    return kept


# --- activations and normalisations --------------------------------------------------------------------------

def _selu(attrs, x):
    alpha, gamma = attrs.get("alpha", 1.67326319217681884765625), attrs.get("gamma", 1.05070102214813232421875)
    return gamma * torch.where(x > 0, x, alpha * torch.expm1(x))


def _celu(attrs, x):
    alpha = attrs.get("alpha", 1.0)
    return F.relu(x) + torch.clamp(alpha * torch.expm1(x / alpha), max=0.0)


def _shrink(attrs, x):
    bias, lambd = attrs.get("bias", 0.0), attrs.get("lambd", 0.5)
    return torch.where(x < -lambd, x + bias, torch.where(x > lambd, x - bias, torch.zeros_like(x)))


def _instance_norm(attrs, x, scale, bias):
    return F.instance_norm(x, weight=scale, bias=bias, eps=attrs.get("epsilon", 1e-5))


def _group_norm(attrs, x, scale, bias):
    groups, channels = attrs["num_groups"], x.shape[1]
    if scale.numel() == groups != channels:  # opset 18: one scale and bias per group
        scale, bias = (v.repeat_interleave(channels // groups) for v in (scale, bias))
    return F.group_norm(x, groups, scale, bias, attrs.get("epsilon", 1e-5))


def _lrn(attrs, x):
    """x / (bias + alpha / size * sum of squares over the channel window)^beta, ONNX's uneven window."""
    size = attrs["size"]
    before, after = (size - 1) // 2, size - 1 - (size - 1) // 2
    squares = F.pad(x.square(), [0, 0] * (x.dim() - 2) + [before, after])
    window = sum(squares[:, i:i + x.shape[1]] for i in range(size))
    return x / (attrs.get("bias", 1.0) + attrs.get("alpha", 1e-4) / size * window) ** attrs.get("beta", 0.75)


def _lp_normalization(attrs, x):
    p = attrs.get("p", 2)
    return x / x.abs().pow(p).sum(attrs.get("axis", -1), keepdim=True).pow(1.0 / p)


def _mean_variance_normalization(attrs, x):
    """ONNX's function body: (x - E[x]) / (sqrt(E[x^2] - E[x]^2) + 1e-9) over `axes` (default N, H, W)."""
    axes = [a % x.dim() for a in attrs.get("axes", [0, 2, 3])]
    mean = x.mean(axes, keepdim=True)
    variance = x.square().mean(axes, keepdim=True) - mean.square()
    return (x - mean) / (variance.sqrt() + 1e-9)


def _global_lp_pool(attrs, x):
    p = attrs.get("p", 2)
    return x.abs().pow(p).sum(tuple(range(2, x.dim())), keepdim=True).pow(1.0 / p)


def _hardmax(attrs, x, *, opset: int):
    """One-hot of the first largest value along `axis` (before opset 13: of the input flattened from `axis` on)."""
    axis = attrs.get("axis", -1 if opset >= 13 else 1) % x.dim()
    flat = x if opset >= 13 else x.reshape(*x.shape[:axis], -1)
    along = axis if opset >= 13 else flat.dim() - 1
    hard = F.one_hot(flat.argmax(along), flat.shape[along]).movedim(-1, along).to(x.dtype)
    return hard.reshape(x.shape)


def _grid_sample(attrs, x, grid):
    mode = text(attrs.get("mode", "bilinear"))
    mode = {"linear": "bilinear", "cubic": "bicubic"}.get(mode, mode)  # opset 20's names
    if x.dim() != 4 and mode == "bicubic":
        raise ModelError("distill: GridSample with cubic mode over other than 2-D images is not supported")
    return F.grid_sample(x, grid, mode=mode, padding_mode=text(attrs.get("padding_mode", "zeros")),
                         align_corners=bool(attrs.get("align_corners", 0)))


def _depth_to_space(attrs, x):
    n, c, h, w = x.shape
    bs = attrs["blocksize"]
    if text(attrs.get("mode", b"DCR")) == "CRD":
        x = x.reshape(n, c // bs ** 2, bs, bs, h, w).permute(0, 1, 4, 2, 5, 3)
    else:
        x = x.reshape(n, bs, bs, c // bs ** 2, h, w).permute(0, 3, 4, 1, 5, 2)
    return x.reshape(n, c // bs ** 2, h * bs, w * bs)


def _space_to_depth(attrs, x):
    n, c, h, w = x.shape
    bs = attrs["blocksize"]
    x = x.reshape(n, c, h // bs, bs, w // bs, bs).permute(0, 3, 5, 1, 2, 4)
    return x.reshape(n, c * bs * bs, h // bs, w // bs)


# --- Resize and Upsample, axis by axis as onnxruntime computes them (float32 coordinates) -----------------------

def _source(coord: str, out_len: int, in_len: int, scale: float) -> torch.Tensor:
    """The input coordinate of every output position along one axis."""
    d = torch.arange(out_len, dtype=torch.float32)
    if coord == "half_pixel":
        return (d + 0.5) / scale - 0.5
    if coord == "pytorch_half_pixel":
        return (d + 0.5) / scale - 0.5 if out_len > 1 else torch.zeros(out_len)
    if coord == "align_corners":
        return d * (in_len - 1) / (out_len - 1) if out_len > 1 else torch.zeros(out_len)
    if coord == "asymmetric":
        return d / scale
    if coord == "half_pixel_symmetric":  # onnxruntime: a float32 offset, the rest in double
        f32 = np.float32
        offset = f32(in_len) / f32(2) * (f32(1) - f32(out_len) / (f32(scale) * f32(in_len)))
        return (float(offset) + (d.double() + 0.5) / scale - 0.5).float()
    raise ModelError(f"distill: Resize coordinate_transformation_mode={coord} is not supported")


def _nearest(src: torch.Tensor, mode: str, in_len: int, scale: float) -> torch.Tensor:
    half = src == src.floor() + 0.5
    if mode == "round_prefer_floor":
        index = torch.where(half, src.floor(), src.round())
    elif mode == "round_prefer_ceil":
        index = torch.where(half, src.ceil(), src.round())
    elif mode == "floor":
        index = src.floor()
    elif mode == "ceil":
        index = src.ceil()
    else:  # opset < 11 Resize and Upsample: ceil when shrinking, truncate when growing
        index = src.ceil() if scale < 1 else src.trunc()
    return index.long().clamp(0, in_len - 1)


def _cubic_weights(ratio: torch.Tensor, a: float) -> list[torch.Tensor]:
    def near(t):
        return ((a + 2) * t - (a + 3)) * t * t + 1

    def far(t):
        return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return [far(ratio + 1), near(ratio), near(1 - ratio), far(2 - ratio)]


def _resize_axis(x, axis, out_len, scale, opts) -> torch.Tensor:
    in_len = x.shape[axis]
    src = _source(opts["coord"], out_len, in_len, scale)
    if opts["mode"] == "nearest":
        return x.index_select(axis, _nearest(src, opts["nearest"], in_len, scale))
    if opts["mode"] == "linear":
        src = src.clamp(0, in_len - 1)
        lo = src.floor().long()
        hi = (lo + 1).clamp(max=in_len - 1)
        w = _along((src - lo).to(x.dtype), axis, x.dim())
        return x.index_select(axis, lo) * (1 - w) + x.index_select(axis, hi) * w
    base = src.floor()
    taps = [(base + k).long() for k in (-1, 0, 1, 2)]
    weights = _cubic_weights(src - base, opts["cubic_a"])
    if opts["exclude_outside"]:
        weights = [torch.where((t >= 0) & (t < in_len), w, 0.0) for t, w in zip(taps, weights, strict=True)]
        total = sum(weights)
        weights = [w / total for w in weights]
    return sum(x.index_select(axis, t.clamp(0, in_len - 1)) * _along(w.to(x.dtype), axis, x.dim())
               for t, w in zip(taps, weights, strict=True))


def _interpolate(x, scales: list[float] | None, sizes: list[int] | None, opts: dict) -> torch.Tensor:
    for axis in range(x.dim()):
        if sizes is not None:
            out_len, scale = sizes[axis], sizes[axis] / x.shape[axis]
        else:
            scale = scales[axis]
            out_len = int(np.float32(x.shape[axis]) * np.float32(scale))
        if out_len != x.shape[axis] or scale != 1.0:
            x = _resize_axis(x, axis, out_len, float(np.float32(scale)), opts)
    return x


def _resize_options(attrs: dict, opset: int) -> dict:
    mode = text(attrs.get("mode", b"nearest"))
    if mode not in ("nearest", "linear", "cubic"):
        raise ModelError(f"distill: Resize mode={mode} is not supported")
    if attrs.get("antialias", 0) or text(attrs.get("keep_aspect_ratio_policy", b"stretch")) != "stretch":
        raise ModelError("distill: Resize with antialias or keep_aspect_ratio_policy is not supported")
    old = opset < 11
    return {"mode": mode, "cubic_a": attrs.get("cubic_coeff_a", -0.75),
            "exclude_outside": attrs.get("exclude_outside", 0),
            "coord": "asymmetric" if old else text(attrs.get("coordinate_transformation_mode", b"half_pixel")),
            "nearest": "simple" if old else text(attrs.get("nearest_mode", b"round_prefer_floor"))}


def _full(values: list, axes, rank: int, fill) -> list:
    """Per-axis values given for `axes` only (opset 18's axes attribute) -> one per axis."""
    if axes is None:
        return values
    out = [fill] * rank
    for axis, v in zip(axes, values, strict=True):
        out[axis % rank] = v
    return out


def resize(attrs, x, roi=None, scales=None, sizes=None, *, opset: int):
    if opset < 11:  # Resize-10: (X, scales)
        return _interpolate(x, roi.tolist(), None, _resize_options(attrs, opset))
    opts = _resize_options(attrs, opset)
    axes = attrs.get("axes")
    if sizes is not None and sizes.numel():
        full = _full(ints(sizes), axes, x.dim(), None)
        return _interpolate(x, None, [x.shape[i] if s is None else s for i, s in enumerate(full)], opts)
    return _interpolate(x, _full(scales.tolist(), axes, x.dim(), 1.0), None, opts)


def upsample(attrs, x, scales=None, *, opset: int):
    values = scales.tolist() if scales is not None else list(attrs["scales"])
    return _interpolate(x, values, None, _resize_options(attrs, 10))


# --- quantisation (QDQ) --------------------------------------------------------------------------------------------

_QRANGE = {torch.uint8: (0, 255), torch.int8: (-128, 127), torch.uint16: (0, 65535), torch.int16: (-32768, 32767)}


def _per_axis(attrs, x, scale, opset: int):
    if attrs.get("block_size", 0):
        raise ModelError("distill: blocked quantisation (block_size) is not supported")
    if scale.dim() == 0 or scale.numel() == 1 or opset < 13:
        return scale.reshape(())
    return _along(scale, attrs.get("axis", 1) % x.dim(), x.dim())


def dequantize(attrs, x, scale, zero=None, *, opset: int):
    """(x - zero) * scale; x may be the float-carried integers of a QuantizeLinear."""
    centred = x.to(scale.dtype)
    if zero is not None:
        centred = centred - _per_axis(attrs, x, zero, opset).to(scale.dtype)
    return centred * _per_axis(attrs, x, scale, opset)


def quantize(attrs, x, scale, zero=None, *, opset: int):
    """saturate(round_half_even(x / scale) + zero), its integers carried in x's float dtype so that gradients pass
    (straight through the rounding) to the DequantizeLinear that reads them, as in every QDQ pair."""
    dtype = zero.dtype if zero is not None else torch_dtype(attrs["output_dtype"]) if "output_dtype" in attrs \
        else torch.uint8
    if dtype not in _QRANGE:
        raise ModelError(f"distill: QuantizeLinear to {dtype} is not supported (8- and 16-bit integers are)")
    q = x / _per_axis(attrs, x, scale, opset)
    q = q + (torch.round(q) - q).detach()
    if zero is not None:
        q = q + _per_axis(attrs, x, zero, opset).to(q.dtype)
    return q.clamp(*_QRANGE[dtype])


# --- the table ----------------------------------------------------------------------------------------------------

def unary(fn: Callable) -> Callable:
    return lambda attrs, x: fn(x)


def binary(fn: Callable) -> Callable:
    return lambda attrs, a, b: fn(a, b)


def _sum_sq(x, dims, keep):
    return x.square().sum(dims, keepdim=keep)


OPS: dict[str, Callable] = {
    "ReduceMean": _reduce_with(lambda x, d, k: x.mean(d, keepdim=k)),
    "ReduceSum": _reduce_with(lambda x, d, k: x.sum(d, keepdim=k)),
    "ReduceMax": _reduce_with(lambda x, d, k: x.amax(d, keepdim=k)),
    "ReduceMin": _reduce_with(lambda x, d, k: x.amin(d, keepdim=k)),
    "ReduceProd": _reduce_with(_prod),
    "ReduceL1": _reduce_with(lambda x, d, k: x.abs().sum(d, keepdim=k)),
    "ReduceL2": _reduce_with(lambda x, d, k: _sum_sq(x, d, k).sqrt()),
    "ReduceSumSquare": _reduce_with(_sum_sq),
    "ReduceLogSum": _reduce_with(lambda x, d, k: x.sum(d, keepdim=k).log()),
    "ReduceLogSumExp": _reduce_with(lambda x, d, k: torch.logsumexp(x, d, keepdim=k)),
    "ArgMax": lambda attrs, x: _arg(attrs, x, True), "ArgMin": lambda attrs, x: _arg(attrs, x, False),
    "TopK": _topk, "CumSum": _cumsum, "GatherElements": _gather_elements, "GatherND": _gather_nd,
    "ScatterND": _scatter_nd, "ScatterElements": _scatter_elements, "Scatter": _scatter_elements,
    "OneHot": _one_hot, "Trilu": _trilu, "EyeLike": _eye_like, "NonMaxSuppression": _nms,
    "NonZero": unary(lambda x: torch.nonzero(x).t()),
    "Size": unary(lambda x: torch.tensor(x.numel(), dtype=torch.int64)),
    "Mean": lambda attrs, *xs: sum(xs) / len(xs),
    "Einsum": lambda attrs, *xs: torch.einsum(text(attrs["equation"]).replace(" ", ""), *xs),
    "CastLike": lambda attrs, x, like: x.to(like.dtype),
    "Not": unary(torch.logical_not), "And": binary(torch.logical_and), "Or": binary(torch.logical_or),
    "Xor": binary(torch.logical_xor), "GreaterOrEqual": binary(torch.ge), "LessOrEqual": binary(torch.le),
    "BitwiseNot": unary(torch.bitwise_not), "BitwiseAnd": binary(torch.bitwise_and),
    "BitwiseOr": binary(torch.bitwise_or), "BitwiseXor": binary(torch.bitwise_xor),
    "Sign": unary(lambda x: torch.where(x.isnan(), x, x.sign())),  # torch's sign of NaN is 0
    "Round": unary(torch.round), "IsNaN": unary(torch.isnan),
    "IsInf": lambda attrs, x: (torch.isposinf(x) & bool(attrs.get("detect_positive", 1)))
    | (torch.isneginf(x) & bool(attrs.get("detect_negative", 1))),
    "Sin": unary(torch.sin), "Cos": unary(torch.cos), "Tan": unary(torch.tan), "Asin": unary(torch.asin),
    "Acos": unary(torch.acos), "Atan": unary(torch.atan), "Sinh": unary(torch.sinh), "Cosh": unary(torch.cosh),
    "Asinh": unary(torch.asinh), "Atanh": unary(torch.atanh),
    "Softsign": unary(F.softsign), "Selu": _selu, "Celu": _celu, "Mish": unary(F.mish), "Shrink": _shrink,
    "ThresholdedRelu": lambda attrs, x: torch.where(x > attrs.get("alpha", 1.0), x, torch.zeros_like(x)),
    "InstanceNormalization": _instance_norm, "GroupNormalization": _group_norm, "LRN": _lrn,
    "DepthToSpace": _depth_to_space, "SpaceToDepth": _space_to_depth, "LpNormalization": _lp_normalization,
    "MeanVarianceNormalization": _mean_variance_normalization, "GlobalLpPool": _global_lp_pool,
    "GridSample": _grid_sample,
}
# Ops that read the model's opset (keyword `opset`).
OPSET_OPS: dict[str, Callable] = {"Resize": resize, "Upsample": upsample, "QuantizeLinear": quantize,
                                  "DequantizeLinear": dequantize, "Hardmax": _hardmax}
