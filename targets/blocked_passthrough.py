"""Keep feature maps in the blocked channel layout through `resize2d`, channel `concat` and channel slices.

TVM 0.27's ConvertLayout has no blocked (NCHW[b]c) layout rule for `image.resize2d` ("axis swap
only"), and a concat that meets one NCHW input takes NCHW for all. An FPN neck (DBNet, YOLO) then
converts every upsampled map back to NCHW and forth again: in DBNet four resizes and a 96-channel
concat at the largest scale. A channel slice (YOLOv8's C2f splits, rewritten to slices by
`schedules.split_to_slices`) falls back to NCHW the same way. These ops are exact in the blocked layout
(resize works per channel; a concat or slice of whole channel blocks along the block axis is the same
concat or slice), so after ConvertLayout:

    resize2d(to_nchw(x))                -> to_nchw(resize2d[NCHW{b}c](x))
    concat([to_nchw(x_i)], axis=1)       -> to_nchw(concat([x_i], axis=1))
    strided_slice(to_nchw(x), 1, s, e)   -> to_nchw(strided_slice(x, 1, s/b, e/b))   (s, e whole blocks)
    to_blocked(to_nchw(x))              -> x

and the conversions nobody reads any more are dropped.
"""

from __future__ import annotations

from typing import Any

from rewriter.targets.schedules import function_pass


def blocked_passthrough() -> Any:
    """The rewrite above, with common subexpressions merged first and dead code dropped after; run it right after
    ConvertLayout."""
    import tvm
    from tvm import relax

    @relax.expr_functor.mutator
    class _Rewriter(relax.PyExprMutator):
        def visit_call_(self, call: relax.Call) -> relax.Expr:  # noqa: D102
            call = super().visit_call_(call)
            if not isinstance(call.op, tvm.ir.Op):
                return call
            if call.op.name == "relax.image.resize2d" and call.attrs.layout == "NCHW":
                return self._resize(call)
            if call.op.name == "relax.concat":
                return self._concat(call)
            if call.op.name == "relax.strided_slice":
                return self._slice(call)
            if call.op.name == "relax.layout_transform":
                return self._cancel(call)
            return call

        def _unblocked(self, expr: Any) -> tuple[Any, int, Any] | None:
            """(blocked tensor, block, its layout_transform call) where `expr` is to_nchw(blocked), else None."""
            value = self._bound_value(expr)
            if not (isinstance(value, relax.Call) and value.op == tvm.ir.Op.get("relax.layout_transform")):
                return None
            block = _to_nchw_block(value.args[0], value)
            return (value.args[0], block, value) if block else None

        def _bound_value(self, expr: Any) -> Any:
            """The value bound to the variable `expr`, looking through tuple items (a split's sections)."""
            value = self.lookup_binding(expr) if isinstance(expr, relax.Var) else None
            if isinstance(value, relax.TupleGetItem):
                parts = self.lookup_binding(value.tuple_value) if isinstance(value.tuple_value, relax.Var) else None
                if isinstance(parts, relax.Tuple):
                    field = parts.fields[int(value.index)]
                    return self.lookup_binding(field) if isinstance(field, relax.Var) else field
            return value

        def _resize(self, call: relax.Call) -> relax.Expr:
            found = self._unblocked(call.args[0])
            if found is None:
                return call
            data, block, to_nchw = found
            a = call.attrs
            resized = self.builder_.emit(relax.op.image.resize2d(
                data, call.args[1], tuple(float(r) for r in a.roi), f"NCHW{block}c", a.method,
                a.coordinate_transformation_mode, a.rounding_method, float(a.cubic_alpha), int(a.cubic_exclude),
                float(a.extrapolation_value), a.out_dtype or None))
            return relax.op.layout_transform(resized, to_nchw.attrs.index_map)

        def _concat(self, call: relax.Call) -> relax.Expr:
            parts = call.args[0]
            if int(call.attrs.axis) not in (1, -3) or not isinstance(parts, relax.Tuple):
                return call
            found = [self._unblocked(part) for part in parts.fields]
            if not found or any(f is None for f in found) or len({f[1] for f in found}) != 1:
                return call
            joined = self.builder_.emit(relax.op.concat([f[0] for f in found], axis=1))
            return relax.op.layout_transform(joined, found[0][2].attrs.index_map)

        def _slice(self, call: relax.Call) -> relax.Expr:
            found = self._unblocked(call.args[0])
            bounds = _channel_slice(call)
            if found is None or bounds is None or bounds[0] % found[1] or bounds[1] % found[1]:
                return call
            data, block, to_nchw = found
            sliced = self.builder_.emit(relax.op.strided_slice(
                data, axes=[1], begin=[bounds[0] // block], end=[bounds[1] // block]))
            return relax.op.layout_transform(sliced, to_nchw.attrs.index_map)

        def _cancel(self, call: relax.Call) -> relax.Expr:
            found = self._unblocked(call.args[0])
            if found is None or _to_blocked_block(call) != found[1]:
                return call
            return found[0]

    rewrite = function_pass("RewriterBlockedPassthrough", _Rewriter)
    # CSE first: ConvertLayout transforms a tensor read by two convs once per reader
    cse = relax.transform.EliminateCommonSubexpr()
    return tvm.transform.Sequential([cse, rewrite, relax.transform.DeadCodeElimination()])


def _channel_slice(call: Any) -> tuple[int, int] | None:
    """(begin, end) of a unit-stride strided_slice of a static 4-D tensor along the channel axis only."""
    shape = _static_shape(call.args[0])
    try:
        axes, begin, end = ([int(v.value) for v in arg.fields] for arg in call.args[1:4])
        strides = [int(v.value) for v in call.args[4].fields] if len(call.args) > 4 else [1]
    except (AttributeError, TypeError):  # symbolic bounds
        return None
    if shape is None or len(shape) != 4 or axes not in ([1], [-3]) or strides != [1]:
        return None
    channels = shape[1]
    start, stop = (max(0, min(channels, v + channels if v < 0 else v)) for v in (begin[0], end[0]))
    return (start, stop) if start < stop else None


def _to_nchw_block(data: Any, call: Any) -> int:
    """b when `call` maps an [N, C/b, H, W, b] tensor to [N, C, H, W] as NCHW[b]c -> NCHW does, else 0."""
    src, dst = _static_shape(data), _static_shape(call)
    if src is None or dst is None or len(src) != 5 or len(dst) != 4:
        return 0
    block = src[4]
    probe = [0, 1, 2, 3, block - 1]  # element (n, c-block 1, h 2, w 3, lane b-1) is channel b + b - 1
    return block if _mapped(call, probe) == [0, 2 * block - 1, 2, 3] else 0


def _to_blocked_block(call: Any) -> int:
    """b when `call` maps an [N, C, H, W] tensor to [N, C/b, H, W, b] as NCHW -> NCHW[b]c does, else 0."""
    src, dst = _static_shape(call.args[0]), _static_shape(call)
    if src is None or dst is None or len(src) != 4 or len(dst) != 5:
        return 0
    block = dst[4]
    return block if _mapped(call, [0, 2 * block - 1, 2, 3]) == [0, 1, 2, 3, block - 1] else 0


def _mapped(call: Any, index: list[int]) -> list[int] | None:
    """Where the layout_transform `call` sends one concrete index (None when it is not constant)."""
    import tvm

    analyzer = tvm.sym.Analyzer()
    try:
        out = call.attrs.index_map.map_indices([tvm.tirx.const(i, "int64") for i in index])
        return [int(analyzer.simplify(e)) for e in out]
    except (TypeError, ValueError, RuntimeError):
        return None


def _static_shape(expr: Any) -> list[int] | None:
    shape = getattr(expr.ty, "shape", None)
    try:
        return [int(d) for d in shape] if shape is not None else None
    except TypeError:  # a symbolic dimension
        return None
