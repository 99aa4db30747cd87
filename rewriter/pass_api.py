"""What a pass is: the protocol, the context it reads, and the result it returns."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np
import onnx

from . import capture
from .calib import Calibration
from .errors import UsageError
from .progress import log


@dataclass
class PassContext:
    """Everything a pass may read besides the model: fit samples, the seed, progress output."""

    fit: Calibration | None
    seed: int = 0
    log: Callable[[str], None] = log
    budget: Mapping[str, float] = field(default_factory=dict)  # e.g. {"macs": 0.5} from --budget
    # Per-unit settings that --budget chose for each pass ({pass: {unit: setting}}, see budget.py): a pass
    # that finds its name here touches only those units, each at its own setting, instead of its options'.
    allocations: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    # The model before any pass (canonical form), for passes that fit against it (distill's teacher);
    # None when a pass runs on its own, where the model it receives is the original.
    teacher: onnx.ModelProto | None = None
    # Channel counts the build target's kernels vectorise over whole (8 float32 lanes for the x86/arm blocked
    # layout, see targets/schedules.py; 1 without a target): structural passes round kept counts to it.
    channel_multiple: int = 1
    # --output-axis as the user gave it ({output: (axis, carries class scores or None)}): passes that read outputs
    # themselves (distill's loss and its own held-out check) read them as the report does.
    output_axes: Mapping[str, tuple[int, bool | None]] = field(default_factory=dict)
    # The gentler settings the pipeline may retry each pass with when it loses more than the fidelity target
    # ({pass: (options, ...)}, mildest last): a pass's own `gentler` less those touching an option the user set.
    retries: Mapping[str, tuple[Mapping[str, Any], ...]] = field(default_factory=dict)

    def require_data(self, pass_name: str, why: str) -> Calibration:
        if self.fit is None:
            raise UsageError(
                f"pass {pass_name!r} needs calibration data ({why}): give --calib FILE.npz "
                "or --calib synthetic"
            )
        return self.fit

    def collect(self, model: onnx.ModelProto, names: Sequence[str], desc: str | None = None) -> dict[str, np.ndarray]:
        """Activations of `names` on the fit samples, concatenated over samples."""
        return capture.collect(model, self.require_data("capture", "activations"), names, desc)

    def reduce(
        self,
        model: onnx.ModelProto,
        names: Sequence[str],
        update: Callable[[dict[str, np.ndarray]], None],
        desc: str | None = None,
    ) -> None:
        """Stream the fit samples' activations into `update`, one sample at a time."""
        capture.reduce(model, self.require_data("capture", "activations"), names, update, desc)

    def reduce_pair(
        self,
        before: onnx.ModelProto,
        after: onnx.ModelProto,
        names: Sequence[str],
        update: Callable[[dict[str, np.ndarray], dict[str, np.ndarray]], bool | None],
        desc: str | None = None,
        after_names: Sequence[str] | None = None,
    ) -> None:
        """Stream each fit sample through two models (e.g. original and rewritten so far) side by side,
        until `update` returns True (it has seen enough). `after_names` defaults to `names`."""
        data = self.require_data("capture", "activations")
        after_run = capture.run(after, data, names if after_names is None else after_names)
        pairs = zip(capture.run(before, data, names, desc), after_run, strict=True)
        for values_before, values_after in pairs:
            if update(values_before, values_after):
                break


@dataclass
class PassResult:
    """The rewritten model plus what the report says about it."""

    model: onnx.ModelProto
    changed: list[str] = field(default_factory=list)
    notes: dict = field(default_factory=dict)


class Pass(Protocol):
    """A rewrite registered by name; options arrive as keyword arguments to __init__."""

    name: ClassVar[str]

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult: ...


class Gentle(Protocol):
    """A pass with milder settings to fall back on. `gentler` lists option overrides, each milder than the one
    before; when the pass loses more fidelity than the target, the pipeline runs it again with the next one
    (only where the user left those options at their defaults)."""

    name: ClassVar[str]
    gentler: ClassVar[tuple[Mapping[str, Any], ...]]


class Allocatable(Protocol):
    """A pass whose strength can be set per unit (a channel group, a layer), so that --budget can spend
    cuts where they cost the least fidelity. `budget_levels` are the per-unit settings tried in the
    sensitivity analysis, weakest first, in the pass's own terms (prune's ratio, svd's rank_ratio)."""

    name: ClassVar[str]
    budget_levels: ClassVar[tuple[float, ...]]

    def budget_units(self, model: onnx.ModelProto) -> dict[str, list[str]]:
        """unit -> the layers (node labels) a cut of it changes; --budget never lets two passes cut one layer."""
        ...
