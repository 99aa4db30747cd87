"""The exit pass: cut tensors, threshold choice, nested If control nodes on the digits ResNet sample."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest

from rewriter import rewrite
from rewriter.cli import main
from rewriter.errors import ModelError
from rewriter.passes._exit_graph import exit_conditions, probe_model
from rewriter.passes._exit_heads import choose_thresholds, route, threshold_for
from rewriter.registry import available_passes
from tests.helpers import CALIB, SAMPLES, conv_model, run_ort


def test_threshold_is_the_lowest_that_keeps_agreement_with_one_error_to_spare():
    conf = np.array([0.99, 0.98, 0.97, 0.96, 0.95, 0.5, 0.4])
    agree = np.array([True, True, True, True, True, False, True])
    threshold, count = threshold_for(conf, agree, 0.8)  # 5 of 6 (one error to spare) >= 0.8
    assert count == 5 and 0.5 < threshold < 0.95
    threshold, count = threshold_for(conf, agree, 1.0)  # unreachable with a spare error: nobody exits
    assert count == 0 and threshold > conf.max()


def test_later_exits_see_only_the_samples_that_did_not_leave():
    first = np.array([0.9, 0.9, 0.1, 0.1])
    second = np.array([0.1, 0.1, 0.9, 0.9])
    agree_first, agree_second = np.array([True, True, False, False]), np.ones(4, dtype=bool)
    thresholds = choose_thresholds([first, second], [agree_first, agree_second], 0.5)
    stats = route([first, second], [agree_first, agree_second], thresholds)
    assert list(stats.exits) == [0, 0, 1, 1] and stats.agree.all()


@pytest.fixture(scope="module")
def resnet_exit():
    return rewrite(SAMPLES / "digits_resnet.onnx", passes=["exit"], calib=CALIB, seed=0)


def _held_out(result, count=None):
    data = np.load(CALIB)
    order = np.random.default_rng(0).permutation(len(data["input"]))  # the API's split with seed 0
    held = np.sort(order[: result.report["calibration"]["held_out_samples"]])
    return data["input"][held][:count]


def test_resnet_sample_exits_early_and_agrees_on_unseen_digits(resnet_exit):
    notes = resnet_exit.report["passes"][0]["notes"]
    assert len(notes["exits"]) >= 2
    assert len(exit_conditions(resnet_exit.model)) == len(notes["exits"])  # nested If nodes, one per exit
    assert resnet_exit.report["fidelity"]["top1_agreement"] >= 0.99  # held-out digits the pass never saw
    probe, _ = probe_model(resnet_exit.model)
    costs = [e["macs"] for e in notes["exits"]] + [notes["full_macs"]]
    taken = [_exit_taken(run_ort(probe, {"input": x[None]})) for x in _held_out(resnet_exit)]
    expected = float(np.mean([costs[k] for k in taken]))
    assert expected <= 0.6 * resnet_exit.report["input"]["macs"]
    assert len(set(taken)) >= 2


def _exit_taken(conditions: list[np.ndarray]) -> int:
    return next((k for k, c in enumerate(conditions) if bool(c)), len(conditions))


def test_early_answers_come_from_heads_and_the_rest_from_the_full_model(resnet_exit):
    original = onnx.load(SAMPLES / "digits_resnet.onnx")
    probe, _ = probe_model(resnet_exit.model)
    samples = _held_out(resnet_exit, 40)
    early = full = 0
    for x in samples:
        feed = {"input": x[None]}
        new, old = run_ort(resnet_exit.model, feed)[0], run_ort(original, feed)[0]
        if _exit_taken(run_ort(probe, feed)) < len(resnet_exit.report["passes"][0]["notes"]["exits"]):
            early += 1
            assert not np.allclose(new, old)
        else:
            full += 1
            np.testing.assert_allclose(new, old, rtol=1e-5, atol=1e-5)
    assert early > 0


def test_a_batch_answers_like_its_samples_one_by_one(resnet_exit):
    assert resnet_exit.report["interface"]["restored"] == {"input[0]": "N"}
    samples = _held_out(resnet_exit, 12)
    batched = run_ort(resnet_exit.model, {"input": samples})[0]
    single = np.concatenate([run_ort(resnet_exit.model, {"input": x[None]})[0] for x in samples])
    np.testing.assert_allclose(batched, single, rtol=1e-5, atol=1e-5)


def test_non_classifier_is_refused_with_exit_3_and_nothing_written(tmp_path, capsys):
    path = tmp_path / "conv.onnx"
    onnx.save(conv_model(), path)
    out = tmp_path / "out"
    code = main([str(path), "--passes", "exit", "--calib", "synthetic", "-o", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 3
    assert len(err.splitlines()) == 1 and "classifier" in err
    assert not out.exists()


@pytest.mark.slow
def test_exit_composes_after_another_pass():
    first = "prune" if "prune" in available_passes() else "svd"
    result = rewrite(SAMPLES / "digits_resnet.onnx", passes=[first, "exit"], calib=CALIB, seed=0)
    records = result.report["passes"]
    assert [r["name"] for r in records] == [first, "exit"]
    assert records[1]["notes"]["exits"] and exit_conditions(result.model)
    assert result.report["fidelity"]["top1_agreement"] >= 0.95


def _at_batch_1(model: onnx.ModelProto) -> onnx.ModelProto:
    static = onnx.ModelProto()
    static.CopyFrom(model)
    for info in (static.graph.input[0], static.graph.output[0]):
        info.type.tensor_type.shape.dim[0].dim_value = 1  # libraries are built at batch 1
    return static


@pytest.mark.slow
def test_cuda_library_of_an_exit_model_builds_with_its_branches(resnet_exit, tmp_path):
    """No GPU here: the cuda build (host VM with both branches, device kernels as cubin) must at least succeed."""
    pytest.importorskip("tvm")
    from rewriter.targets import build_artifact, resolve_target
    from tests.targets.test_cuda import needs_nvcc

    if needs_nvcc.args[0]:
        pytest.skip(needs_nvcc.kwargs["reason"])
    report = build_artifact(_at_batch_1(resnet_exit.model), resolve_target("cuda"), tmp_path / "model.cuda.so")
    assert report["device_code"] == "cubin+ptx" and (tmp_path / "model.cuda.so").stat().st_size > 0


def test_x86_library_keeps_control_flow_and_matches_onnxruntime(resnet_exit, tmp_path):
    pytest.importorskip("tvm")
    from tvm import relax, runtime

    from rewriter.targets import build_artifact, resolve_target
    from rewriter.targets.lower import import_onnx

    static = _at_batch_1(resnet_exit.model)
    library = tmp_path / "model.x86.so"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_artifact(static, resolve_target("x86"), library)
    assert not [w for w in caught if "layout not applied" in str(w.message)]  # the segments get the CPU layout
    vm = relax.VirtualMachine(runtime.load_module(str(library)), runtime.cpu())
    assert import_onnx(static)["main"].script().count("if ") == len(exit_conditions(static))  # relax.If kept
    probe, _ = probe_model(resnet_exit.model)
    seen = set()
    for x in _held_out(resnet_exit):
        feed = {"input": x[None]}
        taken = _exit_taken(run_ort(probe, feed))
        if taken in seen:
            continue
        seen.add(taken)
        got = vm["main"](runtime.tensor(x[None])).numpy()
        np.testing.assert_allclose(got, run_ort(resnet_exit.model, feed)[0], rtol=1e-4, atol=1e-4)
    exits = len(resnet_exit.report["passes"][0]["notes"]["exits"])
    assert 0 in seen and exits in seen  # a sample that leaves at the first exit and one that runs the whole model




@pytest.mark.slow
def test_mobilenetv3_direction_classifier_exits_in_onnxruntime_and_lowers(real):
    pytest.importorskip("tvm")
    from rewriter.targets.lower import fuse_pipeline, import_onnx
    from rewriter.targets.presets import make_tvm_target, resolve_target

    model, calib = real["mobilenetv3_cls"]  # opset 11, Softmax output, 64 real text-line crops
    result = rewrite(model, passes=["exit"], calib=calib, options={"exit": {"agreement": 0.9}})
    assert result.report["passes"][0]["notes"]["exits"]
    x = np.load(calib)["x"][:6]
    single = np.concatenate([run_ort(result.model, {"x": x[i:i + 1]})[0] for i in range(len(x))])
    np.testing.assert_allclose(single.sum(axis=1), 1.0, atol=1e-5)  # early answers are probabilities too
    np.testing.assert_allclose(run_ort(result.model, {"x": x})[0], single, rtol=1e-5, atol=1e-6)
    static = onnx.ModelProto()
    static.CopyFrom(result.model)
    for info, dims in ((static.graph.input[0], x.shape[1:]), (static.graph.output[0], [2])):
        for axis, size in enumerate([1, *dims]):
            info.type.tensor_type.shape.dim[axis].dim_value = size
    with make_tvm_target(resolve_target("x86")), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused = fuse_pipeline()(import_onnx(static))  # segments bring their own PrimFuncs (hard-swish)
    assert "if " in fused["main"].script()
    assert not [w for w in caught if "layout not applied" in str(w.message)]


@pytest.mark.slow
def test_detector_is_refused(real, tmp_path):
    model, calib = real["yolov8n"]
    with np.load(calib) as data:
        few = {k: data[k][:4] for k in data.files}
    out = tmp_path / "out"
    with pytest.raises(ModelError, match="classifier"):
        rewrite(model, passes=["exit"], calib=few, out_dir=out)
    assert not out.exists()


def test_mlp_hidden_vectors_with_a_logistic_head_and_named_points():
    from rewriter.calib import load_calibration
    from rewriter.canonical import canonicalize
    from rewriter.graph import GraphView
    from rewriter.metrics import count_macs
    from rewriter.pass_api import PassContext
    from rewriter.passes.exit import ExitPass

    model = canonicalize(onnx.load(SAMPLES / "digits_mlp.onnx"), {"input": [1, 1, 8, 8]})
    points = [p.tensor for p in ExitPass()._points(model, count_macs(model))]
    assert points and all(len(GraphView(model).static_shape(p)) == 2 for p in points)  # hidden vectors
    data = load_calibration(CALIB, model).take(np.arange(400))
    result = ExitPass(points=",".join(points), head="logistic", criterion="entropy").run(
        model, PassContext(fit=data))
    notes = result.notes
    assert notes["candidates"] == points and all(len(e) for e in notes["exits"])
    for exit_ in notes["exits"]:
        assert exit_["fit_agreement"] is None or exit_["fit_agreement"] >= 0.99
    feed = {"input": data.inputs["input"][:1]}
    assert run_ort(result.model, feed)[0].shape == (1, 10)


def test_bad_options_are_usage_errors():
    from rewriter.errors import UsageError
    from rewriter.registry import make_pass

    for options in ({"criterion": "vibes"}, {"head": "forest"}, {"agreement": "1.5"}, {"folds": "1"}):
        with pytest.raises(UsageError):
            make_pass("exit", options)


@pytest.mark.parametrize("opset", [13, 18])
@pytest.mark.parametrize("criterion", ["max_prob", "margin", "entropy"])
def test_graph_confidence_is_the_fitted_formula(criterion, opset):
    """The If condition's score is what the thresholds were chosen on (ties included), built from ops every
    TVM runtime has (no TopK: it lowers to an extern sort the aarch64 runtime lacks)."""
    from onnx import TensorProto, helper

    from rewriter.passes._exit_graph import Answer, _Builder, _excess_nodes
    from rewriter.passes._exit_heads import confidence

    x = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 5])
    empty = helper.make_model(helper.make_graph([], "g", [x], []), opset_imports=[helper.make_opsetid("", opset)])
    b = _Builder(empty, Answer(None, TensorProto.FLOAT))
    nodes: list = []
    excess = _excess_nodes(b, "e/", "logits", criterion, 5, 0.25, nodes)
    graph = helper.make_graph(nodes, "g", [x], [helper.make_tensor_value_info(excess, TensorProto.FLOAT, None)],
                              b.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    assert not any(n.op_type == "TopK" for n in model.graph.node)
    logits = np.random.default_rng(0).normal(size=(64, 5)).astype(np.float32)
    logits[:8, :2] = 3.0  # ties for first place: the margin is 0
    got = run_ort(model, {"logits": logits})[0][:, 0]
    np.testing.assert_allclose(got, confidence(logits, criterion) - 0.25, atol=1e-6)
