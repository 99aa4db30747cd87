"""TIR schedule rules for CPU kernels that have no tuning record (dlight-style, no search).

Applied by `cpu_rules()` through `dlight.ApplyDefaultSchedule` after fusion, in this order:
- `BlockedConv`: the blocked convolutions of `conv_compute` with their fused epilogue. A register
  tile of output columns x up to MAX_TILE_BLOCKS channel blocks: each block's channels vectorised,
  columns and blocks unrolled, input channels and the window reduced outside the tile, accumulation in
  a local buffer written back once with the epilogue (bias, activation, residual add) applied on the way.
  Parallel over (batch, group of channel blocks, output row).
- `InnerReduction` for the convolutions left in NCHW (channel counts that are not whole blocks): the
  innermost spatial axis moved inside the reduction and vectorised, outer axes parallel. Before dlight's
  `Reduction`, which would take any reduction with an epilogue (a conv with its bias) and compute it one
  output at a time, the padded input copied again for each: DBNet's 12- and 18-channel convs ran 5-10x slower.
- `Dense`: matrix products whose column count is whole vectors (constant weights with a column tail are padded
  to whole tiles before fusion, `schedules.pad_matmul_columns`), register-tiled like the convolutions.
- dlight's CPU `Reduction` (softmax-like chains, means).
- `InnerReduction`: any other kernel with one reduction (pooling, products with a column tail, means).
- `Elementwise`: purely spatial kernels (activations, layout transforms, concat, resize).
"""

from __future__ import annotations

from typing import Any

from rewriter.targets.conv_compute import CONV_BLOCK, DWCONV_BLOCK, PAD_BLOCK

MAX_TILE = 12  # output columns per register tile (accumulators: tile x one vector register)
# A tile may span several output-channel blocks: each broadcast input value then feeds that many FMAs.
# Measured on YOLOv8n's 64->64 3x3 conv at 40x40 (2 threads, Zen 4): 1 block x 10 columns 0.73 ms,
# 4 blocks x 4-5 columns 0.64 ms (onnxruntime 0.61 ms).
MAX_TILE_BLOCKS, MAX_ACCUMULATORS = 4, 20
MAX_TILE_ROWS = 4  # rows of a matrix product's register tile (Dense)
MATMUL_BLOCKS = ("matmul", "NT_matmul", "T_matmul", "batch_matmul", "dense")
MIN_PARALLEL = 8  # fuse outer loops until this many parallel iterations exist
# Below this much work a kernel runs on one thread: waking the pool costs more than it saves, and on a
# busy machine a descheduled worker stalls the whole barrier.
MIN_PARALLEL_WORK = 1 << 20


def cpu_rules(target: Any) -> list[Any]:
    """The rules in the order they are tried, for an llvm target."""
    from tvm.s_tir import dlight as dl

    nchw_convs = InnerReduction(only=("conv", "group_conv"))
    return [BlockedConv(), nchw_convs, Dense(), dl.cpu.Reduction(), InnerReduction(), Elementwise()]


def _rule_base() -> type:
    from tvm.s_tir.dlight.base import ScheduleRule

    return ScheduleRule


class _Rule(_rule_base()):
    """Common helpers: CPU targets only; a rule that cannot schedule a kernel declines it."""

    def available(self, func: Any, target: Any) -> bool:
        from tvm import tirx

        return isinstance(func, tirx.PrimFunc) and target.kind.name == "llvm"

    def apply(self, func: Any, target: Any, tunable: bool) -> Any:
        if not self.available(func, target):
            return None
        try:
            return self.schedule(func, target)
        except Exception:  # a shape the rule does not cover: the next rule (or TVM's default) takes it
            return None


class BlockedConv(_Rule):
    """Register-tiled NCHW[b]c convolution (regular, grouped-as-depthwise, strided, dilated)."""

    def schedule(self, func: Any, target: Any) -> Any:
        from tvm import s_tir

        sch = s_tir.Schedule(func)
        conv = _find_block(sch, (CONV_BLOCK, DWCONV_BLOCK))
        if conv is None:
            return None
        schedule_blocked_conv(sch, conv, tile=None)
        return sch


def schedule_blocked_conv(sch: Any, conv: Any, tile: int | None) -> None:
    """Schedule the conv block `conv` and the rest of its fused function in place."""
    depthwise = sch.get(conv).name_hint.startswith(DWCONV_BLOCK)
    _inline_injective(sch, keep=(conv,))
    write = _cache_with_epilogue(sch, conv)
    loops = sch.get_loops(conv)
    batch, chunk, row, col, lane = loops[:5]
    reduce = loops[5:]
    width = _extent(sch, col)
    blocks = 1 if depthwise else _divisor_up_to(_extent(sch, chunk), MAX_TILE_BLOCKS)
    co, ci = sch.split(chunk, [None, blocks])
    xo, xi = sch.split(col, [None, tile or _divisor_up_to(width, min(MAX_TILE, MAX_ACCUMULATORS // blocks))])
    sch.reorder(batch, co, row, xo, *reduce, ci, xi, lane)
    outer = sch.fuse(batch, co, row)
    # the input-channel lanes of one block are unrolled too, except in a depthwise conv (it has none)
    unrolled = (xi, ci) if depthwise else (xi, ci, reduce[-1])
    _finish_register_tile(sch, conv, write, outer=outer, write_at=xo, lane=lane, unrolled=unrolled,
                          reduce=reduce[0])


def _finish_register_tile(sch: Any, block: Any, write: Any, *, outer: Any, write_at: Any, lane: Any,
                          unrolled: tuple, reduce: Any) -> None:
    """The common tail of a register-tiled reduction: `outer` parallel when the work pays for threads, the local
    accumulator written back under `write_at`, `lane` vectorised, the tile's loops unrolled, the init split off at
    `reduce`, and the function's other blocks scheduled."""
    if _block_work(sch, block) >= MIN_PARALLEL_WORK:
        sch.parallel(outer)
    sch.reverse_compute_at(write, write_at, preserve_unit_loops=True)
    # Loop kinds first: once the init is split off, the update block is no longer a reduction block.
    sch.vectorize(lane)
    for loop in unrolled:
        sch.unroll(loop)
    _vectorize_last(sch, write)
    init = sch.decompose_reduction(block, reduce)
    _vectorize_last(sch, init)
    _schedule_leftovers(sch, exclude=(block, init, write))


def _vectorize_last(sch: Any, block: Any) -> None:
    from tvm import tirx

    loop = sch.get_loops(block)[-1]
    if sch.get(loop).kind != tirx.ForKind.VECTORIZED:
        sch.vectorize(loop)


def _cache_with_epilogue(sch: Any, conv: Any) -> Any:
    """Accumulate in a local buffer; fold a same-shaped element-wise consumer into the write-back."""
    write = sch.cache_write(conv, 0, "local")
    consumers = sch.get_consumers(write)
    # Only a consumer of the same shape: inlining one that reads part of the tile (a slice of padded columns)
    # would write the whole tile into its smaller output.
    if len(consumers) == 1 and _out_shape(sch, consumers[0]) == _out_shape(sch, write):
        try:
            sch.reverse_compute_inline(consumers[0])
        except Exception:  # a layout change or reduction: it stays a kernel of its own
            pass
    return write


def _out_shape(sch: Any, block: Any) -> list[int]:
    return [int(d) for d in sch.get(block).writes[0].source.shape]


def _divisor_up_to(extent: int, limit: int) -> int:
    """The largest divisor of `extent` up to `limit` (a tile without a tail loop)."""
    return max(d for d in range(1, min(extent, limit) + 1) if extent % d == 0)


class Dense(_Rule):
    """Matrix products (matmul, batch matmul, Gemm) whose column count is whole vectors: a register tile of up to
    4 rows x 4 vectors of columns, the reduction outside it, the columns vectorised, rows and vectors unrolled,
    accumulated locally and written back once with the epilogue (bias, activation). Parallel over tiles.

    Before this rule dlight's `Reduction` took every product with a bias and computed it one output at a time:
    an LSTM's input projection [20, 512] x [512, 2048] ran in 32 ms, its recurrent step in 1.5 ms (0.19 and 0.044
    with the tile)."""

    def schedule(self, func: Any, target: Any) -> Any:
        from tvm import s_tir

        from rewriter.targets.schedules import MATMUL_TILE_VECTORS, vector_lanes

        sch = s_tir.Schedule(func)
        _inline_injective(sch, keep=())
        reductions = [b for b in _root_blocks(sch) if _is_reduction(sch, b)]
        if len(reductions) != 1 or not sch.get(reductions[0]).name_hint.startswith(MATMUL_BLOCKS):
            return None
        block = reductions[0]
        kinds, loops = _iter_kinds(sch, block), sch.get_loops(block)
        lanes = vector_lanes(target)
        if kinds[-1] != "R" or kinds.count("R") != 1 or len(loops) != len(kinds) or len(loops) < 2:
            return None
        if _extent(sch, loops[-2]) % lanes:
            return None  # a column tail: the inner-reduction rule vectorises what it can
        write = _cache_with_epilogue(sch, block)
        *rows, columns, reduce = sch.get_loops(block)
        row = sch.fuse(*rows) if len(rows) > 1 else rows[0] if rows else sch.add_unit_loop(block)
        tile_rows = _divisor_up_to(_extent(sch, row), MAX_TILE_ROWS)
        vectors = _divisor_up_to(_extent(sch, columns) // lanes,
                                 min(MATMUL_TILE_VECTORS, MAX_ACCUMULATORS // tile_rows))
        ro, ri = sch.split(row, [None, tile_rows])
        co, cv, lane = sch.split(columns, [None, vectors, lanes])
        # Column tiles outermost: each tile's slice of the weight is read from memory once and stays in cache
        # while every row tile uses it (a large classifier's weight is tens of MB).
        sch.reorder(co, ro, reduce, ri, cv, lane)
        outer = sch.fuse(co, ro)
        _finish_register_tile(sch, block, write, outer=outer, write_at=outer, lane=lane, unrolled=(cv, ri),
                              reduce=reduce)
        return sch


class InnerReduction(_Rule):
    """One reduction block (pooling, matmul, plain conv, mean): vectorise the innermost spatial axis.

    `only`: name prefixes of the reduction blocks this instance takes (all when empty).
    """

    def __init__(self, only: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.only = only

    def schedule(self, func: Any, target: Any) -> Any:
        from tvm import s_tir

        sch = s_tir.Schedule(func)
        _inline_injective(sch, keep=())
        reductions = [b for b in _root_blocks(sch) if _is_reduction(sch, b)]
        if len(reductions) != 1:
            return None
        if self.only and not sch.get(reductions[0]).name_hint.startswith(self.only):
            return None
        block = reductions[0]
        kinds = _iter_kinds(sch, block)
        loops = sch.get_loops(block)
        if len(loops) != len(kinds) or kinds[0] != "S" or "R" not in kinds:
            return None
        spatial = [loop for loop, kind in zip(loops, kinds, strict=True) if kind == "S"]
        reduce = [loop for loop, kind in zip(loops, kinds, strict=True) if kind == "R"]
        inner = spatial[-1] if len(spatial) > 1 else None
        if inner is not None:
            work = _block_work(sch, block)
            sch.reorder(*spatial[:-1], *reduce, inner)
            outer = _fuse_for_parallel(sch, spatial[:-1])
            if work >= MIN_PARALLEL_WORK:
                sch.parallel(outer)
            if _extent(sch, inner) > 1:
                sch.vectorize(inner)
            init = sch.decompose_reduction(block, reduce[0])
            if _extent(sch, inner) > 1:
                _vectorize_last(sch, init)
        elif _block_work(sch, block) >= MIN_PARALLEL_WORK:
            sch.parallel(spatial[0])
        _schedule_leftovers(sch, exclude=(block,) if inner is None else (block, init))
        return sch


class Elementwise(_Rule):
    """Purely spatial kernels: inline into the output, parallel outer axes, vectorise the last."""

    def schedule(self, func: Any, target: Any) -> Any:
        from tvm import s_tir

        sch = s_tir.Schedule(func)
        if any(_is_reduction(sch, b) for b in _root_blocks(sch)):
            return None
        _inline_injective(sch, keep=())
        _schedule_leftovers(sch, exclude=())
        return sch


def _schedule_leftovers(sch: Any, exclude: tuple) -> None:
    """Parallelise and vectorise the spatial root blocks not scheduled yet (pad, write-backs)."""
    excluded = {sch.get(b).name_hint for b in exclude}
    for block in _root_blocks(sch):
        if sch.get(block).name_hint in excluded or _is_reduction(sch, block):
            continue
        loops = sch.get_loops(block)
        if not loops or any(k != "S" for k in _iter_kinds(sch, block)):
            continue
        big = _block_work(sch, block) >= MIN_PARALLEL_WORK // 4
        if len(loops) == 1:
            if big:
                sch.parallel(loops[0])
            continue
        outer = _fuse_for_parallel(sch, loops[:-1])
        if big:
            sch.parallel(outer)
        if _extent(sch, loops[-1]) in (4, 8, 16, 32, 64):
            sch.vectorize(loops[-1])


def _fuse_for_parallel(sch: Any, loops: list) -> Any:
    """Fuse leading loops until they give MIN_PARALLEL iterations (fusing all of them at most)."""
    count, total = 0, 1
    for loop in loops:
        count += 1
        total *= _extent(sch, loop)
        if total >= MIN_PARALLEL:
            break
    return sch.fuse(*loops[:count]) if count > 1 else loops[0]


def _inline_injective(sch: Any, keep: tuple) -> None:
    """Inline every spatial block that can be (not `keep`, not the pad, not outputs)."""
    kept = {sch.get(b).name_hint for b in keep}
    for block in reversed(_root_blocks(sch)):
        name = sch.get(block).name_hint
        if name in kept or name.startswith(PAD_BLOCK) or _is_reduction(sch, block):
            continue
        try:
            sch.compute_inline(block)
        except Exception:  # an output block, or one read with overlapping windows
            continue


def _root_blocks(sch: Any) -> list:
    return list(sch.get_child_blocks(sch.get_sblock("root")))


def _find_block(sch: Any, prefixes: tuple[str, ...]) -> Any | None:
    for block in _root_blocks(sch):
        if sch.get(block).name_hint.startswith(prefixes):
            return block
    return None


def _iter_kinds(sch: Any, block: Any) -> list[str]:
    from tvm import tirx

    return ["S" if iv.iter_type == tirx.IterVar.DataPar else "R" for iv in sch.get(block).iter_vars]


def _is_reduction(sch: Any, block: Any) -> bool:
    return "R" in _iter_kinds(sch, block)


def _block_work(sch: Any, block: Any) -> int:
    """Iterations of a block (for a reduction: its multiply-accumulates)."""
    work = 1
    for iv in sch.get(block).iter_vars:
        work *= int(iv.dom.extent)
    return work


def _extent(sch: Any, loop: Any) -> int:
    return int(sch.get(loop).extent)
