"""Running models in onnxruntime: outputs and intermediate activations, sample by sample."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from .calib import Calibration
from .errors import ModelError
from .graph import node_reads
from .loading import Detached, detach, is_large, ort_session
from .progress import progress


def _with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy whose graph outputs are exactly `names`, keeping only the nodes they depend on."""
    producers = {out: i for i, node in enumerate(model.graph.node) for out in node.output if out}
    needed, stack = set(), [n for n in names if n in producers]
    while stack:
        index = producers[stack.pop()]
        if index not in needed:
            needed.add(index)
            stack.extend(n for n in node_reads(model.graph.node[index]) if n in producers)
    used = set(names).union(*(node_reads(model.graph.node[i]) for i in needed))
    known = {v.name: v for v in [*model.graph.value_info, *model.graph.output, *model.graph.input]}
    graph = onnx.helper.make_graph(
        [model.graph.node[i] for i in sorted(needed)],
        model.graph.name,
        list(model.graph.input),
        [known.get(n) or onnx.helper.make_empty_tensor_value_info(n) for n in names],
        [t for t in model.graph.initializer if t.name in used],
        value_info=list(model.graph.value_info),
    )
    exposed = onnx.helper.make_model(graph, opset_imports=list(model.opset_import))
    exposed.ir_version = model.ir_version
    return exposed


def _exposing(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto | Detached:
    """`_with_outputs`; for a model over protobuf's limit, on its lean copy, so that its weights are not copied."""
    if not is_large(model):
        return _with_outputs(model, names)
    detached = detach(model)
    return Detached(_with_outputs(detached.model, names), detached.sources)


def session(model: onnx.ModelProto | Detached, threads: int = 0) -> ort.InferenceSession:
    """An onnxruntime CPU session with graph optimisations off, so tensor names survive."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    try:
        return ort_session(model, options)
    except Exception as exc:  # ORT raises its own exception types per failure
        raise ModelError(f"onnxruntime cannot load the model: {str(exc).splitlines()[0]}") from exc


def run(
    model: onnx.ModelProto,
    calib: Calibration,
    names: Sequence[str] | None = None,
    desc: str | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Yield {tensor name: value} for each sample; only one sample's tensors are held at a time."""
    names = list(names) if names is not None else [o.name for o in model.graph.output]
    sess = session(_exposing(model, names))
    for feed in progress(calib.samples(), total=len(calib), desc=desc):
        try:
            values = sess.run(names, feed)
        except Exception as exc:
            raise ModelError(f"onnxruntime failed to run the model: {str(exc).splitlines()[0]}") from exc
        yield dict(zip(names, values, strict=True))


def collect(
    model: onnx.ModelProto,
    calib: Calibration,
    names: Sequence[str] | None = None,
    desc: str | None = None,
) -> dict[str, np.ndarray]:
    """All samples' values of `names`, concatenated along the batch axis."""
    names = list(names) if names is not None else [o.name for o in model.graph.output]
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for values in run(model, calib, names, desc):
        for name, value in values.items():
            parts[name].append(value)
    return {n: np.concatenate(v, axis=0) if v[0].ndim else np.stack(v) for n, v in parts.items()}


def collect_samples(
    model: onnx.ModelProto,
    calib: Calibration,
    names: Sequence[str] | None = None,
    desc: str | None = None,
) -> dict[str, list[np.ndarray]]:
    """Every sample's values of `names`, one array per sample: nothing is assumed about a batch axis."""
    names = list(names) if names is not None else [o.name for o in model.graph.output]
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for values in run(model, calib, names, desc):
        for name, value in values.items():
            parts[name].append(value)
    return parts


def reduce(
    model: onnx.ModelProto,
    calib: Calibration,
    names: Sequence[str],
    update: Callable[[dict[str, np.ndarray]], None],
    desc: str | None = None,
) -> None:
    """Stream samples' tensors into `update` (e.g. to accumulate a covariance) in bounded memory."""
    for values in run(model, calib, names, desc):
        update(values)
