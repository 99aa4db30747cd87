"""The pq pass: EM fits, exact decoding in the graph, dense fallback, options."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from rewriter.calib import Calibration
from rewriter.canonical import canonicalize
from rewriter.errors import UsageError
from rewriter.graph import GraphView
from rewriter.pass_api import PassContext
from rewriter.passes._codebook import activation_em, assign, plain_kmeans, reseed_empty, weight_error
from rewriter.passes.pq import PqPass, codes_to_rows, diagonal_blocks, finer_grams, to_blocks
from rewriter.pipeline import checked
from rewriter.registry import make_pass
from tests.helpers import (
    assert_outputs_close,
    conv_model,
    make_model,
    mlp_model,
    op_counts,
    run_ort,
    set_initializer,
    tensor,
    value,
)


def _context(shape, n=48, seed=0) -> PassContext:
    rng = np.random.default_rng(seed)
    return PassContext(fit=Calibration({"x": rng.normal(size=(n, *shape)).astype(np.float32)}, None, "test"))


def _prototyped(rng, shape, d, kinds=8, layout="rows"):
    """A weight whose sub-vectors (size d, along the input axis) are drawn from `kinds` fp16-exact prototypes."""
    protos = rng.integers(-8, 9, size=(kinds, d)) / 4.0
    if layout == "cols":  # (K, N): sub-vectors run down the columns
        k, n = shape
        return protos[rng.integers(0, kinds, size=(n, k // d))].reshape(n, k).T
    n = shape[0]
    return protos[rng.integers(0, kinds, size=(n, int(np.prod(shape[1:])) // d))].reshape(shape)


def _conv1x1_model(seed=0, channels=(8, 16, 24), size=6) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    c0, c1, c2 = channels
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"], name="pw1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2", "b2"], ["y"], name="pw2")]
    inits = [tensor("w1", rng.normal(size=(c1, c0, 1, 1))), tensor("w2", rng.normal(size=(c2, c1, 1, 1))),
             tensor("b2", rng.normal(size=c2))]
    return make_model(nodes, [value("x", ["N", c0, size, size])], [value("y", ["N", c2, size, size])], inits)


def test_blocks_round_trip_with_groups():
    m = np.arange(8 * 12).reshape(8, 12).astype(float)
    v3 = to_blocks(m, group=2, d=3)
    assert v3.shape == (2 * 4, 4, 3)
    np.testing.assert_array_equal(v3[1, 2], m[2, 3:6])  # block 1 = group 0, input block 1; output 2
    np.testing.assert_array_equal(v3[5, 0], m[4, 3:6])  # block 5 = group 1, input block 1; output 4
    codes = np.arange(8 * 4).reshape(8, 4)
    assert codes_to_rows(codes, 2, 8)[4, 1] == codes[5, 0]


def test_activation_em_beats_plain_kmeans_on_the_output():
    rng = np.random.default_rng(0)
    b, p, d, k = 12, 64, 4, 16
    mix = rng.normal(size=(b, d, d)) * np.array([3.0, 1.0, 0.1, 0.01])  # inputs excite few directions
    grams = mix @ mix.transpose(0, 2, 1)
    v3 = rng.normal(size=(b, p, d))
    book, codes = plain_kmeans(v3.reshape(-1, d), k, seed=0)
    plain = weight_error(v3, grams, book, codes.reshape(b, p))
    fitted, em_codes, history = activation_em(v3, grams, book, iters=30, seed=0)
    aware = weight_error(v3, grams, fitted, em_codes)
    assert aware < 0.7 * plain
    assert history[-1] <= history[0]
    assert assign(v3, grams, fitted)[1] == pytest.approx(aware, rel=1e-6)


def test_empty_cluster_is_reseeded_by_splitting_the_largest():
    centroids = np.array([[0.0, 0.0], [5.0, 5.0], [9.0, 9.0]])
    counts = np.array([10.0, 0.0, 3.0])
    assert reseed_empty(centroids, counts, np.random.default_rng(0)) == 1
    assert np.linalg.norm(centroids[1] - centroids[0]) < 1e-2  # split from cluster 0, the most populated


@pytest.mark.parametrize("data_aware", [True, False])
def test_gemm_and_matmul_codes_decode_exactly(data_aware):
    rng = np.random.default_rng(1)
    model = mlp_model(dims=(16, 32, 24))
    set_initializer(model, "w1", _prototyped(rng, (32, 16), 4))  # Gemm transB=1: (N, K)
    set_initializer(model, "w2", _prototyped(rng, (32, 24), 4, layout="cols"))  # MatMul: (K, N)
    model = canonicalize(model, {"x": [1, 16]})
    result = PqPass(k=8, data_aware=data_aware).run(model, _context([16]))
    new = checked(result.model, "pq")
    assert result.changed == ["fc1", "fc2"]
    assert op_counts(new)["Gather"] == 2 and op_counts(new)["Transpose"] == 1  # only the K x N weight turns
    assert {t.data_type for t in new.graph.initializer if "codes" in t.name} == {onnx.TensorProto.UINT8}
    x = rng.normal(size=(1, 16)).astype(np.float32)
    assert_outputs_close(run_ort(new, {"x": x}), run_ort(model, {"x": x}), rtol=1e-4, atol=1e-4)


def test_conv_codes_decode_exactly_3x3_and_1x1():
    rng = np.random.default_rng(2)
    conv = conv_model(channels=(3, 16, 32))
    set_initializer(conv, "w1", _prototyped(rng, (16, 3, 3, 3), 9))
    set_initializer(conv, "w2", _prototyped(rng, (32, 16, 3, 3), 9))
    point = _conv1x1_model()
    set_initializer(point, "w1", _prototyped(rng, (16, 8, 1, 1), 4))
    set_initializer(point, "w2", _prototyped(rng, (24, 16, 1, 1), 4))
    for model, shape in ((conv, [3, 12, 12]), (point, [8, 6, 6])):
        model = canonicalize(model, {"x": [1, *shape]})
        result = PqPass(k=8).run(model, _context(shape, n=16))
        new = checked(result.model, "pq")
        assert all(d["form"] == "pq" for d in result.notes["layers"].values()), result.notes["layers"]
        x = rng.normal(size=(1, *shape)).astype(np.float32)
        assert_outputs_close(run_ort(new, {"x": x}), run_ort(model, {"x": x}), rtol=1e-4, atol=1e-4)


def test_small_layers_stay_dense_in_float16_and_file_shrinks():
    model = canonicalize(conv_model(channels=(1, 16, 32)), {"x": [1, 1, 12, 12]})
    result = PqPass(k=64, max_error=0).run(model, _context([1, 12, 12], n=16))
    layers = result.notes["layers"]
    assert layers["conv1"]["form"] == "dense_fp16"  # 16 sub-vectors cannot pay for a codebook
    assert layers["conv2"]["form"] == "pq" and layers["conv2"]["bits_per_weight"] < 4
    new = checked(result.model, "pq")
    stored = {t.name: t.data_type for t in new.graph.initializer}
    assert onnx.TensorProto.FLOAT16 in stored.values()
    assert len(new.SerializeToString()) < 0.3 * len(model.SerializeToString())
    x = np.random.default_rng(3).normal(size=(1, 1, 12, 12)).astype(np.float32)
    ref, got = run_ort(model, {"x": x})[0], run_ort(new, {"x": x})[0]
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.7  # random weights have no structure to share
    assert layers["conv2"]["output_error"] < layers["conv2"]["output_error_kmeans"]


def test_options_are_checked():
    with pytest.raises(UsageError):
        make_pass("pq", {"k": "300"})
    with pytest.raises(UsageError):
        make_pass("pq", {"codebook_dtype": "int8"})
    with pytest.raises(UsageError):
        PqPass().run(canonicalize(mlp_model(), {"x": [1, 16]}), PassContext(fit=None))


@pytest.mark.parametrize("data_aware", [True, False])
def test_widths_that_blocks_do_not_divide_are_padded_and_decode_exactly(data_aware):
    """A pruned width such as 179 has no divisor to block by: the last block is zero-padded, then sliced off."""
    rng = np.random.default_rng(4)
    model = mlp_model(dims=(18, 32, 10))
    w1 = _prototyped(rng, (32, 20), 4)[:, :18]  # the cut last blocks, zero-padded, make at most 8 more kinds
    set_initializer(model, "w1", w1)
    model = canonicalize(model, {"x": [1, 18]})
    result = PqPass(k=16, data_aware=data_aware, skip="fc2").run(model, _context([18]))
    layer = result.notes["layers"]["fc1"]
    assert layer["form"] == "pq" and layer["d"] == 4
    new = checked(result.model, "pq")
    assert op_counts(new)["Slice"] >= 1
    x = rng.normal(size=(1, 18)).astype(np.float32)
    assert_outputs_close(run_ort(new, {"x": x}), run_ort(model, {"x": x}), rtol=1e-4, atol=1e-4)
    point = _conv1x1_model(channels=(10, 64, 24))
    set_initializer(point, "w1", _prototyped(rng, (64, 12, 1, 1), 4)[:, :10])
    point = canonicalize(point, {"x": [1, 10, 6, 6]})
    result = PqPass(k=16, data_aware=data_aware, skip="pw2").run(point, _context([10, 6, 6], n=16))
    assert result.notes["layers"]["pw1"]["form"] == "pq"
    y = rng.normal(size=(1, 10, 6, 6)).astype(np.float32)
    got = run_ort(checked(result.model, "pq"), {"x": y})
    assert_outputs_close(got, run_ort(point, {"x": y}), rtol=1e-4, atol=1e-4)


def test_per_block_grams_cut_to_finer_sub_vectors_match_the_full_moments():
    """Grams captured per block of 4 give exactly the 2 x 2 diagonal blocks a capture at 2 would have."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(200, 24))
    cov = x.T @ x  # two groups of 12 columns: blocks (group, block) in to_blocks' order
    per_group = [cov[g * 12:(g + 1) * 12, g * 12:(g + 1) * 12] for g in range(2)]
    blocks4 = np.concatenate([diagonal_blocks(c, 4) for c in per_group])
    blocks2 = np.concatenate([diagonal_blocks(c, 2) for c in per_group])
    np.testing.assert_array_equal(finer_grams(blocks4, 2, 2, 6), blocks2)
    np.testing.assert_array_equal(finer_grams(blocks4, 2, 4, 3), blocks4)


@pytest.mark.parametrize("group2", [1, 16])
def test_max_error_refits_finer_or_keeps_the_layer_dense_and_bounds_what_the_codes_add(group2):
    """Random weights share no structure: at k=16 the codes add a large output error. With max_error each layer
    is refit with smaller sub-vectors (a 3 x 3 kernel's rows, then pairs) until the error it adds is within the
    bound, else kept dense in float16; the model then answers closer to the original (regular and depthwise)."""
    model = canonicalize(conv_model(channels=(3, 64, 64), group2=group2), {"x": [1, 3, 12, 12]})
    ctx = _context([3, 12, 12], n=24)
    xs = np.random.default_rng(6).normal(size=(4, 1, 3, 12, 12)).astype(np.float32)
    ref = np.stack([run_ort(model, {"x": x})[0] for x in xs])
    errors = {}
    for bound in (0.0, 0.45):
        result = PqPass(k=16, book_share=1.0, max_error=bound, head_error=0).run(model, ctx)
        new = checked(result.model, "pq")
        got = np.stack([run_ort(new, {"x": x})[0] for x in xs])
        errors[bound] = np.linalg.norm(got - ref) / np.linalg.norm(ref)
        layers = result.notes["layers"]
        if bound:
            conv2 = layers["conv2"]
            assert conv2["errors_by_block"][9] > bound, conv2  # the first fit was over the bound
            assert set(conv2["errors_by_block"]) <= {9, 3}
            assert (conv2["form"] == "pq" and conv2["d"] == 3 and conv2["added_error"] <= bound) or (
                conv2["form"] == "dense_fp16" and "max_error" in conv2["why"]), conv2
        else:
            assert all("errors_by_block" not in d for d in layers.values())
    assert errors[0.45] < 0.8 * errors[0.0], errors


def test_a_layer_over_max_error_stays_in_its_own_dtype_with_dense_fp16_false():
    """The dense fallback stores its (compensated) weight as the user asked: float32, no Cast, no bytes saved."""
    model = canonicalize(conv_model(channels=(3, 64, 64)), {"x": [1, 3, 12, 12]})
    result = PqPass(k=16, book_share=1.0, max_error=0.01, head_error=0, dense_fp16=False).run(
        model, _context([3, 12, 12], n=24))
    new = checked(result.model, "pq")
    conv2 = result.notes["layers"]["conv2"]
    assert conv2["form"] == "dense" and "max_error" in conv2["why"] and conv2["compensated"], conv2
    assert conv2["bytes_after"] == conv2["bytes_before"]
    assert "conv2" in result.changed  # its weight was rewritten
    weights = {t.name: t for t in new.graph.initializer}
    stored = weights[next(n for n in new.graph.node if n.name == "conv2").input[1]]
    assert stored.data_type == onnx.TensorProto.FLOAT  # read straight by the Conv, no Cast between
    # conv1 stays exact (too small for codes, float32 as asked), so there is no upstream error to compensate
    original = {t.name: t for t in model.graph.initializer}["w2"]
    assert np.allclose(onnx.numpy_helper.to_array(stored), onnx.numpy_helper.to_array(original), atol=1e-5)
    assert not any(n.op_type == "Cast" for n in new.graph.node)


def test_the_layer_that_writes_the_output_is_held_to_head_error():
    """No later layer compensates the last layer's codes, so it is bound by head_error (if tighter than max_error):
    refit finer or kept dense until what its codes add is within it; the layers before keep max_error."""
    model = canonicalize(conv_model(channels=(3, 64, 64)), {"x": [1, 3, 12, 12]})
    assert [GraphView(model).writes_output(n) for n in model.graph.node if n.op_type == "Conv"] == [False, True]
    ctx = _context([3, 12, 12], n=24)
    loose = PqPass(k=16, book_share=1.0, max_error=0.45, head_error=0).run(model, ctx).notes
    assert loose["layers"]["conv2"]["added_error"] > 0.05  # the head bound has something to do
    notes = PqPass(k=16, book_share=1.0, max_error=0.45, head_error=0.05).run(model, ctx).notes
    assert notes["heads"] == ["conv2"]
    conv2 = notes["layers"]["conv2"]
    assert (conv2["form"] == "pq" and conv2["added_error"] <= 0.05) or (
        conv2["form"] == "dense_fp16" and "head_error 0.05" in conv2["why"]), conv2
    assert PqPass(k=16, book_share=1.0, max_error=0, head_error=0.05).run(model, ctx).notes["layers"]["conv2"][
        "form"] == "pq"  # max_error=0: no bound at all, as before
