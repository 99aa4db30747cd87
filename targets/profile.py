"""Per-kernel latency profile of a lowered model: which fused kernels the time goes to.

The Relax VM of TVM 0.27 has no profiler, so each scheduled PrimFunc is compiled on its own and
timed on random inputs of its buffer shapes, then weighted by how often `main` calls it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class KernelTime:
    """One fused kernel: its name, calls per inference, milliseconds per call, scheduled by a rule."""

    name: str
    calls: int
    ms: float
    scheduled: bool

    @property
    def total_ms(self) -> float:
        return self.calls * self.ms


def kernel_profile(scheduled: Any, target: Any, number: int = 5, repeat: int = 3) -> list[KernelTime]:
    """Time every PrimFunc of `scheduled` (an IRModule after scheduling), slowest total first."""
    import tvm

    calls = _call_counts(scheduled)
    rows = []
    for gvar, func in scheduled.functions_items():
        if not isinstance(func, tvm.tirx.PrimFunc) or calls.get(gvar.name_hint, 0) == 0:
            continue
        ms = time_kernel(func, target, number, repeat)
        done = bool(func.attrs is not None and func.attrs.get("tirx.is_scheduled", False))
        rows.append(KernelTime(gvar.name_hint, calls[gvar.name_hint], ms, done))
    return sorted(rows, key=lambda row: -row.total_ms)


def profile_table(rows: list[KernelTime], limit: int = 25) -> str:
    """A markdown table of the slowest kernels with their share of the summed kernel time."""
    total = sum(row.total_ms for row in rows) or 1.0
    lines = ["| kernel | calls | ms/call | total ms | share | rule |", "|---|---|---|---|---|---|"]
    for row in rows[:limit]:
        lines.append(
            f"| {row.name} | {row.calls} | {row.ms:.3f} | {row.total_ms:.3f} | {100 * row.total_ms / total:.1f}% "
            f"| {'yes' if row.scheduled else 'no'} |"
        )
    lines.append(f"| (all {len(rows)} kernels) | | | {total:.3f} | 100% | |")
    return "\n".join(lines)


def _call_counts(mod: Any) -> Counter:
    """How many times the Relax functions call each PrimFunc (call_tir and direct calls)."""
    from tvm import relax

    counts: Counter = Counter()

    def visit(expr: Any) -> None:
        if isinstance(expr, relax.Call):
            for arg in [expr.op, *expr.args]:
                if isinstance(arg, relax.GlobalVar):
                    counts[arg.name_hint] += 1

    for _gvar, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return counts


def time_kernel(func: Any, target: Any, number: int = 5, repeat: int = 3) -> float:
    """Milliseconds per call of one PrimFunc on random inputs of its buffer shapes."""
    import tvm

    func = func.with_attr("global_symbol", "main")
    lib = tvm.compile(tvm.IRModule({"main": func}), target=target)
    device = tvm.cpu()
    rng = np.random.default_rng(0)
    args = []
    for param in func.params:
        shape, dtype = [int(dim) for dim in param.shape], str(param.dtype)
        data = rng.standard_normal(shape).astype(dtype) if "float" in dtype else np.zeros(shape, dtype)
        args.append(tvm.runtime.tensor(data, device))
    timer = lib.mod.time_evaluator("main", device, number=number, repeat=repeat)
    return float(timer(*args).median * 1e3)
