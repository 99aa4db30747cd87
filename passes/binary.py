"""`binary`: binary weights W ~ sum_i alpha_i * B_i, B_i in {-1, +1}, alpha per output channel
(Rastegari et al. 2016, XNOR-Net's BWN; several bases as in ABC-Net, Lin et al. 2017).

Bases are built greedily on the residual (B = sign(R), alpha = mean |R|), then every alpha of a layer is
refitted jointly by least squares on the layer's outputs over calibration inputs taken from the model
binarised so far, against the original model's outputs. Signs are bit-packed 8 per byte in the file and
unpacked in the graph with standard ops (BitShift, Mod, Cast). The first and last weighted layers stay float
unless include_first_last=true; grouped (depthwise) convolutions stay float.
"""

from __future__ import annotations

import numpy as np
import onnx

from rewriter.graph import GraphView, drop_unused_initializers
from rewriter.pass_api import PassContext, PassResult
from rewriter.progress import progress
from rewriter.registry import register_pass

from ._codebook import binarize, output_error_rel, refit_alpha
from ._weight_codes import (
    InputStats,
    WeightLayer,
    binary_decoder,
    boundary_layers,
    capture_stats,
    compensation,
    copy_model,
    find_weight_layer,
    independent_waves,
    insert_before,
    wants_full,
    weight_bytes,
)

NEEDS_DATA = "the scales are refitted on each layer's outputs; or --opt binary.data_aware=false"


@register_pass("binary")
class BinaryPass:
    """Multi-basis binary weights with scales refitted on activations."""

    name = "binary"
    # Retried in turn while the signs lose more than the fidelity target (pipeline.run_passes): more bases.
    gentler = ({"bases": 2}, {"bases": 3})

    def __init__(
        self, *, bases: int = 1, include_first_last: bool = False, data_aware: bool = True, skip: str = ""
    ) -> None:
        if not 1 <= bases <= 8:
            raise ValueError(f"bases must be in [1, 8], got {bases}")
        self.bases, self.include_first_last, self.data_aware = bases, include_first_last, data_aware
        self.skip = {s.strip() for s in skip.split(",") if s.strip()}

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        model = copy_model(model)
        layers, skipped = self._select(model)
        if self.data_aware and layers:
            ctx.require_data("binary", NEEDS_DATA)
        original = copy_model(model)
        details: dict[str, dict] = {}
        for wave in progress(independent_waves(model, layers), desc="binary: layer groups"):
            fitted = [la for la in wave if wants_full(la)] if self.data_aware else []
            stats = capture_stats(ctx, original, model, fitted, {}, desc=None) if fitted else {}
            for la in wave:
                details[la.label] = self._apply(model, la, stats.get(la.label))
        drop_unused_initializers(model)
        return PassResult(model, list(details), {**_summary(details), "layers": details, "skipped": skipped})

    def _select(self, model: onnx.ModelProto) -> tuple[list[WeightLayer], dict[str, str]]:
        view = GraphView(model)
        found, skipped = [], {}
        for node in model.graph.node:
            if node.op_type not in ("Conv", "Gemm", "MatMul"):
                continue
            layer = find_weight_layer(view, node)
            label = node.name or f"{node.op_type}:{node.output[0]}"
            if label in self.skip:
                skipped[label] = "named in binary.skip"
            elif isinstance(layer, str):
                skipped[label] = layer
            elif layer.group > 1:
                skipped[label] = "grouped/depthwise Conv stays float"
            else:
                found.append(layer)
        if not self.include_first_last:
            ends = boundary_layers(view, found)
            skipped.update(dict.fromkeys(ends, "first/last weighted layer stays float (binary.include_first_last)"))
            found = [la for la in found if la.label not in ends]
        return found, skipped

    def _apply(self, model: onnx.ModelProto, layer: WeightLayer, stats: InputStats | None) -> dict:
        m = layer.matrix
        info: dict = {"weights": m.size, "bases": self.bases, "bytes_before": layer.weight.nbytes}
        if stats is None:
            signs, alpha = binarize(m, self.bases)
            info["fit"] = "weights only"
        else:
            target, ridge = compensation(m, stats)
            if ridge is not None:
                info["ridge"] = ridge  # chosen on held-out samples
            signs, start = binarize(target, self.bases)
            alpha = refit_alpha(signs, m, stats.new, stats.cross, start)
            plain_signs, plain_alpha = binarize(m, self.bases)
            info["fit"] = "scales refitted on outputs"
            info["output_error"] = output_error_rel(m, np.einsum("nm,nmk->nk", alpha, signs),
                                                    stats.new, stats.cross, stats.old)
            info["output_error_weights_only"] = output_error_rel(
                m, np.einsum("nm,nmk->nk", plain_alpha, plain_signs), stats.new, stats.cross, stats.old)
        nodes, out = binary_decoder(model, layer, signs, alpha)
        insert_before(model, layer.node.output[0], nodes, out)
        info["bytes_after"] = weight_bytes(model, nodes)
        info["bits_per_weight"] = 8.0 * info["bytes_after"] / m.size
        return info


def _summary(details: dict[str, dict]) -> dict:
    before = sum(d["bytes_before"] for d in details.values())
    after = sum(d["bytes_after"] for d in details.values())
    summary: dict = {"binarised_bytes_before": before, "binarised_bytes_after": after,
                     "binarised_ratio": before / max(after, 1)}
    fitted = [d for d in details.values() if "output_error" in d]
    if fitted:
        summary["mean_output_error"] = float(np.mean([d["output_error"] for d in fitted]))
        summary["mean_output_error_weights_only"] = float(np.mean([d["output_error_weights_only"] for d in fitted]))
    return summary
