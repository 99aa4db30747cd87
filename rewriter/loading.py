"""Reading models safely and writing them deterministically."""

from __future__ import annotations

import os
from pathlib import Path

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


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load an ONNX file; external data only from files inside the model's own folder."""
    path = Path(path)
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
    if external:
        external_data_helper.load_external_data_for_model(model, str(base))
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
