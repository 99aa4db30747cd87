"""A differentiable PyTorch interpreter of an ONNX graph, node for node, for the distill pass.

Float initializers become `torch.nn.Parameter`s keyed by their ONNX names, so training changes exactly the
values the ONNX file holds and `write_back` puts them into the same initializers (same names, shapes, dtypes).
Integer initializers (PQ codes, packed sign bits, shapes) stay constant tensors. Each op is a small function
in `_OPS` (the long tail in _torch_ops.py, LSTM/GRU/RNN in _torch_recurrent.py, If/Loop/Scan in
_torch_control.py); an op that is not there is a one-line ModelError naming it (and why, for the ops refused on
purpose).

Graphs arrive canonicalised to batch 1; `forward` also runs batches of B samples: a Reshape whose constant
target starts with the batch's 1 gets B there. Whether that reading is right for a given graph is checked by
the caller (batched outputs against per-sample ones), never assumed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from functools import partial

import numpy as np
import onnx
import torch
import torch.nn.functional as F  # noqa: N812
from onnx import helper, numpy_helper

from rewriter.errors import ModelError
from rewriter.graph import all_nodes, attributes, subgraphs

from ._torch_control import CONTROL_FLOW, Body, bodies
from ._torch_ops import OPS, OPSET_OPS, binary, torch_dtype, unary
from ._torch_ops import ints as _ints
from ._torch_recurrent import recurrent

FLOAT_DTYPES = (np.float16, np.float32, np.float64)
# Inputs that configure an op rather than carry learnable values: never trained even when float.
# A QDQ model's scales and zero points are configuration too, weights' included: the integer kernels that
# onnxruntime and TVM fuse QDQ into take the int32 bias's scale to be input scale x weight scale, which training
# one scale alone would break. What trains in a QDQ model are its float tensors outside quantisation (norms,
# layers left in float); its integer weights are constants like every integer initializer.
_CONFIG_INPUTS = {"Resize": {1, 2}, "Clip": {1, 2}, "Pad": {1, 2}, "BatchNormalization": {3, 4},
                  "Upsample": {1}, "ConstantOfShape": {0}, "Range": {0, 1, 2}, "Expand": {1}, "Tile": {1},
                  "QuantizeLinear": {1, 2}, "DequantizeLinear": {1, 2}}


def _pads_nd(pads: Sequence[int], rank: int) -> list[int]:
    """ONNX pads (begins..., ends...) -> F.pad order (last axis first: begin, end)."""
    out = []
    for axis in reversed(range(rank)):
        out += [pads[axis], pads[axis + rank]]
    return out


def _auto_pads(attrs: dict, x: torch.Tensor, kernel: Sequence[int], strides: Sequence[int],
               dilations: Sequence[int]) -> list[int]:
    rank = len(kernel)
    mode = attrs.get("auto_pad", b"NOTSET")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode in ("NOTSET", ""):
        return list(attrs.get("pads", [0] * 2 * rank))
    if mode == "VALID":
        return [0] * 2 * rank
    begins, ends = [], []
    for i in range(rank):
        size = x.shape[2 + i]
        out = math.ceil(size / strides[i])
        total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size)
        small, large = total // 2, total - total // 2
        begins.append(large if mode == "SAME_LOWER" else small)
        ends.append(small if mode == "SAME_LOWER" else large)
    return begins + ends


def _conv(attrs, x, w, b=None):
    rank = w.dim() - 2
    strides = attrs.get("strides", [1] * rank)
    dilations = attrs.get("dilations", [1] * rank)
    pads = _auto_pads(attrs, x, w.shape[2:], strides, dilations)
    conv = (F.conv1d, F.conv2d, F.conv3d)[rank - 1]
    if pads[:rank] == pads[rank:]:
        return conv(x, w, b, strides, pads[:rank], dilations, attrs.get("group", 1))
    return conv(F.pad(x, _pads_nd(pads, rank)), w, b, strides, 0, dilations, attrs.get("group", 1))


def _conv_transpose(attrs, x, w, b=None):
    rank = w.dim() - 2
    strides = attrs.get("strides", [1] * rank)
    dilations = attrs.get("dilations", [1] * rank)
    pads = list(attrs.get("pads", [0] * 2 * rank))
    if pads[:rank] != pads[rank:] or "output_shape" in attrs or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET",
                                                                                                         "NOTSET"):
        raise ModelError("distill: ConvTranspose with asymmetric pads, auto_pad or output_shape is not supported")
    conv = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[rank - 1]
    return conv(x, w, b, strides, pads[:rank], attrs.get("output_padding", [0] * rank), attrs.get("group", 1),
                dilations)


def _gemm(attrs, a, b, c=None):
    a = a.t() if attrs.get("transA", 0) else a
    b = b.t() if attrs.get("transB", 0) else b
    y = attrs.get("alpha", 1.0) * (a @ b)
    return y if c is None else y + attrs.get("beta", 1.0) * c


def _pool(attrs, x, kind: str):
    kernel = attrs["kernel_shape"]
    rank = len(kernel)
    strides = attrs.get("strides", [1] * rank)
    dilations = attrs.get("dilations", [1] * rank)
    pads = _auto_pads(attrs, x, kernel, strides, dilations)
    ceil = bool(attrs.get("ceil_mode", 0))
    if kind == "max":
        pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[rank - 1]
        if pads[:rank] != pads[rank:] or any(2 * p > k for p, k in zip(pads, kernel * 2, strict=True)):
            x, pads = F.pad(x, _pads_nd(pads, rank), value=-math.inf), [0] * 2 * rank
        return pool(x, kernel, strides, pads[:rank], dilations, ceil_mode=ceil)
    pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[rank - 1]
    include = bool(attrs.get("count_include_pad", 0))
    if pads[:rank] != pads[rank:]:
        if not include:
            raise ModelError("distill: AveragePool with asymmetric pads excluding padding is not supported")
        x, pads = F.pad(x, _pads_nd(pads, rank)), [0] * 2 * rank
    return pool(x, kernel, strides, pads[:rank], ceil_mode=ceil, count_include_pad=include)


def _clip(attrs, x, lo=None, hi=None):
    lo = attrs.get("min") if lo is None else lo
    hi = attrs.get("max") if hi is None else hi
    if lo is not None:
        x = torch.maximum(x, torch.as_tensor(lo, dtype=x.dtype))
    if hi is not None:
        x = torch.minimum(x, torch.as_tensor(hi, dtype=x.dtype))
    return x


def _softmax(attrs, x, log: bool, opset: int):
    axis = attrs.get("axis", -1 if opset >= 13 else 1)
    if opset >= 13:
        return F.log_softmax(x, axis) if log else F.softmax(x, axis)
    flat = x.reshape(*x.shape[: axis % x.dim()], -1)  # opset < 13: softmax over all axes from `axis` on
    out = F.log_softmax(flat, -1) if log else F.softmax(flat, -1)
    return out.reshape(x.shape)


def _split(attrs, x, split=None, *, count: int):
    axis = attrs.get("axis", 0)
    if split is None and "split" in attrs:
        sizes = list(attrs["split"])
    elif split is not None:
        sizes = _ints(split)
    else:
        size = x.shape[axis]
        step = math.ceil(size / count)
        sizes = [min(step, size - i * step) for i in range(count)]
    return list(torch.split(x, sizes, dim=axis))


def _slice(attrs, x, starts=None, ends=None, axes=None, steps=None):
    starts = _ints(starts) if starts is not None else list(attrs["starts"])
    ends = _ints(ends) if ends is not None else list(attrs["ends"])
    axes = _ints(axes) if axes is not None else list(attrs.get("axes", range(len(starts))))
    steps = _ints(steps) if steps is not None else [1] * len(starts)
    index: list = [slice(None)] * x.dim()
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        axis %= x.dim()
        size = x.shape[axis]
        if step > 0:
            start = min(max(start + size if start < 0 else start, 0), size)
            end = min(max(end + size if end < 0 else end, 0), size)
            index[axis] = slice(start, max(start, end), step)
        else:  # torch has no negative steps: take the range forward, then flip
            start = min(max(start + size if start < 0 else start, -1), size - 1)
            end = min(max(end + size if end < 0 else end, -1), size - 1)
            picks = list(range(start, end, step))
            index[axis] = torch.tensor(picks, dtype=torch.long) if picks else slice(0, 0)
    out = x
    for axis, sel in enumerate(index):
        if isinstance(sel, torch.Tensor):
            out = out.index_select(axis, sel)
        elif sel != slice(None):
            out = out[(slice(None),) * axis + (sel,)]
    return out


def _reshape(attrs, x, shape, batch: int):
    target = _ints(shape)
    if batch > 1 and target and target[0] == 1 and x.shape[0] == batch:
        target[0] = batch  # the canonical graph's batch of 1, run on a batch of B samples
    if not attrs.get("allowzero", 0):
        target = [x.shape[i] if v == 0 else v for i, v in enumerate(target)]
    return x.reshape(target)


def _unsqueeze(attrs, x, axes=None):
    axes = _ints(axes) if axes is not None else list(attrs["axes"])
    rank = x.dim() + len(axes)
    for axis in sorted(a % rank for a in axes):
        x = x.unsqueeze(axis)
    return x


def _squeeze(attrs, x, axes=None):
    axes = _ints(axes) if axes is not None else list(attrs.get("axes", []))
    if not axes:
        return x.squeeze()
    for axis in sorted((a % x.dim() for a in axes), reverse=True):
        x = x.squeeze(axis)
    return x


def _batch_norm(attrs, x, scale, bias, mean, var):
    return F.batch_norm(x, mean, var, scale, bias, False, 0.0, attrs.get("epsilon", 1e-5))


def _constant(attrs):
    if "value" in attrs:
        return torch.from_numpy(numpy_helper.to_array(attrs["value"]).copy())
    for key, dtype in (("value_float", torch.float32), ("value_floats", torch.float32),
                       ("value_int", torch.int64), ("value_ints", torch.int64)):
        if key in attrs:
            return torch.tensor(attrs[key], dtype=dtype)
    raise ModelError("distill: Constant without a value attribute is not supported")


def _mod(attrs, a, b):
    if attrs.get("fmod", 0) or a.is_floating_point():
        return torch.fmod(a, b)
    return torch.remainder(a, b)


def _bitshift(attrs, a, b):
    direction = attrs["direction"].decode()
    return torch.bitwise_right_shift(a, b) if direction == "RIGHT" else torch.bitwise_left_shift(a, b)


def _hard_sigmoid(attrs, x):
    return torch.clamp(attrs.get("alpha", 0.2) * x + attrs.get("beta", 0.5), 0.0, 1.0)


def _shape(attrs, x):
    dims = list(x.shape)[attrs.get("start", 0): attrs.get("end", None)]
    return torch.tensor(dims, dtype=torch.int64)


def _gather(attrs, x, index):
    axis = attrs.get("axis", 0) % x.dim()
    index = index.long()
    index = torch.where(index < 0, index + x.shape[axis], index)
    out = x.index_select(axis, index.reshape(-1))
    return out.reshape(*x.shape[:axis], *index.shape, *x.shape[axis + 1:])


def _range(attrs, start, limit, delta):
    return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)


def _expand(attrs, x, shape):
    target = _ints(shape)
    rank = max(x.dim(), len(target))
    dims = [1] * (rank - len(target)) + target
    x = x.reshape([1] * (rank - x.dim()) + list(x.shape))
    return x.expand([max(d, s) if s != 1 else d for d, s in zip(dims, x.shape, strict=True)])


def _const_of_shape(attrs, shape):
    value = torch.from_numpy(numpy_helper.to_array(attrs["value"]).copy()) if "value" in attrs else torch.zeros(1)
    return torch.full(_ints(shape), value.reshape(-1)[0].item(), dtype=value.dtype)


def _pad(attrs, x, pads=None, value=None, axes=None):
    mode = attrs.get("mode", b"constant").decode()
    pads = _ints(pads) if pads is not None else list(attrs["pads"])
    if axes is not None:
        full = [0] * 2 * x.dim()
        ax = [a % x.dim() for a in _ints(axes)]
        for i, a in enumerate(ax):
            full[a], full[a + x.dim()] = pads[i], pads[i + len(ax)]
        pads = full
    fill = 0.0 if value is None or not value.numel() else value.item()
    torch_mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}.get(mode)
    if torch_mode is None:
        raise ModelError(f"distill: Pad mode={mode} is not supported")
    if torch_mode == "constant":
        return F.pad(x, _pads_nd(pads, x.dim()), value=fill)
    return _pad_border(x, pads, torch_mode)


def _pad_border(x: torch.Tensor, pads: list[int], mode: str) -> torch.Tensor:
    """reflect/replicate padding of any rank: PyTorch pads only the last 1-3 axes of a (N, C, ...) tensor, so
    the axes before the first padded one are folded into C (and N = 1) and unfolded afterwards."""
    rank = x.dim()
    padded = [a for a in range(rank) if pads[a] or pads[a + rank]]
    if not padded:
        return x
    first = padded[0]
    if rank - first > 3:
        raise ModelError(f"distill: Pad mode={mode} over {rank - first} trailing axes is not supported")
    lead = x.shape[:first]
    folded = x.reshape(1, math.prod(lead), *x.shape[first:])
    out = F.pad(folded, _pads_nd([*pads[first:rank], *pads[rank + first:]], rank - first), mode=mode)
    return out.reshape(*lead, *out.shape[2:])


def _flatten(attrs, x):
    axis = attrs.get("axis", 1) % max(x.dim(), 1)
    return x.reshape(math.prod(x.shape[:axis]), -1)


def _layer_norm(attrs, x, scale, bias=None):
    axis = attrs.get("axis", -1) % x.dim()
    return F.layer_norm(x, x.shape[axis:], scale, bias, attrs.get("epsilon", 1e-5))


def _variadic(fn: Callable) -> Callable:
    def run(attrs, *xs):
        out = xs[0]
        for x in xs[1:]:
            out = fn(out, x)
        return out
    return run


_OPS: dict[str, Callable] = {
    "Conv": _conv, "ConvTranspose": _conv_transpose, "Gemm": _gemm, "MatMul": binary(torch.matmul),
    "Add": binary(torch.add), "Sub": binary(torch.sub), "Mul": binary(torch.mul), "Pow": binary(torch.pow),
    "Div": lambda attrs, a, b: a / b if a.is_floating_point() else torch.div(a, b, rounding_mode="trunc"),
    "Max": _variadic(torch.maximum), "Min": _variadic(torch.minimum), "Sum": _variadic(torch.add),
    "Mod": _mod, "BitShift": _bitshift, "Equal": binary(torch.eq), "Less": binary(torch.lt),
    "Greater": binary(torch.gt), "Where": lambda attrs, c, a, b: torch.where(c, a, b),
    "Relu": unary(F.relu), "Sigmoid": unary(torch.sigmoid), "Tanh": unary(torch.tanh), "Exp": unary(torch.exp),
    "Log": unary(torch.log), "Sqrt": unary(torch.sqrt), "Neg": unary(torch.neg), "Abs": unary(torch.abs),
    "Erf": unary(torch.erf), "Floor": unary(torch.floor), "Ceil": unary(torch.ceil),
    "Reciprocal": unary(torch.reciprocal), "Softplus": unary(F.softplus), "Identity": unary(lambda x: x),
    "Dropout": unary(lambda x: x), "HardSigmoid": _hard_sigmoid, "HardSwish": unary(F.hardswish),
    "Clip": _clip, "LeakyRelu": lambda attrs, x: F.leaky_relu(x, attrs.get("alpha", 0.01)),
    "Elu": lambda attrs, x: F.elu(x, attrs.get("alpha", 1.0)),
    "PRelu": lambda attrs, x, s: torch.where(x >= 0, x, x * s),
    "Gelu": lambda attrs, x: F.gelu(x, approximate="tanh" if attrs.get("approximate", b"none") == b"tanh" else "none"),
    "BatchNormalization": _batch_norm, "LayerNormalization": _layer_norm,
    "MaxPool": lambda attrs, x: _pool(attrs, x, "max"), "AveragePool": lambda attrs, x: _pool(attrs, x, "avg"),
    "GlobalAveragePool": unary(lambda x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True)),
    "GlobalMaxPool": unary(lambda x: x.amax(dim=tuple(range(2, x.dim())), keepdim=True)),
    "Concat": lambda attrs, *xs: torch.cat(xs, dim=attrs["axis"]),
    "Slice": _slice, "Flatten": _flatten, "Unsqueeze": _unsqueeze, "Squeeze": _squeeze,
    "Transpose": lambda attrs, x: x.permute(attrs.get("perm", list(range(x.dim()))[::-1])),
    "Gather": _gather, "Shape": _shape, "Range": _range, "Expand": _expand,
    "ConstantOfShape": _const_of_shape, "Pad": _pad, "Tile": lambda attrs, x, r: x.repeat(_ints(r)),
    "LSTM": lambda attrs, *args: recurrent("LSTM", attrs, *args),
    "GRU": lambda attrs, *args: recurrent("GRU", attrs, *args),
    "RNN": lambda attrs, *args: recurrent("RNN", attrs, *args),
} | OPS
SUPPORTED_OPS = frozenset(_OPS) | frozenset(OPSET_OPS) | {"Constant", "Cast", "Split", "Reshape", "Softmax",
                                                          "LogSoftmax"} | frozenset(CONTROL_FLOW)
# Ops refused with a reason rather than a bare "not supported".
REFUSED = {op: "integer-only quantised kernels carry no gradient; distill the float or QDQ model instead"
           for op in ("QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "DynamicQuantizeLinear")}


def trainable_names(model: onnx.ModelProto) -> list[str]:
    """Float initializers with more than one value that feed data (not configuration) inputs: weights, biases,
    BN scale/shift, codebooks, binary scales, low-rank factors. Scalars (the 6 of a hard-swish, the 2 and 1 that
    map bits to signs) and BN running statistics stay as they are."""
    config = {node.input[i] for node in all_nodes(model.graph)  # If branches' BatchNormalization too
              for i in _CONFIG_INPUTS.get(node.op_type, ()) if i < len(node.input)}
    names = []
    for tensor in model.graph.initializer:
        dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
        if dtype in FLOAT_DTYPES and math.prod(tensor.dims) > 1 and tensor.name not in config:
            names.append(tensor.name)
    return names


class TorchGraph(torch.nn.Module):
    """Run an ONNX graph in PyTorch; its float initializers named in `trainable` are parameters."""

    def __init__(self, model: onnx.ModelProto, trainable: Sequence[str] = ()) -> None:
        super().__init__()
        self.nodes = list(model.graph.node)
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
        self.attrs = [attributes(node) for node in self.nodes]
        nodes = list(all_nodes(model.graph))
        unsupported = sorted({n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}:{n.op_type}"
                              for n in nodes if n.op_type not in SUPPORTED_OPS or n.domain not in ("", "ai.onnx")})
        if unsupported:
            why = "; ".join(f"{op}: {REFUSED[op]}" for op in unsupported if op in REFUSED)
            raise ModelError(f"distill: op(s) {', '.join(unsupported)} not supported by the PyTorch interpreter"
                             + (f" ({why})" if why else ""))
        self.bodies = bodies(model.graph)
        initializers = [*model.graph.initializer, *(t for _, _, g in subgraphs(model.graph) for t in g.initializer)]
        self.dtypes = {t.name: helper.tensor_dtype_to_np_dtype(t.data_type) for t in initializers}
        wanted = set(trainable)
        self.params: dict[str, torch.nn.Parameter] = {}
        self.constants: dict[str, torch.Tensor] = {}
        self._params = torch.nn.ParameterList()
        for tensor in initializers:  # a branch's own initializers stay constant (trainable_names reads the top graph)
            value = torch.from_numpy(numpy_helper.to_array(tensor).copy())
            if tensor.name in wanted:
                param = torch.nn.Parameter(value.float())  # float16 codebooks train in float32, stored back as float16
                self.params[tensor.name] = param
                self._params.append(param)
            else:
                self.constants[tensor.name] = value
        self.inputs = [v.name for v in model.graph.input if v.name not in self.dtypes]
        self.outputs = [v.name for v in model.graph.output]

    def _value(self, env: Mapping[str, torch.Tensor], name: str) -> torch.Tensor | None:
        if not name:
            return None
        if name in env:
            return env[name]
        if name in self.params:
            param = self.params[name]
            return param.to(torch.float16) if self.dtypes[name] == np.float16 else param
        return self.constants[name]

    def forward(self, feeds: Mapping[str, torch.Tensor], keep: Sequence[str] = ()) -> dict[str, torch.Tensor]:
        """The graph outputs plus the tensors named in `keep`, for a batch of samples on axis 0."""
        env: dict[str, torch.Tensor] = dict(feeds)
        batch = next(iter(feeds.values())).shape[0] if feeds else 1
        self._run_nodes(self.nodes, self.attrs, env, batch)
        return {name: env[name] if name in env else self._value(env, name) for name in [*self.outputs, *keep]}

    def _run_nodes(self, nodes: Sequence[onnx.NodeProto], attrs: Sequence[dict], env: dict[str, torch.Tensor],
                   batch: int) -> None:
        for node, node_attrs in zip(nodes, attrs, strict=True):
            args = [self._value(env, name) for name in node.input]
            if node.op_type in CONTROL_FLOW:
                run_body = partial(self._run_body, env=env, batch=batch)
                outs = CONTROL_FLOW[node.op_type](node, node_attrs, args, self.bodies, run_body, self.opset)
            else:
                outs = self._run(node, node_attrs, args, batch)
            for name, value in zip(node.output, outs, strict=False):
                if name:
                    env[name] = value

    def _run_body(self, body: Body, bound: Mapping[str, torch.Tensor], env: Mapping[str, torch.Tensor],
                  batch: int) -> list[torch.Tensor]:
        """A subgraph on the enclosing values plus its own bound inputs; its names stay inside it."""
        local = {**env, **bound}
        self._run_nodes(body.nodes, body.attrs, local, batch)
        return [self._value(local, name) for name in body.outputs]

    def _run(self, node: onnx.NodeProto, attrs: dict, args: list, batch: int) -> list[torch.Tensor]:
        op = node.op_type
        while args and args[-1] is None:
            args.pop()
        if op == "Constant":
            return [_constant(attrs)]
        if op == "Cast":
            return [args[0].to(torch_dtype(attrs["to"]))]
        if op == "Split":
            return _split(attrs, *args, count=len(node.output))
        if op == "Reshape":
            return [_reshape(attrs, args[0], args[1], batch)]
        if op in ("Softmax", "LogSoftmax"):
            return [_softmax(attrs, args[0], op == "LogSoftmax", self.opset)]
        try:
            out = OPSET_OPS[op](attrs, *args, opset=self.opset) if op in OPSET_OPS else _OPS[op](attrs, *args)
        except ModelError:
            raise
        except (RuntimeError, TypeError, ValueError, IndexError) as exc:
            where = node.name or node.output[0]
            raise ModelError(f"distill: {op} node {where!r} failed in the PyTorch interpreter: "
                             f"{str(exc).splitlines()[0]}") from exc
        return list(out) if isinstance(out, list | tuple) else [out]

    def write_back(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """A copy of `model` whose trainable initializers hold the current values (same names, shapes, dtypes)."""
        out = onnx.ModelProto()
        out.CopyFrom(model)
        for tensor in out.graph.initializer:
            if tensor.name in self.params:
                value = self.params[tensor.name].detach().numpy().astype(self.dtypes[tensor.name])
                tensor.CopyFrom(numpy_helper.from_array(value.reshape(tuple(tensor.dims)), tensor.name))
        return out
