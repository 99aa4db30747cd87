"""MetaSchedule tuning: tune the fused PrimFuncs into a JSON database, or reuse an existing one.

Needs the extra dependencies psutil and xgboost (apache-tvm's `meta-schedule` extra) and
apache-tvm-ffi 0.1.14.x: 0.1.15.x segfaults while saving tuning records.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable
from typing import Any

from rewriter.errors import ModelError, UsageError
from rewriter.targets.presets import TargetSpec, one_line

WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"


def has_records(work_dir: str | os.PathLike | None) -> bool:
    """True when `work_dir` holds a MetaSchedule JSON database with at least one tuning record."""
    if work_dir is None:
        return False
    records = os.path.join(work_dir, RECORD_FILE)
    workloads = os.path.join(work_dir, WORKLOAD_FILE)
    return os.path.isfile(workloads) and os.path.isfile(records) and os.path.getsize(records) > 0


def load_database(work_dir: str | os.PathLike) -> Any:
    """Open the JSON database in `work_dir` read-only in spirit (nothing is added to it here)."""
    from tvm.s_tir import meta_schedule as ms

    try:
        return ms.database.JSONDatabase(work_dir=str(work_dir), allow_missing=False)
    except Exception as exc:
        raise UsageError(f"cannot read tuning database {work_dir}: {one_line(exc)}") from None


def check_tunable(spec: TargetSpec) -> None:
    """Tuning measures candidates on this machine, so the target must be runnable here."""
    import tvm

    if spec.is_aarch64:
        raise UsageError(f"tuning for {spec.name} needs an aarch64 device to measure on: build it untuned")
    if spec.is_gpu and not tvm.cuda(0).exist:
        raise UsageError(f"tuning for {spec.name} needs a CUDA GPU on this machine")


def build_candidate(mod: Any, target: Any, _params: Any = None) -> Any:
    """MetaSchedule's default_build minus its `import tvm.s_tir.tensor_intrin`.

    That import parses hundreds of TVMScript functions (20-30 s on 2 cores), and LocalBuilder
    starts fresh worker processes for every batch, so it was paid on every tuning round. The
    candidates arrive already scheduled (any tensorize is applied in the tuning process),
    so building them does not need the intrinsic registry.
    """
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm_build(mod, target=target)


def tune(
    fused: Any,
    target: Any,
    trials: int,
    work_dir: str | os.PathLike,
    log: Callable[[str], None] | None = None,
) -> Any:
    """Tune the fused module's PrimFuncs for `trials` trials in total; returns the Database.

    Uses a smaller evolutionary population than MetaSchedule's default: on 2 cores the
    cookbook measured it about 4x faster for about 10% slower kernels.
    """
    try:
        import cloudpickle
        from tvm.s_tir import meta_schedule as ms

        # Ship build_candidate to the builder workers by value: they may not be able to import `targets`.
        cloudpickle.register_pickle_by_value(sys.modules[__name__])
        tasks = ms.relax_integration.extract_tasks(fused, target)
        if target.kind.name == "llvm":
            with contextlib.redirect_stdout(sys.stderr):
                return _tune_from_rules(tasks, target, trials, work_dir, log)
        if log:
            log(f"tuning {len(tasks)} tasks for {trials} trials into {work_dir}")
        # Spread the budget over every task: an unscheduled task runs as naive single-threaded code,
        # so one measured schedule per task is worth more than many for a few tasks.
        per_task = max(1, trials // max(len(tasks), 1))
        strategy = ms.search_strategy.EvolutionarySearch(
            population_size=128, init_min_unmeasured=32, genetic_num_iters=2
        )
        # MetaSchedule prints its progress tables on stdout; the CLI keeps stdout for its result.
        with contextlib.redirect_stdout(sys.stderr):
            return ms.relax_integration.tune_relax(
                fused,
                builder=ms.builder.LocalBuilder(f_build=build_candidate),
                params={},
                target=target,
                work_dir=str(work_dir),
                max_trials_global=max(trials, len(tasks)),
                max_trials_per_task=per_task,
                num_trials_per_iter=min(32, per_task),
                strategy=strategy,
                seed=0,
            )
    except ImportError as exc:
        raise ModelError(f"tuning needs psutil and xgboost ({exc})") from None
    except Exception as exc:
        raise ModelError(f"MetaSchedule tuning failed: {one_line(exc)}") from None




def _tune_from_rules(tasks: list[Any], target: Any, trials: int, work_dir: str | os.PathLike,
                     log: Callable[[str], None] | None) -> Any:
    """CPU: trials by each task's MAC share, each search seeded with the rule schedule's measured record."""
    from tvm.s_tir import meta_schedule as ms

    from rewriter.targets.tuning_seed import allocate_trials, budget_scheduler, seed_database, task_macs

    budgets = allocate_trials(task_macs(tasks), trials)
    chosen = [(task, count) for task, count in zip(tasks, budgets, strict=True) if count > 0]
    database = ms.database.JSONDatabase(work_dir=str(work_dir))
    seeded = seed_database(database, [task for task, _ in chosen], target, log)
    if log:
        log(f"tuning {len(chosen)} of {len(tasks)} tasks (by MAC share) for {trials} trials into {work_dir}; "
            f"{seeded} seeded with the rule schedules")
    if not chosen:
        return database
    contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
        [task for task, _ in chosen], str(work_dir), strategy=ms.search_strategy.EvolutionarySearch(
            population_size=128, init_min_unmeasured=32, genetic_num_iters=2), seed=0)
    counts = [count for _, count in chosen]
    ms.tune.tune_tasks(
        tasks=contexts, task_weights=weights, work_dir=str(work_dir), max_trials_global=sum(counts),
        max_trials_per_task=max(counts), num_trials_per_iter=min(16, max(counts)),
        builder=ms.builder.LocalBuilder(f_build=build_candidate), database=database,
        task_scheduler=budget_scheduler(counts),
    )
    return database
