"""Model files: named tensors in safetensors, and the checks a trained model must pass."""

from __future__ import annotations

from typing import Dict, Mapping

import numpy as np
from safetensors.numpy import load_file, save_file

Model = Dict[str, np.ndarray]


class FerryError(Exception):
    """A trainer's result Ferry cannot take, with the tensor or key at fault in the message."""


def load_model(path: str) -> Model:
    """Reads a safetensors model file as ``{name: numpy array}``."""
    return dict(load_file(path))


def save_model(model: Mapping[str, np.ndarray], path: str) -> None:
    """Writes ``{name: array}`` as a safetensors model file (0-d arrays included)."""
    # ascontiguousarray alone would turn a 0-d array into shape (1,).
    contiguous = {}
    for name, array in model.items():
        array = np.asarray(array)
        contiguous[name] = np.ascontiguousarray(array).reshape(array.shape)
    save_file(contiguous, path)


def is_parameter(array: np.ndarray) -> bool:
    """Floating-point tensors are parameters; integers and booleans are carried unchanged."""
    return np.issubdtype(array.dtype, np.floating)


def check_trained(global_model: Model, trained: Mapping[str, np.ndarray]) -> Model:
    """The trained model to write: every parameter of ``global_model`` with the same shape and
    dtype, finite; carried (integer) tensors are taken from ``global_model``. Raises
    :class:`FerryError` naming the first tensor at fault."""
    if not isinstance(trained, Mapping):
        raise FerryError(f"train must return a dict of arrays, got {type(trained).__name__}")
    out: Model = {}
    for name, reference in global_model.items():
        if not is_parameter(reference):
            out[name] = reference
            continue
        if name not in trained:
            raise FerryError(f"the trained model lacks tensor '{name}' {list(reference.shape)}")
        array = np.asarray(trained[name])
        if array.shape != reference.shape:
            raise FerryError(
                f"tensor '{name}' has shape {list(array.shape)}, the model's is "
                f"{list(reference.shape)}"
            )
        if array.dtype != reference.dtype:
            raise FerryError(
                f"tensor '{name}' has dtype {array.dtype}, the model's is {reference.dtype}; "
                f"cast it back with .astype(np.{reference.dtype})"
            )
        if not np.all(np.isfinite(array)):
            raise FerryError(f"tensor '{name}' holds NaN or infinity")
        out[name] = array
    unknown = sorted(set(trained) - set(global_model))
    if unknown:
        raise FerryError(f"the trained model has tensors the global model lacks: {unknown}")
    return out
