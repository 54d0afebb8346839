"""Detectors trained in another framework, as simcal state dicts and model settings.

One module per framework (``detectron2``; :data:`simcal.choices.IMPORT_FRAMEWORKS`), each with
``convert(weights, source, framework_config) -> Imported``: the weights renamed and laid out as
simcal's detector holds them (background first, class-specific box deltas and mask channels for
the background too), and the ``model.*`` settings that make simcal compute what the home framework
computes (:mod:`simcal.modeling.conventions`), read from the checkpoint itself and from the
framework's config file when given. This module reads checkpoint files safely and holds the
checks every framework shares. ``simcal import`` (:mod:`simcal.engine.importer`) writes the run.
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from simcal.errors import InputError


@dataclass
class Imported:
    """A converted checkpoint.

    Attributes:
        state: simcal's state dict (``{key: tensor}``), for the detector :attr:`model` describes.
        model: ``model.*`` settings (field -> value) of :class:`simcal.config.ModelConfig`.
        num_classes: C, the foreground classes.
        settings: ``(setting, value, where it came from)`` for the summary printed to the user.
        notes: lines worth telling the user (optimizer state dropped, defaults assumed, ...).
        source_keys: simcal key -> the framework's key it came from (for messages).
    """

    state: dict[str, Tensor]
    model: dict[str, Any]
    num_classes: int
    settings: list[tuple[str, Any, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    source_keys: dict[str, str] = field(default_factory=dict)


#: the only globals a ``.pkl`` checkpoint may name: numpy arrays and plain containers
_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("builtins", "complex"),
}


class _Unsafe(pickle.UnpicklingError):
    """A pickle that names something other than arrays and containers (its name is the message)."""


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that builds numpy arrays and containers, and nothing else (a checkpoint from
    the internet must not run code)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        if module == "numpy.dtypes":  # numpy 2's dtype classes
            return super().find_class(module, name)
        raise _Unsafe(f"{module}.{name}")


#: the first object of a checkpoint in torch's legacy (pre-1.6, non-zip) format
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def read_checkpoint(path: str | os.PathLike[str]) -> Any:
    """The object a checkpoint file holds: a ``torch.save`` file (read with ``weights_only``) or a
    pickle of numpy arrays (detectron2's model zoo ``.pkl``, read by an unpickler that builds
    arrays and containers only). Any failure is one :class:`InputError` naming the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(path, "(checkpoint)", "no such file" if not os.path.exists(path) else "not a regular file")
    try:
        if zipfile.is_zipfile(path):
            return torch.load(path, map_location="cpu", weights_only=True)
        with open(path, "rb") as f:
            data = f.read()
        obj = _ArrayUnpickler(io.BytesIO(data), encoding="latin1").load()
        if obj == _TORCH_LEGACY_MAGIC:  # torch's pre-1.6 format starts with this number: torch reads it
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        return obj
    except InputError:
        raise
    except _Unsafe as e:
        raise InputError(
            path, "(checkpoint)", f"refused: the pickle names {e}; only arrays and plain containers are read"
        ) from None
    except Exception as e:  # noqa: BLE001 - any failure to read means a bad or unsafe file
        first = str(e).split("\n")[0].split(". ")[0].strip()
        raise InputError(path, "(checkpoint)", f"cannot read as a checkpoint: {type(e).__name__}: {first}") from None


#: the entries of a training checkpoint that are not the model's weights
TRAINING_STATE = ("optimizer", "scheduler", "iteration", "epoch", "iter", "trainer", "meta", "amp", "grad_scaler")


def model_weights(
    obj: Any, source: str, nested: tuple[str, ...] = ("model", "state_dict")
) -> tuple[dict[str, Tensor], list[str]]:
    """``({key: float tensor}, notes)``: the weights inside a checkpoint object, as tensors.

    ``obj`` is a state dict, or a dict holding one under one of ``nested`` (detectron2:
    ``model``; mmdetection: ``state_dict``). A DDP ``module.`` prefix is removed. Training state
    beside the weights (optimizer, scheduler) is dropped and said so in the notes.
    """
    if not isinstance(obj, Mapping):
        raise InputError(source, "(checkpoint)", f"holds a {type(obj).__name__}, not a dict of weights")
    notes: list[str] = []
    weights: Any = obj
    for key in nested:
        if key in obj and isinstance(obj[key], Mapping):
            weights = obj[key]
            extra = sorted(k for k in obj if k != key and k in TRAINING_STATE)
            if any(k in obj for k in ("optimizer", "scheduler")):
                at = next(
                    (f" at {k} {obj[k]}" for k in ("iteration", "epoch", "iter") if isinstance(obj.get(k), int)), ""
                )
                notes.append(
                    f"a training checkpoint{at} ({', '.join(extra)} beside the weights): only the model's weights "
                    "are imported"
                )
            break
    out: dict[str, Tensor] = {}
    for key, value in weights.items():
        if not isinstance(key, str):
            raise InputError(source, repr(key), "a weight's name that is not a string: not a state dict")
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(np.ascontiguousarray(value))
        if not isinstance(value, Tensor):
            raise InputError(source, key, f"holds a {type(value).__name__}, not an array of weights")
        out[key] = value
    if not out:
        raise InputError(source, "(checkpoint)", "holds no weights")
    if all(k.startswith("module.") for k in out):
        out = {k[len("module.") :]: v for k, v in out.items()}
    for key, value in out.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise InputError(source, key, f"{bad} of {value.numel()} values are not finite (NaN or inf)")
    return out, notes


def shape_error(source: str, key: str, shape: Any, expected: Any, why: str) -> InputError:
    """The one-line error of a tensor whose shape contradicts the others."""
    return InputError(source, key, f"shape {list(shape)} contradicts the other tensors ({why}: {expected})")
