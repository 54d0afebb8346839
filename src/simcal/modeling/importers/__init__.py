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
from collections.abc import Callable, Mapping
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


#: ResNet stages' block counts -> depth (the body of every framework's ResNet)
RESNET_DEPTHS = {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101, (3, 8, 36, 3): 152}


def stage_prefix(k: str | None, first: str, extra: str) -> str:
    """The simcal prefix of a cascade's stage ``k`` (a framework's 0-based index, None for a single
    stage): ``first`` (stage 1 keeps torchvision's keys), else ``extra.{k-1}``."""
    return first if k is None or int(k) == 0 else f"{extra}.{int(k) - 1}"


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


def renamed(
    weights: dict[str, Tensor], rename: Callable[[str], str | None], source: str, framework: str
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """``(state, source_keys)``: every tensor under its simcal name (``rename``), float32; the first
    key ``rename`` does not know is an :class:`InputError` naming it."""
    state: dict[str, Tensor] = {}
    source_keys: dict[str, str] = {}
    for key, value in weights.items():
        new = rename(key)
        if new is None:
            raise InputError(
                source, key, f"a key of no {framework} R-CNN layout known to simcal (the first not understood)"
            )
        if new in state:
            raise InputError(source, key, f"two tensors for {new}")
        state[new] = value.detach().to(torch.float32).contiguous()
        source_keys[new] = key
    return state, source_keys


#: how a framework's class-score rows map onto simcal's (:func:`class_layout`)
CLASS_ROWS = ("background_last", "drop_last", "as_is", "background_first")


def class_layout(
    key: str,
    value: Tensor,
    num_classes: int,
    rows: str,
    box_agnostic: bool,
    mask_agnostic: bool,
    cascade: bool,
) -> Tensor:
    """A framework's class layout -> simcal's, for one tensor of the RoI heads (simcal ``key``).

    ``rows``: the class-score layer's rows: ``background_last`` (softmax, class k at row k,
    background at row C: detectron2, mmdetection 2+) become background first; ``drop_last``
    (detectron2's sigmoid classifier: C + 1 rows, the last never scored) keep the C class rows;
    ``as_is`` (mmdetection's sigmoid C rows, Seesaw's C + 2) stay. Class-specific box deltas 4C and
    mask channels C get zeros for the background in front (4(C+1), C+1); ``background_first``
    (mmdetection v1: simcal's own layout, C + 1 rows, deltas and channels) stays as it is. A cascade's class-agnostic
    box regressors stay one box; on a one-stage head whose mask is class-specific, a class-agnostic
    box regressor (or, the other way round, mask channel) is repeated for each label: the same
    outputs with simcal's single ``class_agnostic`` switch."""
    c = num_classes
    class_agnostic = mask_agnostic and (box_agnostic or cascade)
    if not key.startswith("roi_heads."):
        return value
    if key.endswith(("cls_score.weight", "cls_score.bias")):
        if rows == "drop_last":
            return value[:c].clone()
        if rows == "background_last":
            return torch.cat([value[c:], value[:c]])
        return value  # as_is, background_first
    repeat = (c + 1, *[1] * (value.dim() - 1))
    has_background = rows == "background_first"
    if key.endswith(("bbox_pred.weight", "bbox_pred.bias")):
        if box_agnostic:
            return value if class_agnostic or cascade else value.repeat(*repeat)
        return value if has_background else torch.cat([torch.zeros_like(value[:4]), value])
    if key.endswith(("mask_fcn_logits.weight", "mask_fcn_logits.bias")):
        if mask_agnostic:
            return value if class_agnostic else value.repeat(*repeat)
        return value if has_background else torch.cat([torch.zeros_like(value[:1]), value])
    return value
