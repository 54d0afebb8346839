"""detectron2 checkpoints (``model_final_*.pkl`` of its model zoo, a run's ``model_final.pth``).

What is converted (detectron2 at commit 02b5c4e; docs/import.md has the table):

- names: ``backbone.bottom_up.res{s}`` -> ``backbone.body.layer{s-1}``, ``convK.norm`` -> ``bnK``,
  ``shortcut`` -> ``downsample.{0,1}``, ``fpn_lateral{2..5}`` / ``fpn_output{2..5}`` ->
  ``fpn.inner_blocks`` / ``layer_blocks.{0..3}.0``, the RPN's ``objectness_logits`` /
  ``anchor_deltas`` -> ``cls_logits`` / ``bbox_pred``, ``fc1`` / ``fc2`` -> ``fc6`` / ``fc7``, the
  mask head's ``mask_fcn{1..4}`` / ``deconv`` / ``predictor`` -> ``mask_head.{0..3}.0`` /
  ``mask_predictor.conv5_mask`` / ``mask_fcn_logits``; a cascade's stage k heads
  (``box_head.{k}``, ``box_predictor.{k}``) -> stage 1's keys and ``extra_heads`` /
  ``extra_predictors.{k-1}``;
- layout: the class-score rows from background last (detectron2 class k at row k, background at
  row C) to background first (simcal label k + 1); class-specific box deltas 4C -> 4(C+1) and
  mask channels C -> C+1 (zeros for the background); a sigmoid classifier (``USE_SIGMOID_CE``,
  the federated loss) keeps its C class rows and drops the unused background row;
- the architecture from the tensors: ResNet depth from the block counts, ResNeXt groups and width
  from the 3x3 convs, the classes, class-agnostic box / mask heads, the cascade's stages;
- the math: BGR input with detectron2's mean and std, the stride on the 1x1 conv, detectron2's
  resize, exact anchors, its RPN filtering, ``ROIAlignV2``, no small-box removal, frozen BN, the
  cascade's mean of probabilities and box-coder weights; the test settings; all from the config
  file when given (``_BASE_`` followed), else from the model zoo's defaults (printed).
"""

from __future__ import annotations

import ast
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor

from simcal import choices
from simcal.errors import InputError
from simcal.modeling.importers import RESNET_DEPTHS, Imported, class_layout, renamed, shape_error, stage_prefix

# --------------------------------------------------------------------------- the config file
#: detectron2's defaults (``config/defaults.py``) of every key read or checked here
DEFAULTS: dict[str, Any] = {
    "INPUT.FORMAT": "BGR",
    "INPUT.MIN_SIZE_TEST": 800,
    "INPUT.MAX_SIZE_TEST": 1333,
    "MODEL.PIXEL_MEAN": [103.53, 116.28, 123.675],
    "MODEL.PIXEL_STD": [1.0, 1.0, 1.0],
    "MODEL.META_ARCHITECTURE": "GeneralizedRCNN",
    "MODEL.MASK_ON": False,
    "MODEL.BACKBONE.NAME": "build_resnet_backbone",
    "MODEL.RESNETS.DEPTH": 50,
    "MODEL.RESNETS.NUM_GROUPS": 1,
    "MODEL.RESNETS.WIDTH_PER_GROUP": 64,
    "MODEL.RESNETS.STRIDE_IN_1X1": True,
    "MODEL.RESNETS.NORM": "FrozenBN",
    "MODEL.RESNETS.RES5_DILATION": 1,
    "MODEL.RESNETS.DEFORM_ON_PER_STAGE": [False, False, False, False],
    "MODEL.FPN.NORM": "",
    "MODEL.FPN.FUSE_TYPE": "sum",
    "MODEL.ANCHOR_GENERATOR.SIZES": [[32, 64, 128, 256, 512]],
    "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS": [[0.5, 1.0, 2.0]],
    "MODEL.ANCHOR_GENERATOR.OFFSET": 0.0,
    "MODEL.RPN.NMS_THRESH": 0.7,
    "MODEL.RPN.BBOX_REG_WEIGHTS": [1.0, 1.0, 1.0, 1.0],
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN": 12000,
    "MODEL.RPN.PRE_NMS_TOPK_TEST": 6000,
    "MODEL.RPN.POST_NMS_TOPK_TRAIN": 2000,
    "MODEL.RPN.POST_NMS_TOPK_TEST": 1000,
    "MODEL.RPN.BATCH_SIZE_PER_IMAGE": 256,
    "MODEL.PROPOSAL_GENERATOR.MIN_SIZE": 0,
    "MODEL.ROI_HEADS.NAME": "Res5ROIHeads",
    "MODEL.ROI_HEADS.NUM_CLASSES": 80,
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST": 0.05,
    "MODEL.ROI_HEADS.NMS_THRESH_TEST": 0.5,
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": 512,
    "MODEL.ROI_HEADS.POSITIVE_FRACTION": 0.25,
    "MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS": [10.0, 10.0, 5.0, 5.0],
    "MODEL.ROI_BOX_HEAD.POOLER_TYPE": "ROIAlignV2",
    "MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO": 0,
    "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION": 14,
    "MODEL.ROI_BOX_HEAD.NUM_CONV": 0,
    "MODEL.ROI_BOX_HEAD.NUM_FC": 0,
    "MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE": False,
    "MODEL.ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS": [
        [10.0, 10.0, 5.0, 5.0],
        [20.0, 20.0, 10.0, 10.0],
        [30.0, 30.0, 15.0, 15.0],
    ],
    "MODEL.ROI_MASK_HEAD.POOLER_TYPE": "ROIAlignV2",
    "MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO": 0,
    "MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION": 14,
    "TEST.DETECTIONS_PER_IMAGE": 100,
}

#: what the model zoo's R-CNN FPN configs set over the defaults (``Base-RCNN-FPN.yaml``), assumed
#: without a config file; the test settings of its LVIS configs come on top for LVIS's class counts
ZOO: dict[str, Any] = {
    "MODEL.MASK_ON": True,
    "MODEL.BACKBONE.NAME": "build_resnet_fpn_backbone",
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN": 2000,
    "MODEL.RPN.PRE_NMS_TOPK_TEST": 1000,
    "MODEL.RPN.POST_NMS_TOPK_TRAIN": 1000,
    "MODEL.RPN.POST_NMS_TOPK_TEST": 1000,
    "MODEL.ROI_HEADS.NAME": "StandardROIHeads",
    "MODEL.ROI_BOX_HEAD.NUM_FC": 2,
    "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION": 7,
}
#: the zoo's LVIS configs (LVIS v0.5 1,230 and v1 1,203 classes)
ZOO_LVIS: dict[str, Any] = {"MODEL.ROI_HEADS.SCORE_THRESH_TEST": 0.0001, "TEST.DETECTIONS_PER_IMAGE": 300}
LVIS_CLASS_COUNTS = (1230, 1203)
#: the zoo's ResNeXt-101 32x8d models (FAIR's ImageNet weights: torchvision-style stride and std)
ZOO_RESNEXT: dict[str, Any] = {"MODEL.RESNETS.STRIDE_IN_1X1": False, "MODEL.PIXEL_STD": [57.375, 57.12, 58.395]}


def _merge(base: dict[str, Any], diff: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in diff.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_config(path: str | os.PathLike[str], seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A detectron2 YAML config as a nested dict, its ``_BASE_`` chain merged (relative paths
    resolve against the file that names them); errors name the file."""
    from simcal.config import read_yaml

    path = Path(path).resolve()
    if path in seen:
        raise InputError(path, "_BASE_", "circular inheritance")
    raw = read_yaml(path, "no such detectron2 config file")
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise InputError(path, "(top level)", "expected a detectron2 config (a mapping)")
    base = raw.pop("_BASE_", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise InputError(path, "_BASE_", f"expected a file name, got {base!r}")
    return _merge(read_config(path.parent / base, (*seen, path)), raw)


def _flat(cfg: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"MODEL.RESNETS.DEPTH": 50, ...}``; a Python literal written as a string (``(640, 672)``, as
    the zoo's files write tuples) is read as detectron2's yacs reads it."""
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, name + "."))
        else:
            if isinstance(v, str) and v.strip()[:1] in ("(", "["):
                try:
                    v = ast.literal_eval(v)
                except (ValueError, SyntaxError):
                    pass
            out[name] = v
    return out


# --------------------------------------------------------------------------- names
_Rename = Callable[[re.Match[str]], str]


#: detectron2 key pattern -> simcal key
RENAMES: list[tuple[re.Pattern[str], _Rename]] = [
    (re.compile(r"^backbone\.bottom_up\.stem\.conv1\.weight$"), lambda m: "backbone.body.conv1.weight"),
    (re.compile(r"^backbone\.bottom_up\.stem\.conv1\.norm\.(\w+)$"), lambda m: f"backbone.body.bn1.{m[1]}"),
    (
        re.compile(r"^backbone\.bottom_up\.res([2-5])\.(\d+)\.conv([1-3])\.weight$"),
        lambda m: f"backbone.body.layer{int(m[1]) - 1}.{m[2]}.conv{m[3]}.weight",
    ),
    (
        re.compile(r"^backbone\.bottom_up\.res([2-5])\.(\d+)\.conv([1-3])\.norm\.(\w+)$"),
        lambda m: f"backbone.body.layer{int(m[1]) - 1}.{m[2]}.bn{m[3]}.{m[4]}",
    ),
    (
        re.compile(r"^backbone\.bottom_up\.res([2-5])\.(\d+)\.shortcut\.weight$"),
        lambda m: f"backbone.body.layer{int(m[1]) - 1}.{m[2]}.downsample.0.weight",
    ),
    (
        re.compile(r"^backbone\.bottom_up\.res([2-5])\.(\d+)\.shortcut\.norm\.(\w+)$"),
        lambda m: f"backbone.body.layer{int(m[1]) - 1}.{m[2]}.downsample.1.{m[3]}",
    ),
    (
        re.compile(r"^backbone\.fpn_lateral([2-5])\.(weight|bias)$"),
        lambda m: f"backbone.fpn.inner_blocks.{int(m[1]) - 2}.0.{m[2]}",
    ),
    (
        re.compile(r"^backbone\.fpn_output([2-5])\.(weight|bias)$"),
        lambda m: f"backbone.fpn.layer_blocks.{int(m[1]) - 2}.0.{m[2]}",
    ),
    (re.compile(r"^proposal_generator\.rpn_head\.conv\.(weight|bias)$"), lambda m: f"rpn.head.conv.0.0.{m[1]}"),
    (
        re.compile(r"^proposal_generator\.rpn_head\.objectness_logits\.(weight|bias)$"),
        lambda m: f"rpn.head.cls_logits.{m[1]}",
    ),
    (
        re.compile(r"^proposal_generator\.rpn_head\.anchor_deltas\.(weight|bias)$"),
        lambda m: f"rpn.head.bbox_pred.{m[1]}",
    ),
    (
        re.compile(r"^roi_heads\.box_head\.(?:(\d+)\.)?fc([12])\.(weight|bias)$"),
        lambda m: f"{stage_prefix(m[1], 'roi_heads.box_head', 'roi_heads.extra_heads')}.fc{int(m[2]) + 5}.{m[3]}",
    ),
    (
        re.compile(r"^roi_heads\.box_predictor\.(?:(\d+)\.)?(cls_score|bbox_pred)\.(weight|bias)$"),
        lambda m: f"{stage_prefix(m[1], 'roi_heads.box_predictor', 'roi_heads.extra_predictors')}.{m[2]}.{m[3]}",
    ),
    (
        re.compile(r"^roi_heads\.mask_head\.mask_fcn([1-4])\.(weight|bias)$"),
        lambda m: f"roi_heads.mask_head.{int(m[1]) - 1}.0.{m[2]}",
    ),
    (
        re.compile(r"^roi_heads\.mask_head\.deconv\.(weight|bias)$"),
        lambda m: f"roi_heads.mask_predictor.conv5_mask.{m[1]}",
    ),
    (
        re.compile(r"^roi_heads\.mask_head\.predictor\.(weight|bias)$"),
        lambda m: f"roi_heads.mask_predictor.mask_fcn_logits.{m[1]}",
    ),
]
#: detectron2 keys that hold no weights simcal needs (``DetectionCheckpointer`` drops them too)
IGNORED = re.compile(r"^(pixel_mean|pixel_std)$|anchor_generator\.cell_anchors\.\d+$|\.num_batches_tracked$")


def rename(key: str) -> str | None:
    """The simcal key of a detectron2 key; None for a key of no layout known here."""
    for pattern, to in RENAMES:
        m = pattern.match(key)
        if m:
            return to(m)
    return None


# --------------------------------------------------------------------------- the architecture


def _architecture(w: dict[str, Tensor], source: str) -> dict[str, Any]:
    """What the tensors say: body, stages, classes, agnostic heads, classifier rows."""
    blocks = []
    for s in range(2, 6):
        ids = {int(m[1]) for k in w if (m := re.match(rf"^backbone\.bottom_up\.res{s}\.(\d+)\.conv1\.weight$", k))}
        blocks.append(len(ids))
    if not blocks[0]:
        first = next(iter(w))
        raise InputError(source, first, "not a detectron2 ResNet-FPN R-CNN checkpoint (no backbone.bottom_up.res2)")
    deform = next((k for k in w if ".conv2_offset." in k), None)
    if deform is not None:
        raise InputError(source, deform, "deformable convolutions (DEFORM_ON_PER_STAGE) are not supported")
    depth = RESNET_DEPTHS.get(tuple(blocks))
    if depth is None:
        raise InputError(source, "backbone.bottom_up", f"ResNet stages of {blocks} blocks: not ResNet-50/101/152")
    conv2 = w.get("backbone.bottom_up.res2.0.conv2.weight")
    if conv2 is None or conv2.dim() != 4:
        raise InputError(source, "backbone.bottom_up.res2.0.conv2.weight", "missing, or not a conv weight")
    width, groups = conv2.shape[0], conv2.shape[0] // conv2.shape[1]
    body = f"resnet{depth}" if groups == 1 else f"resnext{depth}_{groups}x{width // groups}d"
    if groups == 1 and width != 64:
        raise InputError(source, "backbone.bottom_up.res2.0.conv2.weight", f"width {width}: only 64 (ResNet) is built")
    if f"{body}_fpn" not in choices.ARCHS:
        raise InputError(
            source, "backbone.bottom_up", f"a {body} body: not one torchvision builds ({', '.join(choices.ARCHS)})"
        )
    if "backbone.fpn_lateral2.weight" not in w:
        raise InputError(source, "backbone", "no FPN (fpn_lateral2): only ResNet-FPN detectors are imported")
    stages = sorted(
        {int(m[1]) for k in w if (m := re.match(r"^roi_heads\.box_predictor\.(\d+)\.cls_score\.weight$", k))}
    )
    cascade = bool(stages)
    cls_key = "roi_heads.box_predictor.0.cls_score.weight" if cascade else "roi_heads.box_predictor.cls_score.weight"
    if cls_key not in w:
        if any(k.startswith("roi_heads.res5") for k in w):
            raise InputError(source, "roi_heads.res5", "a C4 detector (res5 box head): only FPN detectors are imported")
        raise InputError(source, cls_key, "missing: no box classifier")
    if any(re.match(r"^roi_heads\.box_head\.(\d+\.)?conv\d", k) for k in w):
        raise InputError(
            source, "roi_heads.box_head.conv1", "a box head with convolutions: only the 2-fc head is imported"
        )
    if "roi_heads.mask_head.predictor.weight" not in w:
        raise InputError(
            source, "roi_heads.mask_head.predictor.weight", "missing: no mask head (simcal imports Mask R-CNNs)"
        )
    rows = w[cls_key].shape[0]
    box_key = cls_key.replace("cls_score", "bbox_pred")
    box_rows = w[box_key].shape[0] if box_key in w else None
    mask_rows = w["roi_heads.mask_head.predictor.weight"].shape[0]
    return {
        "body": body,
        "stages": len(stages) if cascade else 1,
        "rows": rows,
        "box_rows": box_rows,
        "mask_rows": mask_rows,
        "cls_key": cls_key,
        "box_key": box_key,
    }


# --------------------------------------------------------------------------- conversion
def _check(settings: dict[str, Any], key: str, ok: bool, what: str, source: str) -> None:
    if not ok:
        raise InputError(source, key, f"{settings[key]!r}: {what}")


def convert(
    weights: dict[str, Tensor], source: str, config_path: str | None = None, meta: dict[str, Any] | None = None
) -> Imported:
    """A detectron2 state dict (``{key: tensor}``, from :func:`simcal.modeling.importers.model_weights`)
    as simcal's; ``config_path``: the run's detectron2 YAML (else the model zoo's defaults);
    ``meta``: unused (detectron2's files hold no config)."""
    w = {k: v for k, v in weights.items() if not IGNORED.search(k)}
    arch = _architecture(w, source)
    given = _flat(read_config(config_path)) if config_path else {}
    cfg_name = str(config_path) if config_path else "detectron2 model zoo default"
    zoo = dict(ZOO)
    cls_rows = arch["rows"]
    if not given:
        if cls_rows - 1 in LVIS_CLASS_COUNTS:
            zoo.update(ZOO_LVIS)
        if arch["body"].startswith("resnext"):
            zoo.update(ZOO_RESNEXT)
    settings = {**DEFAULTS, **({} if given else zoo), **given}
    origin = {k: cfg_name if k in given or (not given and k in zoo) else "detectron2 default" for k in settings}
    where = config_path or source

    # what simcal cannot compute as detectron2 does: refused in one line
    s = settings
    _check(
        s, "MODEL.META_ARCHITECTURE", s["MODEL.META_ARCHITECTURE"] == "GeneralizedRCNN", "only GeneralizedRCNN", where
    )
    _check(s, "MODEL.MASK_ON", bool(s["MODEL.MASK_ON"]), "simcal imports Mask R-CNNs (MASK_ON: True)", where)
    _check(
        s,
        "MODEL.BACKBONE.NAME",
        s["MODEL.BACKBONE.NAME"] == "build_resnet_fpn_backbone",
        "only build_resnet_fpn_backbone",
        where,
    )
    _check(
        s,
        "MODEL.RESNETS.DEFORM_ON_PER_STAGE",
        not any(s["MODEL.RESNETS.DEFORM_ON_PER_STAGE"]),
        "deformable convolutions are not supported",
        where,
    )
    _check(s, "MODEL.RESNETS.RES5_DILATION", s["MODEL.RESNETS.RES5_DILATION"] == 1, "only 1 (no dilated res5)", where)
    _check(s, "MODEL.FPN.NORM", not s["MODEL.FPN.NORM"], "a normalised FPN is not supported", where)
    _check(s, "MODEL.FPN.FUSE_TYPE", s["MODEL.FPN.FUSE_TYPE"] == "sum", "only sum", where)
    sizes = [list(map(float, x)) for x in s["MODEL.ANCHOR_GENERATOR.SIZES"]]
    _check(
        s,
        "MODEL.ANCHOR_GENERATOR.SIZES",
        sizes in ([[32.0, 64.0, 128.0, 256.0, 512.0]], [[32.0], [64.0], [128.0], [256.0], [512.0]]),
        "only one size per level, 32..512",
        where,
    )
    ratios = [list(map(float, x)) for x in s["MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS"]]
    _check(s, "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", ratios == [[0.5, 1.0, 2.0]], "only [[0.5, 1.0, 2.0]]", where)
    _check(s, "MODEL.ANCHOR_GENERATOR.OFFSET", float(s["MODEL.ANCHOR_GENERATOR.OFFSET"]) == 0.0, "only 0.0", where)
    _check(s, "MODEL.RPN.NMS_THRESH", float(s["MODEL.RPN.NMS_THRESH"]) == 0.7, "only 0.7 (torchvision's)", where)
    _check(
        s,
        "MODEL.RPN.BBOX_REG_WEIGHTS",
        list(map(float, s["MODEL.RPN.BBOX_REG_WEIGHTS"])) == [1.0] * 4,
        "only 1s",
        where,
    )
    _check(s, "MODEL.PROPOSAL_GENERATOR.MIN_SIZE", float(s["MODEL.PROPOSAL_GENERATOR.MIN_SIZE"]) == 0, "only 0", where)
    for head, res in (("ROI_BOX_HEAD", 7), ("ROI_MASK_HEAD", 14)):
        _check(s, f"MODEL.{head}.POOLER_TYPE", s[f"MODEL.{head}.POOLER_TYPE"] == "ROIAlignV2", "only ROIAlignV2", where)
        _check(s, f"MODEL.{head}.POOLER_SAMPLING_RATIO", s[f"MODEL.{head}.POOLER_SAMPLING_RATIO"] == 0, "only 0", where)
        _check(s, f"MODEL.{head}.POOLER_RESOLUTION", s[f"MODEL.{head}.POOLER_RESOLUTION"] == res, f"only {res}", where)
    _check(
        s,
        "MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS",
        list(map(float, s["MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS"])) == [10.0, 10.0, 5.0, 5.0],
        "only [10, 10, 5, 5]",
        where,
    )
    _check(
        s,
        "MODEL.ROI_BOX_HEAD.NUM_FC",
        s["MODEL.ROI_BOX_HEAD.NUM_FC"] == 2 and s["MODEL.ROI_BOX_HEAD.NUM_CONV"] == 0,
        "only the 2-fc box head",
        where,
    )
    _check(s, "MODEL.RESNETS.NORM", s["MODEL.RESNETS.NORM"] in ("FrozenBN", "BN", "SyncBN"), "only batch norm", where)
    _check(s, "INPUT.MIN_SIZE_TEST", int(s["INPUT.MIN_SIZE_TEST"]) > 0, "must be > 0 (images are resized)", where)
    name = s["MODEL.ROI_HEADS.NAME"]
    cascade = arch["stages"] > 1
    _check(
        s,
        "MODEL.ROI_HEADS.NAME",
        name == ("CascadeROIHeads" if cascade else "StandardROIHeads"),
        f"the checkpoint holds {'a cascade of ' + str(arch['stages']) + ' stages' if cascade else 'one box stage'}",
        where,
    )
    if cascade and arch["stages"] != 3:
        raise InputError(source, "roi_heads.box_predictor", f"{arch['stages']} cascade stages: only 3 are built")

    # the classes and the layout of the class-specific layers
    sigmoid = bool(s["MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE"])
    num_classes = cls_rows - 1
    if num_classes < 1:
        raise shape_error(source, arch["cls_key"], w[arch["cls_key"]].shape, "C + 1 >= 2 rows", "the classes")
    declared = int(s["MODEL.ROI_HEADS.NUM_CLASSES"])
    if declared != num_classes and "MODEL.ROI_HEADS.NUM_CLASSES" in given:
        raise InputError(
            where,
            "MODEL.ROI_HEADS.NUM_CLASSES",
            f"{declared} classes, but {source} classifies {num_classes} ({arch['cls_key']}: {cls_rows} rows)",
        )
    box_rows, mask_rows = arch["box_rows"], arch["mask_rows"]
    if box_rows is not None and box_rows not in (4, 4 * num_classes):
        raise shape_error(
            source, arch["box_key"], w[arch["box_key"]].shape, f"4 or 4 x {num_classes} rows", "the classes"
        )
    if cascade and box_rows != 4:
        raise InputError(source, arch["box_key"], "class-specific cascade box regression is not supported")
    if mask_rows not in (1, num_classes):
        raise shape_error(
            source, "roi_heads.mask_head.predictor.weight", (mask_rows,), f"1 or {num_classes} channels", "the classes"
        )
    box_agnostic = box_rows == 4
    mask_agnostic = mask_rows == 1
    class_agnostic = mask_agnostic and (box_agnostic or cascade)

    state, source_keys = renamed(w, rename, source, "detectron2")
    rows = "drop_last" if sigmoid else "background_last"
    for key, value in list(state.items()):
        state[key] = class_layout(key, value, num_classes, rows, box_agnostic, mask_agnostic, cascade)

    model: dict[str, Any] = {
        "arch": f"{arch['body']}_fpn",
        "roi_heads": "cascade" if cascade else "standard",
        "class_agnostic": class_agnostic,
        "classifier": "sigmoid" if sigmoid else "softmax",
        "norm": "frozen_bn",
        "pixel_format": str(s["INPUT.FORMAT"]).lower(),
        "pixel_mean": [float(v) for v in s["MODEL.PIXEL_MEAN"]],
        "pixel_std": [float(v) for v in s["MODEL.PIXEL_STD"]],
        "resize": "detectron2",
        "stride_in_1x1": bool(s["MODEL.RESNETS.STRIDE_IN_1X1"]),
        "anchors": "exact",
        "proposals": "detectron2",
        "roi_align": "detectron2",
        "min_box_size": 0.0,
        "min_size": int(s["INPUT.MIN_SIZE_TEST"]),
        "max_size": int(s["INPUT.MAX_SIZE_TEST"]),
        "rpn_pre_nms_top_n_train": int(s["MODEL.RPN.PRE_NMS_TOPK_TRAIN"]),
        "rpn_post_nms_top_n_train": int(s["MODEL.RPN.POST_NMS_TOPK_TRAIN"]),
        "rpn_pre_nms_top_n_test": int(s["MODEL.RPN.PRE_NMS_TOPK_TEST"]),
        "rpn_post_nms_top_n_test": int(s["MODEL.RPN.POST_NMS_TOPK_TEST"]),
        "rpn_batch_size_per_image": int(s["MODEL.RPN.BATCH_SIZE_PER_IMAGE"]),
        "box_batch_size_per_image": int(s["MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE"]),
        "box_positive_fraction": float(s["MODEL.ROI_HEADS.POSITIVE_FRACTION"]),
        "score_thresh": float(s["MODEL.ROI_HEADS.SCORE_THRESH_TEST"]),
        "nms_thresh": float(s["MODEL.ROI_HEADS.NMS_THRESH_TEST"]),
        "detections_per_img": int(s["TEST.DETECTIONS_PER_IMAGE"]),
    }
    if model["pixel_format"] not in choices.PIXEL_FORMATS:
        raise InputError(where, "INPUT.FORMAT", f"{s['INPUT.FORMAT']!r}: only BGR or RGB")
    if cascade:
        model["cascade_mean_probs"] = True
        model["cascade_box_weights"] = [[float(v) for v in r] for r in s["MODEL.ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS"]]
    read = {
        "pixel_format": "INPUT.FORMAT",
        "pixel_mean": "MODEL.PIXEL_MEAN",
        "pixel_std": "MODEL.PIXEL_STD",
        "stride_in_1x1": "MODEL.RESNETS.STRIDE_IN_1X1",
        "min_size": "INPUT.MIN_SIZE_TEST",
        "max_size": "INPUT.MAX_SIZE_TEST",
        "rpn_pre_nms_top_n_test": "MODEL.RPN.PRE_NMS_TOPK_TEST",
        "rpn_post_nms_top_n_test": "MODEL.RPN.POST_NMS_TOPK_TEST",
        "score_thresh": "MODEL.ROI_HEADS.SCORE_THRESH_TEST",
        "nms_thresh": "MODEL.ROI_HEADS.NMS_THRESH_TEST",
        "detections_per_img": "TEST.DETECTIONS_PER_IMAGE",
    }
    settings_out = [(f"model.{k}", model[k], f"{d2} ({origin[d2]})") for k, d2 in read.items()]
    notes = []
    if not given:
        notes.append(
            "no --framework-config: the detectron2 model zoo's settings are assumed"
            + (" (its LVIS test settings for this class count)" if cls_rows - 1 in LVIS_CLASS_COUNTS else "")
        )
    return Imported(state, model, num_classes, settings_out, notes, source_keys)


def source_key(key: str, source_keys: dict[str, str]) -> str:
    """The detectron2 name of simcal key ``key`` (for a message about a tensor the file lacks)."""
    if key in source_keys:
        return source_keys[key]
    inverse = [
        (r"^backbone\.body\.conv1\.weight$", lambda m: "backbone.bottom_up.stem.conv1.weight"),
        (r"^backbone\.body\.bn1\.(\w+)$", lambda m: f"backbone.bottom_up.stem.conv1.norm.{m[1]}"),
        (
            r"^backbone\.body\.layer(\d)\.(\d+)\.conv(\d)\.weight$",
            lambda m: f"backbone.bottom_up.res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.weight",
        ),
        (
            r"^backbone\.body\.layer(\d)\.(\d+)\.bn(\d)\.(\w+)$",
            lambda m: f"backbone.bottom_up.res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.norm.{m[4]}",
        ),
        (
            r"^backbone\.body\.layer(\d)\.(\d+)\.downsample\.0\.weight$",
            lambda m: f"backbone.bottom_up.res{int(m[1]) + 1}.{m[2]}.shortcut.weight",
        ),
        (
            r"^backbone\.body\.layer(\d)\.(\d+)\.downsample\.1\.(\w+)$",
            lambda m: f"backbone.bottom_up.res{int(m[1]) + 1}.{m[2]}.shortcut.norm.{m[3]}",
        ),
        (r"^backbone\.fpn\.inner_blocks\.(\d)\.0\.(\w+)$", lambda m: f"backbone.fpn_lateral{int(m[1]) + 2}.{m[2]}"),
        (r"^backbone\.fpn\.layer_blocks\.(\d)\.0\.(\w+)$", lambda m: f"backbone.fpn_output{int(m[1]) + 2}.{m[2]}"),
        (r"^rpn\.head\.conv\.0\.0\.(\w+)$", lambda m: f"proposal_generator.rpn_head.conv.{m[1]}"),
        (r"^rpn\.head\.cls_logits\.(\w+)$", lambda m: f"proposal_generator.rpn_head.objectness_logits.{m[1]}"),
        (r"^rpn\.head\.bbox_pred\.(\w+)$", lambda m: f"proposal_generator.rpn_head.anchor_deltas.{m[1]}"),
        (r"^roi_heads\.box_head\.fc(\d)\.(\w+)$", lambda m: f"roi_heads.box_head.fc{int(m[1]) - 5}.{m[2]}"),
        (
            r"^roi_heads\.extra_heads\.(\d)\.fc(\d)\.(\w+)$",
            lambda m: f"roi_heads.box_head.{int(m[1]) + 1}.fc{int(m[2]) - 5}.{m[3]}",
        ),
        (r"^roi_heads\.box_predictor\.(\w+)\.(\w+)$", lambda m: f"roi_heads.box_predictor.{m[1]}.{m[2]}"),
        (
            r"^roi_heads\.extra_predictors\.(\d)\.(\w+)\.(\w+)$",
            lambda m: f"roi_heads.box_predictor.{int(m[1]) + 1}.{m[2]}.{m[3]}",
        ),
        (r"^roi_heads\.mask_head\.(\d)\.0\.(\w+)$", lambda m: f"roi_heads.mask_head.mask_fcn{int(m[1]) + 1}.{m[2]}"),
        (r"^roi_heads\.mask_predictor\.conv5_mask\.(\w+)$", lambda m: f"roi_heads.mask_head.deconv.{m[1]}"),
        (r"^roi_heads\.mask_predictor\.mask_fcn_logits\.(\w+)$", lambda m: f"roi_heads.mask_head.predictor.{m[1]}"),
    ]
    for pattern, to in inverse:
        m = re.match(pattern, key)
        if m:
            return to(m)
    return key
