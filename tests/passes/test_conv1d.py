"""1-D convolutions (audio and sequence front ends): the shared im2col, and every weight pass on a Conv1d net."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from rewriter import rewrite
from rewriter.graph import GraphView
from rewriter.layers import conv_geometry, conv_patches, conv_rows
from tests.helpers import conv1d_model, run_ort, smooth_signals


def test_conv1d_patches_times_the_weight_give_the_conv_output():
    model = conv1d_model()
    view = GraphView(model)
    x = smooth_signals(3)
    for name in ("conv1", "conv2", "conv3"):
        node = next(n for n in model.graph.node if n.name == name)
        weight = view.constant(node.input[1])
        geometry = conv_geometry(node, list(weight.shape))
        assert geometry.rank == 1 and geometry.own_kernel == weight.shape[2:]
        single = onnx.helper.make_model(
            onnx.helper.make_graph([node], "one", [onnx.helper.make_tensor_value_info(node.input[0], 1, None)],
                                   [onnx.helper.make_tensor_value_info(node.output[0], 1, None)],
                                   [t for t in model.graph.initializer if t.name in node.input]),
            opset_imports=[onnx.helper.make_opsetid("", 17)])
        length = {"conv1": 64, "conv2": 64, "conv3": 32}[name]
        feed = x if name == "conv1" else np.abs(np.random.default_rng(1).normal(size=(3, weight.shape[1], length)))
        feed = feed.astype(np.float32)
        y = run_ort(single, {node.input[0]: feed})[0]
        bias = view.constant(node.input[2])
        got = conv_patches(feed.astype(np.float64), geometry) @ weight.reshape(len(weight), -1).T + bias
        np.testing.assert_allclose(got, conv_rows(y), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("passes, most_drop, most_macs", [
    (["prune"], 0.15, 0.7), (["pq"], 0.1, 1.0), (["svd"], 0.2, 0.8), (["binary"], 0.6, 1.1),
    (["prune", "pq", "distill"], 0.2, 0.7)])
def test_weight_passes_rewrite_conv1d_layers(passes, most_drop, most_macs):
    model = conv1d_model()
    # each pass at its default strength, not retried milder (that is tested below)
    pinned = {"prune": {"max_error": 0.2}, "pq": {"max_error": 0.2}, "binary": {"bases": 1}}
    options = {name: pinned[name] for name in passes if name in pinned}
    result = rewrite(model, passes=passes, calib={"x": smooth_signals(96)}, options=options)
    report = result.report
    first = report["passes"][0]
    convs = {"conv1", "conv2", "conv3", "conv4"}
    assert convs & set(first["changed"]), first["notes"]
    onnx.checker.check_model(result.model, full_check=True)
    x = smooth_signals(4, seed=5)
    assert run_ort(result.model, {"x": x})[0].shape == (4, 6, 32)
    assert report["fidelity"]["drop"] <= most_drop
    assert report["output"]["macs"] <= most_macs * report["input"]["macs"]

