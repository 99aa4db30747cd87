"""Graph side of the weight-code passes (pq, binary): which layers carry a codable weight, the input
statistics their fits need (captured through the core's PassContext), and the standard-op decoding
subgraphs that rebuild the dense weight in the graph."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import networkx as nx
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from rewriter.graph import GraphView, attributes, node_reads, unique_name
from rewriter.layers import ConvGeometry, conv_geometry, conv_patches, rows
from rewriter.pass_api import PassContext

from ._codebook import fitted_target

# Above this input width a K x K moment matrix would take too much memory and time.
MAX_MOMENT_DIM = 4608
ROWS_PER_INPUT, MIN_ROWS = 64, 16384
FLUSH_ROWS = 8192
HELD_EVERY = 4  # one sample in this many is also kept apart, to choose the fits' shrinkage on
FLOATS = (np.float16, np.float32, np.float64)


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def add_initializer(model: onnx.ModelProto, base: str, value: np.ndarray, dtype: np.dtype) -> str:
    name = unique_name(model, base)
    model.graph.initializer.append(numpy_helper.from_array(np.asarray(value).astype(dtype), name))
    return name


@dataclass
class WeightLayer:
    """A Conv/Gemm/MatMul whose weight is a constant, seen as an output-major matrix M (N x K per group).

    kind: "conv" (weight N, C/g, [kh,] kw), "rows" (Gemm transB=1, weight N x K) or "cols" (weight K x N)."""

    node: onnx.NodeProto
    kind: str
    weight: np.ndarray
    conv: ConvGeometry | None = None
    group: int = 1

    @property
    def label(self) -> str:
        return self.node.name or f"{self.node.op_type}:{self.node.output[0]}"

    @property
    def matrix(self) -> np.ndarray:
        w = self.weight.astype(np.float64)
        return w.T if self.kind == "cols" else w.reshape(w.shape[0], -1)

    def weight_from(self, matrix: np.ndarray) -> np.ndarray:
        """An output-major matrix like `matrix` back in the weight's own layout and dtype."""
        w = matrix.T if self.kind == "cols" else matrix.reshape(self.weight.shape)
        return np.ascontiguousarray(w, dtype=self.weight.dtype)

    @property
    def spatial(self) -> int:
        """kh * kw for a Conv (1 for Gemm/MatMul)."""
        return math.prod(self.conv.kernel) if self.conv is not None else 1

    @property
    def full_width(self) -> int:
        """Width of the layer's input rows (all groups' patch columns)."""
        return self.matrix.shape[1] * self.group

    def input_rows(self, x: np.ndarray) -> np.ndarray:
        return conv_patches(x, self.conv) if self.conv is not None else rows(x)


def find_weight_layer(view: GraphView, node: onnx.NodeProto) -> WeightLayer | str:
    """The node as a WeightLayer, or the reason it is left alone."""
    if len(node.input) < 2 or not view.is_initializer(node.input[1]):
        return "weight is not a constant"
    if view.is_initializer(node.input[0]):
        return "the data input is a constant"
    weight = view.constant(node.input[1])
    if weight.dtype.type not in FLOATS:
        return f"weight dtype {weight.dtype} is not float"
    if len(view.consumers(node.input[1])) > 1:
        return "weight shared with another node"
    attrs = attributes(node)
    if node.op_type == "Gemm":
        if attrs.get("transA", 0):
            return "Gemm with transA=1"
        return WeightLayer(node, "rows" if attrs.get("transB", 0) else "cols", weight)
    if node.op_type == "MatMul":
        return WeightLayer(node, "cols", weight) if weight.ndim == 2 else "batched MatMul weight"
    conv = conv_geometry(node, list(weight.shape))
    if conv is None:
        return "only 1-D/2-D Conv with explicit padding"
    return WeightLayer(node, "conv", weight, conv, conv.group)


def independent_waves(model: onnx.ModelProto, layers: list[WeightLayer]) -> list[list[WeightLayer]]:
    """Layers grouped by depth among layers: no layer of a group feeds another, so one capture serves a
    group, and every group sees the rewrites of the groups before it."""
    graph = nx.DiGraph()
    producers = {out: node.output[0] for node in model.graph.node for out in node.output if out}
    for node in model.graph.node:
        graph.add_node(node.output[0])
        graph.add_edges_from((producers[n], node.output[0]) for n in node_reads(node) if n in producers)
    keys = {layer.node.output[0]: layer for layer in layers}
    depth: dict[str, int] = {}
    for key in nx.topological_sort(graph):
        if key in keys:
            depth[key] = 1 + max((depth[a] for a in nx.ancestors(graph, key) if a in keys), default=-1)
    waves: dict[int, list[WeightLayer]] = {}
    for key, layer in keys.items():
        waves.setdefault(depth[key], []).append(layer)
    return [waves[d] for d in sorted(waves)]


def boundary_layers(view: GraphView, layers: list[WeightLayer]) -> set[str]:
    """Labels of the first and last weighted layers: those a graph input reaches, or that reach a graph
    output, without crossing another weighted layer."""
    weighted = {n.op_type for n in view.graph.node if n.op_type in ("Conv", "Gemm", "MatMul", "ConvTranspose")}
    reached = _reach(view, [v.name for v in view.graph.input], forward=True, stop=weighted)
    outputs = [o.name for o in view.graph.output]
    feeding = _reach(view, outputs, forward=False, stop=weighted)
    return {la.label for la in layers if la.node.input[0] in reached or la.node.output[0] in feeding}


def _reach(view: GraphView, start: list[str], forward: bool, stop: set[str]) -> set[str]:
    """Tensor names reachable from `start` through nodes whose op is not in `stop`."""
    seen, stack = set(), list(start)
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        nodes = view.consumers(name) if forward else [p for p in [view.producer(name)] if p is not None]
        for node in nodes:
            if node.op_type not in stop:
                stack.extend(node.output if forward else [i for i in node.input if i])
    return seen


@dataclass
class InputStats:
    """A layer's input statistics: x from the original model, x' from the model rewritten so far.

    Full moments (new = X'^T X', cross = X'^T X, old = X^T X) when the layer is dense and narrow enough,
    else only per-block Grams of x' (B, d, d)."""

    new: np.ndarray | None = None
    cross: np.ndarray | None = None
    old: np.ndarray | None = None
    blocks: np.ndarray | None = None
    group: int = 1  # per-group widths are padded separately to whole blocks
    held: InputStats | None = None  # full moments of the held-out samples' rows alone (also in the above)
    count: int = 0
    pending: list = field(default_factory=list)  # (x, x', same) rows not yet folded in: few large products
    pending_rows: int = 0

    @property
    def full(self) -> bool:
        return self.new is not None


def rows_needed(width: int) -> int:
    return max(ROWS_PER_INPUT * width, MIN_ROWS)


def compensation(m: np.ndarray, stats: InputStats) -> tuple[np.ndarray, float | None]:
    """The layer's compensated target from its full moments, the ridge chosen on the held-out rows."""
    held = None if stats.held is None else (stats.held.new, stats.held.cross, stats.held.old)
    return fitted_target(m, (stats.new, stats.cross), stats.count, held, 0 if held is None else stats.held.count)


def wants_full(layer: WeightLayer) -> bool:
    return layer.group == 1 and layer.full_width <= MAX_MOMENT_DIM


def capture_stats(
    ctx: PassContext,
    original: onnx.ModelProto,
    current: onnx.ModelProto,
    wave: list[WeightLayer],
    block: dict[str, int],
    desc: str,
) -> dict[str, InputStats]:
    """Input statistics of every layer of a wave (no layer feeds another), over the fit samples streamed
    through the original and the rewritten model side by side, until each has enough rows.

    `block` gives, for layers without full moments, the sub-vector size of their per-block Grams."""
    stats = {la.label: _empty_stats(la, block.get(la.label)) for la in wave}
    stats = {k: v for k, v in stats.items() if v is not None}
    live = [la for la in wave if la.label in stats]
    if not live:
        return {}

    seen = [0]

    def update(before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> bool:
        held_out = seen[0] % HELD_EVERY == HELD_EVERY - 1
        seen[0] += 1
        for la in live:
            st = stats[la.label]
            if st.count >= rows_needed(min(la.full_width, MAX_MOMENT_DIM)):
                continue
            x = la.input_rows(before[la.node.input[0]].astype(np.float64))
            same = np.array_equal(before[la.node.input[0]], after[la.node.input[0]])
            x_new = x if same else la.input_rows(after[la.node.input[0]].astype(np.float64))
            for part in (st, st.held) if held_out and st.held is not None else (st,):
                part.pending.append((x, x_new, same))
                part.pending_rows += len(x)
                part.count += len(x)
                if part.pending_rows >= FLUSH_ROWS:
                    _flush(part)
        return all(stats[la.label].count >= rows_needed(min(la.full_width, MAX_MOMENT_DIM)) for la in live)

    ctx.reduce_pair(original, current, sorted({la.node.input[0] for la in live}), update, desc=desc)
    for st in [*stats.values(), *(st.held for st in stats.values() if st.held is not None)]:
        _flush(st)
        scale = 1.0 / max(st.count, 1)
        for name in ("new", "cross", "old", "blocks"):
            value = getattr(st, name)
            if value is not None:
                setattr(st, name, value * scale)
    return stats


def _empty_stats(layer: WeightLayer, block: int | None) -> InputStats | None:
    width = layer.full_width
    if wants_full(layer):
        held = InputStats(np.zeros((width, width)), np.zeros((width, width)), np.zeros((width, width)))
        return InputStats(np.zeros((width, width)), np.zeros((width, width)), np.zeros((width, width)), held=held)
    if block is None:
        return None
    per_group = math.ceil(width // layer.group / block)
    return InputStats(blocks=np.zeros((layer.group * per_group, block, block)), group=layer.group)


def _flush(st: InputStats) -> None:
    if not st.pending:
        return
    same = all(p[2] for p in st.pending)
    x = np.concatenate([p[0] for p in st.pending])
    x_new = x if same else np.concatenate([p[1] for p in st.pending])
    st.pending, st.pending_rows = [], 0
    _accumulate(st, x, x_new, same)


def _accumulate(st: InputStats, x: np.ndarray, x_new: np.ndarray, same: bool) -> None:
    if st.full:
        old = x.T @ x
        st.old += old
        st.new += old if same else x_new.T @ x_new
        st.cross += old if same else x_new.T @ x
    else:
        b, d = st.blocks.shape[:2]
        xg = x_new.reshape(len(x_new), st.group, -1)
        xg = np.pad(xg, ((0, 0), (0, 0), (0, -xg.shape[2] % d)))
        xb = xg.reshape(len(x_new), b, d)
        st.blocks += np.einsum("rbd,rbe->bde", xb, xb)


def insert_before(model: onnx.ModelProto, output: str, nodes: list[onnx.NodeProto], weight: str) -> None:
    """Insert `nodes` before the node producing `output`, and make that node read `weight` as input 1."""
    current = list(model.graph.node)
    at = next(i for i, n in enumerate(current) if output in n.output)
    current[at].input[1] = weight
    del model.graph.node[:]
    model.graph.node.extend([*current[:at], *nodes, *current[at:]])


def _shape_const(model: onnx.ModelProto, base: str, shape) -> str:
    return add_initializer(model, base, np.asarray(shape, dtype=np.int64), np.int64)


def short_base(model: onnx.ModelProto, tag: str) -> str:
    """A short unused prefix like 'pq.7': decoder tensor names repeat in the file, so they stay brief."""
    taken = {t.name.rsplit(".", 1)[0] for t in model.graph.initializer if t.name.startswith(tag + ".")}
    i = 0
    while f"{tag}.{i}" in taken:
        i += 1
    return f"{tag}.{i}"


def _layout_nodes(model: onnx.ModelProto, layer: WeightLayer, src: str, base: str) -> tuple[list, str]:
    """Reshape an output-major (N, ...) tensor to the weight's own layout (Transpose for K x N weights)."""
    n = layer.matrix.shape[0]
    shape = (n, layer.matrix.shape[1]) if layer.kind == "cols" else layer.weight.shape
    out = unique_name(model, f"{base}.dense")
    nodes = [helper.make_node("Reshape", [src, _shape_const(model, f"{base}.shape", shape)], [out],
                              name=unique_name(model, f"{base}.reshape"))]
    if layer.kind == "cols":
        t = unique_name(model, f"{base}.t")
        nodes.append(helper.make_node("Transpose", [out], [t], name=unique_name(model, f"{base}.transpose"),
                                      perm=[1, 0]))
        out = t
    return nodes, out


def _cast_to(model: onnx.ModelProto, src: str, dtype: np.dtype, base: str) -> tuple[list, str]:
    out = unique_name(model, f"{base}.weight")
    to = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    return [helper.make_node("Cast", [src], [out], name=unique_name(model, f"{base}.cast"), to=to)], out


def pq_decoder(
    model: onnx.ModelProto, layer: WeightLayer, codebook: np.ndarray, codes: np.ndarray, book_dtype: np.dtype
) -> tuple[list, str]:
    """codebook (k, d) + uint8 codes (N, J) -> Gather (-> Slice off the padding) -> Reshape (-> Transpose)
    -> Cast -> dense weight."""
    base = short_base(model, "pq")
    book = add_initializer(model, f"{base}.codebook", codebook, book_dtype)
    code = add_initializer(model, f"{base}.codes", codes, np.uint8)
    index, gathered = unique_name(model, f"{base}.index"), unique_name(model, f"{base}.gathered")
    nodes = [helper.make_node("Cast", [code], [index], name=unique_name(model, f"{base}.index_cast"),
                              to=TensorProto.INT32),
             helper.make_node("Gather", [book, index], [gathered], name=unique_name(model, f"{base}.gather"),
                              axis=0)]
    n, width = layer.matrix.shape
    if codes.shape[1] * codebook.shape[1] != width:
        flat, trimmed = unique_name(model, f"{base}.flat"), unique_name(model, f"{base}.trimmed")
        starts, ends, axes = (_shape_const(model, f"{base}.{t}", [v]) for t, v in (("start", 0), ("end", width),
                                                                                   ("axis", 1)))
        nodes += [helper.make_node("Reshape", [gathered, _shape_const(model, f"{base}.rows", [n, -1])], [flat],
                                   name=unique_name(model, f"{base}.flatten")),
                  helper.make_node("Slice", [flat, starts, ends, axes], [trimmed],
                                   name=unique_name(model, f"{base}.slice"))]
        gathered = trimmed
    layout, out = _layout_nodes(model, layer, gathered, base)
    nodes += layout
    if np.dtype(book_dtype) != layer.weight.dtype:
        cast, out = _cast_to(model, out, layer.weight.dtype, base)
        nodes += cast
    return nodes, out


def dense_decoder(model: onnx.ModelProto, layer: WeightLayer, dtype: np.dtype,
                  weight: np.ndarray | None = None) -> tuple[list, str]:
    """The weight (or a refitted `weight` of its shape) stored in `dtype` (float16) and cast back to its own
    dtype in the graph; stored in its own dtype, no Cast (a refitted weight with dense_fp16=false)."""
    own = np.dtype(dtype) == layer.weight.dtype
    base = short_base(model, "dense" if own else "fp16")
    stored = add_initializer(model, f"{base}.stored", layer.weight if weight is None else weight, dtype)
    if own:
        return [], stored
    return _cast_to(model, stored, layer.weight.dtype, base)


def binary_decoder(
    model: onnx.ModelProto, layer: WeightLayer, signs: np.ndarray, alpha: np.ndarray
) -> tuple[list, str]:
    """Bit-packed signs (N, m, K) and alpha (N, m) -> W[n] = sum_i alpha[n, i] * s[n, i], with standard ops:
    BitShift + Mod unpack the bits, Mul/Sub map {0, 1} to {-1, +1}, a batched MatMul weighs the bases."""
    n, m, k = signs.shape
    base = short_base(model, "bin")
    total = n * m * k
    packed = np.packbits((signs > 0).ravel().astype(np.uint8)).reshape(-1, 1)
    bits = add_initializer(model, f"{base}.bits", packed, np.uint8)
    shifts = add_initializer(model, f"{base}.shifts", np.arange(7, -1, -1, dtype=np.uint8), np.uint8)
    two = add_initializer(model, f"{base}.two", np.array(2, dtype=np.uint8), np.uint8)
    fconst = {v: add_initializer(model, f"{base}.{v}", np.array(float(v), dtype=layer.weight.dtype),
                                 layer.weight.dtype) for v in (1, 2)}
    scale = add_initializer(model, f"{base}.alpha", alpha.reshape(n, 1, m), layer.weight.dtype)
    names = {t: unique_name(model, f"{base}.{t}") for t in ("shifted", "bit", "float", "flat", "signs",
                                                            "double", "pm", "weighted")}
    shape = _shape_const(model, f"{base}.flat_shape", [len(packed) * 8])
    nodes = [
        helper.make_node("BitShift", [bits, shifts], [names["shifted"]], direction="RIGHT",
                         name=unique_name(model, f"{base}.bitshift")),
        helper.make_node("Mod", [names["shifted"], two], [names["bit"]], name=unique_name(model, f"{base}.mod")),
        helper.make_node("Cast", [names["bit"]], [names["float"]], name=unique_name(model, f"{base}.cast_bits"),
                         to=helper.np_dtype_to_tensor_dtype(layer.weight.dtype)),
        helper.make_node("Reshape", [names["float"], shape], [names["flat"]], name=unique_name(model, f"{base}.r1")),
    ]
    flat = names["flat"]
    if total != len(packed) * 8:
        starts, ends = (_shape_const(model, f"{base}.{t}", [v]) for t, v in (("start", 0), ("end", total)))
        flat = unique_name(model, f"{base}.trimmed")
        nodes.append(helper.make_node("Slice", [names["flat"], starts, ends], [flat],
                                      name=unique_name(model, f"{base}.slice")))
    nodes += [
        helper.make_node("Reshape", [flat, _shape_const(model, f"{base}.nmk", [n, m, k])], [names["signs"]],
                         name=unique_name(model, f"{base}.r2")),
        helper.make_node("Mul", [names["signs"], fconst[2]], [names["double"]], name=unique_name(model, f"{base}.mul")),
        helper.make_node("Sub", [names["double"], fconst[1]], [names["pm"]], name=unique_name(model, f"{base}.sub")),
        helper.make_node("MatMul", [scale, names["pm"]], [names["weighted"]],
                         name=unique_name(model, f"{base}.matmul")),
    ]
    layout, out = _layout_nodes(model, layer, names["weighted"], base)
    return nodes + layout, out


def weight_bytes(model: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> int:
    """Bytes of the initializers a decoding subgraph reads."""
    used = {i for node in nodes for i in node.input}
    return sum(len(t.raw_data) or _data_len(t) for t in model.graph.initializer if t.name in used)


def _data_len(tensor: onnx.TensorProto) -> int:
    return math.prod(tensor.dims) * np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
