"""Models over protobuf's 2 GB limit: loaded with their external data, canonicalised, run in onnxruntime and
written as model.onnx plus model.onnx.data.

The fast tests lower the size switch (loading.LARGE_MODEL_BYTES) so that small models take the large-model
path; the slow ones build a real model just over 2 GiB (its weights written straight to disk, never held twice).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from rewriter import canonical, loading, rewrite
from rewriter.errors import ModelError
from tests.helpers import CALIB, SAMPLES, conv_model, mlp_model, run_ort, tensor
from tests.rewriter.test_cli_errors import MLP, _assert_clean_failure, _run

# --- the size switch, on small models -----------------------------------------------------------------------------


@pytest.fixture
def everything_large(monkeypatch):
    """Every model counts as over the limit."""
    monkeypatch.setattr(loading, "LARGE_MODEL_BYTES", 0)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_save_switches_to_external_data_just_above_the_threshold(tmp_path, monkeypatch):
    model = mlp_model()
    size = model.ByteSize()
    monkeypatch.setattr(loading, "LARGE_MODEL_BYTES", size)
    assert loading.save_model(model, tmp_path / "a.onnx") == [tmp_path / "a.onnx"]
    assert (tmp_path / "a.onnx").read_bytes() == loading.serialize(model)
    monkeypatch.setattr(loading, "LARGE_MODEL_BYTES", size - 1)
    files = loading.save_model(model, tmp_path / "b.onnx")
    assert files == [tmp_path / "b.onnx", tmp_path / "b.onnx.data"]
    lean = onnx.load(str(files[0]), load_external_data=False)
    locations = {e.value for t in lean.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"b.onnx.data"}  # relative: the pair can move
    inline = [t.name for t in lean.graph.initializer if t.data_location != TensorProto.EXTERNAL]
    assert all(numpy_helper.to_array(t).nbytes < loading.EXTERNAL_MIN_BYTES for t in model.graph.initializer
               if t.name in inline)
    back = loading.load_model(files[0])
    for before, after in zip(model.graph.initializer, back.graph.initializer, strict=True):
        np.testing.assert_array_equal(numpy_helper.to_array(before), numpy_helper.to_array(after))
    # the caller's model keeps its data: saving detaches a lean copy, it does not strip the model
    assert all(t.HasField("raw_data") and t.data_location == TensorProto.DEFAULT for t in model.graph.initializer)


def test_external_save_is_deterministic_and_aligns_large_tensors(tmp_path, monkeypatch, everything_large):
    monkeypatch.setattr(loading, "ALIGN_MIN_BYTES", 512)
    monkeypatch.setattr(loading, "ALIGNMENT", 4096)
    model = mlp_model(dims=(16, 64, 8))
    first, second = tmp_path / "one", tmp_path / "two"
    first.mkdir(), second.mkdir()
    a, b = loading.save_model(model, first / "m.onnx"), loading.save_model(model, second / "m.onnx")
    assert [_digest(p) for p in a] == [_digest(p) for p in b]
    lean = onnx.load(str(a[0]), load_external_data=False)
    for t in lean.graph.initializer:
        info = onnx.external_data_helper.ExternalDataInfo(t)
        if t.data_location == TensorProto.EXTERNAL and info.length >= 512:
            assert info.offset % 4096 == 0, (t.name, info.offset)


def _mistyped() -> onnx.ModelProto:
    model = mlp_model()
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.zeros((32, 16)), "w1"))  # double where float
    return model


def _dangling() -> onnx.ModelProto:
    model = mlp_model()
    model.graph.node[1].input[0] = "nowhere"
    return model


def test_check_and_infer_work_on_the_lean_copy(monkeypatch):
    expected = onnx.shape_inference.infer_shapes(mlp_model(), check_type=True, strict_mode=True, data_prop=True)
    failures = {}
    for name, bad, full in (("type", _mistyped, True), ("graph", _dangling, False)):
        with pytest.raises(Exception) as caught:  # noqa: PT011 - the type is whatever onnx raises for the normal model
            loading.check_model(bad(), full_check=full)
        failures[name] = caught.type
    monkeypatch.setattr(loading, "LARGE_MODEL_BYTES", 0)
    model = mlp_model()
    inferred = loading.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    assert inferred is not model and not model.graph.value_info  # like onnx's: a new model, the given one as it was
    assert inferred.graph.value_info == expected.graph.value_info
    assert inferred.graph.initializer == model.graph.initializer  # the weights are back in the new model
    grafted = loading.infer_shapes(model, in_place=True, check_type=True, strict_mode=True, data_prop=True)
    assert grafted is model and model.graph.value_info == expected.graph.value_info  # no copy of the weights
    loading.check_model(model, full_check=True)
    for name, bad, full in (("type", _mistyped, True), ("graph", _dangling, False)):
        with pytest.raises(failures[name]):
            loading.check_model(bad(), full_check=full)


def test_size_is_only_counted_near_the_threshold(monkeypatch):
    """Counting a model's size encodes it (as slow as serializing): values far below the threshold skip that."""
    model = mlp_model()
    values = sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
    counted = []
    monkeypatch.setattr(loading, "_size", lambda m: counted.append(m) or m.ByteSize())
    monkeypatch.setattr(loading, "LARGE_MODEL_BYTES", 4 * values)
    assert not loading.is_large(model) and counted == []
    monkeypatch.setattr(loading, "LARGE_MODEL_BYTES", values // 2)
    assert loading.is_large(model) and counted == []  # the values alone are over it
    monkeypatch.setattr(loading, "LARGE_MODEL_BYTES", values + 1)
    assert loading.is_large(model) and counted == [model]  # the values fit, the whole model does not


def test_session_by_path_matches_the_in_memory_one(tmp_path, monkeypatch):
    model = conv_model()
    feed = {"x": np.random.default_rng(0).normal(size=(2, 3, 12, 12)).astype(np.float32)}
    expected = run_ort(model, feed)
    monkeypatch.setattr(loading, "LARGE_MODEL_BYTES", 0)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    got = loading.ort_session(model, ort.SessionOptions()).run(None, feed)
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-5, atol=1e-5)
    assert list(tmp_path.iterdir()) == []  # the temporary copy is gone once the session is made


def test_canonical_form_is_the_same_through_the_lean_copy(monkeypatch):
    model = onnx.load(str(SAMPLES / "digits_resnet.onnx"))
    shapes = {"input": [1, 1, 8, 8]}
    normal = canonical.canonicalize(model, shapes)
    monkeypatch.setattr(loading, "LARGE_MODEL_BYTES", 0)
    monkeypatch.setattr(canonical, "_DETACH_MIN_BYTES", 1024)
    large = canonical.canonicalize(model, shapes)
    assert [n.op_type for n in large.graph.node] == [n.op_type for n in normal.graph.node]
    assert all(t.data_location == TensorProto.DEFAULT and t.HasField("raw_data") for t in large.graph.initializer)
    with np.load(CALIB) as data:
        feed = {"input": data["input"][:1]}
    np.testing.assert_allclose(run_ort(large, feed)[0], run_ort(normal, feed)[0], rtol=1e-5, atol=1e-5)


def test_matmul_add_stays_unfused_for_large_models(monkeypatch):
    """MatMul+Add -> Gemm would transpose the weight, which the lean copy does not hold."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 512])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 600])],
                              [tensor("w", rng.normal(size=(512, 600))), tensor("b", rng.normal(size=600))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert [n.op_type for n in canonical.canonicalize(model, {"x": [4, 512]}).graph.node] == ["Gemm"]
    monkeypatch.setattr(loading, "LARGE_MODEL_BYTES", 0)
    large = canonical.canonicalize(model, {"x": [4, 512]})
    assert [n.op_type for n in large.graph.node] == ["MatMul", "Add"]
    feed = {"x": rng.normal(size=(4, 512)).astype(np.float32)}
    np.testing.assert_allclose(run_ort(large, feed)[0], run_ort(model, feed)[0], rtol=1e-4, atol=1e-4)


def test_rewrite_through_the_large_path_writes_model_data(tmp_path, everything_large):
    result = rewrite(MLP, passes=["svd"], calib=CALIB, out_dir=tmp_path / "out", bench=True)
    assert all(ms > 0 for ms in result.report["bench"]["onnxruntime_ms"].values())  # timed through the path too
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["model.onnx", "model.onnx.data", "report.html", "report.json"]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["output"]["external_data"] == "model.onnx.data"
    assert report["output"]["bytes"] == sum((tmp_path / "out" / f).stat().st_size for f in files[:2])
    assert result.artifacts["model_data"] == tmp_path / "out" / "model.onnx.data"
    assert report["interface"]["restored"] == {"input[0]": "N"}  # the dims check ran through the large path
    written = loading.load_model(tmp_path / "out" / "model.onnx")
    with np.load(CALIB) as data:
        feed = {"input": data["input"][:4]}
    np.testing.assert_allclose(run_ort(written, feed)[0], run_ort(result.model, feed)[0], rtol=1e-5, atol=1e-5)
    again = rewrite(MLP, passes=["svd"], calib=CALIB, out_dir=tmp_path / "again")
    assert again.report["output"]["external_data"] == "model.onnx.data"
    for name in ("model.onnx", "model.onnx.data"):
        assert _digest(tmp_path / "out" / name) == _digest(tmp_path / "again" / name)


def test_normal_models_are_written_whole(tmp_path):
    rewrite(MLP, calib=CALIB, out_dir=tmp_path / "out")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["output"]["external_data"] is None
    assert report["output"]["bytes"] == (tmp_path / "out" / "model.onnx").stat().st_size
    assert not (tmp_path / "out" / "model.onnx.data").exists()


def test_tvm_build_of_a_large_model_is_refused_in_one_line(tmp_path, monkeypatch, capsys, everything_large):
    monkeypatch.chdir(tmp_path)
    code, err = _run(capsys, MLP, "--calib", CALIB, "--target", "x86", "-o", tmp_path / "out")
    _assert_clean_failure(tmp_path, code, err, 3, "over 2 GB: TVM builds")


def test_truncated_external_data_is_refused_before_loading(tmp_path):
    onnx.save(mlp_model(), str(tmp_path / "m.onnx"), save_as_external_data=True, location="w.bin", size_threshold=0)
    with open(tmp_path / "w.bin", "r+b") as data:
        data.truncate((tmp_path / "w.bin").stat().st_size - 4)
    with pytest.raises(ModelError, match="holds .* bytes, its shape .* needs"):
        loading.load_model(tmp_path / "m.onnx")


# --- a real model over 2 GiB ----------------------------------------------------------------------------------------

WIDTH, WIDE = 256, 1 << 20  # two weights of WIDTH x WIDE float32: 1 GiB each


def _build_large(folder: Path) -> tuple[Path, Path]:
    """x[1, 256] -> Gemm 'small' (256 x 256) -> Relu -> MatMul 'big0' (256 x 1M) -> Relu -> MatMul 'big1'
    (1M x 256) -> MatMul 'head' -> y[1, 10]: 2 GiB of random weights, written straight to big.onnx.data, one
    weight at a time."""
    rng = np.random.default_rng(0)
    data, inits, offset = folder / "big.onnx.data", [], 0
    with open(data, "wb") as out:
        for name, shape in (("w0", (WIDTH, WIDE)), ("w1", (WIDE, WIDTH))):
            weight = rng.random(shape, dtype=np.float32)
            weight -= np.float32(0.5)
            weight *= np.float32(2 * np.sqrt(3 / shape[0]))  # unit variance through each layer
            weight.tofile(out)
            proto = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(shape))
            proto.data_location = TensorProto.EXTERNAL
            for key, value in (("location", data.name), ("offset", str(offset)), ("length", str(weight.nbytes))):
                entry = proto.external_data.add()
                entry.key, entry.value = key, value
            offset += weight.nbytes
            inits.append(proto)
            del weight
    scale = np.float32(1 / np.sqrt(WIDTH))
    # 'small' has rank 16: svd at rank 64, fitted on 24 samples, keeps it (and the model's answers) exactly
    small = rng.standard_normal((WIDTH, 16), dtype=np.float32) @ rng.standard_normal((16, WIDTH), dtype=np.float32)
    inits += [numpy_helper.from_array(small * (scale / np.float32(4)), "g0"),
              numpy_helper.from_array(rng.standard_normal((WIDTH, 10), dtype=np.float32) * scale, "head")]
    nodes = [helper.make_node("Gemm", ["x", "g0"], ["h0"], name="small"),
             helper.make_node("Relu", ["h0"], ["r0"], name="relu0"),
             helper.make_node("MatMul", ["r0", "w0"], ["h1"], name="big0"),
             helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
             helper.make_node("MatMul", ["r1", "w1"], ["h2"], name="big1"),
             helper.make_node("MatMul", ["h2", "head"], ["y"], name="head")]
    graph = helper.make_graph(nodes, "large", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, WIDTH])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (folder / "big.onnx").write_bytes(model.SerializeToString())
    calib = folder / "calib.npz"
    np.savez(calib, x=rng.standard_normal((32, WIDTH), dtype=np.float32))  # 24 to fit, 8 held out
    return folder / "big.onnx", calib


@pytest.fixture(scope="module")
def large(tmp_path_factory):
    path, calib = _build_large(tmp_path_factory.mktemp("large"))
    yield path, calib
    for file in path.parent.iterdir():  # 2 GiB: do not leave it for pytest's tmp rotation
        file.unlink()


@pytest.fixture
def out(tmp_path):
    """The OUT_DIR of a large run, removed afterwards whatever happened (2 GiB each)."""
    yield tmp_path / "out"
    shutil.rmtree(tmp_path / "out", ignore_errors=True)


def _outputs(path: Path, calib: Path) -> np.ndarray:
    """onnxruntime's outputs for the first 8 calibration samples, the model opened by path (its data mapped)."""
    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_prepacking", "1")
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    with np.load(calib) as data:
        return np.concatenate([sess.run(None, {"x": data["x"][i:i + 1]})[0] for i in range(8)])


def _check_written(out: Path) -> None:
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.onnx.data", "report.html", "report.json"]
    report = json.loads((out / "report.json").read_text())
    assert report["output"]["external_data"] == "model.onnx.data"
    assert (out / "model.onnx").stat().st_size < 2**20
    assert report["output"]["bytes"] == (out / "model.onnx").stat().st_size + (out / "model.onnx.data").stat().st_size
    assert report["output"]["bytes"] > 2**31
    lean = onnx.load(str(out / "model.onnx"), load_external_data=False)
    big = [t for t in lean.graph.initializer if t.name in ("w0", "w1")]
    assert len(big) == 2 and all(t.data_location == TensorProto.EXTERNAL for t in big)
    model = loading.load_model(out / "model.onnx")  # the rewriter's own loader takes its output back
    assert loading.is_large(model)
    del model


@pytest.mark.slow
def test_large_model_with_svd(large, out):
    """One rewrite over 2 GiB (each costs about a minute here): the untouched weights travel through the external
    data path, and the one layer svd splits keeps the model's answers (its rank is below the kept rank)."""
    path, calib = large
    result = rewrite(path, passes=["svd"], calib=calib, out_dir=out,
                     options={"svd": {"ops": "Gemm", "rank_ratio": 0.25}})  # only 'small': cheap to fit
    assert result.report["passes"][0]["changed"] == ["small"]
    reported = result.report["fidelity"]["cosine"]
    del result
    _check_written(out)
    written, original = _outputs(out / "model.onnx", calib), _outputs(path, calib)
    cosine = float(np.sum(written * original) / np.linalg.norm(written) / np.linalg.norm(original))
    assert reported > 1 - 1e-5 and cosine > 1 - 1e-5 and abs(cosine - reported) < 1e-5, (cosine, reported)
