"""Fidelity read along each output's own layout: damaged class scores raise `drop` and trip --max-drop."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from rewriter.calib import Calibration
from rewriter.errors import GuardrailError
from rewriter.fidelity import compare
from rewriter.layouts import OutputLayout, infer_layouts, parse_output_axis
from rewriter.pipeline import Reference, _guard
from tests.helpers import make_model, set_initializer, tensor, value

RNG = np.random.default_rng(0)
SAMPLES = 12


def _calib(shape, labels=None) -> Calibration:
    return Calibration({"x": RNG.normal(size=(SAMPLES, *shape)).astype(np.float32)}, labels, "test")


def _inferred(model: onnx.ModelProto) -> onnx.ModelProto:
    return onnx.shape_inference.infer_shapes(model)


def _classifier():
    """x[N, 16] -> Gemm -> Softmax(axis 1) -> probs[N, 10]."""
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["logits"], transB=1),
             helper.make_node("Softmax", ["logits"], ["probs"], axis=1)]
    inits = [tensor("w", RNG.normal(size=(10, 16))), tensor("b", RNG.normal(size=10))]
    return make_model(nodes, [value("x", [1, 16])], [value("probs", [1, 10])], inits), (16,), "w", 10


def _detector(transpose: bool):
    """YOLOv8-style [N, 4 + C, anchors] (Concat of pixel boxes and Sigmoid scores); YOLOX-style transposed."""
    c, classes, hw = 8, 3, 36
    nodes = [
        helper.make_node("Conv", ["x", "wb"], ["box_map"]),
        helper.make_node("Reshape", ["box_map", "shape_box"], ["box_flat"]),
        helper.make_node("Mul", ["box_flat", "stride"], ["boxes"]),
        helper.make_node("Conv", ["x", "wc"], ["cls_map"]),
        helper.make_node("Reshape", ["cls_map", "shape_cls"], ["cls_flat"]),
        helper.make_node("Sigmoid", ["cls_flat"], ["scores"]),
        helper.make_node("Concat", ["boxes", "scores"], ["head"], axis=1),
    ]
    out_shape = [1, 4 + classes, hw]
    if transpose:
        nodes.append(helper.make_node("Transpose", ["head"], ["out"], perm=[0, 2, 1]))
        out_shape = [1, hw, 4 + classes]
    inits = [tensor("wb", RNG.normal(size=(4, c, 1, 1)) * 0.1), tensor("wc", RNG.normal(size=(classes, c, 1, 1))),
             onnx.numpy_helper.from_array(np.array([1, 4, hw], np.int64), "shape_box"),
             onnx.numpy_helper.from_array(np.array([1, classes, hw], np.int64), "shape_cls"),
             tensor("stride", np.array(320.0))]
    name = "out" if transpose else "head"
    model = make_model(nodes, [value("x", [1, c, 6, 6])], [value(name, out_shape)], inits)
    return model, (c, 6, 6), "wc", classes


def _ctc():
    """A recogniser's [N, T, C] with Softmax over the last axis."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["probs"], axis=-1)]
    model = make_model(nodes, [value("x", [1, 20, 16])], [value("probs", [1, 20, 6])],
                       [tensor("w", RNG.normal(size=(16, 6)))])
    return model, (20, 16), "w", 6


def _segmenter():
    """A one-channel probability map [N, 1, H, W]."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["m"]), helper.make_node("Sigmoid", ["m"], ["map"])]
    model = make_model(nodes, [value("x", [1, 4, 8, 8])], [value("map", [1, 1, 8, 8])],
                       [tensor("w", RNG.normal(size=(1, 4, 1, 1)))])
    return model, (4, 8, 8), "w", 1


def _damage(model: onnx.ModelProto, weight: str, channel: int) -> onnx.ModelProto:
    """Replace one output channel's weights (one class) with noise."""
    damaged = onnx.ModelProto()
    damaged.CopyFrom(model)
    array = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == weight)).copy()
    axis = 1 if array.ndim == 2 and weight == "w" and model.graph.node[0].op_type == "MatMul" else 0
    index = [slice(None)] * array.ndim
    index[axis] = channel
    array[tuple(index)] = np.random.default_rng(7).normal(size=array[tuple(index)].shape) * 3
    return set_initializer(damaged, weight, array)


@pytest.mark.parametrize("build, feature_axis, scores", [
    (_classifier, 1, "softmax"),
    (lambda: _detector(False), 1, "sigmoid"),
    (lambda: _detector(True), 2, "sigmoid"),
    (_ctc, 2, "softmax"),
])
def test_layout_read_from_graph_and_damaged_class_trips_max_drop(build, feature_axis, scores):
    model, shape, weight, classes = build()
    reference = Reference.build(model, _inferred(model), _calib(shape))
    layout = reference.layouts[model.graph.output[0].name]
    assert layout.feature_axis == feature_axis and layout.scores == scores, layout
    assert reference.measure(model)["drop"] < 1e-9
    damaged = reference.measure(_damage(model, weight, classes - 1))
    assert damaged["drop"] > 0.05
    with pytest.raises(GuardrailError, match="max-drop"):
        _guard("damage", damaged, 0.05)


def test_detector_class_channels_box_channels_and_detection_agreement():
    model, shape, weight, classes = _detector(False)
    reference = Reference.build(model, _inferred(model), _calib(shape))
    layout = reference.layouts["head"]
    assert layout.class_channels == (4, 4 + classes) and layout.box_channels == (0, 4)
    assert "Concat" in layout.why
    same = reference.measure(model)
    assert same["detection_agreement"] == 1.0 and same["top1_agreement"] == 1.0
    damaged = reference.measure(_damage(model, weight, 0))
    assert damaged["outputs"]["head"]["worst_channel"] == 4  # class 0 is channel 4, not a box coordinate
    assert damaged["detection_agreement"] < 0.95


def test_yolox_layout_points_the_worst_channel_at_the_class_not_the_anchor():
    model, shape, weight, _ = _detector(True)
    reference = Reference.build(model, _inferred(model), _calib(shape))
    damaged = reference.measure(_damage(model, weight, 1))
    worst = damaged["channel_cosine_worst"]
    assert worst["axis"] == 2 and worst["channel"] == 5


def test_segmentation_map_loud_samples_cannot_hide_broken_ones():
    """One channel: the pooled cosine is dominated by loud samples; the per-sample cosine is in `drop`."""
    layout = OutputLayout(1, why="test")
    rng = np.random.default_rng(3)
    ref = [rng.uniform(0, 1, size=(1, 1, 8, 8)) * (100.0 if i < 2 else 1.0) for i in range(10)]
    new = [r.copy() if i < 2 else rng.uniform(0, 1, size=r.shape) for i, r in enumerate(ref)]
    fid = compare(["map"], {"map": ref}, {"map": new}, {"map": layout})
    assert fid["channel_cosine_min"] > 0.95  # the pooled figure alone would pass
    assert fid["cosine"] < 0.9 and fid["drop"] > 0.1


def test_segmenter_layout_is_its_one_channel():
    model, shape, _, _ = _segmenter()
    reference = Reference.build(model, _inferred(model), _calib(shape))
    layout = reference.layouts["map"]
    assert layout.feature_axis == 1 and "top1_agreement" not in reference.measure(model)


def test_multi_output_damage_in_the_second_output_is_caught():
    model, shape, weight, classes = _classifier()
    model.graph.output.insert(0, value("logits", [1, 10]))  # an embedding-like first output
    reference = Reference.build(model, _inferred(model), _calib(shape))
    assert reference.layouts["logits"].scores is None  # no softmax, no labels: not scored by top-1
    fid = reference.measure(_damage(model, weight, 3))
    assert fid["outputs"]["probs"]["drop"] > 0.05 and fid["drop"] == max(
        f["drop"] for f in fid["outputs"].values())


def test_silent_channel_is_not_a_cosine_of_zero():
    ref = [np.concatenate([np.ones((1, 3, 5)), np.zeros((1, 1, 5))], axis=1) for _ in range(4)]
    new = [r + np.concatenate([np.zeros((1, 3, 5)), np.full((1, 1, 5), 1e-7)], axis=1) for r in ref]
    fid = compare(["y"], {"y": ref}, {"y": new}, {"y": OutputLayout(1)})
    assert fid["channel_cosine_min"] > 1 - 1e-9 and fid["drop"] < 1e-6


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_classes_picked_too_rarely_for_a_cosine_are_left_to_top1_and_a_frequent_one_is_scored():
    """A recogniser's output: [T, classes] probabilities per sample, four classes in use and 60 never seen."""
    rng = np.random.default_rng(0)
    logits = [np.full((1, 20, 64), -12.0) + rng.normal(size=(1, 20, 64)) for _ in range(6)]
    for x in logits:
        x[0, np.arange(20), rng.integers(0, 4, 20)] = 4.0
    ref = [_softmax(x) for x in logits]
    unseen = [_softmax(x + np.pad(rng.normal(size=(1, 20, 60)) * 2, ((0, 0), (0, 0), (4, 0)))) for x in logits]
    layout = OutputLayout(2, "softmax")
    fid = compare(["p"], {"p": ref}, {"p": unseen}, {"p": layout})
    assert fid["outputs"]["p"]["classes_scored"] == 4
    assert fid["channel_cosine_min"] > 0.999 and fid["top1_agreement"] == 1.0
    once = [x.copy() for x in logits]
    once[0][0, 3, 40] = 8.0  # one step of 120 now reads an unseen class: a flip, not a lost channel
    fid = compare(["p"], {"p": ref}, {"p": [_softmax(x) for x in once]}, {"p": layout})
    # the frequent class that step lost keeps most of its ~30 steps
    assert fid["outputs"]["p"]["classes_scored"] == 4 and fid["channel_cosine_min"] > 0.98
    assert fid["top1_agreement"] == pytest.approx(119 / 120) and fid["drop"] < 0.02
    often = [x.copy() for x in logits]
    for x in often:
        x[0, :4, 40] = 8.0  # 24 steps read it: often enough to be scored, and that channel is lost
    fid = compare(["p"], {"p": ref}, {"p": [_softmax(x) for x in often]}, {"p": layout})
    assert fid["outputs"]["p"]["classes_scored"] == 5 and fid["channel_cosine_min"] < 0.5


def _ctc_lines(rng: np.random.Generator, lines: int, steps: int = 40, classes: int = 30) -> list[np.ndarray]:
    """CTC-style [1, T, classes] logits: blank (class 0) at most steps, a character held for 1-2 steps now and then."""
    out = []
    for _ in range(lines):
        path = np.zeros(steps, np.int64)
        for start in range(1, steps - 2, 4):
            path[start:start + int(rng.integers(1, 3))] = rng.integers(1, classes)
        x = rng.normal(size=(1, steps, classes))
        x[0, np.arange(steps), path] += 8.0
        out.append(x)
    return out


def test_a_recognisers_reading_is_compared_as_text():
    """One step in 20 flipped to another character agrees per step at 95 % but edits about a quarter of the text:
    the reading's character error rate, not per-step top-1, is what the drop reports."""
    rng = np.random.default_rng(7)
    logits = _ctc_lines(rng, 16)
    ref = [_softmax(x) for x in logits]
    layout = OutputLayout(2, "softmax")
    same = compare(["p"], {"p": ref}, {"p": [_softmax(x * 0.7) for x in logits]}, {"p": layout})
    assert same["reading_error"] == 0.0 and same["readings_same"] == 1.0
    assert same["outputs"]["p"]["reading_blank"] == 0
    flipped = [x.copy() for x in logits]
    for x in flipped:
        steps = np.flatnonzero(x[0].argmax(axis=1) > 0)[::8]  # every eighth character step reads another character
        x[0, steps] = np.roll(x[0, steps], 1, axis=1)
    fid = compare(["p"], {"p": ref}, {"p": [_softmax(x) for x in flipped]}, {"p": layout})
    assert fid["top1_agreement"] > 0.94
    assert fid["reading_error"] > 0.15 and fid["drop"] == pytest.approx(fid["reading_error"])
    assert fid["readings_same"] == 0.0


def test_a_tagger_without_a_dominant_class_is_not_read_as_text():
    """Per-step labels with no class at most steps (no CTC blank) keep per-step top-1 as their figure."""
    rng = np.random.default_rng(8)
    logits = [rng.normal(size=(1, 30, 5)) * 3 for _ in range(8)]
    ref = [_softmax(x) for x in logits]
    fid = compare(["p"], {"p": ref}, {"p": ref}, {"p": OutputLayout(2, "softmax")})
    assert "reading_error" not in fid and fid["top1_agreement"] == 1.0


def test_a_classifier_over_a_few_held_out_samples_still_scores_its_classes():
    """16 images of a two-class classifier: each class holds a quarter of them or more, so both are scored."""
    rng = np.random.default_rng(3)
    logits = [rng.normal(size=(1, 2)) * 3 for _ in range(16)]
    ref = [_softmax(x) for x in logits]
    new = [_softmax(x * 0.5) for x in logits]  # the same picks, softer
    fid = compare(["p"], {"p": ref}, {"p": new}, {"p": OutputLayout(1, "softmax")})
    assert fid["outputs"]["p"]["classes_scored"] == 2 and fid["top1_agreement"] == 1.0
    assert fid["channel_cosine_min"] < 0.999


def test_embedding_is_not_scored_by_top1():
    rng = np.random.default_rng(4)
    ref = [rng.normal(size=(1, 64)) for _ in range(40)]
    new = [r + rng.normal(size=r.shape) * 0.05 for r in ref]
    model = make_model([helper.make_node("Identity", ["x"], ["emb"])], [value("x", [1, 64])], [value("emb", [1, 64])])
    layouts = infer_layouts(model, {"emb": ref})
    fid = compare(["emb"], {"emb": ref}, {"emb": new}, layouts)
    assert layouts["emb"].scores is None and "top1_agreement" not in fid
    assert fid["drop"] < 0.01


def test_ragged_and_batchless_outputs_compare_sample_by_sample():
    rng = np.random.default_rng(5)
    ref = [rng.normal(size=(k, 6)) for k in (3, 5, 2)]  # NMS-style: a varying number of rows
    new = [ref[0].copy(), ref[1].copy(), rng.normal(size=(4, 6))]  # the last sample found other boxes
    fid = compare(["dets"], {"dets": ref}, {"dets": new}, {"dets": OutputLayout(1)})
    assert fid["outputs"]["dets"]["shape_mismatches"] == 1
    assert fid["cosine"] == pytest.approx(2 / 3) and fid["drop"] >= 1 / 3


def test_labels_give_accuracy_and_class_axis():
    probs = [np.eye(4)[[i % 4]] + 0.1 for i in range(8)]
    new = [p.copy() for p in probs]
    new[3] = np.eye(4)[[0]] + 0.1
    labels = np.array([i % 4 for i in range(8)])
    model = make_model([helper.make_node("Identity", ["x"], ["y"])], [value("x", [1, 4])], [value("y", [1, 4])])
    layouts = infer_layouts(model, {"y": probs}, labels)
    assert layouts["y"].scores == "labels"
    fid = compare(["y"], {"y": probs}, {"y": new}, layouts, labels)
    assert fid["top1_agreement"] == 7 / 8 and fid["accuracy_before"] == 1.0 and fid["accuracy_after"] == 7 / 8


def test_probabilities_found_from_values_and_output_axis_override():
    probs = [np.random.default_rng(i).dirichlet(np.ones(5), size=(1, 7)) for i in range(4)]  # [1, 7, 5]
    model = make_model([helper.make_node("Identity", ["x"], ["y"])], [value("x", [1, 7, 5])],
                       [value("y", [1, 7, 5])])
    assert infer_layouts(model, {"y": probs})["y"].feature_axis == 2
    forced = infer_layouts(model, {"y": probs}, given={"y": (1, False)})["y"]
    assert forced.feature_axis == 1 and forced.scores is None and "output-axis" in forced.why
    assert parse_output_axis("out=2:scores") == ("out", 2, True)
    with pytest.raises(Exception, match="output-axis"):
        parse_output_axis("out=x")
