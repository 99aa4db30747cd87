"""Calibration data: loading and checking an .npz, synthetic data on request, fit/held-out split."""

from __future__ import annotations

import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from .canonical import declared_shape, graph_inputs
from .errors import UsageError

LABELS = "labels"


@dataclass(frozen=True)
class Calibration:
    """Samples for every model input (first axis = samples) and optional labels.

    An input's array either has the input's rank, each sample a batch of 1 (`x[i:i+1]`), or one axis more,
    each sample the whole input (`x[i]`, listed in `whole`): that form feeds inputs whose batch axis is not
    first (an LSTM's state [layers, batch, hidden]) and scalars (a sample rate)."""

    inputs: Mapping[str, np.ndarray]
    labels: np.ndarray | None
    source: str
    whole: frozenset[str] = frozenset()

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def take(self, index: np.ndarray) -> Calibration:
        labels = None if self.labels is None else self.labels[index]
        return Calibration({k: v[index] for k, v in self.inputs.items()}, labels, self.source, self.whole)

    def feed(self, i: int) -> dict[str, np.ndarray]:
        """Sample i as the model takes it (models are canonicalised to batch 1)."""
        return sample_feed(self.inputs, i, self.whole)

    def samples(self) -> Iterator[dict[str, np.ndarray]]:
        for i in range(len(self)):
            yield self.feed(i)

    def feed_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape each input is fed at."""
        return {k: v.shape[1:] if k in self.whole else (1, *v.shape[1:]) for k, v in self.inputs.items()}


def sample_feed(arrays: Mapping, i: int, whole: frozenset[str]) -> dict:
    """Sample i of arrays (numpy or torch) in the Calibration layout."""
    # [i, ...] keeps a scalar input a 0-d array (onnxruntime refuses numpy scalars)
    return {k: v[i, ...] if k in whole else v[i : i + 1] for k, v in arrays.items()}


def _input_dtypes(model: onnx.ModelProto) -> dict[str, np.dtype]:
    return {
        v.name: np.dtype(onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type))
        for v in graph_inputs(model)
    }


def load_calibration(path: str | Path, model: onnx.ModelProto) -> Calibration:
    """Read FILE.npz (no pickle), check it against the model's inputs, cast to their dtypes."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"calibration path {path} is a directory, not an .npz file")
    if not path.is_file():
        raise UsageError(f"calibration file not found: {path}")
    if not zipfile.is_zipfile(path):  # .npy, random bytes, pickles: np.load would read them another way
        raise UsageError(f"{path} is not an .npz file (np.savez output: one array per model input)")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except ValueError as exc:
        if "pickle" in str(exc):
            raise UsageError(f"{path} holds object arrays that need pickle; refusing to load it") from exc
        raise UsageError(f"{path} is not a readable .npz file: {exc}") from exc
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise UsageError(f"{path} is not a readable .npz file: {exc}") from exc
    labels = arrays.pop(LABELS, None)
    return check_arrays(arrays, labels, model, str(path))


def check_arrays(
    arrays: dict[str, np.ndarray], labels: np.ndarray | None, model: onnx.ModelProto, source: str
) -> Calibration:
    dtypes = _input_dtypes(model)
    if set(arrays) != set(dtypes):
        raise UsageError(
            f"calibration arrays {sorted(arrays)} do not match the model's inputs {sorted(dtypes)}"
        )
    for name, array in arrays.items():
        _check_values(name, array)
    counts = {len(a) if a.ndim else 0 for a in arrays.values()}
    if len(counts) != 1 or 0 in counts:
        raise UsageError("calibration arrays must all have the same, non-zero number of samples")
    whole = frozenset(v.name for v in graph_inputs(model) if arrays[v.name].ndim == len(declared_shape(v)) + 1)
    for value in graph_inputs(model):
        _check_sample_shape(value.name, declared_shape(value), arrays[value.name].shape, value.name in whole)
    if labels is not None and (labels.ndim != 1 or len(labels) != counts.pop()):
        raise UsageError("calibration 'labels' must be 1-D with one label per sample")
    if labels is not None and (labels.dtype.kind not in "iub" and not (
            labels.dtype.kind == "f" and np.all(np.isfinite(labels)) and np.all(labels == np.round(labels)))
            or (labels.size and labels.min() < 0)):
        raise UsageError("calibration 'labels' must be non-negative integer class indices")
    cast = {k: np.ascontiguousarray(v, dtype=dtypes[k]) for k, v in arrays.items()}
    return Calibration(cast, None if labels is None else labels.astype(np.int64), source, whole)


def _check_values(name: str, array: np.ndarray) -> None:
    """Numbers only, all finite: one NaN in the calibration makes every fitted weight NaN."""
    if array.dtype.kind not in "biuf":
        raise UsageError(f"calibration array {name!r} has dtype {array.dtype}; only real numbers are accepted")
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        index = np.unravel_index(int(np.argmin(np.isfinite(array))), array.shape)
        raise UsageError(f"calibration array {name!r} holds a non-finite value ({array[index]}) at index "
                         f"{list(map(int, index))}")


def _check_sample_shape(name: str, declared: list[int | str], shape: tuple[int, ...], whole: bool) -> None:
    if len(shape) != len(declared) and not whole:
        raise UsageError(
            f"calibration array {name!r} has shape {list(shape)}; the model's input is {declared}: give samples "
            f"on the first axis, as batches of 1 (rank {len(declared)}) or as whole inputs (rank {len(declared) + 1})"
        )
    for want, got in zip(declared if whole else declared[1:], shape[1:], strict=True):
        if isinstance(want, int) and want > 0 and want != got:
            raise UsageError(
                f"calibration array {name!r} has samples of shape {list(shape[1:])}; "
                f"the model's input is {declared}"
            )


def synthetic_calibration(
    model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]], count: int, seed: int
) -> Calibration:
    """Uniform [0, 1) floats (or small integers) of the fixed input shapes, whole inputs (whichever axis is the
    batch); only when asked for."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for name, dtype in _input_dtypes(model).items():
        shape = (count, *input_shapes[name])
        if np.issubdtype(dtype, np.floating):
            arrays[name] = rng.random(shape).astype(dtype)
        else:
            arrays[name] = rng.integers(0, 2, shape).astype(dtype)
    return Calibration(arrays, None, "synthetic", frozenset(arrays))


def split(calib: Calibration, holdout: float, seed: int) -> tuple[Calibration, Calibration]:
    """A seeded split into the part passes fit on and the held-out part fidelity is measured on."""
    if not 0.0 < holdout < 1.0:
        raise UsageError(f"--holdout must be between 0 and 1, got {holdout}")
    n = len(calib)
    if n < 2:
        raise UsageError("calibration needs at least 2 samples (one to fit, one held out)")
    order = np.random.default_rng(seed).permutation(n)
    n_held = min(n - 1, max(1, round(n * holdout)))
    # The fit part stays in the seeded random order: fits that stop early must not see only the file's first
    # samples (a file sorted by label would hand them one class).
    return calib.take(order[n_held:]), calib.take(np.sort(order[:n_held]))
