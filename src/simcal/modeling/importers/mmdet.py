"""mmdetection 2+ checkpoints (``epoch_*.pth`` / ``latest.pth`` of a run, its model zoo's files).

The rules are mmdetection's own, read from its source (``mmdet/models``: ``backbones/resnet.py``,
``necks/fpn.py``, ``dense_heads/rpn_head.py``, ``roi_heads/bbox_heads/bbox_head.py`` and
``convfc_bbox_head.py``, ``roi_heads/mask_heads/fcn_mask_head.py``, ``roi_heads/cascade_roi_head.py``,
``roi_extractors/single_level_roi_extractor.py``, ``utils/normed_predictor.py``,
``losses/seesaw_loss.py``; ``core/anchor/anchor_generator.py``; mmcv's ``imrescale``); docs/import.md
has the table:

- names: ``backbone.*`` (torchvision's ResNet names) -> ``backbone.body.*``, the FPN's
  ``neck.lateral_convs`` / ``fpn_convs.{i}.conv`` -> ``fpn.inner_blocks`` / ``layer_blocks.{i}.0``,
  ``rpn_head.rpn_conv`` / ``rpn_cls`` / ``rpn_reg``, the box head's ``shared_fcs.{0,1}`` / ``fc_cls``
  / ``fc_reg``, the mask head's ``convs.{i}.conv`` / ``upsample`` / ``conv_logits``; a cascade's
  stage k heads (``bbox_head.{k}``, ``mask_head.{k}``) -> stage 1's keys and
  ``extra_heads`` / ``extra_predictors`` / ``extra_mask_heads`` / ``extra_mask_predictors.{k-1}``;
- layout: softmax class rows background last -> first; a sigmoid classifier's C rows and Seesaw's
  C + 2 (classes, then objectness (object, background), simcal's own layout) as they are;
  class-specific box deltas 4C and mask channels C get the background's zeros in front;
- the math: RGB or BGR (``to_rgb``) with the config's mean and std, the stride on the 3x3
  (``style='pytorch'``) or the 1x1 (``'caffe'``), mmcv's resize, exact anchors, the RPN ranking
  and suppressing on sigmoid scores, aligned RoIAlign with mmdetection's level mapping, no
  small-box removal, frozen BN, normalised class-score and mask layers (Seesaw's
  ``NormedLinear`` / ``NormedConv2d``), a cascade's mean of logits and its stages' box-coder
  weights (1 / ``target_stds``), its per-stage mask heads averaged.

The config comes from ``--framework-config`` (an mmdetection Python config, read without running
it: :func:`read_config`), else from the one mmdetection stores in the checkpoint (``meta.config``),
else from the model zoo's defaults (printed).
"""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path
from typing import Any

from torch import Tensor

from simcal import choices
from simcal.errors import InputError
from simcal.modeling.importers import RESNET_DEPTHS, Imported, class_layout, renamed, shape_error, stage_prefix

# --------------------------------------------------------------------------- the config, without running it


class _Unsafe(Exception):
    """A construct the config reader does not evaluate (it would run code)."""


def _evaluate(node: ast.AST, names: dict[str, Any]) -> Any:
    """The value of a config expression: literals, lists, tuples, dicts, ``dict(...)`` calls (with
    ``**other``), names assigned before, ``name[key]``, unary minus and +, -, *, / on numbers (and
    ``list * n``). Anything else would run code: :class:`_Unsafe`."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        items = [_evaluate(e, names) for e in node.elts]
        return items if isinstance(node, ast.List) else tuple(items)
    if isinstance(node, ast.Dict):
        out: dict[Any, Any] = {}
        for k, v in zip(node.keys, node.values):
            if k is None:  # {**other}
                out.update(_evaluate(v, names))
            else:
                out[_evaluate(k, names)] = _evaluate(v, names)
        return out
    if isinstance(node, ast.Name):
        if node.id in names:
            return names[node.id]
        raise _Unsafe(f"the name {node.id!r} (not assigned before)")
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" and not node.args:
        out = {}
        for kw in node.keywords:
            if kw.arg is None:
                out.update(_evaluate(kw.value, names))
            else:
                out[kw.arg] = _evaluate(kw.value, names)
        return out
    if isinstance(node, ast.Subscript):
        return _evaluate(node.value, names)[_evaluate(node.slice, names)]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _evaluate(node.operand, names)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
        a, b = _evaluate(node.left, names), _evaluate(node.right, names)
        ops = {ast.Add: lambda: a + b, ast.Sub: lambda: a - b, ast.Mult: lambda: a * b, ast.Div: lambda: a / b}
        return ops[type(node.op)]()
    raise _Unsafe(f"a {type(node).__name__} expression at line {getattr(node, 'lineno', '?')}")


#: the config's names that must be read (the model and its test pipeline): one that would run code is an
#: error; any other (``gpu_ids = range(8)``, a hook's settings) is skipped and said so
NEEDED = frozenset({"_base_", "model", "test_cfg", "train_cfg", "test_pipeline", "data", "img_norm_cfg"})
#: where :func:`parse_config` lists the lines it skipped
SKIPPED = "__skipped__"


def _merge(base: dict[str, Any], diff: dict[str, Any]) -> dict[str, Any]:
    """mmcv's config merge: dicts merge recursively unless the child says ``_delete_=True``."""
    out = dict(base)
    for k, v in diff.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and not v.get("_delete_", False):
            out[k] = _merge(out[k], v)
        else:
            out[k] = {kk: vv for kk, vv in v.items() if kk != "_delete_"} if isinstance(v, dict) else v
    return out


def parse_config(text: str, source: str, base_dir: Path | None = None, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """An mmdetection Python config as a dict, its ``_base_`` files merged first (mmcv's rules),
    without running it: each top-level ``name = expression`` is evaluated by :func:`_evaluate`.
    A statement that would run code (an import, a function call other than ``dict``) is an
    :class:`InputError` naming the file and the line."""
    try:
        tree = ast.parse(text)
    except SyntaxError as e:
        raise InputError(source, f"line {e.lineno}", f"not a Python config: {e.msg}") from None
    names: dict[str, Any] = {}
    skipped: list[str] = []
    for stmt in tree.body:
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
            continue  # a docstring
        targets = (
            stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target] if isinstance(stmt, ast.AnnAssign) else None
        )
        if not targets or not all(isinstance(t, ast.Name) for t in targets) or stmt.value is None:
            raise InputError(
                source, f"line {stmt.lineno}", "only `name = value` lines are read (the config is not run)"
            )
        ids = [t.id for t in targets]  # type: ignore[union-attr]
        try:
            value = _evaluate(stmt.value, names)
        except (_Unsafe, KeyError, TypeError, ZeroDivisionError, IndexError) as e:
            why = str(e) if isinstance(e, _Unsafe) else f"{type(e).__name__}: {e}"
            if not NEEDED.intersection(ids):  # gpu_ids = range(8), a hook's settings: not the model's
                skipped.append(f"{', '.join(ids)} (line {stmt.lineno})")
                continue
            raise InputError(source, f"line {stmt.lineno}", f"not read without running the config: {why}") from None
        for name in ids:
            names[name] = value
    base = names.pop("_base_", None)
    merged: dict[str, Any] = {}
    for b in [base] if isinstance(base, str) else list(base or []):
        if base_dir is None or not isinstance(b, str):
            raise InputError(source, "_base_", f"cannot follow {b!r} from here")
        merged = _merge(merged, read_config(base_dir / b, seen))
    out = _merge(merged, names)
    if skipped:
        out[SKIPPED] = [*merged.get(SKIPPED, []), *(f"{s} of {source}" for s in skipped)]
    return out


def read_config(path: str | os.PathLike[str], seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """:func:`parse_config` of a file (``_base_`` paths relative to it)."""
    path = Path(path).resolve()
    if path in seen:
        raise InputError(path, "_base_", "circular inheritance")
    if not path.is_file():
        raise InputError(path, "(config)", "no such mmdetection config file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(path, "(config)", "not UTF-8 text") from None
    return parse_config(text, str(path), path.parent, (*seen, path))


def _get(cfg: dict[str, Any], dotted: str, default: Any = None) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def _pipeline_steps(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """The test pipeline's steps, ``MultiScaleFlipAug``'s inner transforms included."""
    pipeline = _get(cfg, "data.test.pipeline") or cfg.get("test_pipeline") or []
    steps: list[dict[str, Any]] = []
    for step in pipeline:
        if isinstance(step, dict):
            steps.append(step)
            steps += [t for t in step.get("transforms", []) if isinstance(t, dict)]
    return steps


# --------------------------------------------------------------------------- names

RENAMES: list[tuple[re.Pattern[str], Any]] = [
    (
        re.compile(
            r"^backbone\.(conv1\.weight|bn1\.\w+|layer[1-4]\.\d+\.(?:conv[1-3]\.weight|bn[1-3]\.\w+|downsample\.[01]\.\w+))$"
        ),
        lambda m: f"backbone.body.{m[1]}",
    ),
    (
        re.compile(r"^neck\.lateral_convs\.([0-3])\.conv\.(weight|bias)$"),
        lambda m: f"backbone.fpn.inner_blocks.{m[1]}.0.{m[2]}",
    ),
    (
        re.compile(r"^neck\.fpn_convs\.([0-3])\.conv\.(weight|bias)$"),
        lambda m: f"backbone.fpn.layer_blocks.{m[1]}.0.{m[2]}",
    ),
    (re.compile(r"^rpn_head\.rpn_conv\.(weight|bias)$"), lambda m: f"rpn.head.conv.0.0.{m[1]}"),
    (re.compile(r"^rpn_head\.rpn_cls\.(weight|bias)$"), lambda m: f"rpn.head.cls_logits.{m[1]}"),
    (re.compile(r"^rpn_head\.rpn_reg\.(weight|bias)$"), lambda m: f"rpn.head.bbox_pred.{m[1]}"),
    (
        re.compile(r"^roi_head\.bbox_head\.(?:(\d+)\.)?shared_fcs\.([01])\.(weight|bias)$"),
        lambda m: f"{stage_prefix(m[1], 'roi_heads.box_head', 'roi_heads.extra_heads')}.fc{int(m[2]) + 6}.{m[3]}",
    ),
    (
        re.compile(r"^roi_head\.bbox_head\.(?:(\d+)\.)?fc_(cls|reg)\.(weight|bias)$"),
        lambda m: (
            f"{stage_prefix(m[1], 'roi_heads.box_predictor', 'roi_heads.extra_predictors')}."
            f"{'cls_score' if m[2] == 'cls' else 'bbox_pred'}.{m[3]}"
        ),
    ),
    (
        re.compile(r"^roi_head\.mask_head\.(?:(\d+)\.)?convs\.([0-3])\.conv\.(weight|bias)$"),
        lambda m: f"{stage_prefix(m[1], 'roi_heads.mask_head', 'roi_heads.extra_mask_heads')}.{m[2]}.0.{m[3]}",
    ),
    (
        re.compile(r"^roi_head\.mask_head\.(?:(\d+)\.)?upsample\.(weight|bias)$"),
        lambda m: (
            f"{stage_prefix(m[1], 'roi_heads.mask_predictor', 'roi_heads.extra_mask_predictors')}.conv5_mask.{m[2]}"
        ),
    ),
    (
        re.compile(r"^roi_head\.mask_head\.(?:(\d+)\.)?conv_logits\.(weight|bias)$"),
        lambda m: (
            stage_prefix(m[1], "roi_heads.mask_predictor", "roi_heads.extra_mask_predictors")
            + f".mask_fcn_logits.{m[2]}"
        ),
    ),
]
IGNORED = re.compile(r"\.num_batches_tracked$")


def rename(key: str) -> str | None:
    """The simcal key of an mmdetection key; None for a key of no layout known here."""
    for pattern, to in RENAMES:
        m = pattern.match(key)
        if m:
            return to(m)
    return None


def source_key(key: str, source_keys: dict[str, str]) -> str:
    """The mmdetection name of simcal key ``key`` (for a message about a tensor the file lacks)."""
    if key in source_keys:
        return source_keys[key]
    for pattern, to in [
        (r"^backbone\.body\.(.*)$", lambda m: f"backbone.{m[1]}"),
        (r"^backbone\.fpn\.inner_blocks\.(\d)\.0\.(\w+)$", lambda m: f"neck.lateral_convs.{m[1]}.conv.{m[2]}"),
        (r"^backbone\.fpn\.layer_blocks\.(\d)\.0\.(\w+)$", lambda m: f"neck.fpn_convs.{m[1]}.conv.{m[2]}"),
        (r"^rpn\.head\.conv\.0\.0\.(\w+)$", lambda m: f"rpn_head.rpn_conv.{m[1]}"),
        (r"^rpn\.head\.cls_logits\.(\w+)$", lambda m: f"rpn_head.rpn_cls.{m[1]}"),
        (r"^rpn\.head\.bbox_pred\.(\w+)$", lambda m: f"rpn_head.rpn_reg.{m[1]}"),
        (r"^roi_heads\.box_head\.fc(\d)\.(\w+)$", lambda m: f"roi_head.bbox_head.shared_fcs.{int(m[1]) - 6}.{m[2]}"),
        (r"^roi_heads\.box_predictor\.cls_score\.(\w+)$", lambda m: f"roi_head.bbox_head.fc_cls.{m[1]}"),
        (r"^roi_heads\.box_predictor\.bbox_pred\.(\w+)$", lambda m: f"roi_head.bbox_head.fc_reg.{m[1]}"),
        (r"^roi_heads\.mask_head\.(\d)\.0\.(\w+)$", lambda m: f"roi_head.mask_head.convs.{m[1]}.conv.{m[2]}"),
        (r"^roi_heads\.mask_predictor\.conv5_mask\.(\w+)$", lambda m: f"roi_head.mask_head.upsample.{m[1]}"),
        (r"^roi_heads\.mask_predictor\.mask_fcn_logits\.(\w+)$", lambda m: f"roi_head.mask_head.conv_logits.{m[1]}"),
    ]:
        m = re.match(pattern, key)
        if m:
            return to(m)
    return key


# --------------------------------------------------------------------------- defaults
#: mmdetection 2's ``_base_/models/mask_rcnn_r50_fpn.py`` and ``_base_/datasets/coco_instance.py``, the
#: settings read below, assumed where neither ``--framework-config`` nor the checkpoint's meta has a config
ZOO: dict[str, Any] = {
    "model": {
        "backbone": {
            "type": "ResNet",
            "depth": 50,
            "style": "pytorch",
            "norm_cfg": {"type": "BN", "requires_grad": True},
        },
        "neck": {"type": "FPN", "num_outs": 5},
        "rpn_head": {
            "type": "RPNHead",
            "anchor_generator": {
                "type": "AnchorGenerator",
                "scales": [8],
                "ratios": [0.5, 1.0, 2.0],
                "strides": [4, 8, 16, 32, 64],
            },
            "loss_cls": {"type": "CrossEntropyLoss", "use_sigmoid": True},
        },
        "roi_head": {
            "type": "StandardRoIHead",
            "bbox_roi_extractor": {"roi_layer": {"type": "RoIAlign", "output_size": 7, "sampling_ratio": 0}},
            "bbox_head": {
                "type": "Shared2FCBBoxHead",
                "reg_class_agnostic": False,
                "bbox_coder": {"target_stds": [0.1, 0.1, 0.2, 0.2]},
            },
            "mask_roi_extractor": {"roi_layer": {"type": "RoIAlign", "output_size": 14, "sampling_ratio": 0}},
            "mask_head": {"type": "FCNMaskHead", "num_convs": 4, "class_agnostic": False},
        },
        "train_cfg": {
            "rpn_proposal": {"nms_pre": 2000, "max_per_img": 1000},
            "rcnn": {"sampler": {"num": 512, "pos_fraction": 0.25}},
        },
        "test_cfg": {
            "rpn": {"nms_pre": 1000, "max_per_img": 1000, "nms": {"iou_threshold": 0.7}, "min_bbox_size": 0},
            "rcnn": {"score_thr": 0.05, "nms": {"iou_threshold": 0.5}, "max_per_img": 100, "mask_thr_binary": 0.5},
        },
    },
    "test_pipeline": [
        {
            "type": "MultiScaleFlipAug",
            "img_scale": (1333, 800),
            "transforms": [
                {"type": "Resize", "keep_ratio": True},
                {
                    "type": "Normalize",
                    "mean": [123.675, 116.28, 103.53],
                    "std": [58.395, 57.12, 57.375],
                    "to_rgb": True,
                },
                {"type": "Pad", "size_divisor": 32},
            ],
        },
    ],
}
#: the LVIS configs' test settings (``configs/lvis``, ``configs/seesaw_loss``), for LVIS's class counts
ZOO_LVIS_RCNN = {"score_thr": 0.0001, "max_per_img": 300}
LVIS_CLASS_COUNTS = (1203, 1230)


# --------------------------------------------------------------------------- conversion
def _config(config_path: str | None, meta: dict[str, Any] | None, source: str) -> tuple[dict[str, Any], str]:
    """The config to read and where it came from."""
    if config_path:
        return read_config(config_path), config_path
    text = meta.get("config") if isinstance(meta, dict) else None
    if isinstance(text, str) and text.strip():
        return parse_config(text, f"{source} (meta.config)"), f"{source} (meta.config)"
    return {}, "mmdetection model zoo default"


def convert(
    weights: dict[str, Tensor], source: str, config_path: str | None = None, meta: dict[str, Any] | None = None
) -> Imported:
    """An mmdetection 2+ state dict (``{key: tensor}``, from
    :func:`simcal.modeling.importers.model_weights`) as simcal's; ``config_path``: the model's
    mmdetection config; ``meta``: the checkpoint's ``meta`` (its stored config and class names)."""
    w = {k: v for k, v in weights.items() if not IGNORED.search(k)}
    deform = next((k for k in w if ".conv_offset." in k or "conv2.conv_offset" in k), None)
    if deform is not None:
        raise InputError(source, deform, "deformable convolutions (DCN, as the paper's HTC X-101) are not supported")
    htc = next((k for k in w if k.startswith("roi_head.semantic_head") or ".conv_res." in k), None)
    if htc is not None:
        raise InputError(source, htc, "a Hybrid Task Cascade (semantic branch or mask flow): not supported")
    if not any(k.startswith("backbone.layer1.") for k in w):
        first = next(iter(w))
        raise InputError(source, first, "not an mmdetection ResNet-FPN R-CNN checkpoint (no backbone.layer1)")
    given, where = _config(config_path, meta, source)
    notes: list[str] = []
    if given.get(SKIPPED):
        notes.append(f"config lines not read (they would run code; not the model's): {'; '.join(given.pop(SKIPPED))}")
    cfg = _merge(ZOO, given)

    # the body from the tensors (as detectron2's: block counts, grouped convs), checked against the config
    blocks = [
        len({int(m[1]) for k in w if (m := re.match(rf"^backbone\.layer{i}\.(\d+)\.conv1\.weight$", k))})
        for i in range(1, 5)
    ]
    depth = RESNET_DEPTHS.get(tuple(blocks))
    if depth is None:
        raise InputError(source, "backbone", f"ResNet stages of {blocks} blocks: not ResNet-50/101/152")
    conv2 = w.get("backbone.layer1.0.conv2.weight")
    if conv2 is None or conv2.dim() != 4:
        raise InputError(source, "backbone.layer1.0.conv2.weight", "missing, or not a conv weight")
    width, groups = conv2.shape[0], conv2.shape[0] // conv2.shape[1]
    body = f"resnet{depth}" if groups == 1 else f"resnext{depth}_{groups}x{width // groups}d"
    if f"{body}_fpn" not in choices.ARCHS:
        raise InputError(source, "backbone", f"a {body} body: not one torchvision builds ({', '.join(choices.ARCHS)})")
    backbone = _get(cfg, "model.backbone", {})
    if backbone.get("dcn") is not None:
        raise InputError(
            where, "model.backbone.dcn", "deformable convolutions (the paper's HTC X-101) are not supported"
        )
    if int(backbone.get("depth", depth)) != depth:
        raise InputError(where, "model.backbone.depth", f"{backbone.get('depth')}, but {source} holds a ResNet-{depth}")
    style = backbone.get("style", "pytorch")
    if style not in ("pytorch", "caffe"):
        raise InputError(where, "model.backbone.style", f"{style!r}: only pytorch or caffe")
    neck = _get(cfg, "model.neck", {})
    if neck.get("type", "FPN") != "FPN" or neck.get("add_extra_convs", False) or int(neck.get("num_outs", 5)) != 5:
        raise InputError(where, "model.neck", "only an FPN of 5 outputs, P6 by max pooling (add_extra_convs=False)")
    anchors = _get(cfg, "model.rpn_head.anchor_generator", {})
    if (
        [float(x) for x in anchors.get("scales", [8])] != [8.0]
        or [float(x) for x in anchors.get("ratios", [0.5, 1.0, 2.0])] != [0.5, 1.0, 2.0]
        or [int(x) for x in anchors.get("strides", [4, 8, 16, 32, 64])] != [4, 8, 16, 32, 64]
    ):
        raise InputError(where, "model.rpn_head.anchor_generator", "only scales [8], ratios [0.5, 1, 2], strides 4..64")
    if not _get(cfg, "model.rpn_head.loss_cls.use_sigmoid", True):
        raise InputError(where, "model.rpn_head.loss_cls.use_sigmoid", "only a sigmoid RPN classifier")

    # the heads
    roi = _get(cfg, "model.roi_head", {})
    stage_keys = sorted({int(m[1]) for k in w if (m := re.match(r"^roi_head\.bbox_head\.(\d+)\.fc_cls\.weight$", k))})
    cascade = bool(stage_keys)
    if cascade and len(stage_keys) != 3:
        raise InputError(source, "roi_head.bbox_head", f"{len(stage_keys)} cascade stages: only 3 are built")
    if (roi.get("type", "StandardRoIHead") == "CascadeRoIHead") != cascade:
        raise InputError(
            where,
            "model.roi_head.type",
            f"{roi.get('type')!r}, but {source} holds " + ("a cascade of 3 stages" if cascade else "one box stage"),
        )
    bbox_head = roi.get("bbox_head", {})
    bbox_heads = bbox_head if isinstance(bbox_head, list) else [bbox_head]
    mask_head = roi.get("mask_head", {})
    mask_head = mask_head[0] if isinstance(mask_head, list) else mask_head
    head0 = {**_get(ZOO, "model.roi_head.bbox_head"), **bbox_heads[0]}
    loss = head0.get("loss_cls", {}) or {}
    seesaw = loss.get("type") == "SeesawLoss"
    sigmoid = bool(loss.get("use_sigmoid", False)) and not seesaw
    classifier = "seesaw" if seesaw else "sigmoid" if sigmoid else "softmax"
    cls_key = "roi_head.bbox_head.0.fc_cls.weight" if cascade else "roi_head.bbox_head.fc_cls.weight"
    if cls_key not in w:
        raise InputError(source, cls_key, "missing: no box classifier")
    if "roi_head.mask_head.conv_logits.weight" not in w and "roi_head.mask_head.0.conv_logits.weight" not in w:
        raise InputError(
            source, "roi_head.mask_head.conv_logits.weight", "missing: no mask head (simcal imports Mask R-CNNs)"
        )
    rows = w[cls_key].shape[0]
    num_classes = rows - {"seesaw": 2, "sigmoid": 0, "softmax": 1}[classifier]
    if num_classes < 1:
        raise shape_error(source, cls_key, w[cls_key].shape, "at least one class", "the classes")
    declared = head0.get("num_classes")
    if declared is not None and int(declared) != num_classes and given:
        raise InputError(
            where,
            "model.roi_head.bbox_head.num_classes",
            f"{declared} classes, but {source} classifies {num_classes} ({cls_key}: {rows} rows, {classifier})",
        )
    reg_key = cls_key.replace("fc_cls", "fc_reg")
    box_rows = w[reg_key].shape[0] if reg_key in w else None
    if box_rows is not None and box_rows not in (4, 4 * num_classes):
        raise shape_error(source, reg_key, w[reg_key].shape, f"4 or 4 x {num_classes} rows", "the classes")
    if cascade and box_rows != 4:
        raise InputError(source, reg_key, "class-specific cascade box regression is not supported")
    mask_key = "roi_head.mask_head.0.conv_logits.weight" if cascade else "roi_head.mask_head.conv_logits.weight"
    if mask_key not in w:
        raise InputError(source, mask_key, "missing: a cascade's stages each have a mask head here")
    mask_rows = w[mask_key].shape[0]
    if mask_rows not in (1, num_classes):
        raise shape_error(source, mask_key, w[mask_key].shape, f"1 or {num_classes} channels", "the classes")
    box_agnostic, mask_agnostic = box_rows == 4, mask_rows == 1
    class_agnostic = mask_agnostic and (box_agnostic or cascade)

    state, source_keys = renamed(w, rename, source, "mmdetection")
    for key, value in list(state.items()):
        state[key] = class_layout(
            key,
            value,
            num_classes,
            "background_last" if classifier == "softmax" else "as_is",
            box_agnostic,
            mask_agnostic,
            cascade,
        )

    # the test pipeline: resize, normalisation, padding
    steps = _pipeline_steps(cfg) or _pipeline_steps(ZOO)
    norm = next((s for s in steps if s.get("type") == "Normalize"), None) or _pipeline_steps(ZOO)[-2]
    scale_step = next((s for s in steps if "img_scale" in s or "scale" in s and s.get("type") == "Resize"), {})
    img_scale = scale_step.get("img_scale", scale_step.get("scale", (1333, 800)))
    if isinstance(img_scale, list):
        if len(img_scale) != 1:
            raise InputError(where, "test_pipeline.img_scale", "multi-scale testing is not supported")
        img_scale = img_scale[0]
    resize = next((s for s in steps if s.get("type") == "Resize"), {"keep_ratio": True})
    if not resize.get("keep_ratio", True):
        raise InputError(where, "test_pipeline.Resize.keep_ratio", "only keep_ratio=True")
    pad = next((s for s in steps if s.get("type") == "Pad"), {"size_divisor": 32})
    if int(pad.get("size_divisor", 32)) != 32:
        raise InputError(where, "test_pipeline.Pad.size_divisor", "only 32")
    test_cfg = _merge(_get(ZOO, "model.test_cfg"), _get(cfg, "model.test_cfg") or cfg.get("test_cfg") or {})
    rcnn = test_cfg.get("rcnn", {})
    rpn = test_cfg.get("rpn", {})
    if not given and num_classes in LVIS_CLASS_COUNTS:
        rcnn = {**rcnn, **ZOO_LVIS_RCNN}
    if float(rpn.get("min_bbox_size", 0)) != 0 or float(_iou(rpn, 0.7)) != 0.7:
        raise InputError(where, "test_cfg.rpn", "only nms iou_threshold 0.7 and min_bbox_size 0")
    if float(rcnn.get("mask_thr_binary", 0.5)) != 0.5:
        raise InputError(where, "test_cfg.rcnn.mask_thr_binary", "only 0.5")
    stds = [list(map(float, _get({"h": h}, "h.bbox_coder.target_stds", [0.1, 0.1, 0.2, 0.2]))) for h in bbox_heads]
    if not cascade and stds[0] != [0.1, 0.1, 0.2, 0.2]:
        raise InputError(
            where, "model.roi_head.bbox_head.bbox_coder.target_stds", "only [0.1, 0.1, 0.2, 0.2] (one stage)"
        )
    train_cfg = _get(cfg, "model.train_cfg") or cfg.get("train_cfg") or {}
    proposal_train = train_cfg.get("rpn_proposal", {})
    sampler = _get(
        train_cfg if not isinstance(train_cfg.get("rcnn"), list) else {"rcnn": train_cfg["rcnn"][0]}, "rcnn.sampler", {}
    )
    to_rgb = bool(norm.get("to_rgb", True))
    model: dict[str, Any] = {
        "arch": f"{body}_fpn",
        "roi_heads": "htc" if cascade else "standard",
        "class_agnostic": class_agnostic,
        "classifier": classifier,
        "cls_head": "normed" if _get(head0, "cls_predictor_cfg.type") == "NormedLinear" else "linear",
        "mask_head": "normed" if _get(mask_head, "predictor_cfg.type") == "NormedConv2d" else "standard",
        "norm": "frozen_bn",
        "pixel_format": "rgb" if to_rgb else "bgr",
        "pixel_mean": [float(v) for v in norm.get("mean")],
        "pixel_std": [float(v) for v in norm.get("std")],
        "resize": "mmdet",
        "stride_in_1x1": style == "caffe",
        "anchors": "exact",
        "proposals": "mmdet",
        "roi_align": "mmdet",
        "min_box_size": 0.0,
        "min_size": int(min(img_scale)),
        "max_size": int(max(img_scale)),
        "rpn_pre_nms_top_n_train": int(proposal_train.get("nms_pre", 2000)),
        "rpn_post_nms_top_n_train": int(proposal_train.get("max_per_img", proposal_train.get("max_num", 1000))),
        "rpn_pre_nms_top_n_test": int(rpn.get("nms_pre", 1000)),
        "rpn_post_nms_top_n_test": int(rpn.get("max_per_img", rpn.get("max_num", 1000))),
        "box_batch_size_per_image": int(sampler.get("num", 512)),
        "box_positive_fraction": float(sampler.get("pos_fraction", 0.25)),
        "score_thresh": float(rcnn.get("score_thr", 0.05)),
        "nms_thresh": float(_iou(rcnn, 0.5)),
        "detections_per_img": int(rcnn.get("max_per_img", 100)),
    }
    if cascade:
        model.update(mask_flow=False, cascade_mean_probs=False)
        model["cascade_box_weights"] = [[1.0 / v for v in s] for s in stds]
    if model["cls_head"] == "normed" and float(_get(head0, "cls_predictor_cfg.tempearture", 20)) != 20:
        raise InputError(where, "model.roi_head.bbox_head.cls_predictor_cfg.tempearture", "only 20")
    if (
        isinstance(meta, dict)
        and isinstance(meta.get("CLASSES"), (list, tuple))
        and len(meta["CLASSES"]) != num_classes
    ):
        raise InputError(
            source, "meta.CLASSES", f"{len(meta['CLASSES'])} class names, but the classifier has {num_classes} classes"
        )
    read = {
        "pixel_format": "Normalize.to_rgb",
        "pixel_mean": "Normalize.mean",
        "pixel_std": "Normalize.std",
        "stride_in_1x1": "model.backbone.style",
        "min_size": "img_scale",
        "max_size": "img_scale",
        "rpn_pre_nms_top_n_test": "test_cfg.rpn.nms_pre",
        "rpn_post_nms_top_n_test": "test_cfg.rpn.max_per_img",
        "score_thresh": "test_cfg.rcnn.score_thr",
        "nms_thresh": "test_cfg.rcnn.nms.iou_threshold",
        "detections_per_img": "test_cfg.rcnn.max_per_img",
    }
    settings = [(f"model.{k}", model[k], f"{v} ({where})") for k, v in read.items()]
    if not given:
        notes.append(
            "no config (neither --framework-config nor meta.config in the checkpoint): mmdetection's model zoo "
            "settings are assumed"
            + (" (its LVIS test settings for this class count)" if num_classes in LVIS_CLASS_COUNTS else "")
        )
    return Imported(state, model, num_classes, settings, notes, source_keys)


def _iou(cfg: dict[str, Any], default: float) -> float:
    """An NMS config's IoU threshold: mmdetection 2's ``nms.iou_threshold`` or 2.0's ``nms_thr``."""
    nms = cfg.get("nms")
    if isinstance(nms, dict) and "iou_threshold" in nms:
        return float(nms["iou_threshold"])
    return float(cfg.get("nms_thr", default))
