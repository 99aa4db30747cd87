"""--target-opt: the presets resolve to the documented TVM targets, and bad options fail before any work."""

from __future__ import annotations

import pytest

from rewriter.errors import UsageError

pytest.importorskip("tvm")
from rewriter.targets import resolve_target  # noqa: E402
from rewriter.targets.presets import ARM_CPUS  # noqa: E402


@pytest.mark.parametrize("cpu", sorted(ARM_CPUS))
def test_arm_cpu_presets_carry_their_vector_features(cpu):
    target = resolve_target("arm", {"mcpu": cpu}).tvm_target
    assert target["mcpu"] == cpu and target["mtriple"] == "aarch64-linux-gnu" and "+neon" in target["mattr"]
    assert ("+dotprod" in target["mattr"]) == (cpu in ("cortex-a76", "neoverse-n1"))


def test_x86_portable_cpu_and_cuda_arch():
    assert resolve_target("x86", {"mcpu": "x86-64-v3", "num-cores": "4"}).tvm_target["mcpu"] == "x86-64-v3"
    assert resolve_target("x86", {"num-cores": "4"}).tvm_target["num-cores"] == 4
    assert resolve_target("cuda", {"arch": "sm_90"}).tvm_target["arch"] == "sm_90"


@pytest.mark.parametrize("target, options, words", [
    ("x86", {"mcpu": "nonsense"}, "not a CPU LLVM knows"),
    ("arm", {"mcpu": "skylake"}, "not a CPU LLVM knows"),
    ("cuda", {"arch": "sm_99"}, "not one of"),
    ("x86", {"arch": "sm_80"}, "unknown --target-opt arch"),
    ('{"kind": "llvm"}', {"mcpu": "znver3"}, "target JSON"),
])
def test_bad_target_options(target, options, words):
    with pytest.raises(UsageError, match=words):
        resolve_target(target, options)
