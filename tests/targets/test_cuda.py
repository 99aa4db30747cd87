"""targets: the cuda artifact, built with no GPU, embeds a precompiled sm_80 cubin and its PTX."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import pytest

from rewriter.errors import ModelError, UsageError
from rewriter.targets import build_artifact, resolve_target
from tests.targets.test_lower import conv_gemm_model, mlp_model, unsupported_model

tvm = pytest.importorskip("tvm")


def _has_nvcc() -> bool:
    from rewriter.targets.cuda_stub import find_nvcc

    with contextlib.suppress(UsageError):
        return bool(find_nvcc())
    return False


needs_nvcc = pytest.mark.skipif(not _has_nvcc(), reason="nvcc (CUDA toolkit) is absent: cannot precompile kernels")


@needs_nvcc
def test_cuda_builds_without_gpu(tmp_path: Path) -> None:
    out = tmp_path / "model.cuda.so"
    report = build_artifact(conv_gemm_model(), resolve_target("cuda"), out)
    assert report["artifact"] == "model.cuda.so" and report["device_code"] == "cubin+ptx"
    assert [p.name for p in tmp_path.iterdir()] == ["model.cuda.so"]  # no temp file left
    data = out.read_bytes()
    assert data[:4] == b"\x7fELF" and int.from_bytes(data[18:20], "little") == 62  # x86-64 host library
    # The device code is a precompiled sm_80 cubin (an embedded ELF with e_machine EM_CUDA=190),
    # not CUDA C source left for the deployment machine to compile.
    assert b"__global__" not in data and (cubin := data.find(b"\x7fELF", 1)) > 0
    assert int.from_bytes(data[cubin + 18:cubin + 20], "little") == 190
    assert b"sm_80" in data and b"cubin" in data
    # ... and the PTX of compute_80, which the driver of a newer GPU (sm_90) JIT-compiles.
    assert b".target sm_80" in data and b".entry" in data
    assert report["ptx_version"] == re.search(rb"\.version (\d+\.\d+)", data).group(1).decode()


@needs_nvcc
def test_cuda_arch_preset_reaches_the_device_code(tmp_path: Path) -> None:
    out = tmp_path / "model.cuda.so"
    report = build_artifact(conv_gemm_model(), resolve_target("cuda", {"arch": "sm_90"}), out)
    data = out.read_bytes()
    assert report["device_code"] == "cubin+ptx" and b".target sm_90" in data and b".target sm_80" not in data


def test_cuda_without_nvcc_is_usage_error(monkeypatch, tmp_path: Path) -> None:
    from rewriter.targets import cuda_offline, cuda_stub

    if tvm.cuda(0).exist:
        pytest.skip("a GPU is present: the cuda target builds in-process")
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.setattr(cuda_stub, "CUDA_BIN_DIRS", ())
    with pytest.raises(UsageError, match="needs nvcc") as info:
        cuda_offline.build_in_child(mlp_model(), resolve_target("cuda"), tmp_path / "m.so", None)
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


@needs_nvcc
def test_cuda_child_error_is_one_line_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="NoSuchOp") as info:
        build_artifact(unsupported_model(), resolve_target("cuda"), tmp_path / "m.so")
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []
