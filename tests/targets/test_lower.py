"""targets: resolve_target presets and build_artifact for x86, arm, cuda and tuning."""

from __future__ import annotations

import json
import shutil
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from rewriter.errors import ModelError, UsageError
from rewriter.targets import TargetSpec, build_artifact, resolve_target

tvm = pytest.importorskip("tvm")
ort = pytest.importorskip("onnxruntime")

RNG = np.random.default_rng(0)


def _init(name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
    """Weights seeded by name, so every call builds the same model."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.5, name)


def _model(nodes, inputs, outputs, inits) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def conv_gemm_model() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Conv", ["x", "cw", "cb"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"]),
        helper.make_node("Gemm", ["f", "gw", "gb"], ["y"], transB=1),
    ]
    inits = [_init("cw", (4, 3, 3, 3)), _init("cb", (4,)), _init("gw", (5, 256)), _init("gb", (5,))]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])
    return _model(nodes, [x], [y], inits)


def mlp_model() -> onnx.ModelProto:
    """Two inputs, so a wrong input order would break the comparison."""
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Gemm", ["r", "w2", "b2"], ["g"], transB=1),
        helper.make_node("Sub", ["g", "z"], ["y"]),
    ]
    inits = [_init("w1", (32, 16)), _init("b1", (32,)), _init("w2", (4, 32)), _init("b2", (4,))]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])
    return _model(nodes, [x, z], [y], inits)


def if_model() -> onnx.ModelProto:
    """Gemm+Relu, then If(sum(x) > 0): Relu(2h) else h - 1, then Sigmoid."""
    h_info = helper.make_tensor_value_info("h_out", TensorProto.FLOAT, [1, 8])
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    one = numpy_helper.from_array(np.array(1.0, np.float32), "one")
    then_g = helper.make_graph(
        [helper.make_node("Mul", ["h", "two"], ["m"]), helper.make_node("Relu", ["m"], ["h_out"])],
        "then", [], [h_info], [two],
    )
    else_g = helper.make_graph([helper.make_node("Sub", ["h", "one"], ["h_out"])], "else", [], [h_info], [one])
    nodes = [
        helper.make_node("Gemm", ["x", "w", "b"], ["g"], transB=1),
        helper.make_node("Relu", ["g"], ["h"]),
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["branch"], then_branch=then_g, else_branch=else_g),
        helper.make_node("Sigmoid", ["branch"], ["y"]),
    ]
    inits = [_init("w", (8, 4)), _init("b", (8,)), numpy_helper.from_array(np.array(0.0, np.float32), "zero")]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])
    return _model(nodes, [x], [y], inits)


def unsupported_model() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("NoSuchOp", ["x"], ["y"], domain="custom")], "g", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("custom", 1)])


def random_inputs(model: onnx.ModelProto) -> list[np.ndarray]:
    shapes = [[d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input]
    return [RNG.standard_normal(shape).astype(np.float32) for shape in shapes]


def run_ort(model: onnx.ModelProto, inputs: list[np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in model.graph.input]
    return session.run(None, dict(zip(names, inputs, strict=True)))[0]


def run_tvm(path: Path, inputs: list[np.ndarray]) -> np.ndarray:
    from tvm import relax

    vm = relax.VirtualMachine(tvm.runtime.load_module(str(path)), tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(a) for a in inputs]).numpy()


@pytest.fixture(scope="module")
def x86() -> TargetSpec:
    return resolve_target("x86")


# resolve_target ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["none", "x86", "arm", "cuda"])
def test_resolve_presets(name: str) -> None:
    spec = resolve_target(name)
    assert spec.name == name
    if name == "none":
        assert spec.tvm_target is None
    else:
        assert spec.artifact_suffix == name
        json.dumps(spec.tvm_target)  # JSON-able
        tvm.target.Target(spec.tvm_target)


def test_resolve_x86_uses_real_cpu() -> None:
    target = resolve_target("x86").tvm_target
    assert target["kind"] == "llvm" and target["mcpu"] not in ("", "native", "generic")
    assert target["num-cores"] >= 1


def test_resolve_custom_json() -> None:
    spec = resolve_target('{"kind":"llvm","mcpu":"znver3"}')
    assert spec == TargetSpec("custom", {"kind": "llvm", "mcpu": "znver3"}, "custom")
    assert not spec.is_aarch64
    assert resolve_target('{"kind":"llvm","mtriple":"aarch64-linux-gnu"}').is_aarch64


def test_custom_llvm_target_gets_this_machines_cores_for_tuning() -> None:
    from rewriter.targets.presets import make_tvm_target

    target = make_tvm_target(resolve_target('{"kind": "llvm", "mcpu": "skylake"}'))
    assert int(target.attrs["num-cores"]) >= 1


@pytest.mark.parametrize(
    "bad", ["foo", "", "{bad json", '{"kind":"nonexistent"}', '{"kind":"llvm","bogus":1}', '["llvm"]']
)
def test_resolve_invalid(bad: str) -> None:
    with pytest.raises(UsageError) as info:
        resolve_target(bad)
    assert "\n" not in str(info.value)


# x86 -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [conv_gemm_model, mlp_model], ids=["conv_gemm", "mlp"])
def test_x86_matches_onnxruntime(make, x86: TargetSpec, tmp_path: Path) -> None:
    model = make()
    messages: list[str] = []
    out = tmp_path / "model.x86.so"
    report = build_artifact(model, x86, out, log=messages.append)
    assert out.is_file() and report["artifact"] == "model.x86.so"
    assert report["name"] == "x86" and report["tvm_target"] == x86.tvm_target
    assert report["tuning_trials"] == 0 and report["tuning_db"] is None and report["build_seconds"] > 0
    assert any("lowering to x86" in m for m in messages)
    assert [p.name for p in tmp_path.iterdir()] == ["model.x86.so"]  # no temp file left
    assert b".debug_info" not in out.read_bytes()  # linked without DWARF: it was a fifth of YOLOv8n's library
    inputs = random_inputs(model)
    np.testing.assert_allclose(run_tvm(out, inputs), run_ort(model, inputs), rtol=1e-4, atol=1e-5)


def test_x86_if_model_both_branches(x86: TargetSpec, tmp_path: Path) -> None:
    model = if_model()
    out = tmp_path / "model.x86.so"
    build_artifact(model, x86, out)
    for sign in (1.0, -1.0):
        x = np.abs(RNG.standard_normal((1, 4))).astype(np.float32) * sign
        np.testing.assert_allclose(run_tvm(out, [x]), run_ort(model, [x]), rtol=1e-4, atol=1e-5)


def test_x86_build_is_reproducible(x86: TargetSpec, tmp_path: Path) -> None:
    model = mlp_model()
    build_artifact(model, x86, tmp_path / "a.so")
    build_artifact(model, x86, tmp_path / "b.so")
    assert (tmp_path / "a.so").read_bytes() == (tmp_path / "b.so").read_bytes()


def test_none_writes_nothing(tmp_path: Path) -> None:
    report = build_artifact(mlp_model(), resolve_target("none"), tmp_path / "model.none.so")
    assert report["artifact"] is None and report["tvm_target"] is None
    assert list(tmp_path.iterdir()) == []


def test_dynamic_input_is_model_error(x86: TargetSpec, tmp_path: Path) -> None:
    model = mlp_model()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    with pytest.raises(ModelError, match="static shape"):
        build_artifact(model, x86, tmp_path / "m.so")
    assert list(tmp_path.iterdir()) == []


def test_unsupported_op_is_model_error(x86: TargetSpec, tmp_path: Path) -> None:
    model = unsupported_model()
    with pytest.raises(ModelError, match="NoSuchOp") as info:
        build_artifact(model, x86, tmp_path / "m.so")
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


# arm / cuda ----------------------------------------------------------------------------------


def test_arm_artifact_is_aarch64_elf(tmp_path: Path) -> None:
    out = tmp_path / "model.arm.so"
    if shutil.which("aarch64-linux-gnu-gcc") is None:
        with pytest.raises(UsageError, match="gcc-aarch64-linux-gnu"):
            build_artifact(conv_gemm_model(), resolve_target("arm"), out)
        return
    report = build_artifact(conv_gemm_model(), resolve_target("arm"), out)
    header = out.read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and header[4] == 2  # ELF64
    assert int.from_bytes(header[18:20], "little") == 183  # e_machine EM_AARCH64
    assert b".debug_info" not in out.read_bytes()
    assert report["artifact"] == "model.arm.so"


def test_arm_missing_cross_compiler_names_package(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(UsageError, match="gcc-aarch64-linux-gnu"):
        build_artifact(mlp_model(), resolve_target("arm"), tmp_path / "model.arm.so")


# tuning --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_tuning_writes_and_reuses_database(x86: TargetSpec, tmp_path: Path) -> None:
    pytest.importorskip("psutil")
    pytest.importorskip("xgboost")
    model, db = mlp_model(), tmp_path / "db"
    report = build_artifact(model, x86, tmp_path / "tuned.so", tune_trials=2, tuning_db=str(db))
    assert report["tuning_trials"] == 2 and report["tuning_db"] == str(db)
    assert (db / "database_tuning_record.json").stat().st_size > 0
    reused = build_artifact(model, x86, tmp_path / "reused.so", tuning_db=str(db))
    assert reused["tuning_db"] == str(db) and reused["tuning_trials"] == 0
    inputs = random_inputs(model)
    expected = run_ort(model, inputs)
    for name in ("tuned.so", "reused.so"):
        np.testing.assert_allclose(run_tvm(tmp_path / name, inputs), expected, rtol=1e-4, atol=1e-5)
