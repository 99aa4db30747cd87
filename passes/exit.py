"""`exit`: dynamic early exit through ONNX `If` control nodes (BranchyNet, Teerapittayanon et al. 2016;
control nodes as in Liu & Deng 2018), with heads and thresholds calibrated on data instead of hand-set.

Exit points are cut tensors (every input -> output path passes through them, found with a dominator
tree), so the rest of the network depends on the input only through them. At each point a head (global
average pooling, then one affine layer) is fitted to reproduce the model's own logits: ridge regression
onto them, or a multinomial logistic regression onto the model's own top-1 answers. No labels are used.
Each head's confidence (max softmax probability, top-2 margin or 1 - normalised entropy) decides: an exit's
threshold is the lowest one at which the samples leaving there agree with the full model's top-1 at
`agreement`, chosen on out-of-fold head outputs (each sample scored by a head fitted without it). The same
choice made without each fold and applied to it estimates how the thresholds generalise to unseen samples.
Exits that do not lower the expected MACs per sample are dropped.
"""

from __future__ import annotations

import numpy as np
import onnx

from rewriter.dominators import CutPoint, cut_points
from rewriter.errors import ModelError, UsageError
from rewriter.graph import GraphView, attributes
from rewriter.metrics import count_macs
from rewriter.pass_api import PassContext, PassResult
from rewriter.registry import register_pass

from ._exit_graph import Answer, ExitSpec, build_exit_model
from ._exit_heads import (
    CRITERIA,
    HEADS,
    ExitStats,
    choose_thresholds,
    confidence,
    cross_validated,
    expected_macs,
    fit_head,
    fold_ids,
    out_of_fold_logits,
    pooled,
    route,
)

# Automatic points stop where this share of the MACs is spent: later heads cannot save enough.
MAX_FRACTION = 0.9
MIN_SAMPLES = 20
_PASS_THROUGH = {"Identity", "Cast", "Dropout", "Flatten", "Reshape", "Squeeze"}
_FINISH = {"Softmax", "LogSoftmax", "Sigmoid"}
NEEDS_DATA = "its heads and thresholds are fitted to the model's own outputs on calibration samples"


class _Scores:
    """Where a classifier's scores come from: the tensor the heads imitate and how answers are finished."""

    def __init__(self, model: onnx.ModelProto) -> None:
        outputs = list(model.graph.output)
        view = GraphView(model)
        shape = view.static_shape(outputs[0].name) if len(outputs) == 1 else None
        if shape is None or len(shape) != 2 or shape[0] != 1 or shape[1] < 2:
            described = ", ".join(f"{o.name} {view.shape(o.name)}" for o in outputs)
            raise ModelError(
                f"exit needs a classifier with one class-score output of shape [N, classes]; this model gives "
                f"{described} (detectors, segmenters and sequence models are not supported)"
            )
        self.output, self.classes = outputs[0].name, shape[1]
        self.logits, self.finish = self.output, None
        node = view.producer(self.output)
        while node is not None and node.op_type in _PASS_THROUGH and view.static_shape(node.input[0]) == shape:
            node = view.producer(node.input[0])
        if node is not None and node.op_type in _FINISH and view.static_shape(node.input[0]) == shape:
            if node.op_type == "Sigmoid" or attributes(node).get("axis", -1) in (1, -1):
                self.logits, self.finish = node.input[0], node.op_type
        self.from_probabilities = False
        self.dtype = outputs[0].type.tensor_type.elem_type

    def targets(self, values: np.ndarray) -> np.ndarray:
        """Logits for the heads to fit, from the captured score tensor. An output that holds probabilities
        with no Softmax in sight is fitted as log-probabilities, and early answers then get a Softmax."""
        if self.finish is None and np.all(values >= 0) and np.allclose(values.sum(axis=1), 1.0, atol=1e-3):
            self.from_probabilities, self.finish = True, "Softmax"
        return np.log(np.clip(values, 1e-12, None)) if self.from_probabilities else values


@register_pass("exit")
class ExitPass:
    """Early-exit heads at cut tensors, behind If control nodes with calibrated thresholds."""

    name = "exit"

    def __init__(
        self,
        *,
        points: str = "3",
        criterion: str = "margin",
        agreement: float = 0.99,
        head: str = "ridge",
        folds: int = 5,
    ) -> None:
        if criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")
        if head not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, got {head!r}")
        if not 0.0 < agreement <= 1.0:
            raise ValueError(f"agreement must be in (0, 1], got {agreement}")
        if folds < 2:
            raise ValueError(f"folds must be at least 2, got {folds}")
        self.points = str(points).strip()
        self.criterion, self.agreement, self.head, self.folds = criterion, agreement, head, folds

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        scores = _Scores(model)
        data = ctx.require_data("exit", NEEDS_DATA)
        if len(data) < MIN_SAMPLES:
            raise UsageError(f"exit needs at least {MIN_SAMPLES} fit samples for its heads, got {len(data)}")
        total = count_macs(model)
        points = self._points(model, total)
        features, logits = self._capture(model, points, scores, ctx)
        folds = fold_ids(len(logits), self.folds, ctx.seed)
        top = np.argmax(logits, axis=1)
        oof = [out_of_fold_logits(f, logits, self.head, folds, ctx.seed) for f in features]
        confs = [confidence(o, self.criterion) for o in oof]
        agrees = [np.argmax(o, axis=1) == top for o in oof]
        head_macs = [f.shape[1] * scores.classes for f in features]
        keep = self._select(points, confs, agrees, head_macs, total)
        thresholds = choose_thresholds([confs[i] for i in keep], [agrees[i] for i in keep], self.agreement) \
            if keep else []
        # An exit no fit sample is left to reach (all left earlier) has no finite threshold and would never
        # fire: it goes, and the others keep theirs (nobody was routed to it).
        keep = [i for i, t in zip(keep, thresholds, strict=True) if np.isfinite(t)]
        thresholds = [t for t in thresholds if np.isfinite(t)]
        if not keep:
            why = _no_exit_reason(len(logits), self.agreement)
            ctx.log(f"exit: no exit point lowers the expected MACs at agreement {self.agreement}; model unchanged"
                    + (f" ({why})" if why else ""))
            return PassResult(model, [], {"exits": [], "macs_total": total, "why": why,
                                          "candidates": [p.tensor for p in points]})
        confs, agrees = [confs[i] for i in keep], [agrees[i] for i in keep]
        costs = _costs([points[i] for i in keep], [head_macs[i] for i in keep])
        full = total + sum(head_macs[i] for i in keep)
        heads = [fit_head(features[i], logits, self.head, ctx.seed) for i in keep]  # deployed: all fit samples
        specs = [ExitSpec(points[i].tensor, len(points[i].shape), h.weight, h.bias, t)
                 for i, h, t in zip(keep, heads, thresholds, strict=True)]
        answer = Answer(scores.finish, scores.dtype)
        new = build_exit_model(model, scores.output, specs, self.criterion, answer)
        fit_stats = route(confs, agrees, thresholds)
        held = cross_validated(confs, agrees, self.agreement, folds)
        notes = self._notes(specs, costs, full, total, fit_stats, held)
        notes.update(macs_total=total, candidates=[p.tensor for p in points])
        return PassResult(new, [s.tensor for s in specs], notes)

    def _points(self, model: onnx.ModelProto, total: int) -> list[CutPoint]:
        """Exit candidates: named cut tensors, or a count of them spread over the cumulative MACs."""
        usable = [p for p in cut_points(model) if p.shape is not None and len(p.shape) in (2, 4)]
        if not self.points.isdigit():
            by_name = {p.tensor: p for p in usable}
            names = [n.strip() for n in self.points.split(",") if n.strip()]
            missing = [n for n in names if n not in by_name]
            if missing or not names:
                hint = ", ".join(p.tensor for p in _block_ends(usable, total)[:6])
                raise UsageError(f"exit.points {missing or self.points!r}: not cut tensors of the model "
                                 f"(a head needs a [N, C, H, W] or [N, D] tensor every path passes; e.g. {hint})")
            order = [p.tensor for p in usable]
            return sorted((by_name[n] for n in set(names)), key=lambda p: order.index(p.tensor))
        count = int(self.points)
        if count < 1:
            raise UsageError("exit.points must name tensors or give a count of at least 1")
        ends = _block_ends(usable, total)
        if not ends:
            raise ModelError("exit found no tensor that every path passes through before the last "
                             f"{1 - MAX_FRACTION:.0%} of the MACs: there is nowhere to put an exit")
        return _spread(ends, count, total)

    def _capture(self, model: onnx.ModelProto, points: list[CutPoint], scores: _Scores, ctx: PassContext):
        """Pooled features at every point and the model's logits, one fit sample at a time."""
        parts: list[list[np.ndarray]] = [[] for _ in points]
        outs: list[np.ndarray] = []

        def update(values: dict[str, np.ndarray]) -> None:
            for part, point in zip(parts, points, strict=True):
                part.append(pooled(values[point.tensor]))
            outs.append(values[scores.logits].reshape(1, -1))

        names = sorted({p.tensor for p in points} | {scores.logits})
        ctx.reduce(model, names, update, desc="exit: features")
        logits = scores.targets(np.concatenate(outs).astype(np.float64))
        return [np.concatenate(p).astype(np.float64) for p in parts], logits

    def _select(self, points, confs, agrees, head_macs, total) -> list[int]:
        """Drop exits one at a time while that lowers the expected MACs per sample (out-of-fold routing)."""

        def cost(keep: list[int]) -> float:
            if not keep:
                return float(total)
            thresholds = choose_thresholds([confs[i] for i in keep], [agrees[i] for i in keep], self.agreement)
            stats = route([confs[i] for i in keep], [agrees[i] for i in keep], thresholds)
            heads = [head_macs[i] for i in keep]
            return expected_macs(stats.exits, _costs([points[i] for i in keep], heads), total + sum(heads))

        keep = list(range(len(points)))
        while keep:
            best = min(([i for i in keep if i != j] for j in keep), key=cost)
            if cost(best) >= cost(keep):
                break
            keep = best
        return keep

    def _notes(self, specs, costs, full: int, total: int, fit: ExitStats, held: ExitStats) -> dict:
        exits = []
        for k, (spec, cost) in enumerate(zip(specs, costs, strict=True)):
            exits.append({
                "tensor": spec.tensor, "macs": cost, "macs_fraction": cost / total, "threshold": spec.threshold,
                "fit_share": _share(fit, k), "fit_agreement": _agreement(fit, k),
                "held_out_share": _share(held, k), "held_out_agreement": _agreement(held, k),
            })
        return {
            "criterion": self.criterion, "head": self.head, "agreement_target": self.agreement, "exits": exits,
            "full_macs": full, "full_share_held_out": _share(held, len(specs)),
            "expected_macs": expected_macs(held.exits, costs, full),
            "expected_macs_fraction": expected_macs(held.exits, costs, full) / total,
            "agreement_held_out": float(held.agree.mean()),
            "held_out": "each fold's samples routed by thresholds chosen without them (cross-validation)",
        }


def _no_exit_reason(samples: int, agreement: float) -> str:
    """Thresholds keep one disagreement in reserve, so certifying `agreement` needs enough samples."""
    needed = int(np.ceil(agreement / max(1.0 - agreement, 1e-12)))
    if samples >= needed:
        return ""
    return (f"with {samples} fit samples no exit can show agreement {agreement} with a disagreement in reserve; "
            f"that needs at least {needed}: give more calibration samples or lower exit.agreement")


def _costs(points: list[CutPoint], head_macs: list[int]) -> list[int]:
    """MACs spent by a sample leaving at each exit: the prefix plus every head it passed."""
    return [p.macs + sum(head_macs[: k + 1]) for k, p in enumerate(points)]


def _share(stats: ExitStats, k: int) -> float:
    return float(np.mean(stats.exits == k)) if len(stats.exits) else 0.0


def _agreement(stats: ExitStats, k: int) -> float | None:
    leaving = stats.exits == k
    return float(stats.agree[leaving].mean()) if leaving.any() else None


def _block_ends(points: list[CutPoint], total: int) -> list[CutPoint]:
    """Of the cut tensors computed with the same MACs (conv -> norm -> activation), the last: a block's output."""
    ends: dict[int, CutPoint] = {}
    for point in points:
        if 0 < point.macs <= MAX_FRACTION * total:
            ends[point.macs] = point
    return sorted(ends.values(), key=lambda p: p.macs)


def _spread(ends: list[CutPoint], count: int, total: int) -> list[CutPoint]:
    """`count` points closest to evenly spaced shares of the MACs (all of them when there are fewer)."""
    if len(ends) <= count:
        return ends
    chosen: list[CutPoint] = []
    for j in range(1, count + 1):
        goal = j / (count + 1) * MAX_FRACTION * total
        left = [p for p in ends if p not in chosen]
        chosen.append(min(left, key=lambda p: abs(p.macs - goal)))
    return sorted(chosen, key=lambda p: p.macs)
