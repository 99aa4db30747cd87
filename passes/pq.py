"""`pq`: product quantisation of Conv/Gemm/MatMul weights (Stock, Joulin, Gribonval, Graham, Jegou 2019,
"And the Bit Goes Down").

Each layer's weight is cut into sub-vectors: the kh x kw block of one input channel for k x k convs, a
block of `block` consecutive input channels for 1 x 1 convs and Gemm/MatMul. k centroids per layer are
learnt by EM on the layer's *output* error over calibration inputs: the E-step assigns each sub-vector to
the centroid that least changes the output (distance weighted by its input block's Gram matrix), the
M-step solves each centroid by least squares on those activations, and empty clusters are re-seeded by
splitting the most populated one. A small layer gets fewer centroids (its codebook may take at most
`book_share` of its dense float16 bytes), so that its codes still pay. EM starts from plain k-means on
the weights. Layers are quantised in graph order with inputs taken from the model quantised so far, and
each layer's target is the weight that maps those inputs onto the original layer's outputs, so earlier
errors are corrected rather than stacked.

In the graph: a float16 codebook and uint8 codes -> Gather -> Reshape (-> Transpose) -> Cast feed the
layer's weight input. Layers whose codes would not be smaller stay dense (float16 plus a Cast).
"""

from __future__ import annotations

import math

import numpy as np
import onnx

from rewriter.graph import GraphView, drop_unused_initializers
from rewriter.pass_api import PassContext, PassResult
from rewriter.progress import progress
from rewriter.registry import register_pass

from ._codebook import activation_em, output_error_rel, plain_kmeans, weight_error
from ._weight_codes import (
    InputStats,
    WeightLayer,
    capture_stats,
    compensation,
    copy_model,
    dense_decoder,
    find_weight_layer,
    independent_waves,
    insert_before,
    pq_decoder,
    wants_full,
    weight_bytes,
)

MIN_K = 16  # a layer shrunk below this many centroids loses too much: it stays dense
BOOK_DTYPES = {"float16": np.float16, "float32": np.float32}
NEEDS_DATA = "the codebooks are fitted to each layer's outputs; or --opt pq.data_aware=false for plain k-means"


def padded(m: np.ndarray, d: int) -> np.ndarray:
    """M (N, Kg) with zero columns up to a multiple of d: a width like 179 (pruned) still splits into blocks."""
    return np.pad(m, ((0, 0), (0, -m.shape[1] % d)))


def padded_square(cov: np.ndarray, d: int) -> np.ndarray:
    pad = -len(cov) % d
    return np.pad(cov, ((0, pad), (0, pad)))


def to_blocks(m: np.ndarray, group: int, d: int) -> np.ndarray:
    """Output-major M (N, Kg) -> sub-vectors (B, P, d): block b = (group, input block) shares one Gram."""
    n, kg = m.shape
    j = kg // d
    return m.reshape(group, n // group, j, d).transpose(0, 2, 1, 3).reshape(group * j, n // group, d)


def codes_to_rows(codes: np.ndarray, group: int, n: int) -> np.ndarray:
    """Codes (B, P) back to the weight's output-major order (N, J)."""
    j = codes.shape[0] // group
    return codes.reshape(group, j, n // group).transpose(0, 2, 1).reshape(n, j)


def finer_grams(blocks: np.ndarray, group: int, d: int, per_group: int) -> np.ndarray:
    """Per-block Grams (B, D, D) captured for sub-vectors of D, cut to sub-vectors of d (d divides D): the d x d
    diagonal blocks of each, in to_blocks' order, `per_group` of them per group (a narrower padding needs fewer)."""
    size = blocks.shape[-1]
    if size == d:
        return blocks
    r = size // d
    index = np.arange(r)
    cut = blocks.reshape(-1, r, d, r, d)[:, index, :, index, :].transpose(1, 0, 2, 3)  # (B, r, d, d)
    return cut.reshape(group, -1, d, d)[:, :per_group].reshape(-1, d, d)


def diagonal_blocks(cov: np.ndarray, d: int) -> np.ndarray:
    """The (d x d) diagonal blocks of a (J d x J d) matrix, as (J, d, d)."""
    j = len(cov) // d
    index = np.arange(j)
    return cov.reshape(j, d, j, d)[index, :, index, :]


@register_pass("pq")
class PqPass:
    """Product quantisation with activation-aware EM codebooks."""

    name = "pq"
    # Retried in turn while the codes lose more than the fidelity target (pipeline.run_passes). PQ alone on
    # PP-OCRv4's recogniser: per-step top-1 91.4 % at max_error 0.2, 96.3 % at 0.05; its greedy reading (after prune)
    # edits 6.3 % of the characters at 0.025 and 3.5 % at 0.01.
    gentler = ({"max_error": 0.1}, {"max_error": 0.05}, {"max_error": 0.025}, {"max_error": 0.01})

    def __init__(
        self,
        *,
        k: int = 256,
        block: int = 4,
        codebook_dtype: str = "float16",
        dense_fp16: bool = True,
        iters: int = 25,
        book_share: float = 0.25,
        data_aware: bool = True,
        skip: str = "",
        max_error: float = 0.2,
        head_error: float = 0.05,
    ) -> None:
        if not 2 <= k <= 256:
            raise ValueError(f"k must be in [2, 256] (codes are uint8), got {k}")
        if block < 1:
            raise ValueError(f"block must be at least 1, got {block}")
        if codebook_dtype not in BOOK_DTYPES:
            raise ValueError(f"codebook_dtype must be one of {sorted(BOOK_DTYPES)}, got {codebook_dtype!r}")
        if iters < 0:
            raise ValueError(f"iters must be >= 0, got {iters}")
        if not 0.0 < book_share <= 1.0:
            raise ValueError(f"book_share must be in (0, 1], got {book_share}")
        if not (max_error >= 0.0 and head_error >= 0.0):
            raise ValueError(f"max_error and head_error must be >= 0 (0: no bound), got {max_error}, {head_error}")
        self.k, self.block, self.book_dtype = k, block, np.dtype(BOOK_DTYPES[codebook_dtype])
        self.book_share = book_share
        self.dense_fp16, self.iters, self.data_aware = dense_fp16, iters, data_aware
        self.skip = {s.strip() for s in skip.split(",") if s.strip()}
        self.max_error, self.head_error = max_error, head_error

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        model = copy_model(model)
        view = GraphView(model)
        layers, skipped = [], {}
        for node in model.graph.node:
            if node.op_type in ("Conv", "Gemm", "MatMul"):
                found = find_weight_layer(view, node)
                label = node.name or f"{node.op_type}:{node.output[0]}"
                if label in self.skip:
                    skipped[label] = "named in pq.skip"
                elif isinstance(found, WeightLayer):
                    layers.append(found)
                else:
                    skipped[label] = found
        if self.data_aware and layers:
            ctx.require_data("pq", NEEDS_DATA)
        heads = {la.label for la in layers if view.writes_output(la.node)}  # bound by head_error
        original = copy_model(model)
        details: dict[str, dict] = {}
        for wave in progress(independent_waves(model, layers), desc="pq: layer groups"):
            plans = {la.label: self._plan(la) for la in wave}
            coded = [la for la in wave if plans[la.label]["form"] == "pq"]
            stats = {}
            if self.data_aware and coded:
                blocks = {la.label: plans[la.label]["d"] for la in coded}
                stats = capture_stats(ctx, original, model, coded, blocks, desc=None)
            for la in wave:
                bound = self._bound(la.label in heads)
                details[la.label] = self._apply(model, la, plans[la.label], stats.get(la.label), ctx.seed, bound)
        drop_unused_initializers(model)
        changed = [label for label, d in details.items() if d["form"] != "dense" or d.get("compensated")]
        notes = {**self._summary(details), "layers": details, "skipped": skipped, "heads": sorted(heads)}
        return PassResult(model, changed, notes)

    def _sub_size(self, layer: WeightLayer) -> int:
        """Sub-vector size: the kernel's spatial block, or `block` input channels (the width padded to fit)."""
        if layer.spatial > 1:
            return layer.spatial
        return min(self.block, layer.matrix.shape[1])

    @staticmethod
    def _finer_sizes(layer: WeightLayer, d: int, stats: InputStats) -> list[int]:
        """Smaller sub-vectors to refit with when the codes add more output error than `max_error`: a k x k
        kernel's rows, then halves, down to 2 (more codes per weight, each closer to its weights). With per-block
        Grams only the sizes that divide the captured block can be fitted without another capture."""
        sizes, size = [], d
        if layer.spatial > 1 and layer.conv.kernel[-1] < size:
            size = layer.conv.kernel[-1]
            sizes.append(size)
        while size // 2 >= 2:
            size //= 2
            sizes.append(size)
        return sizes if stats.full else [s for s in sizes if d % s == 0]

    def _plan(self, layer: WeightLayer, d: int | None = None) -> dict:
        """Which form the layer takes: codes when they are smaller than the dense weight, else dense."""
        n, kg = layer.matrix.shape
        d = d or self._sub_size(layer)
        own = layer.weight.dtype
        dense_dtype = np.dtype(np.float16) if self.dense_fp16 and own.itemsize > 2 else own
        dense = n * kg * dense_dtype.itemsize
        subs = n * math.ceil(kg / d)
        # A small layer gets fewer centroids: its codebook may take at most book_share of its dense bytes.
        fits = int(self.book_share * dense // (d * self.book_dtype.itemsize))
        k = min(self.k, subs, 1 << max(fits, 1).bit_length() - 1)
        coded = k * d * self.book_dtype.itemsize + subs
        plan = {"weights": n * kg, "d": d, "k": k, "dense_dtype": dense_dtype, "bytes_before": layer.weight.nbytes}
        floor = min(MIN_K, self.k)
        if d < 2 or k < floor or coded >= dense:
            plan["form"] = "dense_fp16" if dense_dtype != layer.weight.dtype else "dense"
            plan["why"] = ("sub-vectors of one weight" if d < 2 else f"fewer than {floor} centroids would fit"
                           if k < floor else f"codes ({coded} B) not smaller than dense")
        else:
            plan["form"] = "pq"
        return plan

    def _apply(
        self, model: onnx.ModelProto, layer: WeightLayer, plan: dict, stats: InputStats | None, seed: int,
        bound: float,
    ) -> dict:
        """Write the layer's planned form into `model`; `bound`: what its codes may add to its output (0: any)."""
        found = None
        if plan["form"] == "pq":
            plan, found = self._codes(layer, plan, stats, seed, bound)
        info = {k: v for k, v in plan.items() if k not in ("dense_dtype", "refitted")}
        if plan.get("refitted") is not None:
            info["compensated"] = True  # dense, but its weight now corrects the errors of the layers before it
        if plan["form"] == "dense" and plan.get("refitted") is None:
            info["bytes_after"] = plan["bytes_before"]
        elif plan["form"] in ("dense", "dense_fp16"):  # float16 (+ Cast), or the refitted weight in its own dtype
            nodes, out = dense_decoder(model, layer, plan["dense_dtype"], plan.get("refitted"))
            insert_before(model, layer.node.output[0], nodes, out)
            info["bytes_after"] = weight_bytes(model, nodes) if nodes else plan["bytes_before"]
        else:
            codebook, codes, fit = found
            nodes, out = pq_decoder(model, layer, codebook, codes, self.book_dtype)
            insert_before(model, layer.node.output[0], nodes, out)
            info.update(fit, bytes_after=weight_bytes(model, nodes))
        info["bits_per_weight"] = 8.0 * info["bytes_after"] / plan["weights"]
        return info

    def _codes(self, layer: WeightLayer, plan: dict, stats: InputStats | None, seed: int,
               bound: float) -> tuple[dict, tuple | None]:
        """The layer's codebook, codes and fit at the planned sub-vector size. With `max_error`, a layer whose output
        error is over it is refit with smaller sub-vectors until one holds, and stays dense float16 when none does
        (or when codes stop paying): the plan that was used and its fit, or the dense plan and None."""
        # The compensated target (and its ridge, chosen on held-out rows) does not depend on the sub-vector size:
        # solved once per layer, for every fit and for the dense fallback.
        target = compensation(layer.matrix, stats) if stats is not None and stats.full else None
        found = self._fit(layer, plan, stats, seed, target)
        error = found[2].get("added_error")  # absent without data (k-means on the weights alone)
        if not bound or error is None or error <= bound:
            return plan, found
        tried = {plan["d"]: error}
        for d in self._finer_sizes(layer, plan["d"], stats):
            finer = self._plan(layer, d)
            if finer["form"] != "pq":
                break
            found = self._fit(layer, finer, stats, seed, target)
            tried[d] = found[2]["added_error"]
            if tried[d] <= bound:
                return finer, (*found[:2], {**found[2], "errors_by_block": tried})
        # Dense, but refitted like the codes were (with full moments): the weight that corrects the errors of the
        # layers before it.
        refitted = layer.weight_from(target[0]) if target is not None else None
        form = "dense_fp16" if plan["dense_dtype"] != layer.weight.dtype else "dense"  # dense_fp16=false: own dtype
        dense = {**plan, "form": form, "refitted": refitted,
                 "why": f"codes add more output error than {self._bound_name(bound)} {bound} at every sub-vector size",
                 "errors_by_block": tried}
        return dense, None

    def _bound(self, head: bool) -> float:
        """What the codes may add to the layer's output: max_error, or head_error (if tighter) for a layer that
        writes a graph output, whose error no later layer's compensation can absorb. 0: no bound."""
        if head and self.head_error and self.max_error:
            return min(self.max_error, self.head_error)
        return self.max_error

    def _bound_name(self, bound: float) -> str:
        return "head_error" if bound < self.max_error else "max_error"

    def _fit(self, layer: WeightLayer, plan: dict, stats: InputStats | None, seed: int,
             compensated_target: tuple[np.ndarray, float | None] | None) -> tuple:
        """Codebook (k, d) and codes (N, J) for the layer, plus what the report says about the fit.
        `compensated_target`: (target, ridge) from `compensation` when the layer has full input moments."""
        d, k, g = plan["d"], plan["k"], layer.group
        m = padded(layer.matrix, d)
        n = m.shape[0]
        book, plain_codes = plain_kmeans(to_blocks(m, g, d).reshape(-1, d), k, seed)
        plain_codes = plain_codes.reshape(-1, n // g)
        if stats is None:
            return book, codes_to_rows(plain_codes, g, n).astype(np.uint8), {"fit": "k-means on weights"}
        target, ridge = m, None
        if stats.full:
            compensated, ridge = compensated_target
            target, grams = padded(compensated, d), diagonal_blocks(padded_square(stats.new, d), d)
        else:
            grams = finer_grams(stats.blocks, g, d, math.ceil(layer.matrix.shape[1] / d))
        v3 = to_blocks(target, g, d)
        start = float(weight_error(v3, grams, book, plain_codes))
        book_em, codes, history = activation_em(v3, grams, book, self.iters, seed)
        fit = {"fit": "activation EM", "em_iterations": len(history) - 1,
               "objective_ratio": float(history[-1] / max(start, 1e-30)) if history else 1.0}
        if ridge is not None:
            fit["ridge"] = ridge  # chosen on held-out samples
        if stats.full and wants_full(layer):
            width = layer.matrix.shape[1]
            approx = book_em[codes_to_rows(codes, g, n)].reshape(m.shape)[:, :width]
            plain = book[codes_to_rows(plain_codes, g, n)].reshape(m.shape)[:, :width]
            fit["output_error"] = output_error_rel(layer.matrix, approx, stats.new, stats.cross, stats.old)
            fit["output_error_kmeans"] = output_error_rel(layer.matrix, plain, stats.new, stats.cross, stats.old)
            if fit["output_error_kmeans"] < fit["output_error"]:
                # EM minimises a per-block surrogate; on the full output error plain k-means can still win.
                fit.update(fit="k-means on weights (beat EM on the output)", output_error=fit["output_error_kmeans"])
                approx, book_em, codes = plain, book, plain_codes
            # The error the codes add to the best this layer can do on its inputs (upstream errors left out).
            best = compensated[:, :width]
            fit["added_error"] = output_error_rel(best, approx, stats.new, stats.new, stats.new)
        else:  # from the per-block Grams: exact for a depthwise conv, without cross-block terms otherwise
            energy = float(np.sum(v3 * (v3 @ grams)))
            fit["added_error"] = math.sqrt(weight_error(v3, grams, book_em, codes) / max(energy, 1e-30))
        return book_em, codes_to_rows(codes, g, n).astype(np.uint8), fit

    @staticmethod
    def _summary(details: dict[str, dict]) -> dict:
        before = sum(d["bytes_before"] for d in details.values())
        after = sum(d["bytes_after"] for d in details.values())
        weights = sum(d["weights"] for d in details.values())
        summary = {"weight_bytes_before": before, "weight_bytes_after": after,
                   "bits_per_weight": 8.0 * after / max(weights, 1),
                   "forms": {f: sum(d["form"] == f for d in details.values()) for f in ("pq", "dense_fp16", "dense")}}
        fitted = [d for d in details.values() if "output_error" in d]
        if fitted:
            summary["mean_output_error"] = float(np.mean([d["output_error"] for d in fitted]))
            summary["mean_output_error_kmeans"] = float(np.mean([d["output_error_kmeans"] for d in fitted]))
        return summary
