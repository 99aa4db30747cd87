"""Lower an ONNX model through TVM Relax and export a deployable shared library.

ONNX -> Relax (static input shapes) -> ConvertToDataflow -> zero pipeline (fusion, folding)
-> [MetaSchedule database] -> [dlight GPU schedules] -> tvm.compile -> export_library.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import onnx

from rewriter.canonical import graph_inputs
from rewriter.errors import ModelError, RewriterError, UsageError
from rewriter.targets import control_flow, cuda_offline, lift, recurrent, tuning
from rewriter.targets.presets import TargetSpec, describe, export_compiler, make_tvm_target, one_line
from rewriter.targets.scalars import scalar_constants

Log = Callable[[str], None]


def build_artifact(
    model: onnx.ModelProto,
    spec: TargetSpec,
    out_path: str | os.PathLike,
    tune_trials: int = 0,
    tuning_db: str | None = None,
    log: Log | None = None,
    remote: tuning.Remote | None = None,
) -> dict[str, Any]:
    """Compile `model` for `spec` into `out_path`; returns the report's `target` dict. With `remote`
    (tracker HOST:PORT, device key) tuning measures the candidates on a device from that tracker."""
    start = time.perf_counter()
    report: dict[str, Any] = {
        "name": spec.name,
        "tvm_target": spec.tvm_target,
        "artifact": None,
        "tuning_trials": 0,
        "tuning_db": None,
        "tuning": None,
        "device_code": None,
    }
    if spec.tvm_target is None:
        report["build_seconds"] = 0.0
        return report
    if tune_trials < 0:
        raise UsageError(f"tune_trials must be >= 0, got {tune_trials}")
    if tuning_db is not None:
        tuning.check_db_path(tuning_db, tune_trials)  # a mistyped path must not build untuned in silence
    fcompile = export_compiler(spec)  # fail fast on a missing toolchain
    if tune_trials > 0:
        tuning.check_tunable(spec, remote)
    _say(log, f"lowering to {describe(spec)}")
    out = Path(out_path)
    if spec.is_gpu:
        cuda_offline.use_ptx_compile()  # in-process (tuning on a GPU) as in the child: SASS + PTX, by nvcc
    if cuda_offline.needs_child(spec, tune_trials):
        # No GPU driver here: compile in a child process against a stub libcuda so the
        # artifact embeds a cubin, not CUDA C source (the artifact contract).
        tuned = cuda_offline.build_in_child(model, spec, out, tuning_db, log)
    else:
        tuned = lower_and_export(model, spec, out, tune_trials, tuning_db, log, fcompile, remote)
    report.update(
        artifact=out.name,
        tuning_trials=tune_trials,
        tuning_db=str(tuning_db) if tuned is not None and tuning_db is not None else None,
        tuning=tuned,
        device_code=cuda_offline.device_code(out) if spec.is_gpu else None,
        ptx_version=cuda_offline.ptx_version(out) if spec.is_gpu else None,
        build_seconds=round(time.perf_counter() - start, 3),
    )
    _say(log, f"built {out.name} in {report['build_seconds']:.1f} s")
    return report


def lower_and_export(
    model: onnx.ModelProto,
    spec: TargetSpec,
    out_path: Path,
    tune_trials: int,
    tuning_db: str | None,
    log: Log | None,
    fcompile: Callable[..., Any] | None,
    remote: tuning.Remote | None = None,
) -> dict[str, Any] | None:
    """Lower, compile and export in this process; the tuning summary (tuning.summary) when a database was used."""
    target = make_tvm_target(spec)
    with target:
        # Compact weights (pq codes, packed signs) enter as inputs so folding cannot expand them, then bind back.
        compact, arrays = lift.split_compact(model)
        fused = _guard("TVM cannot lower the model",
                       lambda: lift.bind_compact(fuse_pipeline()(import_onnx(compact)), arrays))
    with _tuning_dir(tuning_db, tune_trials) as work_dir:
        database, tuned = _database(fused, target, tune_trials, work_dir, log, remote)
        executable = _guard("TVM cannot compile the model", lambda: _compile(fused, target, database))
    _export(executable, out_path, fcompile)
    if tuned is not None:
        tuned["db"] = None if tuning_db is None else str(tuning_db)  # None: tuned into a temporary database
    return tuned


def static_inputs(model: onnx.ModelProto) -> tuple[dict[str, list[int]], dict[str, str]]:
    """Shapes and dtypes of the model's real inputs (initializers excluded); ModelError if dynamic."""
    shapes: dict[str, list[int]] = {}
    dtypes: dict[str, str] = {}
    for value in graph_inputs(model):
        tensor = value.type.tensor_type
        dims = [dim.dim_value if dim.HasField("dim_value") else -1 for dim in tensor.shape.dim]
        if not tensor.HasField("shape") or any(dim <= 0 for dim in dims):
            raise ModelError(
                f"input {value.name!r} has no static shape ({_dims_text(tensor)}): fix it with --input-shape"
            )
        shapes[value.name] = dims
        dtypes[value.name] = str(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type))
    return shapes, dtypes


def import_onnx(model: onnx.ModelProto) -> Any:
    """ONNX -> Relax IRModule with the model's own static input shapes."""
    from tvm.relax.frontend.onnx import from_onnx

    shapes, dtypes = static_inputs(model)
    model = scalar_constants(model)  # so that the blocked CPU layout passes through per-tensor scales
    if recurrent.has_recurrent(model):  # TVM's importer has no LSTM/GRU: unroll them over the static sequence
        model = recurrent.unroll_recurrent(model)
    if control_flow.has_control_flow(model):  # If nodes stay relax.If, around segments that fuse on their own
        return _guard("TVM cannot import the model",
                      lambda: control_flow.import_with_control_flow(model, shapes, dtypes))
    return _guard("TVM cannot import the model", lambda: from_onnx(model, shape_dict=shapes, dtype_dict=dtypes))


def fuse_pipeline() -> Any:
    """ConvertToDataflow, then TVM's zero pipeline (legalize, fold, fuse) with the bindings canonicalised
    after legalisation; run it inside `with target:`.

    The importer emits no dataflow block when the graph holds an ONNX `If`, and FuseOps
    only fuses inside dataflow blocks, hence ConvertToDataflow(min_size=1) first. A legalised
    BatchNormalization is a tuple (output, mean, variance) read back by index; FuseOps stops at
    tuples, so without CanonicalizeBindings every activation or residual sum after a BatchNormalization
    ran as a kernel of its own (digits_resnet: 18 kernels, 12 with it).
    """
    import tvm
    from tvm import relax

    from rewriter.targets.schedules import layout_pipeline

    target = tvm.target.Target.current(allow_none=True)
    # CPU: convolutions go to a blocked channel layout before fusion (schedules.py).
    layout = [layout_pipeline(target)] if target is not None and target.kind.name == "llvm" else []
    transform = relax.transform
    return tvm.transform.Sequential(
        [transform.ConvertToDataflow(min_size=1), *layout, transform.LegalizeOps(), transform.CanonicalizeBindings(),
         transform.DeadCodeElimination(), transform.AnnotateTIROpPattern(), transform.FoldConstant(),
         transform.FuseOps(), transform.FuseTIR()],
        name="rewriter_fuse",
    )


def schedule_pipeline(target: Any, database: Any | None = None) -> Any:
    """Apply tuning records (if any), then rule-based default schedules (CPU rules or dlight on GPU).

    Without dlight, a GPU build succeeds but compiles every kernel as host code.
    """
    import tvm
    from tvm import relax
    from tvm.s_tir import dlight as dl

    from rewriter.targets.schedule_rules import cpu_rules

    passes = []
    if database is not None:
        passes.append(relax.transform.MetaScheduleApplyDatabase(enable_warning=False))
    if target.kind.name == "llvm":  # kernels without a tuning record get our rule-based schedules
        passes.append(dl.ApplyDefaultSchedule(*cpu_rules(target)))
    if "gpu" in [str(key) for key in target.keys]:
        passes.append(
            dl.ApplyDefaultSchedule(
                dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                dl.gpu.GeneralReduction(), dl.gpu.Fallback(),
            )
        )
    return tvm.transform.Sequential(passes, name="rewriter_schedule")


def _compile(fused: Any, target: Any, database: Any | None) -> Any:
    import tvm

    with target, database if database is not None else contextlib.nullcontext():
        scheduled = schedule_pipeline(target, database)(fused)
    # For cuda the result is an x86-64 host library that embeds the device code. Compile inside
    # `with target:`: TVM's nvcc callback reads the arch from the current target.
    with target:
        return tvm.compile(scheduled, target=target, relax_pipeline="default_build")


def _database(fused: Any, target: Any, trials: int, work_dir: str | None, log: Log | None,
              remote: tuning.Remote | None = None) -> tuple[Any | None, dict[str, Any] | None]:
    """The database to apply and its tuning summary, or (None, None) without tuning or a database."""
    if work_dir is None:
        return None, None
    if trials > 0:
        return tuning.tune(fused, target, trials, work_dir, log, remote)
    return tuning.reuse(fused, target, work_dir, log)


@contextlib.contextmanager
def _tuning_dir(tuning_db: str | None, trials: int) -> Iterator[str | None]:
    if tuning_db is not None:
        if trials > 0:
            os.makedirs(tuning_db, exist_ok=True)
        yield tuning_db
    elif trials > 0:
        with tempfile.TemporaryDirectory(prefix="rewriter-tune-") as tmp:
            yield tmp
    else:
        yield None


def _export(executable: Any, out_path: Path, fcompile: Callable[..., Any] | None) -> None:
    """Export next to `out_path` then rename, so a failure never leaves a partial artifact."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out_path.stem}.", suffix=".so", dir=out_path.parent)
    os.close(fd)
    try:
        _guard("exporting the artifact failed", lambda: executable.export_library(tmp_name, fcompile=fcompile))
        os.chmod(tmp_name, 0o755)  # mkstemp creates 0600
        os.replace(tmp_name, out_path)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)


def _guard(what: str, thunk: Callable[[], Any]) -> Any:
    """Run `thunk`; turn any TVM failure into a one-line ModelError."""
    try:
        return thunk()
    except RewriterError:
        raise
    except Exception as exc:
        raise ModelError(f"{what}: {one_line(exc)}") from None


def _dims_text(tensor: onnx.TypeProto.Tensor) -> str:
    dims = [str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim]
    return "x".join(dims) if dims else "unknown rank"


def _say(log: Log | None, message: str) -> None:
    if log is not None:
        log(message)
