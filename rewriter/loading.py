"""Reading models safely and writing them deterministically.

Protobuf cannot serialize or parse a message over 2 GiB, so a model whose weights pass that limit never
exists as bytes here: its large initializers are *detached* (a copy of the model whose initializers
reference placeholder external files, plus a map to the tensors that hold the data). That lean copy is
what shape inference, the checker and onnxslim see; onnxruntime opens it from a temporary folder with
the data written beside it; and model.onnx is written the same way, with `model.onnx.data` beside it.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError, EncodeError
from onnx import external_data_helper

from .errors import ModelError

PROTOBUF_LIMIT = 2**31 - 1  # protobuf refuses to serialize or parse a message larger than this
# A model larger than this is handled with its weights outside the protobuf (1 MiB under the limit, for what
# is added on the way: value_info, restored dims). Tests lower it to send small models down that path.
LARGE_MODEL_BYTES = PROTOBUF_LIMIT - 2**20
EXTERNAL_MIN_BYTES = 1024  # tensors this large go to the external data file (onnx's own default)
# Tensors this large start on a boundary of ALIGNMENT bytes, so that runtimes can map them (onnx's defaults).
ALIGN_MIN_BYTES = 2**20
ALIGNMENT = 2**16
_DETACHED = "rewriter-detached-"  # placeholder location of a detached tensor: this prefix and its number
_PACKED_4BIT = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4, getattr(onnx.TensorProto, "FLOAT4E2M1", -1)}


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


def _check_external_sizes(external: list[onnx.TensorProto], base: Path, path: Path) -> None:
    """External data shorter than its tensor's declared shape reads as a truncated array: refuse it. Measured on
    the files before loading, so that no tensor is copied to find its length."""
    for tensor in external:
        if tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
            continue
        info = external_data_helper.ExternalDataInfo(tensor)
        expected = _shape_nbytes(tensor)
        available = max((base / info.location).stat().st_size - (info.offset or 0), 0)
        held = available if info.length is None else min(info.length, available)
        if held != expected:
            raise ModelError(f"external data for tensor {tensor.name!r} of {path.name} holds {held} "
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
        _check_external_sizes(external, base, path)
        try:
            external_data_helper.load_external_data_for_model(model, str(base))
        except (OSError, ValueError) as exc:
            raise ModelError(f"external data of {path.name} cannot be read: {_first_line(exc)}") from exc
    try:
        check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ModelError(f"{path} fails the ONNX checker: {_first_line(exc)}") from exc
    return model


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def serialize(model: onnx.ModelProto) -> bytes:
    """Deterministic bytes: protobuf's deterministic map ordering, no timestamps anywhere."""
    try:
        return model.SerializeToString(deterministic=True)
    except EncodeError as exc:
        raise ModelError("the model is over protobuf's 2 GB limit and cannot be held as bytes") from exc


def _shape_nbytes(tensor: onnx.TensorProto) -> int:
    """Bytes a tensor's shape and type call for (4-bit types pack two values a byte)."""
    count = math.prod(tensor.dims)
    if tensor.data_type in _PACKED_4BIT:
        return (count + 1) // 2
    return count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def _raw_nbytes(tensor: onnx.TensorProto) -> int:
    """Bytes of a tensor's raw_data, from its shape and type (reading raw_data itself would copy it)."""
    if not tensor.HasField("raw_data") or tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return 0
    return _shape_nbytes(tensor)


def _size(model: onnx.ModelProto) -> int | None:
    """The model's serialized size, or None when it is over protobuf's limit (protobuf cannot even count it)."""
    if sum(_raw_nbytes(t) for t in model.graph.initializer) > PROTOBUF_LIMIT:
        return None
    try:
        return model.ByteSize()
    except EncodeError:
        return None


_TYPED_FIELDS = (("float_data", 4), ("int32_data", 4), ("int64_data", 8), ("double_data", 8), ("uint64_data", 8))


def _tensor_bytes(model: onnx.ModelProto) -> int:
    """The bytes of every tensor's values (initializers, node attributes, subgraphs), counted without encoding
    the model: protobuf's ByteSize costs as much as serializing it."""
    total = 0
    for tensor in external_data_helper._get_all_tensors(model):
        total += _raw_nbytes(tensor) + sum(len(getattr(tensor, name)) * size for name, size in _TYPED_FIELDS)
    return total


def is_large(model: onnx.ModelProto) -> bool:
    """Over LARGE_MODEL_BYTES: the model goes to tools by path, with its weights in an external data file."""
    values = _tensor_bytes(model)
    if values > LARGE_MODEL_BYTES:
        return True
    if values < LARGE_MODEL_BYTES // 2:  # the rest (nodes, names, shapes) is never a gigabyte: no need to count
        return False
    size = _size(model)
    return size is None or size > LARGE_MODEL_BYTES


def model_bytes(model: onnx.ModelProto) -> int:
    """Serialized size of the model; over the limit, of its lean copy plus the external data it needs."""
    size = _size(model)
    if size is not None and size <= LARGE_MODEL_BYTES:
        return size
    detached = detach(model)
    return detached.model.ByteSize() + sum(_raw_nbytes(t) for t in detached.sources.values())


def _copy_fields(source, target, skip: set[str]) -> None:
    """Copy a message's set fields except `skip`, without reading those (reading raw_data copies it)."""
    for field in source.DESCRIPTOR.fields:
        if field.name in skip:
            continue
        if field.is_repeated:
            values = getattr(source, field.name)
            if len(values):
                getattr(target, field.name).extend(values)
        elif source.HasField(field.name):
            if field.message_type is not None:
                getattr(target, field.name).CopyFrom(getattr(source, field.name))
            else:
                setattr(target, field.name, getattr(source, field.name))


@dataclass
class Detached:
    """A lean copy of a model whose large initializers carry no data, only a placeholder external location,
    and the tensors (of the original model, not copied) that hold that data, by placeholder."""

    model: onnx.ModelProto
    sources: dict[str, onnx.TensorProto]


def detach(model: onnx.ModelProto, min_bytes: int = EXTERNAL_MIN_BYTES) -> Detached:
    """The lean copy of `model`: its top-level initializers of `min_bytes` or more are left in `model` and
    referenced by placeholder locations (which never exist as files)."""
    lean = onnx.ModelProto()
    _copy_fields(model, lean, {"graph"})
    _copy_fields(model.graph, lean.graph, {"initializer"})
    sources = {}
    for tensor in model.graph.initializer:
        copy = lean.graph.initializer.add()
        nbytes = _raw_nbytes(tensor)
        if nbytes < max(min_bytes, 1):
            copy.CopyFrom(tensor)
            continue
        _copy_fields(tensor, copy, {"raw_data", "external_data", "data_location"})
        location = f"{_DETACHED}{len(sources)}"
        _refer(copy, location, 0, nbytes)
        sources[location] = tensor
    return Detached(lean, sources)


def _refer(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    """Point a tensor without data at `length` bytes of `location` from `offset`."""
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    tensor.data_location = onnx.TensorProto.EXTERNAL


def _detached_location(tensor: onnx.TensorProto) -> str | None:
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    location = external_data_helper.ExternalDataInfo(tensor).location
    return location if location.startswith(_DETACHED) else None


def attach(model: onnx.ModelProto, sources: dict[str, onnx.TensorProto]) -> onnx.ModelProto:
    """Give a (transformed) lean copy its data back, in place: every placeholder is filled from `sources`."""
    for tensor in external_data_helper._get_all_tensors(model):
        location = _detached_location(tensor)
        if location is None:
            continue
        if location not in sources:
            raise ModelError(f"tensor {tensor.name!r} lost its data on the way (placeholder {location!r})")
        del tensor.external_data[:]
        tensor.ClearField("data_location")  # as the source had it: unset, not DEFAULT
        tensor.raw_data = sources[location].raw_data
    return model


def _write_external(detached: Detached, path: Path, data_name: str, write_data: bool = True) -> list[Path]:
    """Write the lean model to `path` and its detached data to `data_name` beside it, at aligned offsets, in
    graph order (deterministic). Without `write_data` the data file is only sized (sparse): enough for the
    checker, which looks at locations, not contents."""
    lean = onnx.ModelProto()
    lean.CopyFrom(detached.model)  # the lean copy is small; the caller's stays untouched
    data_path = path.with_name(data_name)
    offset = 0
    with open(data_path, "wb") as out:
        for tensor in external_data_helper._get_all_tensors(lean):
            location = _detached_location(tensor)
            if location is None:
                continue
            source = detached.sources[location]
            if _raw_nbytes(source) >= ALIGN_MIN_BYTES:
                offset += -offset % ALIGNMENT
            if write_data:
                data = source.raw_data
                length = len(data)
                out.seek(offset)
                out.write(data)
                del data
            else:
                length = _raw_nbytes(source)
            _refer(tensor, data_name, offset, length)
            offset += length
        out.truncate(offset)
    try:
        path.write_bytes(serialize(lean))
    except ModelError as exc:
        raise ModelError("the model is over 2 GB even with its initializers stored outside it "
                         "(large constants inside nodes or subgraphs), which is not supported") from exc
    return [path, data_path]


def external_data_name(path: str | os.PathLike) -> str:
    """The name of the file beside model.onnx that holds a large model's weights."""
    return Path(path).name + ".data"


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> list[Path]:
    """Write `model` deterministically; return the files written. A model over LARGE_MODEL_BYTES is written
    with its large initializers in `<name>.data` beside it (a relative location, so the pair can move)."""
    path = Path(path)
    if not is_large(model):
        path.write_bytes(serialize(model))
        return [path]
    return _write_external(detach(model), path, external_data_name(path))


def check_model(model: onnx.ModelProto, full_check: bool = False) -> None:
    """onnx.checker.check_model; a large model is checked by path, as a lean copy beside a sparse data file."""
    if not is_large(model):
        onnx.checker.check_model(model, full_check=full_check)
        return
    with tempfile.TemporaryDirectory(prefix="rewriter-check-") as folder:
        path = Path(folder) / "model.onnx"
        _write_external(detach(model), path, external_data_name(path), write_data=False)
        onnx.checker.check_model(str(path), full_check=full_check)


def infer_shapes(model: onnx.ModelProto, in_place: bool = False, **kwargs) -> onnx.ModelProto:
    """onnx.shape_inference.infer_shapes: a new model, `model` left as it was. A large model is inferred on its
    lean copy, which then gets a copy of the weights; with `in_place` (for a caller that owns `model`) the result
    is grafted onto `model` itself instead, so that its weights are not copied."""
    if not is_large(model):
        return onnx.shape_inference.infer_shapes(model, **kwargs)
    detached = detach(model)
    inferred = onnx.shape_inference.infer_shapes(detached.model, **kwargs)
    if not in_place:
        return attach(inferred, detached.sources)
    for name in ("node", "value_info", "output"):
        field = getattr(model.graph, name)
        del field[:]
        field.extend(getattr(inferred.graph, name))
    return model


def ort_session(model: onnx.ModelProto | Detached, options, prepack: bool = False):
    """An onnxruntime CPU session. A normal model goes in as bytes; a large one (or a detached copy) is
    written with its data to a temporary folder and opened by path, so that onnxruntime maps the weights from
    the file instead of holding a copy. Weight prepacking (a second, packed copy) is off for those unless
    `prepack` (for timing)."""
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if isinstance(model, onnx.ModelProto) and not is_large(model):
        return ort.InferenceSession(serialize(model), options, providers=providers)
    detached = model if isinstance(model, Detached) else detach(model)
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    # The files can go once the session is made: the mapping keeps the data alive until the session ends.
    with tempfile.TemporaryDirectory(prefix="rewriter-session-", ignore_cleanup_errors=True) as folder:
        path = Path(folder) / "model.onnx"
        _write_external(detached, path, external_data_name(path))
        return ort.InferenceSession(str(path), options, providers=providers)
