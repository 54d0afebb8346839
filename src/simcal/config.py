"""Typed configuration: dataclasses, YAML presets with ``_base_`` inheritance, ``key=value`` overrides.

A preset is a short YAML diff over a base (mmdetection's habit, without its registries)::

    _base_: lvis_v0.5_r50_fpn.yaml
    train:
      loss: focal

Overrides on the command line use dotted keys: ``train.max_iter=200 model.class_agnostic=true``.
Values are parsed as YAML (``true``, ``[8, 11]``, ``{gamma: 2}``; ``1e-3`` is a number).

Every value is checked (:func:`validate_config`): names against :mod:`simcal.choices`, ranges
(probabilities in [0, 1], counts > 0, learning-rate steps increasing and inside the schedule),
and each loss's keyword arguments. An error names the file that set the value (or
``(command line)`` for an override) and the dotted field, on one line.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Collection
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from simcal import choices
from simcal.errors import InputError
from simcal.io import require_file


@dataclass
class DataConfig:
    """Where the annotations and images are. Relative paths resolve against the config file."""

    train_json: str = ""
    train_images: str = ""
    val_json: str = ""
    val_images: str = ""
    num_workers: int = 2
    # multi-scale training: each training image's short edge drawn uniformly from [lo, hi] (a pair;
    # HTC's [400, 1400]), its long edge at most train_max_size (default model.max_size); test and
    # calibration keep model.min_size / model.max_size
    train_scales: list[int] | None = None
    train_max_size: int | None = None


@dataclass
class ModelConfig:
    """Detector architecture and test-time settings (METHOD.md, LVIS test settings)."""

    arch: str = "resnet50_fpn"  # choices.ARCHS
    roi_heads: str = "standard"  # choices.ROI_HEADS: standard (Mask R-CNN) | cascade (Cascade Mask R-CNN) | htc
    cascade_mean_probs: bool = False  # cascade test score: mean of the stages' probabilities, not logits
    # htc: the mask information flow between the stages' mask heads; false: each alone (mmdetection's Cascade
    # Mask R-CNN, a mask head per stage, test masks their mean)
    mask_flow: bool = True
    class_agnostic: bool = False  # r50-ag: one box regressor and one mask channel for all classes
    # choices.CLASSIFIERS: the classifier's outputs and scores; auto: the one train.loss trains
    # (its choices.LOSSES row: seesaw C+2, eqlv2 / fed sigmoid, bags group softmax; else softmax)
    classifier: str = "auto"
    cls_head: str = "linear"  # choices.CLS_HEADS: linear, or normed (cosine, temperature 20; Seesaw's)
    # a sigmoid classifier's starting class probability p: its fresh bias is -log((1 - p) / p); 0: the layer's
    # own init (bias near 0, p near 0.5: mmdetection's, EQLv2's); unset: train.loss's (its choices.LOSSES row:
    # fed 0.01, CenterNet2 / Detic's PRIOR_PROB; else 0)
    cls_prior_prob: float | None = None
    weights: str | None = None  # torchvision detection weights name (e.g. COCO_V1) or a .pth path
    weights_backbone: str | None = None  # e.g. IMAGENET1K_V1 (the paper's) or a .pth path
    trainable_backbone_layers: int | None = None
    norm: str = "frozen_bn"  # choices.NORMS: frozen_bn (pretrained r50), bn, gn (small / from scratch)
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
    # The home framework's math (simcal.modeling.conventions, docs/import.md), set by `simcal import`;
    # the defaults are torchvision's. Pixel mean / std in 0-255 units, in pixel_format's channel order.
    pixel_format: str = "rgb"  # choices.PIXEL_FORMATS (detectron2's MSRA weights: bgr)
    pixel_mean: list[float] | None = None  # null: torchvision's ImageNet mean
    pixel_std: list[float] | None = None  # null: torchvision's ImageNet std (detectron2's MSRA weights: [1, 1, 1])
    resize: str = "torchvision"  # choices.RESIZES
    stride_in_1x1: bool = False  # ResNet stage strides on the 1x1 conv (MSRA / caffe weights), not the 3x3
    anchors: str = "torchvision"  # choices.ANCHORS
    proposals: str = "torchvision"  # choices.PROPOSAL_RULES
    roi_align: str = "torchvision"  # choices.ROI_ALIGNS
    min_box_size: float = 0.01  # detections narrower or shorter (px) are dropped before NMS; 0 keeps all
    mask_head: str = "standard"  # choices.MASK_HEADS: normed: cosine mask logits, temperature 20 (mmdetection)
    # mmdetection v1's legacy box convention (the SimCal release): widths x2 - x1 + 1 in the box coder and NMS,
    # boxes clipped to size - 1, masks pasted at integer corners (OpenCV resize)
    box_plus_one: bool = False
    # a cascade's box-coder weights per stage; null: (10, 10, 5, 5), (20, 20, 10, 10), (30, 30, 15, 15)
    cascade_box_weights: list[list[float]] | None = None


@dataclass
class TrainConfig:
    """Optimisation. Budgets are iterations (or epochs), never wall-clock time."""

    batch_size: int = 16  # global, over all processes
    base_lr: float = 0.01  # the paper (supp. G), at reference_batch_size; scaled linearly with batch_size
    reference_batch_size: int = 16
    optimizer: str = "sgd"  # choices.OPTIMIZERS
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 500  # mmdetection v1 (the authors' base): 500 iterations from 1/3
    warmup_factor: float = 0.333
    max_iter: int | None = None  # iterations; when None, derived from epochs
    epochs: float = 12.0
    steps: list[float] = field(default_factory=lambda: [8.0, 11.0])  # in the unit of the budget
    gamma: float = 0.1
    loss: str = "ce"  # choices.LOSSES
    loss_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. {gamma: 2} for focal
    sampler: str = "random"  # choices.TRAIN_SAMPLERS
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

    head: str = "3fc_ft"  # choices.CALIBRATED_HEADS
    layers: str = "all3"  # choices.LAYERS (which layers of the head train, Table 10)
    steps: int = 12000
    decay: list[float] = field(default_factory=lambda: [8000 / 12000, 11000 / 12000])  # fractions of steps
    classes_per_batch: int = 16  # bi-level: n classes per step, one image each
    lr: float = 0.01
    momentum: float = 0.9  # the paper's; the released code used 0
    weight_decay: float = 0.0001
    loss: str = "ce"  # choices.LOSSES (decoupled baselines, Table 4)
    loss_kwargs: dict[str, Any] = field(default_factory=dict)
    sampler: str = "bilevel"  # choices.CALIBRATION_SAMPLERS (random, repeat_factor: decoupled baselines)
    stages: str = "all"  # choices.CALIBRATION_STAGES: a cascade's stages calibrated (all, or the last)
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
    """Dual-head inference (Eq. 2): calibrated column for classes with N_z <= T; post-hoc methods."""

    combine: str = "sel"  # choices.COMBINERS
    T: float = 300.0  # training instances
    param: float = 1.0  # gamma of norcal, tau of logit-adj


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: where a value came from when it was not set by a file: an override on the command line
COMMAND_LINE = "(command line)"


class Origins:
    """Which file set each dotted field (``train.loss`` -> ``configs/x.yaml``), for error messages.

    A field nobody set explicitly (a dataclass default) is reported against ``default``.
    """

    def __init__(self, default: str, fields: dict[str, str] | None = None) -> None:
        self.default = default
        self.fields: dict[str, str] = dict(fields or {})

    def set_all(self, raw: dict[str, Any], source: str, prefix: str = "") -> None:
        """Record ``source`` for every leaf of ``raw`` (a nested dict; loss_kwargs is one leaf)."""
        for key, value in raw.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict) and not name.endswith("loss_kwargs"):
                self.set_all(value, source, name + ".")
            else:
                self.fields[name] = source
                parts = name.split(".")  # a leaf under an earlier leaf (train.max_iter.x=3) replaced it
                for above in (".".join(parts[:n]) for n in range(1, len(parts))):
                    if above in self.fields:
                        self.fields[above] = source

    def of(self, name: str) -> str:
        """The source of ``name``, of the nearest enclosing field that has one, or of a field inside it."""
        parts = name.split(".")
        for n in range(len(parts), 0, -1):
            hit = self.fields.get(".".join(parts[:n]))
            if hit is not None:
                return hit
        inner = [source for field, source in self.fields.items() if field.startswith(name + ".")]
        return inner[-1] if inner else self.default


def _merge(base: dict[str, Any], diff: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in diff.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "loss_kwargs" else v
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader, except that a key given twice in one mapping is an error
    (PyYAML keeps the last one silently: a second ``train:`` section would drop the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode):
                if (key.tag, key.value) in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key.value!r} given twice in one mapping", key.start_mark
                    )
                seen.add((key.tag, key.value))
        return super().construct_mapping(node, deep)


def read_yaml(path: Path, missing: str = "no such config file") -> Any:
    """The content of a YAML file; a missing file, bad YAML, text that is not UTF-8 or a key given
    twice is an :class:`InputError` naming the file."""
    require_file(path, missing)
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # a SafeLoader
    except yaml.YAMLError as e:
        raise InputError(path, "(yaml)", " ".join(str(e).split())) from None
    except UnicodeDecodeError:
        raise InputError(path, "(yaml)", "not UTF-8 text") from None


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> tuple[dict[str, Any], Origins]:
    path = path.resolve()
    if path in seen:
        raise InputError(path, "_base_", "circular inheritance")
    raw = read_yaml(path) or {}
    if not isinstance(raw, dict):
        raise InputError(path, "(top level)", "expected a mapping")
    # resolve relative data paths against the file that names them
    data = raw.get("data")
    if isinstance(data, dict):
        for key in ("train_json", "train_images", "val_json", "val_images"):
            v = data.get(key)
            if isinstance(v, str) and v and not os.path.isabs(v) and not v.startswith("${"):
                data[key] = str((path.parent / v).resolve())
    base = raw.pop("_base_", None)
    origins = Origins(str(path))
    if base:
        if not isinstance(base, str):
            raise InputError(path, "_base_", f"expected a file name, got {base!r}")
        parent, origins = _read_yaml(path.parent / base, (*seen, path))
        origins.default = str(path)
        origins.set_all(raw, str(path))
        raw = _merge(parent, raw)
    else:
        origins.set_all(raw, str(path))
    return raw, origins


def _build(cls: type, values: Any, origins: Origins, prefix: str) -> Any:
    if not isinstance(values, dict):
        name = prefix.rstrip(".") or "(top level)"
        raise InputError(origins.of(name), name, f"expected a mapping, got {values!r}")
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key not in known:
            raise InputError(origins.of(name), name, f"unknown key (known: {', '.join(sorted(known))})")
        f = known[key]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            value = _build(type(default), value, origins, f"{name}.")
        else:
            value = _coerce(value, default, f.type, origins.of(name), name)
        kwargs[key] = value
    return cls(**kwargs)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


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
    if t.startswith("int"):
        if _is_number(value) and float(value).is_integer():
            return int(value)
        raise InputError(source, name, f"expected an integer, got {value!r}")
    if t.startswith("float"):
        if _is_number(value) and math.isfinite(value):
            return float(value)
        raise InputError(source, name, f"expected a finite number, got {value!r}")
    if t.startswith("str"):
        if not isinstance(value, str):
            raise InputError(source, name, f"expected a string, got {value!r}")
        return value
    if t.startswith("list[list"):
        rows_ok = isinstance(value, list) and all(
            isinstance(row, list) and all(_is_number(v) and math.isfinite(v) for v in row) for row in value
        )
        if not rows_ok:
            raise InputError(source, name, f"expected a list of lists of numbers, got {value!r}")
        return [[float(v) for v in row] for row in value]
    if t.startswith("list"):
        if not isinstance(value, list) or not all(_is_number(v) and math.isfinite(v) for v in value):
            raise InputError(source, name, f"expected a list of numbers, got {value!r}")
        return [float(v) for v in value]
    if t.startswith("dict"):
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise InputError(source, name, f"expected a mapping of names to values, got {value!r}")
        return dict(value)
    return value


def parse_overrides(items: list[str], allowed: tuple[str, ...] | None = None) -> dict[str, Any]:
    """``["train.max_iter=10", "model.arch=small"]`` -> nested dict of YAML-parsed values.

    ``allowed``: dotted prefixes a key must start with (``("calibration.",)``); ``None``: any.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) < 2 or not all(parts):
            raise InputError(COMMAND_LINE, item, "overrides look like section.key=value")
        key = ".".join(parts)
        if allowed is not None and not any(key == a.rstrip(".") or key.startswith(a) for a in allowed):
            raise InputError(COMMAND_LINE, key, f"cannot be overridden here (accepted: {', '.join(allowed)})")
        value = parse_value(text)
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise InputError(COMMAND_LINE, key, "conflicts with another override")
        if parts[-1] in node and node[parts[-1]] != value:
            raise InputError(COMMAND_LINE, key, f"given twice, as {node[parts[-1]]!r} and {value!r}")
        node[parts[-1]] = value
    return out


def parse_value(text: str) -> Any:
    """An override's value: YAML (``true``, ``[8, 11]``, ``{gamma: 2}``), with ``1e-3`` a number
    (YAML 1.1 reads exponents without a dot as text)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        return number if math.isfinite(number) else value
    return value


def load_config(path: str | os.PathLike[str] | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML preset (following ``_base_``), apply overrides, and validate every key."""
    if path:
        raw, origins = _read_yaml(Path(path))
    else:
        raw, origins = {}, Origins("(defaults)")
    if overrides:
        diff = parse_overrides(overrides)
        raw = _merge(raw, diff)
        origins.set_all(diff, COMMAND_LINE)
    raw = _implied(raw, raw)
    cfg = _build(Config, raw, origins, "")
    validate_config(cfg, origins)
    return cfg


def config_from_dict(raw: dict[str, Any], source: str = "<config>", stored: bool = True) -> Config:
    """Rebuild a :class:`Config` from :meth:`Config.to_dict` output (as stored in a run directory).

    ``stored``: the config of an existing run. Its names, types and ranges are checked, but not
    the rules that only shape a new run (:data:`NEW_RUN_RULES`): a run trained before they
    existed keeps loading, and resumes with the schedule it started with.
    """
    origins = Origins(source)
    cfg = _build(Config, raw, origins, "")
    validate_config(cfg, origins, stored=stored)
    return cfg


def apply_overrides(
    cfg: Config, overrides: list[str], source: str, allowed: tuple[str, ...] | None = None, stored: bool = False
) -> Config:
    """A copy of ``cfg`` (read from ``source``) with ``section.key=value`` overrides, validated.

    ``allowed`` restricts the keys (``("calibration.",)`` for ``simcal calibrate``); ``stored``:
    ``cfg`` is an existing run's config (see :func:`config_from_dict`).
    """
    diff = parse_overrides(list(overrides), allowed)
    origins = Origins(source)
    origins.set_all(diff, COMMAND_LINE)
    out = _build(Config, _implied(_merge(cfg.to_dict(), diff), diff), origins, "")
    validate_config(out, origins, stored=stored)
    return out


def _implied(raw: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """``raw`` with the settings a choice implies, where ``given`` (what the user wrote: files and
    overrides) leaves them open, saying so: a calibration loss whose authors trained only some
    layers (:attr:`simcal.choices.LossSpec.calibration_layers`: ``bags`` -> ``last1``) sets
    ``calibration.layers``. A setting the user gave is kept (and refused by the checks if it cannot work)."""
    cal, wrote = raw.get("calibration"), given.get("calibration")
    if not isinstance(cal, dict) or not isinstance(wrote, dict) or "loss" not in wrote or "layers" in wrote:
        return raw
    spec = choices.LOSSES.get(cal.get("loss"))  # type: ignore[arg-type]
    if spec is None or spec.calibration_layers is None or cal.get("layers") == spec.calibration_layers:
        return raw
    if os.environ.get("RANK", "0") == "0":
        print(
            f"calibration.loss={cal['loss']} trains calibration.layers={spec.calibration_layers}, as its authors did "
            "(set calibration.layers to choose)"
        )
    return {**raw, "calibration": {**cal, "layers": spec.calibration_layers}}


# --------------------------------------------------------------------------- validation
def _checks(cfg: Config) -> list[tuple[str, bool, str]]:
    """Every rule as ``(field, holds, what it must be)``."""
    m, t, c, i, d = cfg.model, cfg.train, cfg.calibration, cfg.inference, cfg.data
    positive = "must be > 0"
    probability = "must lie in [0, 1]"

    def increasing(xs: list[float]) -> bool:
        return all(a < b for a, b in zip(xs, xs[1:]))

    budget, unit = (t.max_iter, "train.max_iter") if t.max_iter is not None else (t.epochs, "train.epochs")
    return [
        ("data.num_workers", d.num_workers >= 0, "must be >= 0"),
        (
            "data.train_scales",
            d.train_scales is None
            or (
                len(d.train_scales) == 2
                and all(isinstance(v, (int, float)) and float(v).is_integer() and v > 0 for v in d.train_scales)
                and d.train_scales[0] <= d.train_scales[1]
            ),
            "must be [lo, hi], whole pixels with 0 < lo <= hi (or null)",
        ),
        ("data.train_max_size", d.train_max_size is None or d.train_max_size > 0, "must be > 0 (or null)"),
        (
            "model.trainable_backbone_layers",
            m.trainable_backbone_layers in (None, 0, 1, 2, 3, 4, 5),
            "must lie in 0..5 (or null)",
        ),
        ("model.min_size", m.min_size > 0, positive),
        ("model.max_size", m.max_size >= m.min_size, f"must be >= model.min_size ({m.min_size})"),
        ("model.rpn_pre_nms_top_n_train", m.rpn_pre_nms_top_n_train > 0, positive),
        ("model.rpn_post_nms_top_n_train", m.rpn_post_nms_top_n_train > 0, positive),
        ("model.rpn_pre_nms_top_n_test", m.rpn_pre_nms_top_n_test > 0, positive),
        ("model.rpn_post_nms_top_n_test", m.rpn_post_nms_top_n_test > 0, positive),
        ("model.rpn_batch_size_per_image", m.rpn_batch_size_per_image > 0, positive),
        ("model.box_batch_size_per_image", m.box_batch_size_per_image > 0, positive),
        ("model.box_positive_fraction", 0 < m.box_positive_fraction <= 1, "must lie in (0, 1]"),
        ("model.score_thresh", 0 <= m.score_thresh <= 1, probability),
        ("model.nms_thresh", 0 <= m.nms_thresh <= 1, probability),
        ("model.detections_per_img", m.detections_per_img > 0, positive),
        ("model.pixel_mean", m.pixel_mean is None or len(m.pixel_mean) == 3, "must be 3 numbers (or null)"),
        (
            "model.pixel_std",
            m.pixel_std is None or (len(m.pixel_std) == 3 and all(v > 0 for v in m.pixel_std)),
            "must be 3 numbers > 0 (or null)",
        ),
        ("model.min_box_size", m.min_box_size >= 0, "must be >= 0 (0: no detection is too small)"),
        (
            "model.cascade_box_weights",
            m.cascade_box_weights is None
            or (len(m.cascade_box_weights) == 3 and all(len(r) == 4 and min(r) > 0 for r in m.cascade_box_weights)),
            "must be one row of 4 numbers > 0 per stage, 3 stages (or null)",
        ),
        ("train.batch_size", t.batch_size > 0, positive),
        ("train.base_lr", t.base_lr > 0, positive),
        ("train.reference_batch_size", t.reference_batch_size > 0, positive),
        ("train.momentum", t.momentum >= 0, "must be >= 0"),
        ("train.momentum", t.momentum <= 1, "must be <= 1"),
        ("train.weight_decay", t.weight_decay >= 0, "must be >= 0"),
        ("train.warmup_iters", t.warmup_iters >= 0, "must be >= 0"),
        ("train.warmup_factor", 0 < t.warmup_factor <= 1, "must lie in (0, 1]"),
        ("train.max_iter", t.max_iter is None or t.max_iter > 0, positive),
        ("train.epochs", t.epochs > 0, positive),
        ("train.steps", increasing(t.steps), "must be strictly increasing"),
        (
            "train.steps",
            all(0 < s < budget for s in t.steps),
            f"must lie inside the schedule, 0 < step < {budget:g} ({unit})",  # a NEW_RUN_RULES rule
        ),
        ("train.gamma", 0 < t.gamma <= 1, "must lie in (0, 1]"),
        ("train.repeat_threshold", 0 < t.repeat_threshold <= 1, "must lie in (0, 1]"),
        ("train.flip_prob", 0 <= t.flip_prob <= 1, probability),
        ("train.checkpoint_period", t.checkpoint_period > 0, positive),
        ("train.log_period", t.log_period > 0, positive),
        ("train.seed", t.seed >= 0, "must be >= 0"),
        ("train.threads", t.threads >= 0, "must be >= 0 (0: torch's default)"),
        ("calibration.steps", c.steps > 0, positive),
        ("calibration.decay", increasing(c.decay), "must be strictly increasing"),
        (
            "calibration.decay",
            all(0 < f < 1 for f in c.decay),
            "must be fractions of calibration.steps, each in (0, 1)",
        ),
        ("calibration.classes_per_batch", c.classes_per_batch > 0, positive),
        ("calibration.lr", c.lr > 0, positive),
        ("calibration.momentum", c.momentum >= 0, "must be >= 0"),
        ("calibration.momentum", c.momentum <= 1, "must be <= 1"),
        ("calibration.weight_decay", c.weight_decay >= 0, "must be >= 0"),
        ("calibration.flip_prob", 0 <= c.flip_prob <= 1, probability),
        ("calibration.cache_mb", c.cache_mb >= 0, "must be >= 0 (0: no cache)"),
        ("calibration.miss_batch", c.miss_batch > 0, positive),
        ("calibration.checkpoint_period", c.checkpoint_period > 0, positive),
        ("calibration.log_period", c.log_period > 0, positive),
        ("calibration.seed", c.seed >= 0, "must be >= 0"),
        (
            "model.classifier",
            t.loss == "ce" or m.classifier in ("auto", _loss(t.loss).classifier),
            f"train.loss={t.loss} trains a {_loss(t.loss).classifier} classifier",
        ),
        (
            "model.cls_prior_prob",
            m.cls_prior_prob is None or 0 <= m.cls_prior_prob < 1,
            "must lie in [0, 1) (0: the layer's own init)",
        ),
        (
            "model.cls_prior_prob",
            not m.cls_prior_prob or classifier_of(cfg) == "sigmoid",
            "sets a sigmoid classifier's starting bias: needs train.loss="
            + "|".join(k for k, spec in choices.LOSSES.items() if spec.classifier == "sigmoid")
            + " or model.classifier=sigmoid",
        ),
        (
            "calibration.loss",
            _loss(c.loss).calibration_layers in (None, c.layers),
            f"{c.loss} trains calibration.layers={_loss(c.loss).calibration_layers} only, as its authors did "
            f"(--layers {_loss(c.loss).calibration_layers})",
        ),
        ("inference.T", i.T >= 0, "must be >= 0 (training instances)"),
        ("inference.param", i.param >= 0, "must be >= 0"),
    ]


#: upper bounds of the numbers that have a tighter one than :data:`simcal.choices.MAX_COUNT` (integers) or
#: :data:`simcal.choices.MAX_FLOAT` (reals): what memory and the machine's integer types can hold
UPPER_BOUNDS: dict[str, float] = {
    "train.seed": choices.MAX_SEED,
    "calibration.seed": choices.MAX_SEED,
    "calibration.steps": choices.MAX_STEPS,
    "calibration.classes_per_batch": 4096,
    "calibration.miss_batch": 4096,
    "calibration.cache_mb": 10**8,
    "train.batch_size": choices.MAX_BATCH,
    "train.reference_batch_size": choices.MAX_BATCH,
    "train.threads": choices.MAX_THREADS,
    "data.num_workers": choices.MAX_WORKERS,
    "model.min_size": choices.MAX_IMAGE_SIDE,
    "model.max_size": choices.MAX_IMAGE_SIDE,
    "data.train_max_size": choices.MAX_IMAGE_SIDE,
    "data.train_scales": choices.MAX_IMAGE_SIDE,
    "model.rpn_pre_nms_top_n_train": 10**6,
    "model.rpn_post_nms_top_n_train": 10**6,
    "model.rpn_pre_nms_top_n_test": 10**6,
    "model.rpn_post_nms_top_n_test": 10**6,
    "model.rpn_batch_size_per_image": 10**6,
    "model.box_batch_size_per_image": 10**6,
    "model.detections_per_img": 10**6,
    "train.base_lr": 1e6,
    "calibration.lr": 1e6,
    "train.epochs": 10**6,
}


def _bounds(cfg: Config) -> tuple[str, float, Any] | None:
    """The first number of ``cfg`` above its bound: ``(field, bound, value)``, else None."""
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        for f in dataclasses.fields(values):
            name, value = f"{section.name}.{f.name}", getattr(values, f.name)
            numbers = list(value.values()) if isinstance(value, dict) else value if isinstance(value, list) else [value]
            flat = [x for v in numbers for x in (v if isinstance(v, list) else [v])]
            for x in flat:
                if isinstance(x, bool) or not isinstance(x, (int, float)):
                    continue
                bound = UPPER_BOUNDS.get(name, choices.MAX_COUNT if isinstance(x, int) else choices.MAX_FLOAT)
                if abs(x) > bound:
                    return name, bound, value
    return None


#: rules a run's stored config is not held to (they shape a new run; an older run may predate them)
NEW_RUN_RULES = ("must lie inside the schedule",)

#: ``field -> (value getter, allowed names)``: every choice of the config, read from :mod:`simcal.choices`
_CHOICES: dict[str, tuple[Any, Collection[str]]] = {
    "model.arch": (lambda cfg: cfg.model.arch, choices.ARCHS),
    "model.roi_heads": (lambda cfg: cfg.model.roi_heads, choices.ROI_HEADS),
    "model.norm": (lambda cfg: cfg.model.norm, choices.NORMS),
    "model.pixel_format": (lambda cfg: cfg.model.pixel_format, choices.PIXEL_FORMATS),
    "model.resize": (lambda cfg: cfg.model.resize, choices.RESIZES),
    "model.anchors": (lambda cfg: cfg.model.anchors, choices.ANCHORS),
    "model.proposals": (lambda cfg: cfg.model.proposals, choices.PROPOSAL_RULES),
    "model.roi_align": (lambda cfg: cfg.model.roi_align, choices.ROI_ALIGNS),
    "model.mask_head": (lambda cfg: cfg.model.mask_head, choices.MASK_HEADS),
    "model.classifier": (lambda cfg: cfg.model.classifier, choices.CLASSIFIERS),
    "model.cls_head": (lambda cfg: cfg.model.cls_head, choices.CLS_HEADS),
    "train.optimizer": (lambda cfg: cfg.train.optimizer, choices.OPTIMIZERS),
    "train.loss": (lambda cfg: cfg.train.loss, choices.LOSSES),
    "train.sampler": (lambda cfg: cfg.train.sampler, choices.TRAIN_SAMPLERS),
    "train.repeat_rounding": (lambda cfg: cfg.train.repeat_rounding, choices.REPEAT_ROUNDING),
    "calibration.head": (lambda cfg: cfg.calibration.head, choices.CALIBRATED_HEADS),
    "calibration.layers": (lambda cfg: cfg.calibration.layers, choices.LAYERS),
    "calibration.loss": (lambda cfg: cfg.calibration.loss, choices.LOSSES),
    "calibration.sampler": (lambda cfg: cfg.calibration.sampler, choices.CALIBRATION_SAMPLERS),
    "calibration.stages": (lambda cfg: cfg.calibration.stages, choices.CALIBRATION_STAGES),
    "inference.combine": (lambda cfg: cfg.inference.combine, choices.COMBINERS),
}


def classifier_of(cfg: Config) -> str:
    """The run's classifier (:data:`simcal.choices.CLASSIFIERS` but ``auto``): ``model.classifier``,
    or for ``auto`` the one ``train.loss`` trains (its :data:`simcal.choices.LOSSES` row)."""
    if cfg.model.classifier != "auto":
        return cfg.model.classifier
    return _loss(cfg.train.loss).classifier


def prior_prob_of(cfg: Config) -> float:
    """The starting class probability of the run's sigmoid classifier: ``model.cls_prior_prob``, or unset
    the one ``train.loss``'s reference code uses (its :data:`simcal.choices.LOSSES` row); 0: the layer's init."""
    if cfg.model.cls_prior_prob is not None:
        return cfg.model.cls_prior_prob
    return _loss(cfg.train.loss).prior_prob or 0.0  # a loss with one trains a sigmoid classifier (_checks)


def _loss(name: str) -> choices.LossSpec:
    """``name``'s row of :data:`simcal.choices.LOSSES`; an unknown name (refused by the choice check,
    which runs first) reads as plain ``ce``."""
    return choices.LOSSES.get(name) or choices.LOSSES["ce"]


def validate_config(cfg: Config, source: str | Origins, stored: bool = False) -> None:
    """Check every value of ``cfg``; the first violation is an :class:`InputError` naming the field.

    ``source``: the file the config came from, or :class:`Origins` naming the file of each field.
    ``stored``: a run's own config (:func:`config_from_dict`): :data:`NEW_RUN_RULES` are skipped.
    """
    origins = source if isinstance(source, Origins) else Origins(source)
    for name, (get, allowed) in _CHOICES.items():
        value = get(cfg)
        if value not in allowed:
            raise InputError(origins.of(name), name, f"expected one of {', '.join(allowed)}, got {value!r}")
    for section in ("train", "calibration"):
        sec = getattr(cfg, section)
        problem = choices.check_loss_kwargs(sec.loss, sec.loss_kwargs)
        if problem is not None:
            key, message = problem
            name = f"{section}.loss_kwargs"
            raise InputError(origins.of(name), f"{name}.{key}", message)
    above = _bounds(cfg)
    if above is not None:
        name, bound, value = above
        shown = f"{int(bound)}" if float(bound).is_integer() and bound < 1e12 else f"{bound:g}"
        raise InputError(
            origins.of(name), name, f"must be <= {shown} (what memory and the machine's numbers hold), got {value!r}"
        )
    for name, holds, message in _checks(cfg):
        if stored and message.startswith(NEW_RUN_RULES):
            continue
        if not holds:
            section, key = name.split(".")
            raise InputError(origins.of(name), name, f"{message}, got {getattr(getattr(cfg, section), key)!r}")


def config_differences(new: Config, old: Config) -> list[tuple[str, Any, Any]]:
    """Every dotted field where ``new`` differs from ``old``: ``[(field, new value, old value), ...]``."""

    def walk(a: dict[str, Any], b: dict[str, Any], prefix: str) -> list[tuple[str, Any, Any]]:
        out = []
        for key in a:
            x, y = a[key], b.get(key)
            name = f"{prefix}{key}"
            if isinstance(x, dict) and isinstance(y, dict) and not name.endswith("loss_kwargs"):
                out += walk(x, y, name + ".")
            elif x != y:
                out.append((name, x, y))
        return out

    return walk(new.to_dict(), old.to_dict(), "")


#: what a resumed training run may change: bookkeeping, the settings of later stages, and the
#: test-time settings; everything else shapes the iterations already done
RESUME_SAFE = (
    "train.checkpoint_period",
    "train.log_period",
    "train.threads",
    "data.num_workers",
    "model.score_thresh",
    "model.nms_thresh",
    "model.detections_per_img",
    "model.rpn_pre_nms_top_n_test",
    "model.rpn_post_nms_top_n_test",
    "model.min_box_size",
    "calibration.",
    "inference.",
)
#: budgets a resumed run may extend (never shorten): the steps of the schedule stay where they were
RESUME_LONGER = ("train.max_iter", "train.epochs")


def resume_conflicts(new: Config, old: Config) -> tuple[list[tuple[str, Any, Any]], list[tuple[str, Any, Any]]]:
    """``(allowed, refused)``: the differences of a resumed run's config ``new`` from its stored ``old``.

    Allowed: :data:`RESUME_SAFE` fields, and a longer budget (:data:`RESUME_LONGER`: a larger
    ``max_iter``, or more ``epochs`` when the budget is in epochs). Refused: everything else.
    """
    allowed, refused = [], []
    for name, x, y in config_differences(new, old):
        longer = (
            name in RESUME_LONGER
            and _is_number(x)
            and _is_number(y)
            and x > y
            and (name == "train.max_iter" or (new.train.max_iter is None and old.train.max_iter is None))
        )
        safe = any(name == k or (k.endswith(".") and name.startswith(k)) for k in RESUME_SAFE)
        (allowed if safe or longer else refused).append((name, x, y))
    return allowed, refused


def save_config(cfg: Config, path: str | os.PathLike[str]) -> None:
    """Write the resolved config as YAML (atomic)."""
    from simcal.io import atomic_open

    with atomic_open(path, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
