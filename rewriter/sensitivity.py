"""Per-unit sensitivity curves: what each channel group or layer costs in fidelity at a few strengths.

For every pass that can be set per unit (see pass_api.Allocatable), each unit is rewritten alone at each of
the pass's `budget_levels`, on the canonical model, and the result is measured by the guardrail's figures on
probe samples taken from the fit set (never the held-out samples the final fidelity is reported on: cuts chosen
by those would report a selected, optimistic figure): its drop and its MACs, parameters and bytes. The curves
are what --budget allocates over (budget.py). They are cached on disk, keyed by the model's bytes, the pass
and its options, the levels, the calibration data, how the outputs are read and the seed, so a model is
analysed once and later runs (other budgets) reuse them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx

from . import capture, metrics
from .errors import RewriterError
from .loading import serialize
from .pass_api import PassContext
from .progress import log, muted, progress

FORMAT = 5  # bump when what a curve means changes, so old cache entries are not read
# Fit samples each trial cut is fitted on: the curves rank cuts against each other, they need not be the
# final fit, and a trial per unit and level over every sample would cost the whole rewrite many times over.
TRIAL_SAMPLES = 64
# Fit samples the trial cuts are measured on: those after the TRIAL_SAMPLES when at least MIN_PROBE remain
# (out of sample for the trial fits), else the fit samples themselves (small calibration sets).
PROBE_SAMPLES, MIN_PROBE = 128, 32


def cache_dir() -> Path:
    """$REWRITER_CACHE, else $XDG_CACHE_HOME/rewriter, else ~/.cache/rewriter; curves live in sensitivity/."""
    root = os.environ.get("REWRITER_CACHE")
    if root:
        return Path(root) / "sensitivity"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "rewriter" / "sensitivity"


def cache_key(model: onnx.ModelProto, pass_name: str, options: Mapping, levels, ctx: PassContext, probe) -> str:
    digest = hashlib.sha256()
    digest.update(serialize(model))
    # how the outputs are read (--output-axis included) decides what a drop means
    layouts = {name: layout.as_report() for name, layout in probe.layouts.items()}
    settings = [FORMAT, pass_name, dict(options), list(levels), ctx.seed, ctx.channel_multiple, layouts]
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for data in (ctx.fit, probe.held):
        for name in sorted(data.inputs):
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(data.inputs[name]).tobytes())
        if data.labels is not None:
            digest.update(np.ascontiguousarray(data.labels).tobytes())
    return digest.hexdigest()[:32]


def probe_reference(model: onnx.ModelProto, ctx: PassContext, reference):
    """The guardrail's figures (same outputs, axes and class scores as `reference`) on fit samples: what
    the curves are measured on. The unrewritten canonical `model` gives the reference outputs."""
    if ctx.fit is None or len(ctx.fit) == 0:
        return reference
    count = len(ctx.fit)
    start = TRIAL_SAMPLES if count - TRIAL_SAMPLES >= MIN_PROBE else 0
    probe = ctx.fit.take(np.arange(start, min(count, start + PROBE_SAMPLES)))
    outputs = capture.collect_samples(model, probe, reference.names, desc="sensitivity probe outputs")
    return dataclasses.replace(reference, held=probe, outputs=outputs)


def _point(model: onnx.ModelProto, fid: dict) -> dict:
    counts = metrics.summarize(model)
    return {"drop": float(fid["drop"]), "rel_l2": float(fid["rel_l2"]),
            **{k: counts[k] for k in ("macs", "params", "bytes")}}


def measure_curves(rewrite, options: Mapping, model: onnx.ModelProto, ctx: PassContext, probe, check) -> dict:
    """{units: {unit: [{level, drop, rel_l2, macs, params, bytes} or {level, error}]}, touches: {unit: [layer]},
    base: the unrewritten model's point} for one pass, from the cache
    when this model, pass, options and data were analysed before. `check` is the pipeline's model check;
    `probe` the figures on fit samples (probe_reference)."""
    levels = tuple(rewrite.budget_levels)
    if ctx.fit is not None and len(ctx.fit) > TRIAL_SAMPLES:
        ctx = dataclasses.replace(ctx, fit=ctx.fit.take(np.arange(TRIAL_SAMPLES)))  # the fit set is shuffled
    key = cache_key(model, rewrite.name, options, levels, ctx, probe)
    path = cache_dir() / f"{rewrite.name}-{key}.json"
    cached = _read(path)
    if cached is not None:
        log(f"sensitivity of {rewrite.name}: {len(cached['units'])} unit(s) from the cache ({path})")
        return {**{k: cached[k] for k in ("units", "touches", "base")}, "cached": True, "path": str(path)}
    touches = rewrite.budget_units(model)
    units = list(touches)
    base = _point(model, probe.measure(model))
    curves: dict[str, list[dict]] = {}
    trials = [(unit, level) for unit in units for level in levels]
    for unit, level in progress(trials, desc=f"sensitivity of {rewrite.name} ({len(units)} units x {len(levels)})"):
        with muted():
            curves.setdefault(unit, []).append(_trial(rewrite, model, ctx, probe, check, unit, level))
    _write(path, {"format": FORMAT, "pass": rewrite.name, "levels": list(levels), "base": base, "units": curves,
                  "touches": touches})
    return {"units": curves, "touches": touches, "base": base, "cached": False, "path": str(path)}


def _trial(rewrite, model, ctx: PassContext, probe, check, unit: str, level: float) -> dict:
    """The pass applied to `unit` alone at `level`, measured; a unit the pass refuses is recorded, not fatal."""
    alone = dataclasses.replace(ctx, allocations={rewrite.name: {unit: level}}, budget={})
    try:
        result = rewrite.run(model, alone)
        if not result.changed:
            return {"level": level, "error": "unchanged"}
        new = check(result.model, f"pass {rewrite.name!r}")
    except RewriterError as exc:
        return {"level": level, "error": str(exc)}
    return {"level": level, **_point(new, probe.measure(new))}


def _read(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == FORMAT else None


def _write(path: Path, data: dict) -> None:
    """Atomic: a concurrent run reads a whole file or none. An unwritable cache only costs the reuse."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle)
        os.replace(tmp, path)
    except OSError as exc:
        log(f"warning: sensitivity cache not written ({exc.strerror or exc}); the next run analyses again")
