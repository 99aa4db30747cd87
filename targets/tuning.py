"""MetaSchedule tuning: tune the fused PrimFuncs into a JSON database, or reuse an existing one.

A database is reused task by task: a task (fused kernel) that already has a valid tuning record
gets no trials, only the tasks without records are tuned, and the build applies every record.
So a second build of the same model with the same database runs no trials. `summary` says what
happened for the report (`target.tuning`).

Needs the extra dependencies psutil and xgboost (apache-tvm's `meta-schedule` extra) and
apache-tvm-ffi 0.1.14.x: 0.1.15.x segfaults while saving tuning records.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

from rewriter.errors import ModelError, RewriterError, UsageError
from rewriter.targets.presets import TargetSpec, one_line

WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"
Log = Callable[[str], None]


def check_db_path(work_dir: str | os.PathLike, trials: int) -> None:
    """Before any lowering: without trials the database must exist and hold records; with trials
    it is created if missing, but cannot be a file."""
    if os.path.exists(work_dir) and not os.path.isdir(work_dir):
        raise UsageError(f"tuning database {work_dir} is a file, not a directory")
    if trials == 0:
        check_database(work_dir)


def check_database(work_dir: str | os.PathLike) -> None:
    """UsageError unless `work_dir` holds a MetaSchedule JSON database with at least one tuning record.

    For `--tuning-db` without trials: a mistyped path must not build untuned in silence.
    """
    if not os.path.isdir(work_dir):
        raise UsageError(f"tuning database {work_dir} does not exist (with --tune-trials 0 it is only read)")
    missing = [name for name in (WORKLOAD_FILE, RECORD_FILE) if not os.path.isfile(os.path.join(work_dir, name))]
    if missing:
        raise UsageError(f"{work_dir} holds no tuning database ({' and '.join(missing)} missing)")
    if len(load_database(work_dir)) == 0:
        raise UsageError(f"tuning database {work_dir} holds no tuning records")


def load_database(work_dir: str | os.PathLike, create: bool = False) -> Any:
    """Open the JSON database in `work_dir`: both files must exist unless `create` (then missing ones are made)."""
    from tvm.s_tir import meta_schedule as ms

    try:
        return ms.database.JSONDatabase(work_dir=str(work_dir), allow_missing=create)
    except Exception as exc:
        raise UsageError(f"cannot read tuning database {work_dir}: {one_line(exc)}") from None


def task_has_record(database: Any, task: Any) -> bool:
    """True when `database` holds a valid (measured, not failed) record for the task's workload,
    the same query MetaScheduleApplyDatabase makes when it applies the database."""
    mod = task.dispatched[0]
    if not database.has_workload(mod):
        return False
    # commit_workload of a known workload only returns it: nothing is written.
    return len(database.get_top_k(database.commit_workload(mod), 1)) > 0


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


def reuse(fused: Any, target: Any, work_dir: str | os.PathLike, log: Log | None = None) -> tuple[Any, dict]:
    """Open an existing database for a build without trials; returns it and the tuning summary."""
    from tvm.s_tir import meta_schedule as ms

    database = load_database(work_dir)
    try:
        tasks = _tunable(ms.relax_integration.extract_tasks(fused, target))
    except Exception as exc:
        raise ModelError(f"MetaSchedule task extraction failed: {one_line(exc)}") from None
    have = sum(task_has_record(database, task) for task in tasks)
    if log:
        log(f"applying tuning records from {work_dir}: {have} of {len(tasks)} tasks have records")
    return database, summary(len(tasks), have, 0, 0, 0, have, len(database))


def tune(fused: Any, target: Any, trials: int, work_dir: str | os.PathLike, log: Log | None = None) -> tuple[Any, dict]:
    """Tune the fused module's tasks that have no record in `work_dir` for up to `trials` trials in
    total; returns the database (created if missing) and the tuning summary.

    The budget is split over all the tasks as if none had records (by MAC share on CPU, evenly on
    GPU), then the shares of the tasks with records are dropped: a second build with the same trials
    and database runs none, and a build with more trials tunes only the tasks that still lack records.
    Uses a smaller evolutionary population than MetaSchedule's default: on 2 cores the cookbook
    measured it about 4x faster for about 10% slower kernels.
    """
    try:
        import cloudpickle
        from tvm.s_tir import meta_schedule as ms

        # Ship build_candidate to the builder workers by value: they may not be able to import `targets`.
        cloudpickle.register_pickle_by_value(sys.modules[__name__])
        tasks = _tunable(ms.relax_integration.extract_tasks(fused, target))
        database = load_database(work_dir, create=True)
        records_before = len(database)
        have = [task_has_record(database, task) for task in tasks]
        # MetaSchedule prints its progress tables on stdout; the CLI keeps stdout for its result.
        with contextlib.redirect_stdout(sys.stderr):
            if target.kind.name == "llvm":
                tuned, seeded = _tune_from_rules(tasks, have, target, trials, work_dir, database, log)
            else:
                tuned, seeded = _tune_evenly(tasks, have, target, trials, work_dir, database, log), 0
        applied = sum(task_has_record(database, task) for task in tasks)
        trials_run = len(database) - records_before - seeded
        return database, summary(len(tasks), sum(have), tuned, trials_run, seeded, applied, len(database))
    except ImportError as exc:
        raise ModelError(f"tuning needs psutil and xgboost ({exc})") from None
    except RewriterError:
        raise
    except Exception as exc:
        raise ModelError(f"MetaSchedule tuning failed: {one_line(exc)}") from None


def summary(tasks: int, with_records: int, tuned: int, trials_run: int, seeded: int, applied: int,
            records: int) -> dict:
    """The report's `target.tuning` (`db` is filled in by the caller: None for a temporary database).

    tasks: the model's tunable kernels (fused PrimFuncs); tasks_with_records: those the database
    already had a valid record for; tasks_tuned: those given trials in this build; trials_run: search
    candidates measured and committed in this build (MetaSchedule may overshoot its budget a little);
    seeded: rule schedules measured and committed as first records (CPU); tasks_applied: those built
    from a record; records: records in the database after the build.
    """
    return {"db": None, "tasks": tasks, "tasks_with_records": with_records, "tasks_tuned": tuned,
            "trials_run": trials_run, "seeded": seeded, "tasks_applied": applied, "records": records}


def _tunable(tasks: list[Any]) -> list[Any]:
    """MetaSchedule skips tasks that arrive already scheduled; leave them out of the count too."""
    return [task for task in tasks if not task.mod.attrs.get("tirx.is_scheduled", False)]


def _tune_from_rules(tasks: list[Any], have: list[bool], target: Any, trials: int, work_dir: str | os.PathLike,
                     database: Any, log: Log | None) -> tuple[int, int]:
    """CPU: trials by each task's MAC share, each search seeded with the rule schedule's measured record.

    Returns how many tasks were given trials and how many of them were seeded."""
    from tvm.s_tir import meta_schedule as ms

    from rewriter.targets.tuning_seed import allocate_trials, budget_scheduler, seed_database, task_macs

    budgets = allocate_trials(task_macs(tasks), trials)
    chosen = [(task, count) for task, count, known in zip(tasks, budgets, have, strict=True)
              if count > 0 and not known]
    skipped = sum(1 for count, known in zip(budgets, have, strict=True) if count > 0 and known)
    seeded = seed_database(database, [task for task, _ in chosen], target, log)
    if log:
        log(f"tuning {len(chosen)} of {len(tasks)} tasks (by MAC share; {skipped} skipped: records in the database) "
            f"for {sum(count for _, count in chosen)} of {trials} trials into {work_dir}; "
            f"{seeded} seeded with the rule schedules")
    if not chosen:
        return 0, seeded
    with _unnamed_handlers_detached():
        contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
            [task for task, _ in chosen], str(work_dir), strategy=_strategy(), seed=0)
    counts = [count for _, count in chosen]
    ms.tune.tune_tasks(
        tasks=contexts, task_weights=weights, work_dir=str(work_dir), max_trials_global=sum(counts),
        max_trials_per_task=max(counts), num_trials_per_iter=min(16, max(counts)),
        builder=ms.builder.LocalBuilder(f_build=build_candidate), database=database,
        task_scheduler=budget_scheduler(counts),
    )
    return len(chosen), seeded


def _tune_evenly(tasks: list[Any], have: list[bool], target: Any, trials: int, work_dir: str | os.PathLike,
                 database: Any, log: Log | None) -> int:
    """GPU: the budget spread evenly over every task: an unscheduled task runs as naive code, so one
    measured schedule per task is worth more than many for a few tasks. Returns how many were tuned."""
    from tvm.s_tir import meta_schedule as ms

    per_task = max(1, trials // max(len(tasks), 1))
    chosen = [task for task, known in zip(tasks, have, strict=True) if not known]
    if log:
        log(f"tuning {len(chosen)} of {len(tasks)} tasks ({len(tasks) - len(chosen)} skipped: records in the "
            f"database) for {per_task * len(chosen)} of {trials} trials into {work_dir}")
    if not chosen:
        return 0
    with _unnamed_handlers_detached():
        contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
            chosen, str(work_dir), strategy=_strategy(), seed=0)
    ms.tune.tune_tasks(
        tasks=contexts, task_weights=weights, work_dir=str(work_dir), max_trials_global=per_task * len(chosen),
        max_trials_per_task=per_task, num_trials_per_iter=min(32, per_task),
        builder=ms.builder.LocalBuilder(f_build=build_candidate), database=database,
    )
    return len(chosen)


def _strategy() -> Any:
    from tvm.s_tir import meta_schedule as ms

    return ms.search_strategy.EvolutionarySearch(population_size=128, init_min_unmeasured=32, genetic_num_iters=2)


@contextlib.contextmanager
def _unnamed_handlers_detached() -> Iterator[None]:
    """MetaSchedule's logger set-up (logging.dictConfig) lists the handlers already on its logger by
    name and fails on an unnamed one ("'NoneType' object has no attribute 'format'"). The host
    application may have attached one (pytest's log capture does, to every non-propagating logger,
    so a second tuning run in one process failed): detach them meanwhile, then attach them again."""
    logger = logging.getLogger("tvm.s_tir.meta_schedule")
    unnamed = [handler for handler in logger.handlers if handler.get_name() is None]
    for handler in unnamed:
        logger.removeHandler(handler)
    try:
        yield
    finally:
        for handler in unnamed:
            logger.addHandler(handler)
