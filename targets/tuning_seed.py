"""MetaSchedule from the rule-based schedules: trials by MAC share, the rules' schedule as the first record.

- `allocate_trials`: each task gets trials in proportion to its share of the model's MACs
  (multiply-accumulates of its reduction blocks times how often `main` calls it), at most 64 a task;
  kernels without MACs (element-wise, layout changes) get none and keep the rule schedules.
- `seed_database`: before the search, the rule schedule of every tuned task is measured and
  committed as a tuning record, so the evolutionary search starts from it (its initial population
  takes the best measured records) and the tuned build is never slower than the untuned one.
"""

from __future__ import annotations

from typing import Any

# Trials one task may get however large its MAC share: past a few generations of the evolutionary search a
# task gains little, and the acceptance's "at most 64 trials per task" is the usual MetaSchedule budget.
MAX_TASK_TRIALS = 64


def block_macs(func: Any) -> int:
    """Multiply-accumulates of an unscheduled PrimFunc: the iteration space of each reduction block."""
    from tvm import s_tir, tirx

    sch = s_tir.Schedule(func)
    total = 0
    for ref in sch.get_child_blocks(sch.get_sblock("root")):
        block = sch.get(ref)
        if any(iv.iter_type != tirx.IterVar.DataPar for iv in block.iter_vars):
            size = 1
            for iv in block.iter_vars:
                size *= int(iv.dom.extent)
            total += size
    return total


def allocate_trials(macs: list[int], trials: int, cap: int | None = MAX_TASK_TRIALS) -> list[int]:
    """Split `trials` over tasks by MAC share (largest remainders); tasks without MACs get 0. No task gets more
    than `cap`: what a big task's share exceeds it by goes to the others, by their shares (water-filling), and
    when every task is at the cap the rest of the budget is left unspent."""
    total = sum(macs)
    if total == 0 or trials <= 0:
        return [0] * len(macs)
    capped: set[int] = set()
    while True:
        free = [i for i, m in enumerate(macs) if m > 0 and i not in capped]
        budget = trials - (cap or 0) * len(capped)
        share = sum(macs[i] for i in free)
        exact = {i: budget * macs[i] / share for i in free} if free and budget > 0 else {}
        over = {i for i, e in exact.items() if cap is not None and e > cap}
        if not over:
            break
        capped |= over
    counts = [cap if i in capped else int(exact.get(i, 0)) for i in range(len(macs))]
    order = sorted(exact, key=lambda i: exact[i] - counts[i], reverse=True)
    for i in order[: trials - sum(counts) if exact else 0]:  # all at the cap: nothing left to place
        counts[i] += 1
    return counts


def task_macs(tasks: list[Any]) -> list[int]:
    """MACs per extracted task, times its call count."""
    return [block_macs(task.dispatched[0]["main"]) * int(task.weight) for task in tasks]


def seed_database(database: Any, tasks: list[Any], target: Any, log: Any = None) -> int:
    """Commit the measured rule schedule of each task as a tuning record; returns how many were seeded."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.dlight.base.transform import _apply_rules

    from rewriter.targets.profile import time_kernel
    from rewriter.targets.schedule_rules import cpu_rules

    seeded = 0
    for task in tasks:
        mod = task.dispatched[0]
        schedules = _apply_rules(mod["main"], target, cpu_rules(target), tunable=False)
        if not schedules:
            continue
        sch = schedules[0]
        try:
            seconds = time_kernel(sch.mod["main"], target) / 1e3
        except Exception as exc:  # the rule schedule does not build here: let the search start from scratch
            if log:
                log(f"seed for {task.task_name} not measured: {exc}")
            continue
        workload = database.commit_workload(mod)
        database.commit_tuning_record(ms.database.TuningRecord(
            sch.trace, workload, [seconds], target, ms.arg_info.ArgInfo.from_prim_func(mod["main"])))
        seeded += 1
    return seeded


def budget_scheduler(budgets: list[int]) -> Any:
    """A MetaSchedule task scheduler that gives task i at most budgets[i] trials, the task furthest
    below its budget first (MetaSchedule's own schedulers cap every task at the same count)."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.task_scheduler import PyTaskScheduler

    @derived_object
    class BudgetScheduler(PyTaskScheduler):
        def __init__(self) -> None:
            super().__init__()
            self.budgets = list(budgets)
            self.done = [0] * len(budgets)
            self.running: set[int] = set()

        def next_task_id(self) -> int:
            for task_id in list(self.running):
                try:
                    measured = len(self.join_running_task(task_id))
                except Exception:  # MetaSchedule terminated the task (its space is exhausted): nothing ran
                    measured = 0
                self.running.discard(task_id)
                self.done[task_id] += measured
                if measured == 0:
                    self.budgets[task_id] = self.done[task_id]
            open_tasks = [i for i, b in enumerate(self.budgets) if self.done[i] < b]
            if not open_tasks:
                return -1
            task_id = min(open_tasks, key=lambda i: self.done[i] / self.budgets[i])
            self.running.add(task_id)
            return task_id

    return BudgetScheduler()
