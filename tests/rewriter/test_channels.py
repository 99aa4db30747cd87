"""The channel-dependency graph: which channels are coupled, where they sit, and what blocks them."""

from __future__ import annotations

import numpy as np
import onnx

from rewriter.canonical import canonicalize
from rewriter.channels import build_channel_graph
from rewriter.pipeline import checked
from tests.channel_nets import Net
from tests.helpers import SAMPLES, token_mlp_model


def _group(cg, producer: str):
    return next(g for g in cg.groups() if producer in g.producers)


def test_residual_add_couples_all_producers():
    n = Net()
    a = n.op("Relu", [n.conv("x", 4, 8, "a")], "ra")
    b = n.conv(n.op("Relu", [n.conv(a, 8, 8, "b1")], "rb"), 8, 8, "b2")
    s = n.op("Add", [a, b], "sum")
    n.conv(n.op("Relu", [s], "rs"), 8, 3, "head")
    cg = build_channel_graph(n.model({"head": [1, 3, 6, 6]}))
    group = _group(cg, "a")
    assert set(group.producers) == {"a", "b2"}
    assert set(group.consumers) == {"b1", "head"}
    assert group.size == 8 and group.blocked is None
    assert all(len(u) == 2 for u in group.units)  # each unit: one channel of a, the same channel of b2
    assert _group(cg, "b1").producers == ["b1"]


def test_concat_and_split_keep_offsets_and_split_halves_apart():
    n = Net()
    p = n.op("Relu", [n.conv("x", 4, 8, "p")], "rp")
    left, right = n.split(p, [3, 5], ["left", "right"])
    q = n.op("Relu", [n.conv(right, 5, 6, "q")], "rq")
    cat = n.op("Concat", [left, right, q], "cat", axis=1)
    n.conv(cat, 14, 2, "head", k=1)
    cg = build_channel_graph(n.model({"head": [1, 2, 6, 6]}))
    groups = [g for g in cg.groups() if "p" in g.producers]
    assert sorted(g.size for g in groups) == [3, 5]
    small = next(g for g in groups if g.size == 3)
    large = next(g for g in groups if g.size == 5)
    assert small.consumers == ["head"] and set(large.consumers) == {"q", "head"}
    assert [cg.positions("cat", u)[0] for u in large.units] == [3, 4, 5, 6, 7]
    assert [cg.positions("cat", u)[0] for u in _group(cg, "q").units] == list(range(8, 14))


def test_depthwise_conv_passes_channels_and_is_a_member():
    n = Net()
    p = n.op("Relu", [n.conv("x", 4, 6, "p", k=1)], "rp")
    d = n.op("Relu", [n.conv(p, 6, 6, "dw", group=6)], "rd")
    n.conv(d, 6, 2, "head", k=1)
    cg = build_channel_graph(n.model({"head": [1, 2, 6, 6]}))
    group = _group(cg, "p")
    assert "dw" in group.members and "dw" not in group.producers
    assert group.consumers == ["head"] and group.size == 6
    assert cg.roles["dw"] == "depthwise"


def test_squeeze_excite_gate_joins_the_main_channels():
    n = Net()
    x = n.op("Relu", [n.conv("x", 4, 8, "main")], "rm")
    pooled = n.op("GlobalAveragePool", [x], "gap")
    squeezed = n.op("Relu", [n.conv(pooled, 8, 2, "reduce", k=1)], "rr")
    gate = n.op("HardSigmoid", [n.conv(squeezed, 2, 8, "expand", k=1)], "gate")
    scaled = n.op("Mul", [x, gate], "scaled")
    n.conv(scaled, 8, 3, "head", k=1)
    cg = build_channel_graph(n.model({"head": [1, 3, 6, 6]}))
    group = _group(cg, "main")
    assert set(group.producers) == {"main", "expand"}
    assert set(group.consumers) == {"reduce", "head"}
    assert _group(cg, "reduce").consumers == ["expand"]


def test_unknown_ops_reshapes_and_outputs_block():
    n = Net()
    a = n.op("Relu", [n.conv("x", 4, 8, "a")], "ra")
    n.op("Reshape", [a, n.const("shape", [1, 2, 4, 36])], "mixed")
    n.inits[-1] = onnx.numpy_helper.from_array(np.array([1, 2, 4, 36], dtype=np.int64), "shape")
    b = n.op("LRN", [n.conv(a, 8, 8, "b")], "lrn", size=3)
    c = n.conv(b, 8, 5, "c")
    cg = build_channel_graph(n.model({"mixed": [1, 2, 4, 36], "c": [1, 5, 6, 6]}))
    assert "Reshape" in _group(cg, "a").blocked
    assert "LRN" in _group(cg, "b").blocked
    assert "graph output" in _group(cg, c).blocked


def test_flatten_into_gemm_spreads_each_channel_over_its_positions():
    model = onnx.load(SAMPLES / "digits_vgg.onnx")
    cg = build_channel_graph(checked(canonicalize(model, {"input": [1, 1, 8, 8]}), "test"))
    last = [g for g in cg.groups() if g.blocked is None][-1]
    gemm = last.consumers[0]
    node = next(n for n in cg.view.graph.node if n.name == gemm)
    flat = cg.view.shape(node.input[0])[1]
    spread = flat // last.size
    assert spread > 1
    assert [cg.positions(node.input[0], u) for u in last.units[:2]] == [
        list(range(0, spread)), list(range(spread, 2 * spread))]


def test_a_last_channel_axis_follows_reshapes_that_keep_it_last():
    cg = build_channel_graph(checked(canonicalize(token_mlp_model(), {"x": [1, 6, 8]}), "test"))
    hidden = next(g for g in cg.groups() if g.size == 24)
    assert hidden.blocked is None
    assert hidden.producers == ["fc1"] and hidden.consumers == ["fc2"]
    assert cg.tensors["ht"].axis == 2 and cg.tensors["rows2"].axis == 1
