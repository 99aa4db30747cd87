"""Default CPU schedules without tuning: a blocked-channel layout for convolutions, chosen by rule.

TVM 0.27's Relax CPU pipeline only legalises and fuses, so an untuned convolution compiles to
naive scalar loops. `layout_pipeline` rewrites the Relax graph before fusion so that every
convolution whose channel counts allow it runs in an NCHW[b]c layout (b = the target's vector
width in float32 lanes), with its weights repacked once at compile time (FoldConstant folds the
weight's layout_transform), and with the blocked layout kept through the element-wise ops
between consecutive convolutions. The TIR schedule rules that then tile, vectorise and
parallelise the fused kernels live in `schedule_rules.py`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from rewriter.targets import conv_compute
from rewriter.targets.presets import one_line

MATMUL_TILE_VECTORS = 4  # vector registers across a matrix product's register tile (schedule_rules.Dense)
MIN_PADDED_COLUMNS = 256  # below this a matrix product's column tail costs little: it is left as it is


def vector_lanes(target: Any) -> int:
    """float32 lanes of the target's widest vector register (AVX-512: 16, AVX2: 8, NEON: 4)."""
    from tvm.target.codegen import llvm_get_vector_width

    try:
        bits = int(llvm_get_vector_width(target))
    except Exception:  # not an llvm target, or LLVM does not know the cpu
        bits = 128
    return max(4, bits // 32)


def channel_block(target: Any) -> int:
    """Channels per block: one AVX-512 register, or two AVX2/NEON registers (more accumulators)."""
    return 16 if vector_lanes(target) >= 16 else 8


def layout_pipeline(target: Any) -> Any:
    """The Relax passes that run before the zero pipeline on CPU targets (inside `with target:`)."""
    import tvm
    from tvm import relax

    block = channel_block(target)
    return tvm.transform.Sequential(
        [
            relax.transform.DecomposeOpsForInference(),  # batch_norm -> scale and shift the layout pass can carry
            transpose_conv_to_shuffle(),
            relax.transform.FoldConstant(),  # the importer's Clip bounds, where(isnan(c), inf, c), become scalars
            clip_to_min_max(),
            split_to_slices(),
            pad_matmul_columns(MATMUL_TILE_VECTORS * vector_lanes(target)),
            blocked_layout(block),
            relax.transform.LegalizeOps(conv_compute.legalize_map(), enable_warning=False),
        ],
        name="rewriter_cpu_layout",
    )


def blocked_layout(max_block: int) -> Any:
    """ConvertLayout with one channel block for the whole model, the one that covers the most MACs.

    One block size throughout: TVM 0.27's ConvertLayout cannot convert between two blocked
    layouts (NCHW16c -> NCHW8c fails), and converting through NCHW would cost a pass each time.
    """
    import tvm
    from tvm import relax

    @tvm.transform.module_pass(opt_level=0, name="RewriterBlockedLayout")
    def run(mod: Any, _ctx: Any) -> Any:
        convs = _conv_shapes(mod)
        block = pick_block([(c, o, g, macs) for c, o, g, macs in convs], max_block)
        if block is None:
            return mod
        from rewriter.targets.blocked_passthrough import blocked_passthrough

        try:
            return blocked_passthrough()(relax.transform.ConvertLayout({}, _layout_choice(block))(mod))
        except Exception as exc:  # an op whose layout inference TVM gets wrong: stay in NCHW (correct, slower)
            warnings.warn(f"blocked conv layout not applied: {one_line(exc)}", stacklevel=1)
            return mod

    return run


# Relative time per MAC, measured on ddddocr's detector (2 threads, AVX-512): a conv left in NCHW runs about 5x
# slower than in the widest block (18 against 99 GMAC/s), and each halving of the block about 1.2x slower.
NCHW_COST, NARROWER_COST = 5.0, 1.2


def pick_block(convs: list[tuple[int, int, int, int]], max_block: int) -> int | None:
    """The channel block (max_block, max_block/2, ..., 4) with the least estimated conv time: the MACs each block
    covers at its cost per MAC, the rest left in NCHW at NCHW_COST; None when no block covers any conv."""
    total = sum(macs for *_, macs in convs)
    best, best_cost = None, float("inf")
    size, cost = max_block, 1.0
    while size >= 4:
        covered = sum(macs for c, o, g, macs in convs if _blockable(c, o, g, size))
        estimate = covered * cost + (total - covered) * NCHW_COST
        if covered and estimate < best_cost:
            best, best_cost = size, estimate
        size, cost = size // 2, cost * NARROWER_COST
    return best


def _blockable(channels: int, filters: int, groups: int, block: int) -> bool:
    if filters % block:
        return False
    if groups == 1:
        return channels % block == 0 or channels < block
    return groups == channels == filters


def _conv_shapes(mod: Any) -> list[tuple[int, int, int, int]]:
    """(in channels, out channels, groups, MACs) of every static NCHW conv2d in the module."""
    from tvm import relax

    found = []

    def visit(expr: Any) -> None:
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm_op()) and expr.op.name == "relax.nn.conv2d":
            shapes = _static_conv(expr)
            if shapes is not None:
                found.append(shapes)

    for _gvar, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return found


def tvm_op() -> type:
    import tvm

    return tvm.ir.Op


def _static_conv(call: Any) -> tuple[int, int, int, int] | None:
    attrs = call.attrs
    data, weight, out = call.args[0].ty.shape, call.args[1].ty.shape, call.ty.shape
    if attrs.data_layout != "NCHW" or attrs.kernel_layout != "OIHW" or data is None or len(data) != 4:
        return None
    try:
        dims = [int(v) for v in (*data, *weight, *out)]
    except TypeError:  # symbolic shape
        return None
    channels, filters, groups = dims[1], dims[4], int(attrs.groups)
    macs = dims[8] * dims[9] * dims[10] * dims[11] * dims[5] * dims[6] * dims[7]
    return channels, filters, groups, macs


def _layout_choice(block: int):
    """ConvertLayout callback: NCHW[block]c for every conv `_blockable` with `block`, else NCHW."""

    def choose(call: Any) -> dict[str, list[str]]:
        if call.op.name == "relax.nn.conv2d_transpose":  # its layout inference fails on blocked inputs
            return {"relax.nn.conv2d_transpose": ["NCHW", "IOHW", "NCHW"]}
        if call.op.name != "relax.nn.conv2d":
            return {}
        shapes = _static_conv(call)
        if shapes is None:
            return {}
        channels, filters, groups, _ = shapes
        if not _blockable(channels, filters, groups, block):
            return {"relax.nn.conv2d": ["NCHW", "OIHW", "NCHW"]}
        if groups == 1:
            in_block = block if channels % block == 0 else channels  # an RGB stem is one block
            return {"relax.nn.conv2d": [f"NCHW{in_block}c", f"OIHW{in_block}i{block}o", f"NCHW{block}c"]}
        return {"relax.nn.conv2d": [f"NCHW{block}c", f"OIHW1i{block}o", f"NCHW{block}c"]}

    return choose


def split_to_slices() -> Any:
    """Rewrite channel splits of 4-D tensors into strided slices.

    TVM 0.27's ConvertLayout rewrites a `split` of a blocked (NCHW16c) tensor with the channel
    indices unchanged, which yields wrong section sizes (a 32-channel split at 16 gives a
    0-channel part); a strided slice falls back to NCHW instead, which is correct.
    """
    from tvm import relax

    def rewrite(call: Any) -> Any:
        bounds = _split_bounds(call)
        if bounds is None:
            return None
        sections, axis = bounds
        data = call.args[0]
        return relax.Tuple([relax.op.strided_slice(data, axes=[axis], begin=[start], end=[end])
                            for start, end in sections])

    return op_rewrite_pass("RewriterSplitToSlices", "relax.split", rewrite)


def pad_matmul_columns(multiple: int) -> Any:
    """Pad a constant matrix-product weight's columns to a multiple of the register tile, slice the product back.

    A recogniser's 8,210-class Gemm has no column tile of whole vectors (8210 = 2 * 5 * 821): the tail made the
    register-tiled rule decline it and the fallback computed one output at a time (149 ms where onnxruntime runs the
    whole model in 8). The zero columns are padded once at compile time (FoldConstant); the slice is a cheap copy.
    """
    import numpy as np
    import tvm
    from tvm import relax

    def rewrite(call: Any) -> Any:
        weight = call.args[1]
        if not isinstance(weight, tvm.ir.expr.Constant) or len(weight.value.shape) != 2:
            return None
        columns = int(weight.value.shape[1])
        if columns < MIN_PADDED_COLUMNS or columns % multiple == 0:
            return None
        value = weight.value.numpy()
        padded = np.pad(value, ((0, 0), (0, -columns % multiple)))
        product = relax.op.matmul(call.args[0], relax.const(padded, str(value.dtype)), out_dtype=call.attrs.out_dtype)
        return relax.op.strided_slice(product, axes=[-1], begin=[0], end=[columns])

    return op_rewrite_pass("RewriterPadMatmulColumns", "relax.matmul", rewrite)


def transpose_conv_to_shuffle() -> Any:
    """Rewrite transposed convs whose stride equals their kernel (no overlap, no padding) as a 1x1 conv to
    O*kh*kw channels and a pixel shuffle.

    Each output pixel of such a conv reads one input pixel through one kernel tap, so the transposed conv
    is a matrix product followed by a rearrangement. The 1x1 conv takes the blocked register-tiled
    kernel; the gather the transposed conv compiles to cannot be vectorised (DBNet's 2x2-stride-2
    upsampling head: a third of its x86 time).
    """
    from tvm import relax

    def rewrite(call: Any) -> Any:
        shapes = _shuffle_shapes(call)
        if shapes is None:
            return None
        (batch, _, height, width), (channels, filters, kh, kw) = shapes
        taps_first = relax.op.permute_dims(call.args[1], [1, 2, 3, 0])  # IOHW -> OHWI
        weight = relax.op.reshape(taps_first, [filters * kh * kw, channels, 1, 1])
        taps = relax.op.nn.conv2d(call.args[0], weight)  # channel o*kh*kw + ky*kw + kx
        grid = relax.op.reshape(taps, [batch, filters, kh, kw, height, width])
        out = relax.op.permute_dims(grid, [0, 1, 4, 2, 5, 3])
        return relax.op.reshape(out, [batch, filters, height * kh, width * kw])

    return op_rewrite_pass("RewriterTransposeConvToShuffle", "relax.nn.conv2d_transpose", rewrite)


def _shuffle_shapes(call: Any) -> tuple[list[int], list[int]] | None:
    """(data NCHW shape, weight IOHW shape) of a plain transposed conv with stride == kernel, else None."""
    a = call.attrs
    data, weight = call.args[0].ty.shape, call.args[1].ty.shape
    if data is None or weight is None or len(data) != 4 or len(weight) != 4:
        return None
    try:
        data, weight = [int(d) for d in data], [int(d) for d in weight]
    except TypeError:  # symbolic dimensions
        return None
    plain = (a.data_layout == "NCHW" and a.kernel_layout == "IOHW" and a.out_layout == "NCHW"
             and int(a.groups) == 1 and all(int(v) == 1 for v in a.dilation)
             and all(int(v) == 0 for v in a.padding) and all(int(v) == 0 for v in a.output_padding)
             and [int(v) for v in a.strides] == weight[2:] and a.out_dtype in ("", None))
    return (data, weight) if plain else None


def clip_to_min_max() -> Any:
    """Rewrite clips by constant bounds as maximum then minimum with scalar constants.

    ConvertLayout has no layout rule for `relax.clip` (HardSwish, HardSigmoid) nor for the opaque
    maximum/minimum kernels the ONNX importer emits for `Clip`: each one sent its feature map back to
    NCHW and forth again (DBNet: a quarter of its time in layout transforms). `relax.maximum` and
    `relax.minimum` with a scalar are element-wise ops the blocked layout passes through.
    """
    import tvm
    from tvm import relax

    @relax.expr_functor.mutator
    class _Rewriter(relax.PyExprMutator):
        def visit_call_(self, call: relax.Call) -> relax.Expr:  # noqa: D102
            call = super().visit_call_(call)
            if not isinstance(call.op, tvm.ir.Op):
                return call
            if call.op.name == "relax.clip":
                data, dtype = call.args[0], call.args[0].ty.dtype
                low, high = (float(getattr(bound, "value", bound)) for bound in call.args[1:3])
                return relax.op.minimum(relax.op.maximum(data, relax.const(low, dtype)), relax.const(high, dtype))
            bound = _imported_bound(call)
            if bound is None:
                return call
            kind, data, scalar = bound
            return (relax.op.maximum if kind == "maximum" else relax.op.minimum)(data, scalar)

    rewrite = function_pass("RewriterClipToMinMax", _Rewriter)
    return tvm.transform.Sequential([rewrite, relax.transform.DeadCodeElimination()])  # the replaced kernels go


def op_rewrite_pass(name: str, op_name: str, rewrite: Callable[[Any], Any]) -> Any:
    """A module pass that replaces each call to the Relax op `op_name` by `rewrite(call)` (kept when None)."""
    import tvm
    from tvm import relax

    op = tvm.ir.Op.get(op_name)

    @relax.expr_functor.mutator
    class _Rewriter(relax.PyExprMutator):
        def visit_call_(self, call: relax.Call) -> relax.Expr:  # noqa: D102
            call = super().visit_call_(call)
            if call.op != op:
                return call
            new = rewrite(call)
            return call if new is None else new

    return function_pass(name, _Rewriter)


def function_pass(name: str, mutator: type) -> Any:
    """A module pass that runs `mutator` (a relax.PyExprMutator) over every Relax function of the module."""
    import tvm
    from tvm import relax

    @tvm.transform.module_pass(opt_level=0, name=name)
    def run(mod: Any, _ctx: Any) -> Any:
        rewriter = mutator(mod)
        for gvar, func in mod.functions_items():
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gvar, rewriter.visit_expr(func))
        return rewriter.builder_.get()

    return run


def _imported_bound(call: Any) -> tuple[str, Any, Any] | None:
    """('maximum' | 'minimum', tensor, scalar constant) for a call_tir of the importer's Clip kernels
    (topi.maximum/minimum of a tensor and a 0-d constant, same shape out as in), else None."""
    import tvm
    from tvm import relax

    if call.op.name != "relax.call_tir" or not isinstance(call.args[0], tvm.ir.GlobalVar):
        return None
    kind = call.args[0].name_hint.rstrip("0123456789")
    args = call.args[1].fields if isinstance(call.args[1], relax.Tuple) else []
    if kind not in ("maximum", "minimum") or len(args) != 2:
        return None
    data, scalar = args
    if not (isinstance(scalar, tvm.ir.GenericConst) and len(scalar.ty.shape) == 0
            and scalar.ty.dtype == data.ty.dtype):
        return None
    out, shape = call.ty, data.ty.shape
    if shape is None or out.shape is None or list(map(int, out.shape)) != list(map(int, shape)):
        return None
    return kind, data, scalar


def _split_bounds(call: Any) -> tuple[list[tuple[int, int]], int] | None:
    """(start, end) of each section of a static split along axis 1 of a 4-D tensor, else None."""
    shape = call.args[0].ty.shape
    axis = int(call.attrs.axis)
    if shape is None or len(shape) != 4 or axis not in (1, -3):
        return None
    size = int(shape[1])
    sections = call.attrs.indices_or_sections
    if isinstance(sections, int) or hasattr(sections, "value"):
        count = int(sections)
        step = size // count
        cuts = [step * i for i in range(1, count)]
    else:
        cuts = [int(index) for index in sections]
    starts = [0, *cuts]
    ends = [*cuts, size]
    return list(zip(starts, ends, strict=True)), 1
