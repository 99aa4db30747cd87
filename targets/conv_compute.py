"""TE computes for the blocked-layout operators that TVM 0.27 cannot legalise itself.

Relax refuses to legalise a conv2d whose layouts carry a channel block (NCHW16c, OIHW16i16o).
These computes give each one a loop nest that the schedule rules recognise by block name
(`rw_conv2d_nchwc`, `rw_dwconv2d_nchwc`, `rw_pad`): reduction over input-channel blocks and the
window outside the output block, so the rule can keep a register tile of output columns x channels.
`relax.sigmoid` is legalised through TVM's vectorisable fast exp instead of a scalar expf call.
"""

from __future__ import annotations

from typing import Any

CONV_BLOCK = "rw_conv2d_nchwc"
DWCONV_BLOCK = "rw_dwconv2d_nchwc"
PAD_BLOCK = "rw_pad"


def legalize_map() -> dict[str, Any]:
    """Legalisations to pass to `relax.transform.LegalizeOps` ahead of the zero pipeline."""
    return {
        "relax.nn.conv2d": _legalize_conv2d,
        "relax.nn.conv2d_transpose": _legalize_conv2d_transpose,
        "relax.sigmoid": _legalize_sigmoid,
        "relax.nn.softmax": _legalize_softmax,
    }


def _legalize_conv2d(bb: Any, call: Any) -> Any:
    from tvm.relax.transform.legalize_ops.nn import _nn_conv2d

    attrs = call.attrs
    if len(attrs.data_layout) == 4:
        return _nn_conv2d(bb, call)
    if attrs.out_dtype not in ("", None) and str(attrs.out_dtype) != str(call.args[0].ty.dtype):
        return call  # mixed precision is not blocked by the layout rule; leave it to TVM
    args = dict(
        strides=[int(v) for v in attrs.strides],
        padding=[int(v) for v in attrs.padding],
        dilation=[int(v) for v in attrs.dilation],
    )
    if int(attrs.groups) == 1:
        return bb.call_te(conv2d_nchwc, call.args[0], call.args[1], **args, primfunc_name_hint="conv2d_nchwc")
    return bb.call_te(dwconv2d_nchwc, call.args[0], call.args[1], **args, primfunc_name_hint="dwconv2d_nchwc")


def _legalize_conv2d_transpose(bb: Any, call: Any) -> Any:
    from tvm.relax.transform.legalize_ops.nn import _nn_conv2d_transpose

    attrs = call.attrs
    plain = (
        attrs.data_layout == "NCHW" and attrs.kernel_layout == "IOHW" and attrs.out_layout == "NCHW"
        and int(attrs.groups) == 1 and all(int(v) == 1 for v in attrs.dilation)
        and attrs.out_dtype in ("", None) and call.ty.shape is not None
    )
    if not plain:
        return _nn_conv2d_transpose(bb, call)
    return bb.call_te(
        conv2d_transpose_nchw, call.args[0], call.args[1],
        strides=[int(v) for v in attrs.strides], padding=[int(v) for v in attrs.padding],
        out_hw=[int(call.ty.shape[2]), int(call.ty.shape[3])], primfunc_name_hint="conv2d_transpose",
    )


def _legalize_sigmoid(bb: Any, call: Any) -> Any:
    from tvm import te, topi

    def sigmoid(x: Any) -> Any:
        if str(x.dtype) != "float32":
            return topi.sigmoid(x)
        exp = topi.fast_exp(topi.negative(x))
        return te.compute(x.shape, lambda *i: 1.0 / (1.0 + exp(*i)), name="rw_sigmoid")

    return bb.call_te(sigmoid, call.args[0], primfunc_name_hint="sigmoid")


def _legalize_softmax(bb: Any, call: Any) -> Any:
    """Softmax along an axis that is not the last (YOLOv8's DFL: 16 bins on axis 1 of [1, 16, 4, 8400]) as four
    kernels (max, exp, sum, divide), each reducing or streaming along the contiguous inner axes, with the
    vectorisable fast exp. TVM's own kernel reduces across the strided axis one position at a time and calls
    scalar expf: a quarter of YOLOv8n's time."""
    from tvm import topi
    from tvm.relax.transform.legalize_ops.nn import _nn_softmax

    data = call.args[0]
    shape = data.ty.shape
    axis = int(call.attrs.axis)
    if shape is None or str(data.ty.dtype) != "float32" or axis % len(shape) == len(shape) - 1:
        return _nn_softmax(bb, call)
    axis %= len(shape)
    peak = bb.emit_te(topi.max, data, axis=axis, keepdims=True, primfunc_name_hint="softmax_max")
    exp = bb.emit_te(lambda x, m: topi.fast_exp(topi.subtract(x, m)), data, peak, primfunc_name_hint="softmax_exp")
    total = bb.emit_te(topi.sum, exp, axis=axis, keepdims=True, primfunc_name_hint="softmax_sum")
    return bb.call_te(topi.divide, exp, total, primfunc_name_hint="softmax_divide")


def _padded(data: Any, padding: list[int]) -> Any:
    """Zero-pad H and W of a 5-D NCHWc tensor; padding is (top, left, bottom, right)."""
    from tvm import topi

    top, left, bottom, right = padding
    if not any(padding):
        return data
    return topi.nn.pad(data, [0, 0, top, left, 0], [0, 0, bottom, right, 0], name=PAD_BLOCK)


def _out_size(size: int, before: int, after: int, kernel: int, stride: int, dilation: int) -> int:
    return (size + before + after - (kernel - 1) * dilation - 1) // stride + 1


def _out_hw(data: Any, kh: int, kw: int, strides: list[int], padding: list[int], dilation: list[int]) -> tuple:
    """Output height and width of a conv over blocked data [N, C/b, H, W, b]."""
    height, width = (int(v) for v in data.shape[2:4])
    return (_out_size(height, padding[0], padding[2], kh, strides[0], dilation[0]),
            _out_size(width, padding[1], padding[3], kw, strides[1], dilation[1]))


def conv2d_nchwc(data: Any, kernel: Any, strides: list[int], padding: list[int], dilation: list[int]) -> Any:
    """data [N, C/ib, H, W, ib] * kernel [O/ob, C/ib, KH, KW, ib, ob] -> [N, O/ob, OH, OW, ob]."""
    from tvm import te

    out_chunks, in_chunks, kh, kw, in_block, out_block = (int(v) for v in kernel.shape)
    (sh, sw), (dh, dw) = strides, dilation
    out_h, out_w = _out_hw(data, kh, kw, strides, padding, dilation)
    pad = _padded(data, padding)
    rc = te.reduce_axis((0, in_chunks), name="rc")
    ry = te.reduce_axis((0, kh), name="ry")
    rx = te.reduce_axis((0, kw), name="rx")
    rb = te.reduce_axis((0, in_block), name="rb")
    return te.compute(
        (int(data.shape[0]), out_chunks, out_h, out_w, out_block),
        lambda n, oc, y, x, ob: te.sum(
            pad[n, rc, y * sh + ry * dh, x * sw + rx * dw, rb] * kernel[oc, rc, ry, rx, rb, ob],
            axis=[rc, ry, rx, rb],
        ),
        name=CONV_BLOCK,
    )


def dwconv2d_nchwc(data: Any, kernel: Any, strides: list[int], padding: list[int], dilation: list[int]) -> Any:
    """Depthwise: data [N, C/b, H, W, b] * kernel [C/b, 1, KH, KW, 1, b] -> [N, C/b, OH, OW, b]."""
    from tvm import te

    batch, chunks, _, _, block = (int(v) for v in data.shape)
    kh, kw = (int(v) for v in kernel.shape[2:4])
    (sh, sw), (dh, dw) = strides, dilation
    out_h, out_w = _out_hw(data, kh, kw, strides, padding, dilation)
    pad = _padded(data, padding)
    ry = te.reduce_axis((0, kh), name="ry")
    rx = te.reduce_axis((0, kw), name="rx")
    return te.compute(
        (batch, chunks, out_h, out_w, block),
        lambda n, c, y, x, b: te.sum(
            pad[n, c, y * sh + ry * dh, x * sw + rx * dw, b] * kernel[c, 0, ry, rx, 0, b], axis=[ry, rx]
        ),
        name=DWCONV_BLOCK,
    )


def conv2d_transpose_nchw(data: Any, weight: Any, strides: list[int], padding: list[int], out_hw: list[int]) -> Any:
    """Transposed conv as a gather over only the taps that hit an input pixel (no zero-stuffed input).

    out[n, o, y, x] = sum over c and the taps ky = (y + pad) % s + ry * s (iy = (y + pad) // s - ry)
    that fall inside the kernel and the input; TVM's default dilates the input with zeros first.
    """
    from tvm import te, tirx

    batch, channels, height, width = (int(v) for v in data.shape)
    _, filters, kh, kw = (int(v) for v in weight.shape)
    (sh, sw), (top, left) = strides, padding[:2]
    rc = te.reduce_axis((0, channels), name="rc")
    ry = te.reduce_axis((0, -(-kh // sh)), name="ry")
    rx = te.reduce_axis((0, -(-kw // sw)), name="rx")

    def tap(n: Any, o: Any, y: Any, x: Any) -> Any:
        ky, kx = (y + top) % sh + ry * sh, (x + left) % sw + rx * sw
        iy, ix = (y + top) // sh - ry, (x + left) // sw - rx
        inside = tirx.all(ky < kh, kx < kw, iy >= 0, iy < height, ix >= 0, ix < width)
        value = data[n, rc, tirx.max(tirx.min(iy, height - 1), 0), tirx.max(tirx.min(ix, width - 1), 0)] * weight[
            rc, o, tirx.min(ky, kh - 1), tirx.min(kx, kw - 1)]
        return te.sum(tirx.if_then_else(inside, value, tirx.const(0.0, data.dtype)), axis=[rc, ry, rx])

    return te.compute((batch, filters, *out_hw), tap, name="rw_conv2d_transpose")
