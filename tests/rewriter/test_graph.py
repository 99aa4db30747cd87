"""The graph view: producers, consumers, constants and shapes of a shape-inferred model."""

from __future__ import annotations

from rewriter.canonical import canonicalize
from rewriter.graph import GraphView, unique_name
from tests.helpers import mlp_model


def test_graph_view_lookups():
    model = canonicalize(mlp_model(dims=(16, 32, 8)), {"x": [1, 16]})
    view = GraphView(model)
    assert view.producer("r").op_type == "Relu" and view.producer("x") is None
    assert [n.op_type for n in view.consumers("h")] == ["Relu"]
    assert view.is_initializer("w1") and view.constant("w1").shape == (32, 16) and view.constant("h") is None
    assert view.static_shape("h") == [1, 32] and view.static_shape("y") == [1, 8]
    assert view.is_graph_output("y") and not view.is_graph_output("r")
    assert unique_name(model, "w1") == "w1_1" and unique_name(model, "fresh") == "fresh"
