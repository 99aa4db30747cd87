"""Target presets: map a `--target` spec to a TVM target dict and the toolchain that links it.

TVM is imported lazily inside functions so that `import targets` stays cheap.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from rewriter.errors import UsageError

PRESET_NAMES = ("none", "x86", "arm", "cuda")
SUPPORTED_KINDS = ("llvm", "cuda")
ARM_CROSS_CC = "aarch64-linux-gnu-gcc"
ARM_CROSS_PACKAGE = "gcc-aarch64-linux-gnu"
BLOCK_CHANNELS = 8  # float32 lanes of AVX2 and NEON: the channel block every CPU build can use
LINK_OPTIONS = ("-Wl,--strip-debug",)  # debug sections only: the dynamic symbols TVM loads by stay
ARM_TARGET = {
    "kind": "llvm",
    "mtriple": "aarch64-linux-gnu",
    "mcpu": "cortex-a72",
    "mattr": ["+neon"],
}
# The host part of the cuda target is generic x86-64 so the artifact runs on any GPU machine.
CUDA_TARGET = {"kind": "cuda", "arch": "sm_80", "host": {"kind": "llvm"}}


@dataclass(frozen=True)
class TargetSpec:
    """A resolved `--target`: its name, the JSON-able TVM target dict and the artifact suffix."""

    name: str
    tvm_target: dict[str, Any] | None
    artifact_suffix: str | None

    @property
    def is_gpu(self) -> bool:
        return self.tvm_target is not None and self.tvm_target.get("kind") != "llvm"

    @property
    def channel_multiple(self) -> int:
        """Channel counts whose convs take the blocked layout whole: pruning to other counts leaves them on
        the slow NCHW path (YOLOv8n pruned at 0.3: 30x onnxruntime's time with odd counts, 0.95x with 8s)."""
        return 1 if self.tvm_target is None else BLOCK_CHANNELS

    @property
    def is_aarch64(self) -> bool:
        """True when the host code is cross-compiled for aarch64 (arm, or a custom llvm aarch64 triple)."""
        target = self.tvm_target or {}
        return target.get("kind") == "llvm" and str(target.get("mtriple", "")).startswith("aarch64")


# --target-opt mcpu=... for arm: the cores people deploy to, with the vector features each really has.
ARM_CPUS = {
    "cortex-a53": ["+neon"],
    "cortex-a72": ["+neon"],
    "cortex-a76": ["+neon", "+dotprod", "+fullfp16"],
    "neoverse-n1": ["+neon", "+dotprod", "+fullfp16"],
}
CUDA_ARCHS = ("sm_70", "sm_72", "sm_75", "sm_80", "sm_86", "sm_87", "sm_89", "sm_90")
TARGET_OPTIONS = {"x86": ("mcpu", "num-cores"), "arm": ("mcpu", "mattr"), "cuda": ("arch",), "none": ()}


def resolve_target(spec: str, options: Mapping[str, str] | None = None) -> TargetSpec:
    """Resolve 'none', 'x86', 'arm', 'cuda' or a TVM target JSON string, with `--target-opt` options for the
    presets; UsageError otherwise."""
    text = spec.strip()
    options = dict(options or {})
    if options and text not in TARGET_OPTIONS:
        raise UsageError("--target-opt applies to the x86, arm and cuda presets; put options in the target JSON")
    unknown = sorted(set(options) - set(TARGET_OPTIONS.get(text, ())))
    if unknown:
        raise UsageError(f"unknown --target-opt {', '.join(unknown)} for {text}; it takes: "
                         f"{', '.join(TARGET_OPTIONS[text]) or 'none'}")
    if text == "none":
        return TargetSpec("none", None, None)
    if text == "x86":
        return TargetSpec("x86", _checked(_with_options(x86_target(), options)), "x86")
    if text == "arm":
        return TargetSpec("arm", _checked(_arm_target(options)), "arm")
    if text == "cuda":
        return TargetSpec("cuda", _checked(_cuda_target(options)), "cuda")
    if text.startswith("{"):
        return TargetSpec("custom", _checked(_parse_json(text)), "custom")
    raise UsageError(
        f"unknown target {spec!r}: use one of {', '.join(PRESET_NAMES)} or a TVM target JSON object"
    )


def x86_target() -> dict[str, Any]:
    """The host CPU as LLVM names it ("native" is silently ignored by TVM 0.27, so ask LLVM)."""
    from tvm.target import codegen

    return {
        "kind": "llvm",
        "mcpu": str(codegen.llvm_get_system_cpu()),
        "num-cores": os.cpu_count() or 1,
    }


def _with_options(config: dict[str, Any], options: Mapping[str, str]) -> dict[str, Any]:
    """x86: mcpu (an LLVM CPU name; x86-64-v3 is a portable AVX2 choice) and num-cores."""
    if "mcpu" in options:
        _known_cpu(options["mcpu"], config)
        config["mcpu"] = options["mcpu"]
    if "num-cores" in options:
        try:
            config["num-cores"] = int(options["num-cores"])
        except ValueError:
            raise UsageError(f"--target-opt num-cores must be an integer, got {options['num-cores']!r}") from None
    return config


def _arm_target(options: Mapping[str, str]) -> dict[str, Any]:
    config = dict(ARM_TARGET)
    if "mcpu" in options:
        cpu = options["mcpu"]
        _known_cpu(cpu, config)
        config["mcpu"], config["mattr"] = cpu, list(ARM_CPUS.get(cpu, ["+neon"]))
    if "mattr" in options:
        config["mattr"] = [a.strip() for a in options["mattr"].split(",") if a.strip()]
    return config


def _cuda_target(options: Mapping[str, str]) -> dict[str, Any]:
    config = json.loads(json.dumps(CUDA_TARGET))
    if "arch" in options:
        if options["arch"] not in CUDA_ARCHS:
            raise UsageError(f"--target-opt arch={options['arch']} is not one of {', '.join(CUDA_ARCHS)}")
        config["arch"] = options["arch"]
    return config


def _known_cpu(cpu: str, config: dict[str, Any]) -> None:
    """LLVM silently falls back to a generic CPU for a name it does not know: refuse it instead."""
    import tvm
    from tvm.target import codegen

    known = codegen.llvm_get_cpu_archlist(tvm.target.Target({k: v for k, v in config.items() if k != "mcpu"}))
    if cpu not in known:
        raise UsageError(f"--target-opt mcpu={cpu} is not a CPU LLVM knows for {config.get('mtriple', 'this host')}")


def make_tvm_target(spec: TargetSpec) -> Any:
    """Build the `tvm.target.Target`; a GPU target without a host gets a generic llvm host."""
    import tvm

    if spec.tvm_target is None:
        raise UsageError("target 'none' has no TVM target")
    config = dict(spec.tvm_target)
    if config.get("kind") != "llvm" and "host" not in config:
        config["host"] = {"kind": "llvm"}
    if config.get("kind") == "llvm" and not spec.is_aarch64:
        # MetaSchedule refuses an llvm target without it; one target serves tuning and compiling alike.
        config.setdefault("num-cores", os.cpu_count() or 1)
    return tvm.target.Target(config)


def describe(spec: TargetSpec) -> str:
    """One-line human description, e.g. 'x86 (llvm -mcpu=rocketlake -num-cores=2)'."""
    if spec.tvm_target is None:
        return spec.name
    target = spec.tvm_target
    opts = " ".join(f"-{key}={_flat(value)}" for key, value in target.items() if key != "kind")
    return f"{spec.name} ({' '.join(filter(None, [str(target.get('kind')), opts]))})"


def export_compiler(spec: TargetSpec) -> Callable[..., Any]:
    """The `fcompile` for `export_library`: the aarch64 cross compiler or the host's, linking without debug
    sections (LLVM's DWARF was a fifth of YOLOv8n's library and nothing at run time reads it).

    Raises UsageError naming the Debian package when the toolchain is missing.
    """
    from tvm.support import cc

    if spec.is_aarch64:
        if shutil.which(ARM_CROSS_CC) is None:
            raise UsageError(
                f"{ARM_CROSS_CC} not found: install the Debian package {ARM_CROSS_PACKAGE} "
                f"(apt-get install {ARM_CROSS_PACKAGE}) to link aarch64 artifacts"
            )
        compiler = ARM_CROSS_CC
    else:
        compiler = cc.get_cc()
        if compiler is None:
            raise UsageError("no host C/C++ compiler found to link the artifact: install the Debian package g++")
    return cc.cross_compiler(compiler, options=list(LINK_OPTIONS))


def _parse_json(text: str) -> dict[str, Any]:
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"target is not valid JSON: {exc.msg} at char {exc.pos}") from None
    if not isinstance(config, dict) or "kind" not in config:
        raise UsageError('target JSON must be an object with a "kind", e.g. {"kind":"llvm","mcpu":"znver3"}')
    if config["kind"] not in SUPPORTED_KINDS:
        raise UsageError(
            f"target kind {config['kind']!r} is not supported: use one of {', '.join(SUPPORTED_KINDS)}"
        )
    return config


def _checked(config: dict[str, Any]) -> dict[str, Any]:
    """Let TVM validate the dict now, so a bad target fails before any pass runs."""
    import tvm

    try:
        tvm.target.Target(config)
    except Exception as exc:  # TVM raises ValueError/TVMError with multi-line text
        raise UsageError(f"TVM rejects target {json.dumps(config)}: {one_line(exc)}") from None
    return config


def _flat(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ",".join(str(item) for item in value)
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def one_line(exc: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception's text (TVM errors span many lines)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
