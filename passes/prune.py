"""`prune`: channel pruning by LASSO selection and least-squares reconstruction (He, Zhang, Sun, ICCV 2017).

Channels are removed a dependency group at a time (rewriter.channels): a layer's output channels together
with every tensor and layer they reach through element-wise ops, residual sums, Concat/Split and depthwise
convolutions. For each group the channels to keep are chosen by LASSO on their contributions to the outputs of
*all* the layers that read them, sampled at a few positions per calibration image; `criterion=l1` keeps the
largest weight magnitudes instead (the common baseline). The chosen channels leave the producers (weights,
bias, BatchNormalization), every member and the consumers at once. Then each consumer is refitted by ridge
least squares, layer by layer in graph order, so that from the inputs of the already-pruned model it
reproduces the original model's outputs (earlier errors are corrected, not accumulated); the ridge is chosen
on held-out calibration images and may be "none" when a refit would overfit.
"""

from __future__ import annotations

import networkx as nx
import numpy as np
import onnx

from rewriter import capture
from rewriter.channels import ChannelGraph, ChannelGroup, build_channel_graph, node_label
from rewriter.errors import UsageError
from rewriter.graph import GraphView
from rewriter.metrics import count_macs
from rewriter.pass_api import PassContext, PassResult
from rewriter.progress import progress
from rewriter.registry import register_pass

from ._prune_blocks import next_layers, output_error, residual_branches, without
from ._prune_fit import Moments, contributions, lasso_select, magnitude_select, reconstruction_error, ridge_refit
from ._prune_layers import Consumer, find_consumer, has_bias_slot, sample_positions, weight_matrix, write_weights
from ._prune_surgery import drop_unused_initializers, remove_atoms

NEEDS_DATA = "LASSO selection and the least-squares refit read activations; or --opt prune.criterion=l1"
PAIRS_PER_CONSUMER = 6000  # (row, output) entries each consumer adds to the LASSO problem
REFIT_POSITIONS = 256  # input rows taken per image for the refit
BLOCK_PROBE_SAMPLES = 16  # calibration samples each residual branch's removal is scored on
BOUND_STEPS = 4  # a group over prune.max_error is tried at 3/4, 1/2 and 1/4 of the ratio, then left whole


def _rows_needed(k: int) -> int:
    return max(8 * k, 4096)


@register_pass("prune")
class PrunePass:
    """Remove whole channels from Conv/Gemm/MatMul layers and everything coupled to them."""

    name = "prune"
    budget_levels = (0.25, 0.5, 0.75)  # share of a group's channels removed, tried per group by --budget
    # Retried in turn while the cut loses more than the fidelity target (pipeline.run_passes): a tighter bound holds
    # back the groups that cost the most, then half the ratio. PP-OCRv4's recogniser: per-step top-1 94.2 % at 0.2,
    # 96.6 % at 0.05.
    gentler = ({"max_error": 0.1}, {"max_error": 0.05}, {"max_error": 0.05, "ratio": 0.15})

    def __init__(
        self,
        *,
        ratio: float = 0.3,
        criterion: str = "lasso",
        refit: bool = True,
        skip: str = "",
        min_channels: int = 1,
        round_to: int = 0,
        positions: int = 16,
        blocks: int = 0,
        sequential: bool = False,
        max_error: float = 0.2,
    ) -> None:
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"ratio must be in [0, 1), got {ratio}")
        if criterion not in ("lasso", "l1"):
            raise ValueError(f"criterion must be 'lasso' or 'l1', got {criterion!r}")
        if not 0.0 <= max_error < 1.0:
            raise ValueError(f"max_error must be in [0, 1) (0: no bound), got {max_error}")
        if min_channels < 1 or round_to < 0 or positions < 1 or blocks < 0:
            raise ValueError("min_channels and positions must be at least 1, round_to and blocks at least 0")
        self.ratio, self.criterion, self.refit = ratio, criterion, refit
        self.min_channels, self.round_to, self.positions = min_channels, round_to, positions
        self.multiple = round_to or 1  # round_to=0: the build target's channel multiple, set by run()
        self.skip = {name.strip() for name in skip.split(",") if name.strip()}
        self.blocks = blocks
        self.sequential = sequential
        self.max_error = max_error

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        self.multiple = self.round_to or ctx.channel_multiple
        dropped: dict = {}
        if self.blocks:
            model, dropped = self._drop_blocks(model, ctx)
        result = self._prune_channels(model, ctx)
        if dropped.get("removed"):
            result.changed[:0] = dropped["removed"]
            result.notes.pop("unchanged", None)
        result.notes["blocks"] = dropped
        return result

    def budget_units(self, model: onnx.ModelProto) -> dict[str, list[str]]:
        """The channel groups this pass may prune, for --budget's per-group choice: key -> the layers a cut
        changes (its members and the consumers that lose input channels)."""
        return {g.key: sorted({*g.members, *g.consumers}) for g in build_channel_graph(model).groups()
                if self._why_not(g) is None}

    def _prune_channels(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        cg = build_channel_graph(model)
        records, candidates = {}, []
        for group in cg.groups():
            why = self._why_not(group)
            records[group.key] = _record(group, why)
            if why is None:
                candidates.append(group)
        if not candidates:
            ctx.log("prune: no channel group can be removed safely; the model is unchanged")
            return PassResult(model, [], {"unchanged": "no prunable channel group", "groups": records})
        ratio = self.ratio
        allocation = ctx.allocations.get(self.name)
        if allocation is not None:  # --budget chose a ratio per group from the sensitivity curves
            for g in candidates:
                if g.key not in allocation:
                    records[g.key]["skipped"] = "left whole by --budget"
            candidates = [g for g in candidates if g.key in allocation]
        elif "macs" in ctx.budget:
            ratio = self._ratio_for_budget(model, cg, candidates, ctx.budget["macs"])
        ratios = {g.key: allocation[g.key] if allocation is not None else ratio for g in candidates}
        # a budget fixes each group's cut; otherwise the ratio is a ceiling that prune.max_error may lower
        bounded = bool(self.max_error) and self.criterion == "lasso" and allocation is None and "macs" not in ctx.budget
        keeps = {g.key: self._keep_ladder(g.size, ratios[g.key], bounded) for g in candidates}
        consumers = self._consumers(cg, candidates)
        todo = []
        for group in candidates:
            record = records[group.key]
            if keeps[group.key][0] >= group.size:
                record["skipped"] = f"ratio {ratios[group.key]:.3f} removes no channel of {group.size}"
                continue
            unfit = [c for c in group.consumers if c not in consumers]
            if self.refit and unfit:  # removing channels a layer reads without refitting it costs too much
                record["skipped"] = f"consumer(s) {', '.join(unfit)} cannot be refitted by least squares"
                continue
            todo.append(group)
        if not todo:
            return PassResult(model, [], {"unchanged": "no channel removed at this ratio", "groups": records})
        ctx.log(f"prune: {len(todo)} channel group(s) to cut" + (
            f"; one whose cut would leave over {self.max_error} relative error in its consumers' outputs is cut less "
            "(prune.max_error)" if bounded else ""))
        if self.sequential and self.refit and self.criterion == "lasso":
            pruned, removed, refits = self._prune_in_order(model, cg, todo, keeps, consumers, records, ctx)
        else:
            removed = self._select_all(model, cg, todo, keeps, consumers, records, ctx)
            pruned = remove_atoms(model, cg, removed)
            refits = self._refit(model, pruned, cg, removed, consumers, ctx) if self.refit else {}
        drop_unused_initializers(pruned)  # the refits replaced the sliced weights
        cut = [g for g in todo if records[g.key]["size_after"] < g.size]
        if not cut:
            return PassResult(model, [], {"unchanged": "every cut exceeds prune.max_error", "groups": records})
        changed = list(dict.fromkeys(m for group in cut for m in group.members))
        notes = {"ratio": ratio if allocation is None else "per group (--budget)", "criterion": self.criterion,
                 "refit": self.refit, "round_to": self.multiple, "max_error": self.max_error if bounded else None,
                 "channels_removed": len(removed), "groups": records,
                 "refits": refits}
        return PassResult(pruned, changed, notes)

    def _select_all(self, model, cg, groups, keeps, consumers, records, ctx) -> set:
        """Every group's channels chosen at once on the original model's activations; the atoms that leave."""
        rows = self._selection_rows(model, consumers, ctx) if self.criterion == "lasso" else {}
        rng = np.random.default_rng(ctx.seed)
        removed = set()
        for group in groups:
            kept = self._select(cg, group, keeps[group.key], consumers, rows, rng, records[group.key])
            removed.update(_leaving(group, kept))
        return removed

    def _prune_in_order(self, model, cg, groups, keeps, consumers, records, ctx) -> tuple:
        """He et al.'s order: wave by wave of consumers, each group is chosen on the inputs of the model pruned
        and refitted so far, then its consumers are refitted. Until the final surgery a removed channel is a zero
        weight column in every layer that reads it, which computes exactly what the pruned graph would."""
        work = onnx.ModelProto()
        work.CopyFrom(model)
        reading = {c for g in groups for c in g.consumers}
        removed, refits, pending = set(), {}, list(groups)
        rng = np.random.default_rng(ctx.seed)
        ctx.require_data("prune", NEEDS_DATA)
        for wave in progress(_waves(model, [consumers[c] for c in reading]), desc="prune: select and refit"):
            labels = {c.label for c in wave}
            now = [g for g in pending if labels.intersection(g.consumers)]
            pending = [g for g in pending if g not in now]
            if now:
                wanted = {c: consumers[c] for g in now for c in g.consumers}
                rows = self._selection_rows(work, wanted, ctx)
                for group in now:
                    kept = self._select(cg, group, keeps[group.key], consumers, rows, rng, records[group.key])
                    removed.update(_leaving(group, kept))
            refits.update(self._refit_wave(model, work, cg, removed, wave, ctx, in_place=True))
        return remove_atoms(work, build_channel_graph(work), removed), removed, refits

    def _drop_blocks(self, model: onnx.ModelProto, ctx: PassContext) -> tuple[onnx.ModelProto, dict]:
        """Remove the `blocks` residual branches whose removal costs the least output fidelity on calibration
        samples, then refit the layers that read their sums."""
        branches = residual_branches(model)
        if not branches:
            return model, {"skipped": "no residual branch (y = x + f(x)) found"}
        data = ctx.require_data("prune", "prune.blocks scores each residual branch on calibration outputs")
        probe = data.take(np.arange(min(len(data), BLOCK_PROBE_SAMPLES)))
        names = [o.name for o in model.graph.output]
        reference = list(capture.run(model, probe, names))
        costs = {b.label: output_error(reference, list(capture.run(without(model, [b]), probe, names)))
                 for b in progress(branches, desc="prune: residual branches")}
        chosen = sorted(branches, key=lambda b: (costs[b.label], b.label))[: self.blocks]
        new = without(model, chosen)
        drop_unused_initializers(new)
        new = onnx.shape_inference.infer_shapes(new)
        view = GraphView(new)
        consumers = [c for c in (find_consumer(view, n) for n in next_layers(new, chosen)) if c is not None]
        cg, refits = build_channel_graph(new), {}
        if self.refit:
            for wave in _waves(new, consumers):
                refits.update(self._refit_wave(model, new, cg, set(), wave, ctx))
            drop_unused_initializers(new)
        return new, {"removed": [b.label for b in chosen], "output_error": costs, "refits": refits}

    def _why_not(self, group: ChannelGroup) -> str | None:
        if group.blocked:
            return f"blocked: {group.blocked}"
        if not group.producers:
            return "no layer produces these channels"
        named = sorted(self.skip.intersection(group.members))
        if named:
            return f"named in prune.skip ({', '.join(named)})"
        if group.size <= self.min_channels:
            return f"{group.size} channel(s), not above prune.min_channels={self.min_channels}"
        return None

    def _keep(self, size: int, ratio: float) -> int:
        keep = size - int(round(ratio * size))
        if self.multiple > 1:
            keep = max(self.multiple, int(round(keep / self.multiple)) * self.multiple)
        return min(size, max(keep, self.min_channels))

    def _consumers(self, cg: ChannelGraph, groups: list[ChannelGroup]) -> dict[str, Consumer]:
        wanted = {c for g in groups for c in g.consumers}
        found = {}
        for node in cg.view.graph.node:  # graph order: the random row samples must not depend on set order
            label = node_label(node)
            consumer = find_consumer(cg.view, node) if label in wanted else None
            if consumer is not None:
                found[label] = consumer
        return found

    def _selection_rows(self, model: onnx.ModelProto, consumers: dict[str, Consumer], ctx) -> dict[str, np.ndarray]:
        """Input rows of every consumer in the original model, a few random positions per image."""
        if not consumers:
            return {}
        ctx.require_data("prune", NEEDS_DATA)
        rng = np.random.default_rng(ctx.seed)
        parts: dict[str, list[np.ndarray]] = {label: [] for label in consumers}

        def update(values: dict[str, np.ndarray]) -> None:
            for label, consumer in consumers.items():
                x = consumer.rows(values[consumer.input])
                parts[label].append(x[sample_positions(len(x), self.positions, rng)].astype(np.float32))

        names = sorted({c.input for c in consumers.values()})
        ctx.reduce(model, names, update, desc="prune: consumer inputs")
        return {label: np.concatenate(p) for label, p in parts.items()}

    def _keep_ladder(self, size: int, ratio: float, bounded: bool) -> list[int]:
        """The channel counts a group may keep, most removed first: the ratio's own, then (bounded) smaller cuts
        down to the whole group."""
        if not bounded:
            return [self._keep(size, ratio)]
        steps = [self._keep(size, ratio * (1 - i / BOUND_STEPS)) for i in range(BOUND_STEPS)] + [size]
        return list(dict.fromkeys(steps))

    def _select(self, cg, group, keeps: list[int], consumers, rows, rng, record: dict) -> np.ndarray:
        """The units of `group` to keep: the first count of `keeps` whose estimated error stays within
        max_error (a single count: no bound). Writes how it chose into `record`."""
        modelled = [consumers[c] for c in group.consumers if c in consumers and c in rows]
        if self.criterion == "l1" or not modelled:
            why = "l1 weight magnitude of the producers"
            record["scoring"] = why if self.criterion == "l1" else why + " (no consumer LASSO can model)"
            kept = magnitude_select(_magnitudes(cg, group), keeps[0])
            record["size_after"] = len(kept)
            return kept
        zs, ys = [], []
        for consumer in modelled:
            node = next(n for n in cg.view.graph.node if node_label(n) == consumer.label)
            w, _ = weight_matrix(cg.view, node)
            columns = [consumer.columns(cg.positions(consumer.input, unit)) for unit in group.units]
            z, y = contributions(rows[consumer.label], w, columns, PAIRS_PER_CONSUMER, rng)
            scale = max(float(np.sqrt(np.mean(y**2))), 1e-12)  # every consumer weighs the same
            zs.append(z / scale)
            ys.append(y / scale)
        z, y = np.concatenate(zs), np.concatenate(ys)
        record["scoring"] = f"lasso over {len(modelled)} consumer(s): {', '.join(c.label for c in modelled)}"
        choices = lasso_select(z, y, keeps)
        errors = [reconstruction_error(z, y, kept) for kept in choices]
        at = next((i for i, e in enumerate(errors) if e <= self.max_error), len(choices) - 1) if len(keeps) > 1 else 0
        record["size_after"] = len(choices[at])
        record["estimated_error"] = round(errors[at], 4)
        if at:
            record["bounded"] = {"estimated_errors": {int(k): round(e, 4) for k, e in zip(keeps, errors, strict=True)},
                                 "kept_instead_of": int(keeps[0])}
            if len(choices[at]) >= group.size:
                record["skipped"] = (f"every cut adds more than prune.max_error={self.max_error} to its consumers' "
                                     f"outputs ({errors[0]:.3f} at {group.size - keeps[0]} of {group.size} channels)")
        return choices[at]

    def _refit(self, original, pruned, cg, removed, consumers, ctx) -> dict:
        """Refit every consumer that lost input channels, wave by wave in graph order."""
        todo = [c for c in consumers.values() if len(cg.kept_positions(c.input, removed)) < len(
            cg.tensors[c.input].atoms)]
        if not todo:
            return {}
        ctx.require_data("prune", NEEDS_DATA)
        results = {}
        for wave in progress(_waves(original, todo), desc="prune: refits"):
            results.update(self._refit_wave(original, pruned, cg, removed, wave, ctx))
        return results

    def _refit_wave(self, original, pruned, cg, removed, wave: list[Consumer], ctx, in_place: bool = False) -> dict:
        """Refit the wave's consumers in `pruned` to the original's outputs. in_place: `pruned` still has every
        channel (sequential order); the refit reads the kept input columns only, fits every output, and writes
        zeros where the removed input channels were."""
        view = GraphView(pruned)
        nodes = {node_label(n): n for n in pruned.graph.node}
        starts, moments, outs, cols, rows_full = {}, {}, {}, {}, {}
        for c in wave:
            w, bias = weight_matrix(view, nodes[c.label])
            inputs = len(w)
            if has_bias_slot(nodes[c.label]):
                w = np.vstack([w, np.zeros((1, w.shape[1])) if bias is None else bias[None]])
            rows_full[c.label] = len(w)
            kept_in = cg.kept_positions(c.input, removed) if in_place else None
            cols[c.label] = None if kept_in is None else np.concatenate(
                [c.columns(kept_in), np.arange(inputs, len(w))])  # kept input columns, then the bias row
            starts[c.label] = w if cols[c.label] is None else w[cols[c.label]]
            moments[c.label] = Moments(*starts[c.label].shape)
            kept = None if in_place else cg.kept_positions(c.output, removed)
            outs[c.label] = np.arange(w.shape[1]) if kept is None else np.asarray(kept)
        rng = np.random.default_rng(ctx.seed + 1)
        seen = [0]

        def update(before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> bool:
            held = seen[0] % 4 == 3
            seen[0] += 1
            for c in wave:
                m = moments[c.label]
                x, y = c.rows(after[c.input]), c.targets(before[c.output])[:, outs[c.label]]
                pick = sample_positions(len(x), REFIT_POSITIONS, rng)
                x = x[pick] if cols[c.label] is None else x[pick][:, cols[c.label][cols[c.label] < x.shape[1]]]
                x = x if m.k == x.shape[1] else np.hstack([x, np.ones((len(pick), 1))])
                m.add(x, y[pick], held)
            return all(sum(m.rows) >= _rows_needed(m.k) for m in moments.values()) and seen[0] >= 8

        ctx.reduce_pair(original, pruned, sorted({c.output for c in wave}), update,
                        after_names=sorted({c.input for c in wave}))
        results = {}
        for c in wave:
            w, info = ridge_refit(moments[c.label], starts[c.label])
            if cols[c.label] is not None:  # back to every input column, the removed ones zero
                full = np.zeros((rows_full[c.label], w.shape[1]))
                full[cols[c.label]] = w
                w = full
            node = nodes[c.label]
            if has_bias_slot(node):
                write_weights(pruned, node, w[:-1], w[-1])
            else:
                write_weights(pruned, node, w, None)
            results[c.label] = info
        return results

    def uniform_ratio(self, model: onnx.ModelProto, budget: float) -> float:
        """The one ratio for every prunable group that brings MACs to `budget` x the model's (the baseline a
        per-group --budget is compared with)."""
        cg = build_channel_graph(model)
        return self._ratio_for_budget(model, cg, [g for g in cg.groups() if self._why_not(g) is None], budget)

    def _ratio_for_budget(self, model, cg, groups, budget: float) -> float:
        """The smallest ratio whose removal brings MACs to `budget` x the model's (channel counts only matter)."""
        total = count_macs(model)

        def macs_at(ratio: float) -> int:
            removed = {a for g in groups for unit in g.units[self._keep(g.size, ratio):] for a in unit}
            return count_macs(remove_atoms(model, cg, removed)) if removed else total

        high = 0.95
        if macs_at(high) > budget * total:
            raise UsageError(f"prune cannot reach --budget macs={budget}: at ratio {high} the model keeps "
                             f"{macs_at(high) / max(total, 1):.3f} of its MACs (blocked groups and layers it "
                             "leaves alone)")
        low = 0.0
        for _ in range(14):
            mid = (low + high) / 2
            low, high = (low, mid) if macs_at(mid) <= budget * total else (mid, high)
        return high


def _leaving(group: ChannelGroup, kept: np.ndarray) -> set:
    """The atoms of the group's units that are not kept."""
    stay = set(int(i) for i in kept)
    return {a for i, unit in enumerate(group.units) if i not in stay for a in unit}


def _record(group: ChannelGroup, why: str | None) -> dict:
    record = {"members": group.members, "producers": group.producers, "consumers": group.consumers,
              "size_before": group.size, "size_after": group.size}
    if why is not None:
        record["skipped"] = why
    return record


def _magnitudes(cg: ChannelGraph, group: ChannelGroup) -> np.ndarray:
    """Per unit: the L1 norm of its producers' output weights, each producer normalised by its mean."""
    scores = np.zeros(group.size)
    nodes = {node_label(n): n for n in cg.view.graph.node}
    for label in group.producers:
        node = nodes[label]
        w = cg.view.constant(node.input[1])
        if node.op_type == "ConvTranspose":
            w = np.moveaxis(w, 1, 0)
        elif node.op_type == "MatMul" or (node.op_type == "Gemm" and not _trans_b(node)):
            w = w.T
        per_out = np.abs(w.reshape(len(w), -1)).sum(axis=1)
        units = [np.mean(per_out[cg.positions(node.output[0], u)]) for u in group.units]
        scores += np.asarray(units) / max(float(np.mean(per_out)), 1e-12)
    return scores


def _trans_b(node: onnx.NodeProto) -> bool:
    return any(a.name == "transB" and a.i for a in node.attribute)


def _waves(model: onnx.ModelProto, consumers: list[Consumer]) -> list[list[Consumer]]:
    """Consumers by depth among themselves: none in a wave feeds another, and each wave sees earlier refits."""
    graph = nx.DiGraph()
    producers = {out: node.output[0] for node in model.graph.node for out in node.output if out}
    for node in model.graph.node:
        graph.add_node(node.output[0])
        graph.add_edges_from((producers[name], node.output[0]) for name in node.input if name in producers)
    keys = {c.output: c for c in consumers}
    depth: dict[str, int] = {}
    for key in nx.topological_sort(graph):
        if key in keys:
            depth[key] = 1 + max((depth[a] for a in nx.ancestors(graph, key) if a in depth), default=-1)
    waves: dict[int, list[Consumer]] = {}
    for key, consumer in keys.items():
        waves.setdefault(depth[key], []).append(consumer)
    return [waves[d] for d in sorted(waves)]
