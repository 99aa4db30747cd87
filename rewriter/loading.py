"""Reading models safely and writing them deterministically."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from .errors import ModelError


def _external_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    return [
        t
        for t in external_data_helper._get_all_tensors(model)
        if external_data_helper.uses_external_data(t)
    ]


def _check_external_location(tensor: onnx.TensorProto, base: Path) -> None:
    """Refuse external-data paths that leave the model's folder (absolute, '..', links)."""
    info = external_data_helper.ExternalDataInfo(tensor)
    location = info.location
    if not location or os.path.isabs(location):
        raise ModelError(f"external data for tensor {tensor.name!r} has an absolute or empty path {location!r}")
    target = (base / location).resolve()
    if not target.is_relative_to(base.resolve()):
        raise ModelError(
            f"external data for tensor {tensor.name!r} points outside the model's folder: {location!r}"
        )
    if not target.is_file():
        raise ModelError(f"external data file {location!r} for tensor {tensor.name!r} is missing")


def _check_external_sizes(model: onnx.ModelProto, path: Path) -> None:
    """External data shorter than its tensor's declared shape reads as a truncated array: refuse it."""
    for tensor in external_data_helper._get_all_tensors(model):
        if tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED) or not tensor.HasField("raw_data"):
            continue
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        expected = int(np.prod(tensor.dims, dtype=np.int64)) * itemsize
        if len(tensor.raw_data) != expected:
            raise ModelError(f"external data for tensor {tensor.name!r} of {path.name} holds {len(tensor.raw_data)} "
                             f"bytes, its shape {list(tensor.dims)} needs {expected}")


def external_data_files(path: str | os.PathLike) -> list[Path]:
    """The files a model's external data lives in (an output folder must never hold them)."""
    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - load_model reports unreadable files with the right message
        return []
    locations = {external_data_helper.ExternalDataInfo(t).location for t in _external_tensors(model)}
    return [path.parent / loc for loc in sorted(locations) if loc]


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load an ONNX file; external data only from files inside the model's own folder."""
    path = Path(path)
    if path.is_dir():
        raise ModelError(f"{path} is a directory, not an ONNX model file")
    if not path.is_file():
        raise ModelError(f"model file not found: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError, OSError) as exc:
        raise ModelError(f"{path} is not a readable ONNX model ({type(exc).__name__})") from exc
    if not model.graph.node or model.ir_version <= 0:
        raise ModelError(f"{path} is not an ONNX model (no graph nodes or no IR version)")
    external = _external_tensors(model)
    base = path.parent
    for tensor in external:
        _check_external_location(tensor, base)
        if (base / external_data_helper.ExternalDataInfo(tensor).location).resolve() == path.resolve():
            raise ModelError(f"external data for tensor {tensor.name!r} points at the model file itself")
    if external:
        try:
            external_data_helper.load_external_data_for_model(model, str(base))
        except (OSError, ValueError) as exc:
            raise ModelError(f"external data of {path.name} cannot be read: {_first_line(exc)}") from exc
        _check_external_sizes(model, path)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ModelError(f"{path} fails the ONNX checker: {_first_line(exc)}") from exc
    return model


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def serialize(model: onnx.ModelProto) -> bytes:
    """Deterministic bytes: protobuf's deterministic map ordering, no timestamps anywhere."""
    return model.SerializeToString(deterministic=True)


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> int:
    data = serialize(model)
    Path(path).write_bytes(data)
    return len(data)
