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

import math
from typing import Any

from rewriter.targets import conv_compute


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
            split_to_slices(block),
            relax.transform.ConvertLayout({}, _layout_choice(block)),
            relax.transform.LegalizeOps(conv_compute.legalize_map(), enable_warning=False),
        ],
        name="rewriter_cpu_layout",
    )


def _layout_choice(block: int):
    """ConvertLayout callback: NCHW[b]c for a conv whose channel counts are multiples of b, else NCHW."""

    def choose(call: Any) -> dict[str, list[str]]:
        if call.op.name != "relax.nn.conv2d":
            return {}
        attrs = call.attrs
        data_shape, weight_shape = call.args[0].ty.shape, call.args[1].ty.shape
        if len(data_shape) != 4 or attrs.data_layout != "NCHW" or attrs.kernel_layout != "OIHW":
            return {}
        channels, filters = int(data_shape[1]), int(weight_shape[0])
        groups = int(attrs.groups)
        if groups == 1 and filters % block == 0:
            # Few input channels (an RGB stem) form one block; otherwise the largest common block.
            in_block = channels if channels < block else math.gcd(channels, block)
            return {"relax.nn.conv2d": [f"NCHW{in_block}c", f"OIHW{in_block}i{block}o", f"NCHW{block}c"]}
        if groups == channels == filters and channels % block == 0:
            return {"relax.nn.conv2d": [f"NCHW{block}c", f"OIHW1i{block}o", f"NCHW{block}c"]}
        return {"relax.nn.conv2d": ["NCHW", "OIHW", "NCHW"]}

    return choose


def split_to_slices(block: int) -> Any:
    """Rewrite channel splits of 4-D tensors into strided slices.

    TVM 0.27's ConvertLayout rewrites a `split` of a blocked (NCHW16c) tensor with the channel
    indices unchanged, which yields wrong section sizes (a 32-channel split at 16 gives a
    0-channel part); a strided slice falls back to NCHW instead, which is correct.
    """
    import tvm
    from tvm import relax

    @relax.expr_functor.mutator
    class _Rewriter(relax.PyExprMutator):
        def visit_call_(self, call: relax.Call) -> relax.Expr:  # noqa: D102
            call = super().visit_call_(call)
            if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.split"):
                return call
            bounds = _split_bounds(call)
            if bounds is None:
                return call
            sections, axis = bounds
            data = call.args[0]
            parts = [relax.op.strided_slice(data, axes=[axis], begin=[start], end=[end]) for start, end in sections]
            return relax.Tuple(parts)

    @tvm.transform.module_pass(opt_level=0, name="RewriterSplitToSlices")
    def run(mod: Any, _ctx: Any) -> Any:
        rewriter = _Rewriter(mod)
        for gvar, func in mod.functions_items():
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gvar, rewriter.visit_expr(func))
        return rewriter.builder_.get()

    return run


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
