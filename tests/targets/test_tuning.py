"""targets/tuning: a tuning database is reused task by task, reported, and refused when it holds nothing.

One real tuning run (the digits MLP, 2 trials) builds the database every other test reuses from a copy.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from rewriter.cli import main
from rewriter.errors import UsageError
from rewriter.targets import build_artifact, resolve_target
from rewriter.targets.tuning import RECORD_FILE, WORKLOAD_FILE
from tests.helpers import CALIB, SAMPLES, mlp_model, run_ort

tvm = pytest.importorskip("tvm")
MLP = SAMPLES / "digits_mlp.onnx"
TRIALS = 2  # by MAC share all to the largest matmul: one task tuned of the MLP's four


def _static_mlp() -> onnx.ModelProto:
    model = onnx.load(MLP)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    return model


def _run_tvm(path: Path, x: np.ndarray) -> np.ndarray:
    vm = tvm.relax.VirtualMachine(tvm.runtime.load_module(str(path)), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x))
    return out.numpy() if hasattr(out, "numpy") else out[0].numpy()


def _assert_matches_onnxruntime(path: Path) -> None:
    for x in np.load(CALIB)["input"][:3]:
        x = x[None]
        expected = run_ort(MLP, {"input": x})[0]
        np.testing.assert_allclose(_run_tvm(path, x), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def _db_files(db: Path) -> dict[str, bytes]:
    return {name: (db / name).read_bytes() for name in (WORKLOAD_FILE, RECORD_FILE)}


def _copy_db(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("logs"))
    return dst


@pytest.fixture(scope="module")
def tuned(tmp_path_factory) -> dict:
    """The first build: tunes into an empty database."""
    pytest.importorskip("psutil")
    pytest.importorskip("xgboost")
    root = tmp_path_factory.mktemp("tuned")
    db, out = root / "db", root / "first.so"
    report = build_artifact(_static_mlp(), resolve_target("x86"), out, tune_trials=TRIALS, tuning_db=str(db))
    return {"db": db, "artifact": out, "report": report, "files": _db_files(db)}


# reuse ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_first_build_tunes_and_reports(tuned: dict) -> None:
    report, db = tuned["report"], tuned["db"]
    tuning = report["tuning"]
    records = len(tuned["files"][RECORD_FILE].decode().splitlines())
    assert report["tuning_trials"] == TRIALS and report["tuning_db"] == str(db)
    assert tuning["db"] == str(db) and tuning["tasks"] == 4
    assert tuning["tasks_with_records"] == 0 and tuning["tasks_tuned"] == 1 and tuning["seeded"] == 1
    assert tuning["trials_run"] >= 1 and tuning["trials_run"] + tuning["seeded"] == tuning["records"] == records
    assert tuning["tasks_applied"] == 1
    _assert_matches_onnxruntime(tuned["artifact"])


@pytest.mark.slow
def test_second_build_with_the_same_db_runs_no_trials(tuned: dict, tmp_path: Path) -> None:
    db = _copy_db(tuned["db"], tmp_path / "db")
    out = tmp_path / "second.so"
    report = build_artifact(_static_mlp(), resolve_target("x86"), out, tune_trials=TRIALS, tuning_db=str(db))
    tuning = report["tuning"]
    assert tuning["tasks"] == 4 and tuning["tasks_with_records"] == 1
    assert tuning["tasks_tuned"] == 0 and tuning["trials_run"] == 0 and tuning["seeded"] == 0
    assert tuning["tasks_applied"] == 1 and tuning["records"] == tuned["report"]["tuning"]["records"]
    assert _db_files(db) == tuned["files"]  # not one record or workload added
    assert out.read_bytes() == tuned["artifact"].read_bytes()  # the same records applied
    _assert_matches_onnxruntime(out)


@pytest.mark.slow
def test_zero_trials_applies_the_records(tuned: dict, tmp_path: Path) -> None:
    db = _copy_db(tuned["db"], tmp_path / "db")
    out = tmp_path / "reused.so"
    report = build_artifact(_static_mlp(), resolve_target("x86"), out, tuning_db=str(db))
    assert report["tuning_trials"] == 0 and report["tuning_db"] == str(db)
    assert report["tuning"] == {**tuned["report"]["tuning"], "db": str(db), "tasks_with_records": 1,
                                "tasks_tuned": 0, "trials_run": 0, "seeded": 0, "runner": None}
    assert _db_files(db) == tuned["files"]
    assert out.read_bytes() == tuned["artifact"].read_bytes()
    _assert_matches_onnxruntime(out)


@pytest.mark.slow
def test_more_trials_tune_only_the_tasks_without_records(tuned: dict, tmp_path: Path) -> None:
    db = _copy_db(tuned["db"], tmp_path / "db")
    out = tmp_path / "more.so"
    # 4 trials by MAC share: 3 to the matmul that has records (dropped), 1 to the next one.
    report = build_artifact(_static_mlp(), resolve_target("x86"), out, tune_trials=4, tuning_db=str(db))
    tuning = report["tuning"]
    assert tuning["tasks_with_records"] == 1 and tuning["tasks_tuned"] == 1 and tuning["tasks_applied"] == 2
    old = tuned["files"][RECORD_FILE].decode().splitlines()
    lines = (db / RECORD_FILE).read_text().splitlines()
    assert lines[: len(old)] == old and len(lines) - len(old) == tuning["trials_run"] + tuning["seeded"] > 0
    old_workloads = {json.loads(line)[0] for line in old}
    assert not {json.loads(line)[0] for line in lines[len(old):]} & old_workloads  # no record for the tuned task
    _assert_matches_onnxruntime(out)


@pytest.mark.slow
def test_db_of_another_model_reports_no_task_with_records(tuned: dict, tmp_path: Path) -> None:
    model = mlp_model(dims=(16, 32, 8))  # other layer shapes, other kernels
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 1
    db = _copy_db(tuned["db"], tmp_path / "db")
    report = build_artifact(model, resolve_target("x86"), tmp_path / "other.so", tuning_db=str(db))
    assert report["tuning"]["tasks"] > 0 and report["tuning_db"] == str(db)
    assert report["tuning"]["tasks_with_records"] == 0 and report["tuning"]["tasks_applied"] == 0
    assert _db_files(db) == tuned["files"]


@pytest.mark.slow
def test_cli_second_build_reports_no_trials(tuned: dict, tmp_path: Path) -> None:
    db = _copy_db(tuned["db"], tmp_path / "db")
    out = tmp_path / "out"
    code = main([str(MLP), "--target", "x86", "--tune-trials", str(TRIALS), "--tuning-db", str(db), "-o", str(out),
                 "--quiet"])
    assert code == 0
    target = json.loads((out / "report.json").read_text())["target"]
    assert target["tuning_trials"] == TRIALS and target["tuning_db"] == str(db)
    assert target["tuning"]["tasks_with_records"] == 1 and target["tuning"]["trials_run"] == 0
    assert _db_files(db) == tuned["files"]
    _assert_matches_onnxruntime(out / "model.x86.so")


# refusals ------------------------------------------------------------------------------------


def _empty_dir(path: Path) -> Path:
    path.mkdir()
    return path


def _empty_files(path: Path) -> Path:
    path.mkdir()
    for name in (WORKLOAD_FILE, RECORD_FILE):
        (path / name).write_text("")
    return path


def _workloads_only(path: Path) -> Path:
    path.mkdir()
    (path / WORKLOAD_FILE).write_text("")
    return path


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: p, "does not exist"),
    (_empty_dir, "holds no tuning database"),
    (_workloads_only, f"{RECORD_FILE} missing"),
    (_empty_files, "holds no tuning records"),
], ids=["missing", "empty_dir", "no_records_file", "empty_files"])
def test_db_without_records_and_no_trials_is_usage_error(make, message: str, tmp_path: Path) -> None:
    db = make(tmp_path / "db")
    out = tmp_path / "m.so"
    with pytest.raises(UsageError, match=message) as info:
        build_artifact(_static_mlp(), resolve_target("x86"), out, tuning_db=str(db))
    assert "\n" not in str(info.value) and not out.exists()


@pytest.mark.parametrize("trials", [0, 2])
def test_db_path_that_is_a_file_is_usage_error(trials: int, tmp_path: Path) -> None:
    db = tmp_path / "db"
    db.write_text("not a directory")
    with pytest.raises(UsageError, match="is a file"):
        build_artifact(_static_mlp(), resolve_target("x86"), tmp_path / "m.so", tune_trials=trials, tuning_db=str(db))


def test_cli_mistyped_db_without_trials_exits_2(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    code = main([str(MLP), "--target", "x86", "--tuning-db", str(tmp_path / "tunning-db"), "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not out.exists()
    assert err[-1].startswith("rewrite: error: tuning database") and "does not exist" in err[-1]


def test_tensor_intrinsics_are_registered_by_the_fast_import_and_inspect_is_restored() -> None:
    """tuning imports TVM's tensor intrinsics with a source-free inspect.stack (the plain import scans
    sys.modules for every TVMScript function); in a fresh process the intrinsics must be registered just as
    the plain import registers them, and inspect.stack be the standard one afterwards."""
    import subprocess
    import sys

    script = (
        "import inspect, sys\n"
        "stack = inspect.stack\n"
        "from rewriter.targets.tuning import _import_tensor_intrinsics\n"
        "_import_tensor_intrinsics()\n"
        "from tvm.s_tir import TensorIntrin\n"
        "assert inspect.stack is stack\n"
        "for name in ('dot_16x4_vnni', 'dot_4x4_i8i8s32_neon', 'wmma_sync_16x16x16_f16f16f32'):\n"
        "    assert TensorIntrin.get(name) is not None, name\n"
        "print('registered', 'tvm.s_tir.tensor_intrin.cuda' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "registered True"
