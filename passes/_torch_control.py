"""ONNX control flow for the distill pass's interpreter, run eagerly: an If runs the branch its condition picks,
a Loop its iterations, a Scan its slices. Each subgraph runs on the enclosing values (through `run_body`, the
interpreter's own), so gradients reach the enclosing graph's weights along the path taken."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import onnx
import torch

from rewriter.errors import ModelError
from rewriter.graph import attributes, subgraphs


class Body(NamedTuple):
    """A subgraph the interpreter runs: an If branch, a Loop or Scan body."""
    nodes: list[onnx.NodeProto]
    attrs: list[dict]
    inputs: list[str]
    outputs: list[str]


# run_body(body, values bound to its inputs) -> its outputs
RunBody = Callable[[Body, Mapping[str, torch.Tensor]], list[torch.Tensor]]


def bodies(graph: onnx.GraphProto) -> dict[tuple[str, str], Body]:
    """The subgraphs of every If, Loop and Scan, by (the node's first output, attribute name)."""
    return {(node.output[0], key): Body(list(sub.node), [attributes(n) for n in sub.node],
                                        [v.name for v in sub.input], [v.name for v in sub.output])
            for node, key, sub in subgraphs(graph) if node.op_type in CONTROL_FLOW}


def _label(node: onnx.NodeProto) -> str:
    return repr(node.name or node.output[0])


def run_if(node, attrs, args, found: Mapping[tuple[str, str], Body], run_body: RunBody, opset: int) -> list:
    """The branch the condition picks. A condition per sample of a batch has no single branch: the caller
    (distill's batching check) then runs samples alone."""
    cond = args[0]
    if cond.numel() != 1:
        raise ModelError(f"distill: If node {_label(node)} has a condition of {cond.numel()} values (one per "
                         "sample of a batch?)")
    return run_body(found[(node.output[0], "then_branch" if bool(cond.item()) else "else_branch")], {})


def run_loop(node, attrs, args, found: Mapping[tuple[str, str], Body], run_body: RunBody, opset: int) -> list:
    """Up to M iterations while the condition holds; the loop-carried values go round, the scan outputs are
    stacked on a new first axis."""
    trips, cond, carried = args[0], args[1] if len(args) > 1 else None, list(args[2:])
    if trips is None and cond is None:
        raise ModelError(f"distill: Loop node {_label(node)} has neither a trip count nor a condition")
    body = found[(node.output[0], "body")]
    scans: list[list[torch.Tensor]] = [[] for _ in range(len(body.outputs) - 1 - len(carried))]
    going, step = cond is None or bool(cond.item()), 0
    while going and (trips is None or step < int(trips.item())):
        values = run_body(body, {body.inputs[0]: torch.tensor(step), body.inputs[1]: torch.tensor(going),
                                 **dict(zip(body.inputs[2:], carried, strict=True))})
        going = bool(values[0].item())  # onnxruntime ends on the body's condition even with no `cond` input
        carried = values[1: 1 + len(carried)]
        for stacked, value in zip(scans, values[1 + len(carried):], strict=True):
            stacked.append(value)
        step += 1
    if any(not stacked for stacked in scans):
        raise ModelError(f"distill: Loop node {_label(node)} ran no iteration, so its scan outputs have no shape")
    return [*carried, *(torch.stack(stacked) for stacked in scans)]


def run_scan(node, attrs, args, found: Mapping[tuple[str, str], Body], run_body: RunBody, opset: int) -> list:
    """Opset 9 on: the body once per slice of the scan inputs along their axes (in either direction), the states
    carried, each step's scan outputs stacked along theirs."""
    if opset < 9:
        raise ModelError("distill: Scan before opset 9 (batched, with sequence_lens) is not supported")
    body = found[(node.output[0], "body")]
    count = attrs["num_scan_inputs"]
    states, inputs = list(args[: len(args) - count]), args[len(args) - count:]
    axes, backwards = attrs.get("scan_input_axes", [0] * count), attrs.get("scan_input_directions", [0] * count)
    inputs = [x.movedim(axis % x.dim(), 0) for x, axis in zip(inputs, axes, strict=True)]
    inputs = [x.flip(0) if back else x for x, back in zip(inputs, backwards, strict=True)]
    outputs = len(body.outputs) - len(states)
    scans: list[list[torch.Tensor]] = [[] for _ in range(outputs)]
    for step in range(inputs[0].shape[0]):
        values = run_body(body, dict(zip(body.inputs, [*states, *(x[step] for x in inputs)], strict=True)))
        states = values[: len(states)]
        for stacked, value in zip(scans, values[len(states):], strict=True):
            stacked.append(value)
    axes, backwards = attrs.get("scan_output_axes", [0] * outputs), attrs.get("scan_output_directions", [0] * outputs)
    stacked = [torch.stack(s[::-1] if back else s)  # a reverse scan output is prepended step by step
               for s, back in zip(scans, backwards, strict=True)]
    return [*states, *(y.movedim(0, axis % y.dim()) for y, axis in zip(stacked, axes, strict=True))]


CONTROL_FLOW: dict[str, Callable] = {"If": run_if, "Loop": run_loop, "Scan": run_scan}
