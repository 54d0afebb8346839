"""Typed configuration: dataclasses, YAML presets with ``_base_`` inheritance, ``key=value`` overrides.

A preset is a short YAML diff over a base (mmdetection's habit, without its registries)::

    _base_: lvis_v0.5_r50_fpn.yaml
    train:
      loss: focal

Overrides on the command line use dotted keys: ``train.max_iter=200 model.class_agnostic=true``.
Values are parsed as YAML scalars (``1e-3``, ``true``, ``[8, 11]``).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from simcal.errors import InputError


@dataclass
class DataConfig:
    """Where the annotations and images are. Relative paths resolve against the config file."""

    train_json: str = ""
    train_images: str = ""
    val_json: str = ""
    val_images: str = ""
    num_workers: int = 2


@dataclass
class ModelConfig:
    """Detector architecture and test-time settings (METHOD.md, LVIS test settings)."""

    arch: str = "resnet50_fpn"  # resnet50_fpn | small
    class_agnostic: bool = False  # r50-ag: one box regressor and one mask channel for all classes
    weights: str | None = None  # torchvision detection weights name (e.g. COCO_V1) or a .pth path
    weights_backbone: str | None = None  # e.g. IMAGENET1K_V1 (the paper's) or a .pth path
    trainable_backbone_layers: int | None = None
    norm: str = "frozen_bn"  # frozen_bn (pretrained r50), bn, gn (small / from scratch)
    min_size: int = 800
    max_size: int = 1333
    # RPN
    rpn_pre_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_test: int = 1000
    rpn_batch_size_per_image: int = 256
    # RoI heads
    box_batch_size_per_image: int = 512
    box_positive_fraction: float = 0.25
    # test (LVIS: 0.0 / 0.5 / 300; torchvision's 0.05 / 100 are wrong for LVIS)
    score_thresh: float = 0.0
    nms_thresh: float = 0.5
    detections_per_img: int = 300
    # NHWC convolutions: same results up to rounding; inference 1.5x faster on CPU (mask head)
    channels_last: bool = True


@dataclass
class TrainConfig:
    """Optimisation. Budgets are iterations (or epochs), never wall-clock time."""

    batch_size: int = 16  # global, over all processes
    base_lr: float = 0.01  # the paper (supp. G), at reference_batch_size; scaled linearly with batch_size
    reference_batch_size: int = 16
    optimizer: str = "sgd"  # sgd | adamw
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 500  # mmdetection v1 (the authors' base): 500 iterations from 1/3
    warmup_factor: float = 0.333
    max_iter: int | None = None  # iterations; when None, derived from epochs
    epochs: float = 12.0
    steps: list[float] = field(default_factory=lambda: [8.0, 11.0])  # in the unit of the budget
    gamma: float = 0.1
    loss: str = "ce"  # ce | lr | focal | cm
    loss_kwargs: dict[str, Any] = field(default_factory=dict)
    sampler: str = "random"  # random | repeat_factor
    repeat_threshold: float = 0.001
    repeat_rounding: str = "stochastic"  # stochastic | ceil
    flip_prob: float = 0.5
    checkpoint_period: int = 1000
    log_period: int = 20
    amp: bool = True  # on CUDA only
    seed: int = 0
    threads: int = 0  # torch threads on CPU, 0 = torch's default


@dataclass
class CalibrationConfig:
    """SimCal calibration of the classification head (METHOD.md; paper Sec. 4.2, supp. G.2)."""

    head: str = "3fc_ft"  # 3fc_ft | 2fc_rand | 3fc_rand | ncm
    layers: str = "all3"  # all3 | last2 | last1 (which layers of the head train, Table 10)
    steps: int = 12000
    decay: list[float] = field(default_factory=lambda: [8000 / 12000, 11000 / 12000])  # fractions of steps
    classes_per_batch: int = 16  # bi-level: n classes per step, one image each
    lr: float = 0.01
    momentum: float = 0.9  # the paper's; the released code used 0
    weight_decay: float = 0.0001
    loss: str = "ce"  # ce | lr | focal | cm (decoupled baselines, Table 4)
    sampler: str = "bilevel"  # bilevel | random | repeat_factor (image-centric: decoupled baselines)
    flip_prob: float = 0.5
    cache_mb: int = 4096  # frozen backbone/RPN outputs kept per (image, flip); 0 disables
    # cache misses of a step computed together, up to this many same-size images (a lone miss is
    # paired with a copy of itself): per-image results do not depend on the batch for 2+ images on
    # oneDNN (tested); 1 = one image at a time, for a backend where that is not so
    miss_batch: int = 16
    checkpoint_period: int = 1000
    log_period: int = 20
    seed: int = 0


@dataclass
class InferenceConfig:
    """Dual-head inference (Eq. 2): calibrated column for classes with N_z <= T."""

    combine: str = "sel"
    T: float = 300.0


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _merge(base: dict[str, Any], diff: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in diff.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "loss_kwargs" else v
    return out


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise InputError(path, "_base_", "circular inheritance")
    if not path.is_file():
        raise InputError(path, "(file)", "no such config file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise InputError(path, "(yaml)", str(e).replace("\n", " ")) from None
    if not isinstance(raw, dict):
        raise InputError(path, "(top level)", "expected a mapping")
    base = raw.pop("_base_", None)
    if base:
        parent = _read_yaml(path.parent / base, (*seen, path))
        raw = _merge(parent, raw)
    # resolve relative data paths against the file that names them
    data = raw.get("data")
    if isinstance(data, dict):
        for key in ("train_json", "train_images", "val_json", "val_images"):
            v = data.get(key)
            if isinstance(v, str) and v and not os.path.isabs(v) and not v.startswith("${"):
                data[key] = str((path.parent / v).resolve())
    return raw


def _build(cls: type, values: dict[str, Any], source: str, prefix: str) -> Any:
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise InputError(source, f"{prefix}{key}", f"unknown key (known: {', '.join(sorted(known))})")
        f = known[key]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            if not isinstance(value, dict):
                raise InputError(source, f"{prefix}{key}", "expected a mapping")
            value = _build(type(default), value, source, f"{prefix}{key}.")
        else:
            value = _coerce(value, default, f.type, source, f"{prefix}{key}")
        kwargs[key] = value
    return cls(**kwargs)


def _coerce(value: Any, default: Any, type_str: Any, source: str, name: str) -> Any:
    t = str(type_str)
    if value is None:
        if "None" in t:
            return None
        raise InputError(source, name, "may not be null")
    if isinstance(default, bool) or t == "bool":
        if not isinstance(value, bool):
            raise InputError(source, name, f"expected true or false, got {value!r}")
        return value
    if t.startswith("int") and not isinstance(value, bool):
        if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
            return int(value)
        raise InputError(source, name, f"expected an integer, got {value!r}")
    if t.startswith("float"):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise InputError(source, name, f"expected a number, got {value!r}")
    if t.startswith("str"):
        if not isinstance(value, str):
            raise InputError(source, name, f"expected a string, got {value!r}")
        return value
    if t.startswith("list"):
        if not isinstance(value, list):
            raise InputError(source, name, f"expected a list, got {value!r}")
        return [float(v) for v in value]
    if t.startswith("dict"):
        if not isinstance(value, dict):
            raise InputError(source, name, f"expected a mapping, got {value!r}")
        return value
    return value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["train.max_iter=10", "model.arch=small"]`` -> nested dict of YAML-parsed values."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise InputError("(command line)", item, "overrides look like section.key=value")
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def load_config(path: str | os.PathLike[str] | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML preset (following ``_base_``), apply overrides, and validate every key."""
    raw = _read_yaml(Path(path)) if path else {}
    if overrides:
        raw = _merge(raw, parse_overrides(overrides))
    cfg = _build(Config, raw, str(path or "(defaults)"), "")
    validate_config(cfg, str(path or "(defaults)"))
    return cfg


def config_from_dict(raw: dict[str, Any], source: str = "<config>") -> Config:
    """Rebuild a :class:`Config` from :meth:`Config.to_dict` output (as stored in a run directory)."""
    cfg = _build(Config, raw, source, "")
    validate_config(cfg, source)
    return cfg


def validate_config(cfg: Config, source: str) -> None:
    choices = {
        "model.arch": (cfg.model.arch, ("resnet50_fpn", "small")),
        "model.norm": (cfg.model.norm, ("frozen_bn", "bn", "gn")),
        "train.loss": (cfg.train.loss, ("ce", "lr", "focal", "cm")),
        "train.sampler": (cfg.train.sampler, ("random", "repeat_factor")),
        "train.repeat_rounding": (cfg.train.repeat_rounding, ("stochastic", "ceil")),
        "train.optimizer": (cfg.train.optimizer, ("sgd", "adamw")),
        "calibration.head": (cfg.calibration.head, ("3fc_ft", "2fc_rand", "3fc_rand", "ncm")),
        "calibration.layers": (cfg.calibration.layers, ("all3", "last2", "last1")),
        "calibration.loss": (cfg.calibration.loss, ("ce", "lr", "focal", "cm")),
        "calibration.sampler": (cfg.calibration.sampler, ("bilevel", "random", "repeat_factor")),
    }
    for name, (value, allowed) in choices.items():
        if value not in allowed:
            raise InputError(source, name, f"expected one of {', '.join(allowed)}, got {value!r}")
    positive = {
        "train.batch_size": cfg.train.batch_size,
        "train.base_lr": cfg.train.base_lr,
        "train.checkpoint_period": cfg.train.checkpoint_period,
        "model.min_size": cfg.model.min_size,
        "model.detections_per_img": cfg.model.detections_per_img,
        "calibration.steps": cfg.calibration.steps,
        "calibration.classes_per_batch": cfg.calibration.classes_per_batch,
        "calibration.lr": cfg.calibration.lr,
        "calibration.miss_batch": cfg.calibration.miss_batch,
    }
    for name, value in positive.items():
        if not value > 0:
            raise InputError(source, name, f"must be positive, got {value!r}")
    non_negative = {
        "train.momentum": cfg.train.momentum,
        "train.weight_decay": cfg.train.weight_decay,
        "calibration.momentum": cfg.calibration.momentum,
        "calibration.weight_decay": cfg.calibration.weight_decay,
    }
    for name, value in non_negative.items():
        if not value >= 0:
            raise InputError(source, name, f"must be >= 0, got {value!r}")
    if cfg.train.max_iter is not None and cfg.train.max_iter < 1:
        raise InputError(source, "train.max_iter", "must be positive")


def save_config(cfg: Config, path: str | os.PathLike[str]) -> None:
    """Write the resolved config as YAML (atomic)."""
    from simcal.io import atomic_open

    with atomic_open(path, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
