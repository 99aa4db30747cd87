"""The distill pass: the PyTorch interpreter against onnxruntime, recovery after compression, an unchanged graph,
determinism, and clear errors without PyTorch or with unsupported ops."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from rewriter import rewrite
from rewriter.calib import Calibration
from rewriter.canonical import canonicalize
from rewriter.errors import ModelError, UsageError
from rewriter.pass_api import PassContext
from rewriter.registry import make_pass
from tests.helpers import CALIB, SAMPLES, make_model, run_ort, tensor, value

SAMPLE_MODELS = ["digits_mlp", "digits_vgg", "digits_resnet", "digits_mobilenet"]


def _digits(n: int) -> np.ndarray:
    with np.load(CALIB) as data:
        return data["input"][:n]


def _interpret(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    torch = pytest.importorskip("torch")
    from rewriter.passes._torch_graph import TorchGraph, trainable_names

    graph = TorchGraph(model, trainable_names(model))
    with torch.no_grad():
        out = graph({k: torch.from_numpy(v) for k, v in feeds.items()})
    return [out[o.name].numpy() for o in model.graph.output]


def _assert_matches_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> None:
    for got, want in zip(_interpret(model, feeds), run_ort(model, feeds), strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(want).max())))


@pytest.mark.parametrize("name", SAMPLE_MODELS)
def test_interpreter_matches_onnxruntime_on_samples(name):
    model = onnx.load(SAMPLES / f"{name}.onnx")
    x = _digits(4)
    for i in range(len(x)):
        _assert_matches_ort(model, {"input": x[i: i + 1]})


def _ops_graph() -> onnx.ModelProto:
    """One graph over the layout and activation ops the interpreter has to get exactly right."""
    rng = np.random.default_rng(0)
    n = helper.make_node
    nodes = [
        n("Conv", ["x", "w", "b"], ["c"], pads=[0, 1, 1, 0], strides=[2, 1]),  # asymmetric pads, strides
        n("LeakyRelu", ["c"], ["l"], alpha=0.1),
        n("Split", ["l", "sp"], ["s1", "s2"], axis=1),
        n("Clip", ["s1", "lo", "hi"], ["k"]),
        n("HardSwish", ["s2"], ["h"]),
        n("Concat", ["k", "h"], ["cat"], axis=1),
        n("MaxPool", ["cat"], ["mp"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]),
        n("AveragePool", ["cat"], ["ap"], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1),
        n("Resize", ["mp", "", "scales"], ["up"], mode="nearest"),
        n("Slice", ["up", "starts", "ends", "axes", "steps"], ["sl"]),
        n("Transpose", ["sl"], ["tr"], perm=[0, 2, 3, 1]),
        n("Reshape", ["tr", "shape"], ["rs"]),
        n("Softmax", ["rs"], ["sm"], axis=-1),
        n("Sigmoid", ["ap"], ["sg"]),
        n("Flatten", ["sg"], ["fl"]),
        n("Gemm", ["fl", "g", "gb"], ["gm"], transB=1, alpha=0.5),
    ]
    inits = [tensor("w", rng.normal(size=(6, 3, 3, 3))), tensor("b", rng.normal(size=6)),
             numpy_helper.from_array(np.array([2, 4], dtype=np.int64), "sp"),
             tensor("lo", np.array(-0.5)), tensor("hi", np.array(0.7)),
             tensor("scales", np.array([1, 1, 2, 2])),
             numpy_helper.from_array(np.array([1, -1], dtype=np.int64), "starts"),
             numpy_helper.from_array(np.array([7, -100], dtype=np.int64), "ends"),
             numpy_helper.from_array(np.array([2, 3], dtype=np.int64), "axes"),
             numpy_helper.from_array(np.array([2, -2], dtype=np.int64), "steps"),
             numpy_helper.from_array(np.array([1, -1, 6], dtype=np.int64), "shape"),
             tensor("g", rng.normal(size=(5, 6 * 3 * 4))), tensor("gb", rng.normal(size=5))]
    return make_model(nodes, [value("x", [1, 3, 11, 8])], [value("sm", [1, 12, 6]), value("gm", [1, 5])], inits)


def _codes_graph() -> onnx.ModelProto:
    """A PQ-style Gather of a float16 codebook by uint8 codes and binary-style unpacked sign bits, as weights."""
    rng = np.random.default_rng(1)
    n = helper.make_node
    nodes = [
        n("Cast", ["codes"], ["idx"], to=TensorProto.INT32),
        n("Gather", ["book", "idx"], ["rows"], axis=0),
        n("Reshape", ["rows", "wshape"], ["w16"]),
        n("Cast", ["w16"], ["w"], to=TensorProto.FLOAT),
        n("BitShift", ["bits", "shifts"], ["shifted"], direction="RIGHT"),
        n("Mod", ["shifted", "two"], ["bit"]),
        n("Cast", ["bit"], ["bitf"], to=TensorProto.FLOAT),
        n("Reshape", ["bitf", "bshape"], ["signs01"]),
        n("Mul", ["signs01", "ftwo"], ["dbl"]),
        n("Sub", ["dbl", "fone"], ["signs"]),
        n("Mul", ["signs", "alpha"], ["wb"]),
        n("MatMul", ["x", "w"], ["h"]),
        n("MatMul", ["h", "wb"], ["y"]),
    ]
    inits = [numpy_helper.from_array(rng.normal(size=(8, 4)).astype(np.float16), "book"),
             numpy_helper.from_array(rng.integers(0, 8, size=(6, 1)).astype(np.uint8), "codes"),
             numpy_helper.from_array(np.array([6, 4], dtype=np.int64), "wshape"),
             numpy_helper.from_array(rng.integers(0, 256, size=(3, 1)).astype(np.uint8), "bits"),
             numpy_helper.from_array(np.arange(7, -1, -1).astype(np.uint8), "shifts"),
             numpy_helper.from_array(np.array(2, dtype=np.uint8), "two"),
             numpy_helper.from_array(np.array([4, 6], dtype=np.int64), "bshape"),
             tensor("ftwo", np.array(2.0)), tensor("fone", np.array(1.0)), tensor("alpha", rng.random((1, 6)))]
    return make_model(nodes, [value("x", [2, 6])], [value("y", [2, 6])], inits)


@pytest.mark.parametrize("build, shape", [(_ops_graph, (1, 3, 11, 8)), (_codes_graph, (2, 6))])
def test_interpreter_matches_onnxruntime_on_generated_graphs(build, shape):
    model = build()
    x = np.random.default_rng(2).normal(size=shape).astype(np.float32)
    _assert_matches_ort(model, {"x": x})


def test_only_weights_are_trainable():
    pytest.importorskip("torch")
    from rewriter.passes._torch_graph import trainable_names

    names = set(trainable_names(_codes_graph()))
    assert names == {"book", "alpha"}  # not the codes, bits, shapes, nor the scalars 2 and 1
    assert {"w", "b", "g", "gb"} <= set(trainable_names(_ops_graph())) and "scales" not in trainable_names(_ops_graph())


def test_unsupported_op_is_one_line_model_error():
    pytest.importorskip("torch")
    from rewriter.passes._torch_graph import TorchGraph

    model = make_model([helper.make_node("Unique", ["x"], ["y"])], [value("x", [1, 4])], [value("y", [4])])
    with pytest.raises(ModelError, match="Unique") as err:
        TorchGraph(model)
    assert "\n" not in str(err.value)


def test_without_torch_the_pass_asks_for_the_extra(monkeypatch):
    import rewriter.passes.distill as distill

    monkeypatch.setattr(distill, "torch_available", lambda: False)
    with pytest.raises(UsageError, match=r"pip install 'rewriter\[distill\]'") as err:
        rewrite(SAMPLES / "digits_mlp.onnx", passes=["distill"], calib=CALIB)
    assert err.value.exit_code == 2


@pytest.mark.parametrize("options", [{"loss": "kd,foo"}, {"loss": "kd:x"}, {"augment": "rotate"}, {"lr": "0"}])
def test_bad_options_are_usage_errors(options):
    with pytest.raises(UsageError):
        make_pass("distill", options)


def _compressed(name: str, passes: list[str], options: dict) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """(teacher, student): the canonical sample and the sample after `passes`."""
    result = rewrite(SAMPLES / f"{name}.onnx", passes=passes, calib=CALIB, options=options)
    teacher = canonicalize(onnx.load(SAMPLES / f"{name}.onnx"), {"input": [1, *_digits(1).shape[1:]]})
    return teacher, result.model


def _context(teacher: onnx.ModelProto, n: int, seed: int = 0) -> PassContext:
    with np.load(CALIB) as data:
        fit = Calibration({"input": data["input"][:n]}, data["labels"][:n], "digits")
    return PassContext(fit=fit, seed=seed, teacher=teacher, log=lambda _: None)


@pytest.fixture(scope="module")
def svd_mlp():
    pytest.importorskip("torch")
    return _compressed("digits_mlp", ["svd"], {"svd": {"rank_ratio": 0.1, "data_aware": False}})


def test_distill_recovers_fidelity_after_svd(svd_mlp):
    teacher, student = svd_mlp
    result = make_pass("distill", {"steps": 40, "eval_every": 10, "batch": 32, "threads": 1, "lr": 1e-2})
    result = result.run(student, _context(teacher, 240))
    notes = result.notes
    assert "kept" not in notes
    assert notes["val_after"]["drop"] < notes["val_before"]["drop"] - 0.05
    assert notes["val_after"]["top1_agreement"] > notes["val_before"]["top1_agreement"]
    # the state kept is the one of lowest loss on the split's clean inputs, lower than the start's
    assert notes["val_after"]["loss"] == min(h["val_loss"] for h in notes["history"]) < notes["val_before"]["loss"]
    # and on digits the distill pass never saw, labelled: accuracy comes back
    with np.load(CALIB) as data:
        x, labels = data["input"][240:], data["labels"][240:]
    before = run_ort(student, {"input": x})[0].argmax(1)
    after = run_ort(result.model, {"input": x})[0].argmax(1)
    assert (after == labels).mean() > (before == labels).mean() + 0.03


def _graph_signature(model: onnx.ModelProto) -> tuple:
    nodes = tuple(n.SerializeToString() for n in model.graph.node)
    inits = tuple((t.name, tuple(t.dims), t.data_type) for t in model.graph.initializer)
    io = tuple(v.SerializeToString() for v in [*model.graph.input, *model.graph.output])
    return nodes, inits, io


def test_graph_unchanged_only_float_initializers_trained():
    pytest.importorskip("torch")
    teacher, student = _compressed("digits_mlp", ["pq"], {"pq": {"k": 4, "block": 8, "max_error": 0}})
    options = {"steps": 4, "eval_every": 2, "loss": "kd,nst,rank", "threads": 1, "lr": 1e-2}
    result = make_pass("distill", options).run(student, _context(teacher, 80))
    assert _graph_signature(result.model) == _graph_signature(student)
    before = {t.name: t for t in student.graph.initializer}
    moved = [t for t in result.model.graph.initializer if t.SerializeToString() != before[t.name].SerializeToString()]
    assert moved, "nothing was trained"
    floats = {TensorProto.FLOAT, TensorProto.FLOAT16}
    assert all(t.data_type in floats for t in moved)  # codes (uint8) and shapes (int64) never change
    assert any("codebook" in t.name for t in moved)  # gradients reach the PQ codebooks through the Gather


def _sequence_major(scale: float) -> onnx.ModelProto:
    """A recogniser's tail: features [1, C, T] -> [T, 1, C] (batch on axis 1, a batch of 1 baked into the
    Reshape) -> a per-step classifier; `scale` perturbs the classifier (the student)."""
    rng = np.random.default_rng(0)
    n = helper.make_node
    w = rng.standard_normal((8, 5)) * scale
    nodes = [n("Transpose", ["x"], ["t"], perm=[2, 0, 1]), n("Reshape", ["t", "shape"], ["r"]),
             n("MatMul", ["r", "w"], ["m"]), n("Softmax", ["m"], ["y"], axis=2)]
    inits = [numpy_helper.from_array(np.array([6, 1, 8], np.int64), "shape"), tensor("w", w)]
    return make_model(nodes, [value("x", [1, 8, 6])], [value("y", [6, 1, 5])], inits)


def test_sequence_major_outputs_train_sample_by_sample():
    """Outputs whose batch axis is not first ([T, N, classes]) are compared per sample as onnxruntime returns
    them (this failed with 'no batch axis of 1' on a real BiLSTM recogniser)."""
    pytest.importorskip("torch")
    teacher, student = _sequence_major(1.0), _sequence_major(1.0)
    student.graph.initializer[1].CopyFrom(tensor("w", numpy_helper.to_array(teacher.graph.initializer[1]) * 0.3))
    x = np.random.default_rng(1).standard_normal((40, 8, 6)).astype(np.float32)
    ctx = PassContext(fit=Calibration({"x": x}, None, "sequence"), seed=0, teacher=teacher, log=lambda _: None)
    options = {"steps": 30, "eval_every": 10, "threads": 1, "lr": 3e-2, "augment": "none", "batch": 8}
    result = make_pass("distill", options).run(student, ctx)
    assert result.notes["val_after"]["drop"] < result.notes["val_before"]["drop"]
    assert _graph_signature(result.model) == _graph_signature(student)


def test_one_value_per_sample_outputs_train():
    """An output of shape [N] (silero-vad's speech probability per chunk) is one channel; it failed with
    'Dimension out of range' in the loss."""
    pytest.importorskip("torch")

    def per_sample(noise: float) -> onnx.ModelProto:
        nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Squeeze", ["h", "axes"], ["y"])]
        w = np.linspace(-1.0, 1.0, 6).reshape(6, 1) + noise * np.random.default_rng(3).standard_normal((6, 1))
        w = tensor("w", w)
        return make_model(nodes, [value("x", ["N", 6])], [value("y", ["N"])],
                          [w, numpy_helper.from_array(np.array([1], np.int64), "axes")])

    teacher, student = per_sample(0.0), per_sample(0.5)
    x = np.random.default_rng(2).standard_normal((40, 6)).astype(np.float32)
    ctx = PassContext(fit=Calibration({"x": x}, None, "vector"), seed=0, teacher=teacher, log=lambda _: None)
    options = {"steps": 30, "eval_every": 10, "threads": 1, "lr": 3e-2, "augment": "none", "batch": 8}
    result = make_pass("distill", options).run(student, ctx)
    assert result.notes["val_after"]["drop"] < result.notes["val_before"]["drop"]


def test_output_axis_given_by_the_user_is_how_distill_reads_the_output():
    """Raw per-step logits from a MatMul carry no sign of being class scores; --output-axis NAME=2:scores says so,
    and distill's loss (soft targets) and its held-out check (top-1 agreement) must read them that way too."""
    pytest.importorskip("torch")
    teacher = _sequence_major(1.0)
    del teacher.graph.node[-1]  # no Softmax: the output is the MatMul's logits
    teacher.graph.output[0].name = teacher.graph.node[-1].output[0] = "y"
    student = onnx.ModelProto()
    student.CopyFrom(teacher)
    student.graph.initializer[1].CopyFrom(tensor("w", numpy_helper.to_array(teacher.graph.initializer[1]) * 0.3))
    x = np.random.default_rng(1).standard_normal((40, 8, 6)).astype(np.float32)
    options = {"steps": 2, "eval_every": 1, "threads": 1, "augment": "none", "batch": 8}
    for axes, scored in (({}, False), ({"y": (2, True)}, True)):
        ctx = PassContext(fit=Calibration({"x": x}, None, "sequence"), seed=0, teacher=teacher, log=lambda _: None,
                          output_axes=axes)
        notes = make_pass("distill", options).run(student, ctx).notes
        assert ("top1_agreement" in notes["val_before"]) is scored


def test_deterministic_with_the_seed(svd_mlp):
    teacher, student = svd_mlp
    options = {"steps": 4, "eval_every": 2, "threads": 1, "lr": 1e-2, "augment": "flip,crop,noise,mixup",
               "loss": "kd,feat,rank:0.1"}
    runs = [make_pass("distill", options).run(student, _context(teacher, 60, seed=s)).model for s in (3, 3, 4)]
    first, again, other = (m.SerializeToString() for m in runs)
    assert first == again
    assert first != other




@pytest.mark.slow
@pytest.mark.parametrize("name", ["yolov8n", "mobilenetv3_cls", "dbnet"])
def test_interpreter_matches_onnxruntime_on_real_models(name, real):
    pytest.importorskip("torch")
    model_path, calib = real[name]
    with np.load(calib) as data:
        feeds = {k: data[k][:1] for k in data.files if k != "labels"}
    model = canonicalize(onnx.load(model_path), {k: [1, *v.shape[1:]] for k, v in feeds.items()})
    _assert_matches_ort(model, feeds)


def test_temperature_is_lowered_only_where_a_long_class_axis_would_drown_the_top_class():
    torch = pytest.importorskip("torch")
    from rewriter.layouts import OutputLayout
    from rewriter.passes._distill_loss import TOP_SHARE, fitted_temperature

    rng = np.random.default_rng(0)
    # a recogniser's per-step softmax over 5,000 classes: one sure class, the rest at ~1e-6 of it
    logits = torch.from_numpy(rng.standard_normal((4, 10, 5000))) - 14.0
    logits[..., 7] = 0.0
    probs = torch.softmax(logits, dim=2).float()
    layout = OutputLayout(2, "softmax")
    chosen = fitted_temperature(probs, layout, 4.0)
    assert 1.0 < chosen < 4.0
    soft = torch.softmax(torch.log(probs.double()) / chosen, dim=2).max(dim=2).values.mean()
    assert abs(float(soft) - TOP_SHARE) < 0.01  # the largest temperature that keeps half on the top class
    # at 4 the tail would hold most of it
    assert float(torch.softmax(torch.log(probs.double()) / 4.0, dim=2).max(dim=2).values.mean()) < 0.1
    # two classes, or independent sigmoid scores: the temperature asked for
    two = torch.softmax(torch.from_numpy(rng.standard_normal((8, 2)) * 3).float(), dim=1)
    assert fitted_temperature(two, OutputLayout(1, "softmax"), 4.0) == 4.0
    assert fitted_temperature(torch.sigmoid(logits.float()), OutputLayout(2, "sigmoid"), 4.0) == 4.0


def test_when_augmented_training_never_helps_it_trains_again_on_the_inputs_as_they_are(svd_mlp, monkeypatch):
    """Inputs the augmentation makes implausible (here: every input negated and scaled) never lower the held-out
    loss on real inputs; distill then starts again from the rewritten model without augmenting."""
    import rewriter.passes._distill_train as train

    real = train.augment

    def implausible(feeds, kinds, *args):
        out = real(feeds, kinds, *args)
        return {k: v * -5.0 for k, v in out.items()} if kinds else out

    monkeypatch.setattr(train, "augment", implausible)
    teacher, student = svd_mlp
    options = {"steps": 20, "eval_every": 5, "patience": 2, "batch": 32, "threads": 1, "lr": 1e-2, "augment": "noise"}
    notes = make_pass("distill", options).run(student, _context(teacher, 240)).notes
    assert "kept" not in notes
    phases = [h.get("augment", "given") for h in notes["history"]]
    assert phases[0] == "given" and phases[-1] == "none"
    assert notes["val_after"]["loss"] == min(h["val_loss"] for h in notes["history"] if h.get("augment") == "none")
