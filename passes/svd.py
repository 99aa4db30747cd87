"""`svd`: low-rank splits of Gemm/MatMul and Conv layers (Xue et al. 2013; Jaderberg et al. 2014).

A weight W (K x N, inputs x outputs) becomes two layers A (K x r) and B (r x N). In data-aware mode the
split minimises the layer's *output* error on calibration inputs X: with C = E[x x^T] = S^T S, the best
rank-r product is W V_r V_r^T, where V_r are the top right singular vectors of S W (whitening by the input
covariance). Plain mode uses the SVD of W itself. Conv layers split either by channels (k x k with r
filters, then 1 x 1) or spatially (k x 1 with r filters, then 1 x k): the spatial split starts from the SVD
of the rearranged weight, and in data-aware mode its 1 x k half is then refitted by least squares so that it
reproduces the original layer's outputs from the k x 1 half's outputs.
"""

from __future__ import annotations

import math

import numpy as np
import onnx

from rewriter.errors import UsageError
from rewriter.graph import QUANTISED_OPS, GraphView, drop_unused_initializers, quantised_op
from rewriter.layers import conv_geometry, conv_patches, conv_rows
from rewriter.metrics import count_macs
from rewriter.pass_api import PassContext, PassResult
from rewriter.progress import progress
from rewriter.registry import register_pass

from ._lowrank import (
    Moments,
    fitted_target,
    lowrank_factor,
    output_error,
    pick_rank,
    residual_share,
    ridge_refit,
    right_basis,
    spatial_factor,
)
from ._svd_layers import (
    Layer,
    add_initializer,
    copy_model,
    factor_weights,
    find_layer,
    independent_waves,
    initializer_array,
    is_head,
    live_node,
    replace_node,
    replacement,
)

# Above this input width a covariance would take too much memory: such layers fall back to weight SVD.
MAX_COVARIANCE_DIM = 4608
# Sequential fitting stops reading samples once a layer's moments rest on this many input rows.
ROWS_PER_INPUT, MIN_ROWS = 64, 16384
NEEDS_DATA = "data_aware=true fits each split to the layer's outputs; or --opt svd.data_aware=false"


# Early stopping still draws its rows from at least this many samples (when there are that many): an early
# conv layer yields thousands of rows per image, and one image is not a calibration set.
SPREAD_SAMPLES = 32
HELD_EVERY = 4  # one fit sample in this many is held out to choose the ridge on


def _row_picker(ctx: PassContext, rows_needed: int):
    """A seeded choice of at most rows_needed / SPREAD_SAMPLES rows of each sample's matrices (same rows in each)."""
    rng = np.random.default_rng(ctx.seed)
    samples = len(ctx.require_data("svd", NEEDS_DATA))
    cap = max(1, math.ceil(rows_needed / min(samples, SPREAD_SAMPLES)))

    def pick(*matrices: np.ndarray) -> tuple[np.ndarray, ...]:
        if len(matrices[0]) <= cap:
            return matrices
        index = np.sort(rng.choice(len(matrices[0]), cap, replace=False))
        return tuple(m[index] for m in matrices)

    return pick


def _rows_needed(k: int) -> int:
    """Input rows after which k x k moments are stable enough to stop reading samples."""
    return max(ROWS_PER_INPUT * k, MIN_ROWS)


def _split_moments(sums: list[list[np.ndarray]], counts: list[int]) -> Moments:
    """Moments over all rows, carrying the fit and held-out parts when both have rows."""
    total = _moments(*((f + h) / max(sum(counts), 1) for f, h in zip(*sums, strict=True)))
    if total.unchanged or min(counts) == 0:
        return total
    fit, held = (Moments(*(m / n for m in part)) for part, n in zip(sums, counts, strict=True))
    return Moments(total.new, total.cross, total.old, split=(fit, held))


def _moments(new: np.ndarray, cross: np.ndarray, old: np.ndarray) -> Moments:
    """Moments, marked unchanged when the rewritten model feeds the layer exactly what the original does."""
    if np.array_equal(new, old) and np.array_equal(cross, old):
        return Moments.same(old)
    return Moments(new, cross, old)


def _error_summary(details: dict) -> dict:
    """Mean relative output error over the split layers, this fit against plain weight SVD at the same ranks."""
    fitted = [d for d in details.values() if "output_error" in d]
    if not fitted:
        return {}
    return {"mean_output_error": float(np.mean([d["output_error"] for d in fitted])),
            "mean_output_error_weight_svd": float(np.mean([d["output_error_weight_svd"] for d in fitted]))}


@register_pass("svd")
class SvdPass:
    """Low-rank split of Gemm, MatMul and Conv layers."""

    name = "svd"
    budget_levels = (0.5, 0.25, 0.125)  # rank_ratio tried per layer by --budget

    def __init__(
        self,
        *,
        rank_ratio: float = 0.5,
        energy: float | None = None,
        data_aware: bool = True,
        conv: str = "channel",
        min_rank: int = 1,
        ops: str = "Gemm,MatMul,Conv",
        keep_heads: bool = True,
        skip: str = "",
        sequential: bool = True,
    ) -> None:
        if not 0.0 < rank_ratio <= 1.0:
            raise ValueError(f"rank_ratio must be in (0, 1], got {rank_ratio}")
        if energy is not None and not 0.0 < energy <= 1.0:
            raise ValueError(f"energy must be in (0, 1], got {energy}")
        if conv not in ("channel", "spatial"):
            raise ValueError(f"conv must be 'channel' or 'spatial', got {conv!r}")
        if min_rank < 1:
            raise ValueError(f"min_rank must be at least 1, got {min_rank}")
        self.rank_ratio, self.energy, self.data_aware = rank_ratio, energy, data_aware
        self.conv_mode, self.min_rank = conv, min_rank
        self.keep_heads, self.sequential = keep_heads, sequential
        self.skip = {name.strip() for name in skip.split(",") if name.strip()}
        self.ops = {op.strip() for op in ops.split(",") if op.strip()}
        unknown = self.ops - {"Gemm", "MatMul", "Conv"}
        if unknown:
            raise ValueError(f"ops may name Gemm, MatMul and Conv, not {sorted(unknown)}")

    @staticmethod
    def explain(view: GraphView, node: onnx.NodeProto) -> str | None:
        """None when svd (default options) could split this node, else why not (`rewrite inspect`)."""
        if node.op_type not in ("Gemm", "MatMul", "Conv"):
            return f"svd splits Gemm, MatMul and Conv, not {node.op_type}"
        found = find_layer(view, node, "channel")
        return found if isinstance(found, str) else None

    def budget_units(self, model: onnx.ModelProto) -> dict[str, list[str]]:
        """The layers this pass may split, for --budget's per-layer choice: label -> the layers it changes."""
        return {la.label: [la.label] for la in self._layers(model, GraphView(model))[0]}

    def _layers(self, model: onnx.ModelProto, view: GraphView) -> tuple[list[Layer], dict[str, str]]:
        layers, skipped = [], {}
        for node in model.graph.node:
            if node.op_type in self.ops:
                found = self._select(view, node)
                if isinstance(found, Layer):
                    layers.append(found)
                else:
                    skipped[node.name or node.output[0]] = found
            elif node.op_type in QUANTISED_OPS:  # dynamic / QOperator quantisation: integer layers stay as they are
                skipped[node.name or node.output[0]] = quantised_op(node.op_type)
        return layers, skipped

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        model = copy_model(model)
        view = GraphView(model)
        layers, skipped = self._layers(model, view)
        names = {n.name for n in model.graph.node} | {o for n in model.graph.node for o in n.output}
        missing = sorted(self.skip - names)
        if missing:
            raise UsageError(f"svd.skip names no node of the model: {', '.join(missing)}")
        ratio = self.rank_ratio
        allocation = ctx.allocations.get(self.name)
        if allocation is not None and self.energy is not None:
            raise UsageError("svd: --budget chooses the ranks; it cannot be combined with svd.energy")
        if allocation is not None:  # --budget chose a rank_ratio per layer from the sensitivity curves
            skipped.update({la.label: "left whole by --budget" for la in layers if la.label not in allocation})
            layers = [la for la in layers if la.label in allocation]
        elif "macs" in ctx.budget:
            ratio = self._ratio_for_budget(model, layers, ctx.budget["macs"])
        ratios = {la.label: allocation[la.label] if allocation is not None else ratio for la in layers}
        changed, details = [], {}
        original = copy_model(model) if self.data_aware else model  # the reference the fits aim at
        covs = {} if self.sequential else self._covariances(model, layers, ctx)  # one pass serves all layers
        for wave in progress(independent_waves(model, layers), desc="svd: layer groups"):
            if self.sequential:
                covs = self._paired_moments(original, model, wave, ctx)
            for layer in wave:
                outcome = self._split(model, view, layer, covs.get(layer.label), ratios[layer.label])
                if isinstance(outcome, dict) and layer.kind == "spatial" and self.data_aware:
                    outcome.update(self._refit_spatial(original, model, layer, ctx))
                if isinstance(outcome, str):
                    skipped[layer.label] = outcome
                else:
                    changed.append(layer.label)
                    details[layer.label] = outcome
        drop_unused_initializers(model)
        mode = ("sequential " if self.sequential else "") + "data-aware" if self.data_aware else "weight"
        notes = {"mode": mode, "rank_ratio": ratio if allocation is None else "per layer (--budget)",
                 **_error_summary(details), "layers": details, "skipped": skipped}
        if allocation is None and ratio != self.rank_ratio:
            notes["effective_options"] = {"rank_ratio": ratio}  # --budget chose it
        return PassResult(model, changed, notes)

    def _refit_spatial(
        self, original: onnx.ModelProto, model: onnx.ModelProto, layer: Layer, ctx: PassContext
    ) -> dict:
        """Refit the 1 x k half of a spatial split by least squares, so that it maps the k x 1 half's
        outputs (on the rewritten model) onto the original layer's outputs."""
        ctx.require_data("svd", NEEDS_DATA)
        second = live_node(model, layer.node.output[0])
        start4d = initializer_array(model, second.input[1])
        bias = initializer_array(model, second.input[2]) if len(second.input) > 2 else 0.0
        geometry = conv_geometry(second, list(start4d.shape))
        start = start4d.reshape(len(start4d), -1).T.astype(np.float64)
        k = len(start)
        gram, cross, energy, count = np.zeros((k, k)), np.zeros_like(start), 0.0, 0

        pick = _row_picker(ctx, _rows_needed(k))

        def update(before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> bool:
            nonlocal energy, count
            patches = conv_patches(after[second.input[0]].astype(np.float64), geometry)
            out = before[layer.node.output[0]].astype(np.float64)
            patches, target = pick(patches, conv_rows(out) - bias)
            gram[:] += patches.T @ patches
            cross[:] += patches.T @ target
            energy += float(np.sum(target**2))
            count += len(patches)
            return count >= _rows_needed(k)

        ctx.reduce_pair(original, model, [layer.node.output[0]], update, after_names=[second.input[0]])
        fitted = ridge_refit(gram, cross, start)
        name = add_initializer(model, f"{second.name}_refit", fitted.T.reshape(start4d.shape), start4d.dtype)
        second.input[1] = name
        return {"output_error": residual_share(gram, cross, energy, fitted),
                "output_error_weight_svd": residual_share(gram, cross, energy, start)}

    def _ratio_for_budget(self, model: onnx.ModelProto, layers: list[Layer], budget: float) -> float:
        """The largest rank_ratio whose splits bring the model's MACs to `budget` x the current MACs."""
        if self.energy is not None:
            raise UsageError("svd: --budget chooses the rank; it cannot be combined with svd.energy")
        total = count_macs(model)

        def macs_at(ratio: float) -> int:
            ranks = [min(la.full_rank, max(self.min_rank, math.ceil(ratio * la.full_rank))) for la in layers]
            return total - sum(la.saving(r) for la, r in zip(layers, ranks, strict=True))

        low, high = 1e-4, 1.0
        if macs_at(low) > budget * total:
            raise UsageError(
                f"svd cannot reach --budget macs={budget}: at the lowest rank the model keeps "
                f"{macs_at(low) / max(total, 1):.3f} of its MACs (heads, depthwise and other layers it leaves alone)"
            )
        for _ in range(40):
            mid = (low + high) / 2
            low, high = (mid, high) if macs_at(mid) <= budget * total else (low, mid)
        return low

    def _select(self, view: GraphView, node: onnx.NodeProto) -> Layer | str:
        if (node.name or node.output[0]) in self.skip:
            return "named in svd.skip"
        if self.keep_heads and is_head(view, node):
            return "output head kept (svd.keep_heads=true): no layer between it and a model output"
        return find_layer(view, node, self.conv_mode)

    def _covariances(self, model: onnx.ModelProto, layers: list[Layer], ctx: PassContext) -> dict:
        """E[x x^T] of each layer's input rows on the fit samples, accumulated one sample at a time."""
        wanted = [la for la in layers if self._fits_on_data(la)]
        if not wanted:
            return {}
        ctx.require_data("svd", NEEDS_DATA)
        sums = {la.label: np.zeros((la.w.shape[0],) * 2) for la in wanted}
        counts = dict.fromkeys(sums, 0)

        def update(values: dict[str, np.ndarray]) -> None:
            for la in wanted:
                r = la.rows(values[la.node.input[0]].astype(np.float64))
                sums[la.label] += r.T @ r
                counts[la.label] += len(r)

        names = sorted({la.node.input[0] for la in wanted})
        ctx.reduce(model, names, update, desc="svd: input covariances")
        return {k: Moments.same(sums[k] / max(counts[k], 1)) for k in sums}

    def _paired_moments(
        self, original: onnx.ModelProto, current: onnx.ModelProto, wave: list[Layer], ctx: PassContext
    ) -> dict[str, Moments]:
        """Moments of each layer's input in the original and in the model rewritten so far, sample by sample.

        No layer of a wave feeds another, so one pass over the samples serves them all."""
        wanted = [la for la in wave if self._fits_on_data(la)]
        if not wanted:
            return {}
        ctx.require_data("svd", NEEDS_DATA)
        # [fit, held-out] x [new, cross, old] per layer; every HELD_EVERY-th sample is held out
        sums = {la.label: [[np.zeros((la.w.shape[0],) * 2) for _ in range(3)] for _ in range(2)] for la in wanted}
        counts = {la.label: [0, 0] for la in wanted}
        pickers = {la.label: _row_picker(ctx, _rows_needed(la.w.shape[0])) for la in wanted}
        seen = [0]

        def update(before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> bool:
            part = int(seen[0] % HELD_EVERY == HELD_EVERY - 1)
            seen[0] += 1
            for la in wanted:
                if counts[la.label][0] >= _rows_needed(la.w.shape[0]):
                    continue
                x, x_new = pickers[la.label](la.rows(before[la.node.input[0]].astype(np.float64)),
                                             la.rows(after[la.node.input[0]].astype(np.float64)))
                new, cross, old = sums[la.label][part]
                new += x_new.T @ x_new
                cross += x_new.T @ x
                old += x.T @ x
                counts[la.label][part] += len(x)
            return all(counts[la.label][0] >= _rows_needed(la.w.shape[0]) for la in wanted)

        ctx.reduce_pair(original, current, sorted({la.node.input[0] for la in wanted}), update)
        return {label: _split_moments(sums[label], counts[label]) for label in sums}

    def _fits_on_data(self, layer: Layer) -> bool:
        return self.data_aware and layer.kind != "spatial" and layer.w.shape[0] <= MAX_COVARIANCE_DIM

    def _split(
        self, model: onnx.ModelProto, view: GraphView, layer: Layer, moments: Moments | None, ratio: float
    ) -> dict | str:
        dtype = view.constant(layer.node.input[1]).dtype
        if layer.kind == "spatial":
            o, i, kh, kw = layer.w.shape
            s = np.linalg.svd(layer.w.transpose(1, 2, 0, 3).reshape(i * kh, o * kw), compute_uv=False)
        else:
            target, ridge = layer.w, None
            if moments is not None:
                target, ridge = fitted_target(layer.w, moments, lambda s: pick_rank(s, ratio, self.energy,
                                                                                   self.min_rank))
            s, basis = right_basis(target, None if moments is None else moments.new)
        rank = pick_rank(s, ratio, self.energy, self.min_rank)
        new_macs = layer.split_macs(rank)
        if new_macs >= layer.macs:
            return f"split at rank {rank} would not reduce MACs ({new_macs} >= {layer.macs})"
        info: dict = {"kind": layer.kind, "rank": rank, "full_rank": len(s), "macs_before": layer.macs,
                      "macs_after": new_macs}
        if layer.kind == "spatial":
            first, second = spatial_factor(layer.w, rank)
        else:
            a, b = target @ basis[:, :rank], basis[:, :rank].T
            first, second = factor_weights(layer, a, b)
            if ridge is not None:
                info["ridge"] = ridge  # chosen on held-out samples
            if moments is not None:
                plain_a, plain_b = lowrank_factor(layer.w, rank)
                info["output_error"] = output_error(layer.w, a @ b, moments)
                info["output_error_weight_svd"] = output_error(layer.w, plain_a @ plain_b, moments)
        replace_node(model, layer.node, replacement(model, layer, first, second, dtype))
        return info


