"""`rewrite inspect MODEL`: the per-layer table (op, shapes, params, MACs, prunable group, which passes can touch
each layer), computed on the canonical model without changing anything."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import onnx

from .canonical import canonicalize, resolve_input_shapes
from .graph import GraphView
from .loading import load_model
from .metrics import count_bytes, count_macs, count_params, node_macs
from .registry import available_passes, get_pass

WEIGHTED = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


def _params(view: GraphView, node: onnx.NodeProto) -> int:
    total = 0
    for name in node.input[1:]:
        value = view.constant(name) if name else None
        total += 0 if value is None else int(value.size)
    return total


def _groups(model: onnx.ModelProto) -> dict[str, str]:
    """node label -> the channel group whose output channels it produces ('key' or 'blocked: why')."""
    from .channels import build_channel_graph  # the channel analysis is only needed here and by prune

    found = {}
    for group in build_channel_graph(model).groups():
        label = group.key if group.blocked is None else f"blocked: {group.blocked}"
        for producer in group.producers:
            found.setdefault(producer, label)
    return found


def _touching(view: GraphView, node: onnx.NodeProto) -> list[str]:
    """Passes whose `explain(view, node)` says they can rewrite the node (None means yes)."""
    names = []
    for name in available_passes():
        explain = getattr(get_pass(name), "explain", None)
        if explain is not None and explain(view, node) is None:
            names.append(name)
    return names


def layer_table(model: onnx.ModelProto) -> list[dict]:
    """One row per weighted layer of a canonical (shape-inferred) model."""
    view = GraphView(model)
    try:
        groups = _groups(model)
    except Exception as exc:  # noqa: BLE001 - the table is still useful without the channel analysis
        groups = {}
        failure = f"channel analysis failed: {exc}"
    else:
        failure = None
    rows = []
    for node in model.graph.node:
        if node.op_type not in WEIGHTED:
            continue
        label = node.name or node.output[0]
        rows.append({
            "name": label,
            "op": node.op_type,
            "input": view.shape(node.input[0]),
            "output": view.shape(node.output[0]),
            "params": _params(view, node),
            "macs": node_macs(view, node),
            "group": groups.get(label, failure or "-"),
            "passes": _touching(view, node),
        })
    return rows


def inspect_model(path: str, input_shapes: Mapping[str, Sequence[int]] | None = None) -> dict:
    """The model's totals and its layer table."""
    original = load_model(path)
    shapes = resolve_input_shapes(original, input_shapes)
    model = canonicalize(original, shapes)
    return {"model": str(path), "input_shapes": shapes, "params": count_params(original), "macs": count_macs(model),
            "bytes": count_bytes(original), "layers": layer_table(model)}


def format_table(info: dict) -> str:
    header = ["layer", "op", "input", "output", "params", "MACs", "prunable group", "passes"]
    rows = [[r["name"], r["op"], "x".join(map(str, r["input"] or [])), "x".join(map(str, r["output"] or [])),
             f"{r['params']:,}", f"{r['macs']:,}", r["group"], ",".join(r["passes"]) or "-"] for r in info["layers"]]
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows, strict=True)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]]
    totals = f"{info['model']}: {info['params']:,} params, {info['macs']:,} MACs at {info['input_shapes']}, " \
             f"{info['bytes']:,} bytes, {len(rows)} weighted layers"
    return "\n".join([totals, *lines])
