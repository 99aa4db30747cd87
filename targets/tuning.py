"""MetaSchedule tuning: tune the fused PrimFuncs into a JSON database, or reuse an existing one.

A database is reused task by task: a task (fused kernel) that already has a valid tuning record
gets no trials, only the tasks without records are tuned, and the build applies every record.
So a second build of the same model with the same database runs no trials. `summary` says what
happened for the report (`target.tuning`).

Candidates are measured on this machine (MetaSchedule's LocalRunner) or, with `remote` = (tracker
HOST:PORT, device key), on devices from a TVM RPC tracker (its RPCRunner): this machine compiles
every candidate into a shared library (cross-linked for aarch64), the device loads and times it.
The rule-schedule seeds are measured where the candidates are, so the records compare like with like.
An llvm target without `num-cores` (the arm preset) is tuned with the device's runtime thread count.
Tested with an aarch64 TVM RPC server under qemu-user (qemu_runner.start_rpc_server).

Needs the extra dependencies psutil and xgboost (apache-tvm's `meta-schedule` extra) and
apache-tvm-ffi 0.1.14.x: 0.1.15.x segfaults while saving tuning records.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

from rewriter.errors import ModelError, RewriterError, UsageError
from rewriter.targets.presets import ARM_CROSS_CC, TargetSpec, one_line

WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"
Log = Callable[[str], None]
Remote = tuple[str, str]  # (tracker HOST:PORT, device key)
# One remote measurement (tracker request, upload, load, time) gets this long before it counts as failed.
RPC_RUN_TIMEOUT_S = 60


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


def runner_name(remote: Remote | None) -> str:
    """Where the candidates are measured, for the report's `target.tuning.runner`."""
    return "local" if remote is None else f"rpc tracker {remote[0]} key {remote[1]}"


def check_tunable(spec: TargetSpec, remote: Remote | None = None) -> None:
    """Without `remote` the candidates run on this machine, so the target must be runnable here; with
    it the tracker must answer and know the key (UsageError in one line, within a deadline)."""
    import tvm

    if spec.is_gpu and not tvm.cuda(0).exist:
        # Without a driver here the build goes through cuda_offline's child process, which does not tune.
        raise UsageError(f"tuning for {spec.name} needs a CUDA GPU on this machine")
    if remote is not None:
        from rewriter.targets.remote import check_device

        check_device(*remote)
    elif spec.is_aarch64:
        raise UsageError(f"tuning for {spec.name} needs an aarch64 device to measure on: give one with "
                         "--rpc HOST:PORT --device-key KEY, or build it untuned")


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


def export_candidate(mod: Any, aarch64: bool = False) -> str:
    """Export a candidate for a remote device as a linked shared library (MetaSchedule's default is a tar
    of object files that the device links with its own compiler, which boards often lack); `aarch64`
    links it with the cross compiler."""
    import tempfile

    from tvm.support import cc

    path = os.path.join(tempfile.mkdtemp(prefix="rewriter-candidate-"), "candidate.so")
    mod.export_library(path, fcompile=cc.cross_compiler(ARM_CROSS_CC) if aarch64 else None)
    return path


def _is_aarch64(target: Any) -> bool:
    return str(target.attrs.get("mtriple", "")).startswith("aarch64")


def _last_line(text: str) -> str:
    """MetaSchedule's builder and runner errors are a heading, a traceback, then the cause: keep the cause."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return one_line(lines[-1] if lines else "unknown error")


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


def tune(fused: Any, target: Any, trials: int, work_dir: str | os.PathLike, log: Log | None = None,
         remote: Remote | None = None) -> tuple[Any, dict]:
    """Tune the fused module's tasks that have no record in `work_dir` for up to `trials` trials in
    total, measuring on this machine or (with `remote`) on a device from the RPC tracker; returns the
    database (created if missing) and the tuning summary.

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
        if remote is not None and target.kind.name == "llvm" and target.attrs.get("num-cores") is None:
            target = _with_device_cores(target, remote, log)
        tasks = _tunable(ms.relax_integration.extract_tasks(fused, target))
        _import_tensor_intrinsics(log)  # TuneContext imports them; done here, in seconds instead of minutes
        database = load_database(work_dir, create=True)
        records_before = len(database)
        have = [task_has_record(database, task) for task in tasks]
        measure = _Measure(target, remote)
        # MetaSchedule prints its progress tables on stdout; the CLI keeps stdout for its result.
        with contextlib.redirect_stdout(sys.stderr):
            if target.kind.name == "llvm":
                tuned, seeded = _tune_from_rules(tasks, have, target, trials, work_dir, database, log, measure)
            else:
                tuned, seeded = _tune_evenly(tasks, have, target, trials, work_dir, database, log, measure), 0
        applied = sum(task_has_record(database, task) for task in tasks)
        trials_run = len(database) - records_before - seeded
        if remote is not None and tuned and not trials_run and not seeded:
            raise ModelError(f"no candidate could be measured on {runner_name(remote)}"
                             f"{': ' + measure.first_error if measure.first_error else ''}")
        return database, summary(len(tasks), sum(have), tuned, trials_run, seeded, applied, len(database),
                                 runner_name(remote))
    except ImportError as exc:
        raise ModelError(f"tuning needs psutil and xgboost ({exc})") from None
    except RewriterError:
        raise
    except Exception as exc:
        raise ModelError(f"MetaSchedule tuning failed: {one_line(exc)}") from None


def _with_device_cores(target: Any, remote: Remote, log: Log | None) -> Any:
    """The target with `num-cores` from the device: MetaSchedule refuses an llvm target without it (it sizes the
    parallel loops), and the arm preset leaves it out, since this machine's core count says nothing about the
    board. Only the tuning uses it: the build applies the records to the preset's own target (a record is
    found by its workload, not its target), so the artifact is the same as without tuning but for the schedules."""
    import tvm

    from rewriter.targets.remote import device_threads

    cores = device_threads(*remote)
    if log:
        log(f"the device {remote[1]!r} runs the TVM runtime on {cores} thread(s): tuning with num-cores={cores}")
    return tvm.target.Target({**target.export(), "num-cores": cores})


def summary(tasks: int, with_records: int, tuned: int, trials_run: int, seeded: int, applied: int,
            records: int, runner: str | None = None) -> dict:
    """The report's `target.tuning` (`db` is filled in by the caller: None for a temporary database).

    tasks: the model's tunable kernels (fused PrimFuncs); tasks_with_records: those the database
    already had a valid record for; tasks_tuned: those given trials in this build; trials_run: search
    candidates measured and committed in this build (MetaSchedule may overshoot its budget a little);
    seeded: rule schedules measured and committed as first records (CPU); tasks_applied: those built
    from a record; records: records in the database after the build; runner: where this build measured
    candidates ("local", "rpc tracker HOST:PORT key KEY"; None when it only applied records).
    """
    return {"db": None, "tasks": tasks, "tasks_with_records": with_records, "tasks_tuned": tuned,
            "trials_run": trials_run, "seeded": seeded, "tasks_applied": applied, "records": records,
            "runner": runner}


def _tunable(tasks: list[Any]) -> list[Any]:
    """MetaSchedule skips tasks that arrive already scheduled; leave them out of the count too."""
    return [task for task in tasks if not task.mod.attrs.get("tirx.is_scheduled", False)]


def _tune_from_rules(tasks: list[Any], have: list[bool], target: Any, trials: int, work_dir: str | os.PathLike,
                     database: Any, log: Log | None, measure: _Measure) -> tuple[int, int]:
    """CPU: trials by each task's MAC share, each search seeded with the rule schedule's measured record.

    Returns how many tasks were given trials and how many of them were seeded."""
    from tvm.s_tir import meta_schedule as ms

    from rewriter.targets.tuning_seed import allocate_trials, budget_scheduler, task_macs

    budgets = allocate_trials(task_macs(tasks), trials)
    chosen = [(task, count) for task, count, known in zip(tasks, budgets, have, strict=True)
              if count > 0 and not known]
    skipped = sum(1 for count, known in zip(budgets, have, strict=True) if count > 0 and known)
    seeded = measure.seed(database, [task for task, _ in chosen], log)
    if log:
        log(f"tuning {len(chosen)} of {len(tasks)} tasks (by MAC share; {skipped} skipped: records in the database) "
            f"for {sum(count for _, count in chosen)} of {trials} trials into {work_dir}; "
            f"{seeded} seeded with the rule schedules; candidates measured on {measure.name}")
    if not chosen:
        return 0, seeded
    with _unnamed_handlers_detached():
        contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
            [task for task, _ in chosen], str(work_dir), strategy=_strategy(), seed=0)
    counts = [count for _, count in chosen]
    ms.tune.tune_tasks(
        tasks=contexts, task_weights=weights, work_dir=str(work_dir), max_trials_global=sum(counts),
        max_trials_per_task=max(counts), num_trials_per_iter=min(16, max(counts)),
        builder=measure.builder, runner=measure.runner, database=database,
        task_scheduler=budget_scheduler(counts),
    )
    return len(chosen), seeded


def _tune_evenly(tasks: list[Any], have: list[bool], target: Any, trials: int, work_dir: str | os.PathLike,
                 database: Any, log: Log | None, measure: _Measure) -> int:
    """GPU: the budget spread evenly over every task: an unscheduled task runs as naive code, so one
    measured schedule per task is worth more than many for a few tasks. Returns how many were tuned."""
    from tvm.s_tir import meta_schedule as ms

    per_task = max(1, trials // max(len(tasks), 1))
    chosen = [task for task, known in zip(tasks, have, strict=True) if not known]
    if log:
        log(f"tuning {len(chosen)} of {len(tasks)} tasks ({len(tasks) - len(chosen)} skipped: records in the "
            f"database) for {per_task * len(chosen)} of {trials} trials into {work_dir}; candidates measured "
            f"on {measure.name}")
    if not chosen:
        return 0
    with _unnamed_handlers_detached():
        contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
            chosen, str(work_dir), strategy=_strategy(), seed=0)
    ms.tune.tune_tasks(
        tasks=contexts, task_weights=weights, work_dir=str(work_dir), max_trials_global=per_task * len(chosen),
        max_trials_per_task=per_task, num_trials_per_iter=min(32, per_task),
        builder=measure.builder, runner=measure.runner, database=database,
    )
    return len(chosen)


class _Measure:
    """The builder and runner of one tuning run: local, or candidates exported as shared libraries and
    timed on a device from the RPC tracker. Also measures the rule-schedule seeds the same way."""

    def __init__(self, target: Any, remote: Remote | None) -> None:
        from tvm.s_tir import meta_schedule as ms

        self.target, self.remote, self.name = target, remote, runner_name(remote)
        self.first_error = ""
        if remote is None:
            self.builder, self.runner = ms.builder.LocalBuilder(f_build=build_candidate), "local"
            return
        from rewriter.targets.remote import parse_tracker

        host, port = parse_tracker(remote[0])
        self.builder = ms.builder.LocalBuilder(
            f_build=build_candidate, f_export=functools.partial(export_candidate, aarch64=_is_aarch64(target)))
        self.runner = ms.runner.RPCRunner(ms.runner.RPCConfig(
            tracker_host=host, tracker_port=port, tracker_key=remote[1], session_priority=1,
            session_timeout_sec=RPC_RUN_TIMEOUT_S))

    def seed(self, database: Any, tasks: list[Any], log: Log | None) -> int:
        if self.remote is None:
            from rewriter.targets.tuning_seed import seed_database

            return seed_database(database, tasks, self.target, log)
        return self._seed_remote(database, tasks, log)

    def _seed_remote(self, database: Any, tasks: list[Any], log: Log | None) -> int:
        """tuning_seed.seed_database with the measurement on the device: the rule schedules built by the
        tuning builder, timed by the RPC runner. ModelError when the device measured none of them."""
        import shutil

        from tvm.s_tir import meta_schedule as ms
        from tvm.s_tir.dlight.base.transform import _apply_rules

        from rewriter.targets.schedule_rules import cpu_rules

        pending = []
        for task in tasks:
            mod = task.dispatched[0]
            schedules = _apply_rules(mod["main"], self.target, cpu_rules(self.target), tunable=False)
            if schedules:
                pending.append((task, mod, schedules[0]))
        if not pending:
            return 0
        built = self.builder.build([ms.builder.BuilderInput(sch.mod, self.target) for _, _, sch in pending])
        measured, errors = [], []
        for (task, mod, sch), result in zip(pending, built, strict=True):
            if result.error_msg:
                errors.append(f"seed for {task.task_name} does not build: {_last_line(result.error_msg)}")
                continue
            args = ms.arg_info.ArgInfo.from_prim_func(mod["main"])
            measured.append((task, mod, sch, args, str(result.artifact_path)))
        device = "cpu" if self.target.kind.name == "llvm" else self.target.kind.name
        futures = self.runner.run([ms.runner.RunnerInput(path, device, args) for *_, args, path in measured])
        seeded = 0
        for (task, mod, sch, args, path), future in zip(measured, futures, strict=True):
            result = future.result()
            shutil.rmtree(os.path.dirname(path), ignore_errors=True)
            if result.error_msg:
                errors.append(f"{task.task_name}: {_last_line(result.error_msg)}")
                continue
            seconds = sorted(float(getattr(t, "value", t)) for t in result.run_secs)
            database.commit_tuning_record(ms.database.TuningRecord(
                sch.trace, database.commit_workload(mod), [seconds[len(seconds) // 2]], self.target, args))
            seeded += 1
        for error in errors:
            if log:
                log(f"seed not measured on {self.name}: {error}")
        if errors and not self.first_error:
            self.first_error = errors[0]
        if not seeded:
            raise ModelError(f"no rule schedule could be measured on {self.name}: {errors[0]}")
        return seeded


def _import_tensor_intrinsics(log: Log | None = None) -> None:
    """Import tvm.s_tir.tensor_intrin (which MetaSchedule's TuneContext imports) with a source-free
    inspect.stack. Its modules define hundreds of TVMScript functions, each of which calls inspect.stack();
    for every frame of a file that is not on disk (<frozen importlib._bootstrap>, <ast>) that scans all of
    sys.modules, so the import took 40-50 s in the CLI and 3 minutes under pytest. TVMScript reads from
    the stack only frames and locals, and the source line of a frame (to tell a method of an
    @I.ir_module class), which none of these module-level functions is."""
    if "tvm.s_tir.tensor_intrin" in sys.modules:
        return
    import inspect
    import time

    def frames(context: int = 1) -> list[inspect.FrameInfo]:
        found, frame = [], sys._getframe(1)
        while frame is not None:
            found.append(inspect.FrameInfo(frame, frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name,
                                           None, None))
            frame = frame.f_back
        return found

    start, stack = time.perf_counter(), inspect.stack
    inspect.stack = frames
    try:
        import tvm.s_tir.tensor_intrin  # noqa: F401
    finally:
        inspect.stack = stack
    if log:
        log(f"tuning: TVM's tensor intrinsics registered ({time.perf_counter() - start:.1f} s)")


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
