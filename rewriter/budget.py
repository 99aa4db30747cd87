"""--budget: per-unit strengths chosen across the listed passes to meet a MACs, parameter or size budget
with the least fidelity lost (AIMET's greedy compression-ratio selection over per-layer sensitivity curves,
in the spirit of AMC's per-layer search).

The curves (sensitivity.py) say, for each unit of each allocatable pass, the drop and the savings at each
level. The allocation greedily takes the cut with the least added error per unit of saving until the
estimated savings meet the budget. The error is the output's squared relative L2 error: errors of separate
cuts are close to independent, so their energies add (the guardrail's drop is nearly flat for small cuts
and then jumps, and the plain L2 error grows sublinearly with a cut's depth, which made one deep cut look
cheaper per saving than several light ones); the real passes then run with those
settings and the result is measured. Units interact (a layer pruned and then split saves less than the two
curves add up to), so when the result misses the budget the allocation is asked for correspondingly more, a
few rounds at most; when it loses far more than the curves said, one uniform setting is tried as well and
the result that loses less on the probe samples (never the held-out ones the report shows) is kept.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import onnx

from . import metrics
from .errors import GuardrailError, UsageError
from .pass_api import PassContext
from .pipeline import Reference, checked, run_passes
from .progress import log
from .sensitivity import measure_curves, probe_reference

METRICS = {"macs": metrics.count_macs, "params": metrics.count_params, "size": metrics.count_bytes}
POINT_KEY = {"macs": "macs", "params": "params", "size": "bytes"}
ROUNDS = 4  # allocate, run, measure; ask for more when the result misses the budget
# A result whose drop exceeds the curves' estimate this much is checked against one uniform setting: cuts
# that are harmless alone can compound (refits of pooled or final layers fitted on one row per image).
SUSPECT_FACTOR, SUSPECT_MARGIN = 3.0, 0.01


def check_budget(budget: Mapping[str, float] | None) -> dict[str, float]:
    """{metric: share of the model's} with metric in macs/params/size and share in (0, 1]."""
    if budget is not None and (not isinstance(budget, Mapping) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in budget.values())):
        raise UsageError(f"budget must map macs/params/size to a number, got {budget!r}")
    budget = dict(budget or {})
    if "latency" in budget:
        raise UsageError("--budget latency is not supported: give macs=R, params=R or size=R")
    unknown = sorted(set(budget) - set(METRICS))
    if unknown:
        raise UsageError(f"--budget supports macs=R, params=R and size=R, not {', '.join(unknown)}")
    for key, value in budget.items():
        if not 0.0 < value <= 1.0:
            raise UsageError(f"--budget {key} must be in (0, 1], got {value}")
    return budget


def totals(model: onnx.ModelProto) -> dict[str, int]:
    return {key: count(model) for key, count in METRICS.items()}


def achieved(budget: Mapping[str, float], base: Mapping[str, int], model: onnx.ModelProto) -> dict:
    shares = {key: METRICS[key](model) / max(base[key], 1) for key in budget}
    return {"targets": dict(budget), "achieved": shares,
            "met": all(shares[k] <= budget[k] + 1e-9 for k in budget)}


@dataclass(frozen=True)
class Step:
    """One unit of one pass taken to a level: its estimated drop and savings against the base model."""

    pass_name: str
    unit: str
    level: float
    drop: float
    cost: float  # what the allocation minimises: the output's squared relative error, additive over cuts
    savings: Mapping[str, float]
    touches: frozenset[str]


def _steps(curves: Mapping[str, dict]) -> dict[tuple[str, str], list[Step]]:
    """Usable levels of each (pass, unit), with savings and drop measured against the unrewritten model."""
    found = {}
    for name, curve in curves.items():
        base = curve["base"]
        for unit, points in curve["units"].items():
            touches = frozenset(curve["touches"].get(unit, [unit]))
            steps = [Step(name, unit, p["level"], max(p["drop"] - base["drop"], 0.0),
                          max(p["rel_l2"] ** 2 - base["rel_l2"] ** 2, 0.0),
                          {k: base[POINT_KEY[k]] - p[POINT_KEY[k]] for k in METRICS}, touches)
                     for p in points if "error" not in p]
            if steps:
                found[(name, unit)] = steps
    return found


def allocate(
    curves: Mapping[str, dict], need: Mapping[str, float]
) -> tuple[dict[str, dict[str, float]], list[dict]]:
    """Greedy: repeatedly move one unit to the level with the least added error per added (normalised)
    saving, until every metric's estimated saving reaches `need`. Returns the allocation and the path taken
    (estimated savings and drop after each move), which also tells the closest result short of the budget."""
    options = _steps(curves)
    chosen: dict[tuple[str, str], Step] = {}
    saved = dict.fromkeys(need, 0.0)
    drop, path = 0.0, []
    while any(saved[k] < need[k] for k in need):
        best = _best_move(options, chosen, {k: need[k] - saved[k] for k in need if saved[k] < need[k]})
        if best is None:
            break
        key, step = best
        old = chosen.get(key)
        for k in need:
            saved[k] += step.savings[k] - (old.savings[k] if old else 0.0)
        drop += step.drop - (old.drop if old else 0.0)
        chosen[key] = step
        path.append({"pass": step.pass_name, "unit": step.unit, "level": step.level,
                     "saved": dict(saved), "estimated_drop": drop})
    allocation: dict[str, dict[str, float]] = {}
    for (name, unit), step in chosen.items():
        allocation.setdefault(name, {})[unit] = step.level
    return allocation, path


def _best_move(options, chosen, remaining: Mapping[str, float]) -> tuple[tuple[str, str], Step] | None:
    """The cheapest next cut per unit of what is still needed. A layer one pass already cuts is not offered
    to another: the curves were measured one cut at a time, and two cuts of one layer compound (a pruned
    layer split as well loses far more than the two curves add up to)."""
    best, best_rank = None, None
    taken = {layer: s.pass_name for s in chosen.values() for layer in s.touches}
    for key, steps in options.items():
        old = chosen.get(key)
        if any(taken.get(layer, key[0]) != key[0] for layer in steps[0].touches):
            continue
        for step in steps:
            # Savings beyond what is still needed are worth nothing: a big cut must not win by overshooting.
            gain = sum(min(max(step.savings[k] - (old.savings[k] if old else 0.0), 0.0), remaining[k])
                       / max(remaining[k], 1e-12) for k in remaining)
            if gain <= 1e-12 or (old is not None and step.level == old.level):
                continue
            cost = max(step.cost - (old.cost if old else 0.0), 0.0)
            rank = (cost / gain, -gain)
            if best_rank is None or rank < best_rank:
                best, best_rank = (key, step), rank
    return best


def run_to_budget(
    base: onnx.ModelProto,
    plan: Sequence[tuple[object, dict]],
    ctx: PassContext,
    reference: Reference,
    max_drop: float | None,
) -> tuple[onnx.ModelProto, list[dict], dict]:
    """The passes that decide the counts run to the budget (a few rounds, a cross-check); the trailing passes
    that keep the graph as it is (distill: `keeps_graph`) change no MACs, parameters or bytes, so they run
    once, on the result, not in every round."""
    cut = len(plan)
    while cut > 0 and getattr(plan[cut - 1][0], "keeps_graph", False):
        cut -= 1
    final, records, report = _run_cuts(base, plan[:cut], ctx, reference, max_drop)
    if cut < len(plan):
        final, recovery = run_passes(final, plan[cut:], ctx, reference, max_drop)
        records = [*records, *recovery]
        report.update(achieved(ctx.budget, totals(base), final))
    return final, records, report


def _run_cuts(base, plan, ctx: PassContext, reference: Reference, max_drop):
    """Sensitivity, allocation and the real run; then, when the cuts together lost far more than their
    curves said, the uniform setting as a cross-check, keeping whichever result lost less."""
    allocatable = [(rw, opts) for rw, opts in plan if hasattr(rw, "budget_units")]
    probe = probe_reference(base, ctx, reference) if allocatable else reference
    curves = {rw.name: measure_curves(rw, opts, base, ctx, probe, checked) for rw, opts in allocatable}
    units = {n: {"cached": c["cached"], "path": c["path"], "base": c["base"], "units": c["units"]}
             for n, c in curves.items()}
    report = {"method": "sensitivity", "probe_samples": len(probe.held), "sensitivity": units}
    try:
        final, records = _allocated(base, plan, ctx, reference, max_drop, curves, report)
    except GuardrailError as exc:
        fallback = _uniform(base, plan, ctx, reference, max_drop, list(curves))
        if fallback is None or not fallback[2]["met"]:
            raise
        log(f"budget: the per-unit cuts failed the guardrail ({exc}); one uniform setting passes it")
        report.update(fallback[2], chosen="uniform", per_unit_refused=str(exc))
        return fallback[0], fallback[1], report
    report["chosen"] = "per unit"
    # Judged on the probe samples, where the curves were measured, never on the held-out samples the report
    # shows: a result chosen by those would report a selected figure.
    drop = probe.measure(final)["drop"]
    if report["met"] and drop > SUSPECT_FACTOR * report["estimated_drop"] + SUSPECT_MARGIN:
        log(f"budget: the cuts together lost more than their curves said (drop {drop:.4f} on the probe samples, "
            f"estimated {report['estimated_drop']:.4f}); trying one uniform setting as well")
        fallback = _uniform(base, plan, ctx, reference, max_drop, list(curves))
        if fallback is not None and fallback[2]["met"]:
            probe_drops = {"per unit": drop, "uniform": probe.measure(fallback[0])["drop"]}
            report["probe_drops"] = probe_drops
            if probe_drops["uniform"] < drop:
                report.update(fallback[2], chosen="uniform")
                return fallback[0], fallback[1], report
    return final, records, report


def _allocated(base, plan, ctx: PassContext, reference, max_drop, curves, report: dict):
    """Allocate, run, measure; ask for more of what fell short, a few rounds at most."""
    budget = dict(ctx.budget)
    base_totals = totals(base)
    need = {k: (1.0 - budget[k]) * base_totals[k] for k in budget}
    ask, previous = dict(need), None
    for round_ in range(1, ROUNDS + 1):
        allocation, path = allocate(curves, ask)
        if allocation == previous:  # the curves have nothing more to give
            break
        previous = allocation
        estimate = path[-1] if path else {"saved": dict.fromkeys(need, 0.0), "estimated_drop": 0.0}
        if any(estimate["saved"][k] < ask[k] * (1 - 1e-9) for k in ask) and round_ == 1:
            _unreachable(budget, base_totals, estimate)
        log(f"budget: round {round_}: {sum(len(v) for v in allocation.values())} unit(s) cut, estimated drop "
            f"{estimate['estimated_drop']:.4f}")
        try:
            final, records = run_passes(base, plan, replace(ctx, allocations=allocation), reference, max_drop)
        except GuardrailError as exc:
            raise GuardrailError(f"{exc}; {_closest(path, max_drop, base_totals)}") from exc
        report.update(achieved(budget, base_totals, final), allocation=allocation, rounds=round_, path=path,
                      estimated_drop=estimate["estimated_drop"])
        if report["met"]:
            return final, records
        for k in budget:
            real = max(base_totals[k] * (1.0 - report["achieved"][k]), 1e-9 * base_totals[k])  # what the run saved
            if real < need[k]:
                # The curves add up savings of cuts that overlap (a layer losing input and output channels), so
                # scale by how far they overstated this allocation's saving, not only by what was asked.
                ask[k] = max(ask[k] * need[k] / real, need[k] * estimate["saved"][k] / real) * 1.02
        if all(ask[k] > base_totals[k] for k in ask):
            break
    log(f"warning: --budget not met after {report['rounds']} round(s): "
        + ", ".join(f"{k} {v:.3f} > {budget[k]}" for k, v in report["achieved"].items() if v > budget[k]))
    return final, records


def _uniform(base, plan, ctx: PassContext, reference, max_drop, allocatable: list[str]):
    """The first allocatable pass at the one setting that meets a MACs budget, the others left out of
    the budget (an empty allocation cuts nothing). None where that is not defined (params/size budgets)."""
    if set(ctx.budget) != {"macs"} or not allocatable:
        return None
    uniform = replace(ctx, allocations={name: {} for name in allocatable[1:]})
    try:
        final, records = run_passes(base, plan, uniform, reference, max_drop)
    except (GuardrailError, UsageError):
        return None
    return final, records, achieved(ctx.budget, totals(base), final)


def _unreachable(budget: Mapping[str, float], base_totals: Mapping[str, int], estimate: dict) -> None:
    shares = {k: 1 - estimate["saved"][k] / max(base_totals[k], 1) for k in budget}
    raise UsageError("cannot reach --budget " + ", ".join(f"{k}={v}" for k, v in budget.items())
                     + ": with every unit the passes may cut at its strongest level the model keeps "
                     + ", ".join(f"{shares[k]:.3f} of its {k}" for k in budget)
                     + " (layers the passes leave alone, blocked channel groups)")


def _closest(path: list[dict], max_drop: float | None, base_totals: Mapping[str, int]) -> str:
    within = [p for p in path if max_drop is None or p["estimated_drop"] <= max_drop]
    if not within:
        return "no cut the sensitivity curves list stays within --max-drop"
    last = within[-1]
    shares = ", ".join(f"{k}≈{1 - v / max(base_totals[k], 1):.3f}" for k, v in last["saved"].items())
    return (f"closest within --max-drop by the sensitivity curves: {shares} "
            f"(estimated drop {last['estimated_drop']:.4f})")
