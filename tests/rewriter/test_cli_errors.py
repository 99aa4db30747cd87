"""Bad input: one clear line on stderr, the right exit code, nothing left behind, input untouched."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from rewriter.cli import main
from tests.helpers import CALIB, SAMPLES

MLP = SAMPLES / "digits_mlp.onnx"


@pytest.fixture
def work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _run(capsys, *argv) -> tuple[int, str]:
    code = main([*(str(a) for a in argv), "--quiet"])
    err = capsys.readouterr().err.strip()
    return code, err


def _assert_clean_failure(work: Path, code: int, err: str, expected: int, words: str) -> None:
    assert code == expected, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("rewrite: error:"), err
    assert words.lower() in lines[0].lower(), lines[0]
    leftovers = [p.name for p in work.iterdir() if p.name != "inputs"]
    assert leftovers == [], f"left behind: {leftovers}"


def _copy_inputs(work: Path) -> tuple[Path, Path]:
    inputs = work / "inputs"
    inputs.mkdir()
    return Path(shutil.copy(MLP, inputs)), Path(shutil.copy(CALIB, inputs))


def test_missing_model(work, capsys):
    code, err = _run(capsys, work / "nope.onnx", "--passes", "svd", "-o", work / "out")
    _assert_clean_failure(work, code, err, 3, "not found")


def test_truncated_model(work, capsys):
    model, calib = _copy_inputs(work)
    data = model.read_bytes()
    model.write_bytes(data[: len(data) // 3])
    code, err = _run(capsys, model, "--passes", "svd", "--calib", calib, "-o", work / "out")
    _assert_clean_failure(work, code, err, 3, "model")


def test_non_onnx_file(work, capsys):
    bogus = work / "inputs" / "notes.onnx"
    bogus.parent.mkdir()
    bogus.write_text("this is not a model\n" * 20)
    code, err = _run(capsys, bogus, "-o", work / "out")
    _assert_clean_failure(work, code, err, 3, "onnx")


def test_unknown_pass(work, capsys):
    code, err = _run(capsys, MLP, "--passes", "svd,nosuchpass", "--calib", CALIB, "-o", work / "out")
    _assert_clean_failure(work, code, err, 2, "unknown pass 'nosuchpass'")


@pytest.mark.parametrize("opt", ["svd.rank_ratio", "rank_ratio=0.3", "svd.=1"])
def test_malformed_opt(work, capsys, opt):
    code, err = _run(capsys, MLP, "--passes", "svd", "--calib", CALIB, "--opt", opt, "-o", work / "out")
    _assert_clean_failure(work, code, err, 2, "malformed --opt")


@pytest.mark.parametrize(("opt", "words"), [("svd.rank=0.3", "unknown option svd.rank"),
                                            ("svd.rank_ratio=lots", "not a valid float"),
                                            ("svd.rank_ratio=1.5", "rank_ratio")])
def test_bad_opt_value_or_key(work, capsys, opt, words):
    code, err = _run(capsys, MLP, "--passes", "svd", "--calib", CALIB, "--opt", opt, "-o", work / "out")
    _assert_clean_failure(work, code, err, 2, words)


def test_bad_target(work, capsys):
    code, err = _run(capsys, MLP, "--target", "riscv-toaster", "-o", work / "out")
    assert code == 2 and len(err.splitlines()) == 1


@pytest.mark.parametrize(("arrays", "words"), [
    ({"images": np.zeros((8, 1, 8, 8), np.float32)}, "do not match the model's inputs"),
    ({"input": np.zeros((8, 1, 9, 9), np.float32)}, "shape"),
])
def test_calib_names_or_shapes_do_not_match(work, capsys, arrays, words):
    bad = work / "inputs" / "bad.npz"
    bad.parent.mkdir()
    np.savez(bad, **arrays)
    code, err = _run(capsys, MLP, "--passes", "svd", "--calib", bad, "-o", work / "out")
    _assert_clean_failure(work, code, err, 2, words)


def test_calib_that_needs_pickle(work, capsys):
    bad = work / "inputs" / "pickled.npz"
    bad.parent.mkdir()
    np.savez(bad, input=np.array([{"a": 1}] * 8, dtype=object))
    code, err = _run(capsys, MLP, "--passes", "svd", "--calib", bad, "-o", work / "out")
    _assert_clean_failure(work, code, err, 2, "pickle")


def test_data_aware_pass_without_calibration(work, capsys):
    code, err = _run(capsys, MLP, "--passes", "svd", "-o", work / "out")
    _assert_clean_failure(work, code, err, 2, "needs calibration data")


def test_external_data_outside_model_folder(work, capsys):
    inputs = work / "inputs"
    (inputs / "model").mkdir(parents=True)
    model = onnx.load(str(MLP))
    onnx.save(model, str(inputs / "model" / "m.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    shutil.move(inputs / "model" / "weights.bin", inputs / "weights.bin")
    escaped = onnx.load(str(inputs / "model" / "m.onnx"), load_external_data=False)
    for t in escaped.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = "../weights.bin"
    onnx.save(escaped, str(inputs / "model" / "m.onnx"))
    code, err = _run(capsys, inputs / "model" / "m.onnx", "-o", work / "out")
    _assert_clean_failure(work, code, err, 3, "outside the model's folder")


def test_external_data_inside_model_folder_loads(work, capsys):
    model = onnx.load(str(MLP))
    onnx.save(model, str(work / "m.onnx"), save_as_external_data=True, location="w.bin", size_threshold=0)
    code, err = _run(capsys, work / "m.onnx", "--calib", CALIB, "-o", work / "out")
    assert code == 0, err
    assert (work / "out" / "model.onnx").is_file()


def test_non_empty_out_dir_refused_unless_forced(work, capsys):
    out = work / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = _run(capsys, MLP, "--calib", CALIB, "-o", out)
    assert code == 2 and "not empty" in err and (out / "keep.txt").read_text() == "mine"
    code, err = _run(capsys, MLP, "--calib", CALIB, "-o", out, "--force")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "report.html", "report.json"]


def test_guardrail_exit_4_leaves_nothing_and_input_untouched(work, capsys):
    model, calib = _copy_inputs(work)
    before = hashlib.sha256(model.read_bytes()).hexdigest()
    code, err = _run(capsys, model, "--passes", "svd", "--calib", calib, "--opt", "svd.rank_ratio=0.05",
                     "--opt", "svd.keep_heads=false", "--max-drop", "0.01", "-o", work / "out")
    _assert_clean_failure(work, code, err, 4, "max-drop")
    assert hashlib.sha256(model.read_bytes()).hexdigest() == before


def test_failure_removes_the_folders_it_made_for_out_dir(work, capsys, monkeypatch):
    from rewriter import targets

    def broken_build(*args, **kwargs):
        from rewriter.errors import ModelError

        raise ModelError("TVM cannot compile the model: simulated")

    monkeypatch.setattr(targets, "build_artifact", broken_build)
    code, err = _run(capsys, MLP, "--calib", CALIB, "--target", "x86", "-o", work / "a" / "b" / "out")
    _assert_clean_failure(work, code, err, 3, "simulated")


def test_external_data_symlink_leaving_the_folder_is_refused(work, capsys):
    inputs = work / "inputs"
    (inputs / "model").mkdir(parents=True)
    onnx.save(onnx.load(str(MLP)), str(inputs / "model" / "m.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    shutil.move(inputs / "model" / "weights.bin", inputs / "weights.bin")
    (inputs / "model" / "weights.bin").symlink_to(inputs / "weights.bin")  # the name stays inside, the data not
    code, err = _run(capsys, inputs / "model" / "m.onnx", "-o", work / "out")
    _assert_clean_failure(work, code, err, 3, "outside the model's folder")
