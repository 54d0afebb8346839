"""The SimCal authors' release (``twangnh/SimCal``, mmdetection 1.0rc0): their Mask R-CNN baselines.

mmdetection v1 lays a Mask R-CNN out as simcal does: background **first**, C + 1 class rows,
class-specific box deltas for C + 1 classes and C + 1 mask channels (``bbox_head.fc_cls`` /
``fc_reg``, ``mask_head.conv_logits`` at the top level, no ``roi_head.``); the backbone, FPN and RPN
keys are mmdetection 2's. Its math is the legacy one (``model.box_plus_one`` and the ``mmdet_v1``
choices of :mod:`simcal.modeling.conventions`): anchors centred at ``(stride - 1) / 2`` and
rounded, widths ``x2 - x1 + 1`` when decoding, suppressing and pooling (RoIAlign not aligned, 2 x
2 samples, up to ``x2 + 1``), boxes clipped to ``size - 1``, per-level RPN NMS, boxes mapped back
by the one resize factor, masks pasted at integer corners by OpenCV. Only the detector is
imported: SimCal's own calibrated heads are calibrated again here (``simcal calibrate``).

The config is the release's v1 Python config (read without running it, as mmdetection 2's:
:func:`simcal.modeling.importers.mmdet.read_config`), else the checkpoint's ``meta.config``, else
the release's ``configs/mask_rcnn_r50_fpn_1x_lvis.py`` settings.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from simcal.errors import InputError
from simcal.modeling.importers import RESNET_DEPTHS, Imported, class_layout, renamed, shape_error
from simcal.modeling.importers import mmdet as mmdet2


def rename(key: str) -> str | None:
    """The simcal key of an mmdetection v1 key (its heads sit at the top level)."""
    if key.startswith(("bbox_head.", "mask_head.")):
        return mmdet2.rename(f"roi_head.{key}")
    return mmdet2.rename(key)


def source_key(key: str, source_keys: dict[str, str]) -> str:
    """The mmdetection v1 name of simcal key ``key``."""
    name = mmdet2.source_key(key, source_keys)
    return name[len("roi_head.") :] if name.startswith("roi_head.") else name


#: the release's ``configs/mask_rcnn_r50_fpn_1x_lvis.py`` (LVIS v0.5, class-specific), the settings read below
RELEASE: dict[str, Any] = {
    "model": {
        "backbone": {"type": "ResNet", "depth": 50, "style": "pytorch"},
        "neck": {"type": "FPN", "num_outs": 5},
        "rpn_head": {"anchor_scales": [8], "anchor_ratios": [0.5, 1.0, 2.0], "anchor_strides": [4, 8, 16, 32, 64]},
        "bbox_roi_extractor": {"roi_layer": {"type": "RoIAlign", "out_size": 7, "sample_num": 2}},
        "bbox_head": {"type": "SharedFCBBoxHead", "target_stds": [0.1, 0.1, 0.2, 0.2]},
        "mask_roi_extractor": {"roi_layer": {"type": "RoIAlign", "out_size": 14, "sample_num": 2}},
    },
    "train_cfg": {
        "rpn_proposal": {"nms_pre": 2000, "max_num": 2000},
        "rcnn": {"sampler": {"num": 512, "pos_fraction": 0.25}},
    },
    "test_cfg": {
        "rpn": {"nms_pre": 1000, "nms_post": 1000, "max_num": 1000, "nms_thr": 0.7, "min_bbox_size": 0},
        "rcnn": {"score_thr": 0.0, "nms": {"type": "nms", "iou_thr": 0.5}, "max_per_img": 300, "mask_thr_binary": 0.5},
    },
    "img_norm_cfg": {"mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375], "to_rgb": True},
    "data": {"test": {"img_scale": (1333, 800), "size_divisor": 32}},
}


def convert(
    weights: dict[str, Tensor], source: str, config_path: str | None = None, meta: dict[str, Any] | None = None
) -> Imported:
    """A SimCal-release (mmdetection v1) state dict as simcal's; ``config_path``: its v1 config."""
    w = {k: v for k, v in weights.items() if not mmdet2.IGNORED.search(k)}
    if any(k.startswith("roi_head.") for k in w):
        raise InputError(
            source, next(k for k in w if k.startswith("roi_head.")), "an mmdetection 2+ checkpoint: use --from mmdet"
        )
    deform = next((k for k in w if ".conv_offset" in k), None)
    if deform is not None:
        raise InputError(source, deform, "deformable convolutions (DCN, as the paper's HTC X-101) are not supported")
    htc = next((k for k in w if k.startswith(("semantic_head.", "bbox_head.1.", "mask_head.1."))), None)
    if htc is not None:
        raise InputError(
            source, htc, "a cascade or Hybrid Task Cascade of the release: not supported (its r50 baselines are)"
        )
    if not any(k.startswith("backbone.layer1.") for k in w):
        raise InputError(
            source, next(iter(w)), "not an mmdetection v1 ResNet-FPN R-CNN checkpoint (no backbone.layer1)"
        )
    given, where = mmdet2._config(config_path, meta, source)  # noqa: SLF001 - the shared config lookup
    notes: list[str] = []
    if given.get(mmdet2.SKIPPED):
        notes.append(
            f"config lines not read (they would run code; not the model's): {'; '.join(given.pop(mmdet2.SKIPPED))}"
        )
    cfg = mmdet2._merge(RELEASE, given)  # noqa: SLF001

    blocks = [
        sum(1 for k in w if k.startswith(f"backbone.layer{i}.") and k.endswith(".conv1.weight")) for i in range(1, 5)
    ]
    depth = RESNET_DEPTHS.get(tuple(blocks))
    if depth is None:
        raise InputError(source, "backbone", f"ResNet stages of {blocks} blocks: not ResNet-50/101/152")
    conv2 = w.get("backbone.layer1.0.conv2.weight")
    if conv2 is None or conv2.dim() != 4 or conv2.shape[0] != conv2.shape[1]:
        raise InputError(
            source, "backbone.layer1.0.conv2.weight", "only ResNet bodies (no grouped convolutions) in v1 imports"
        )
    model_cfg = cfg.get("model", {})
    style = mmdet2._get(model_cfg, "backbone.style", "pytorch")  # noqa: SLF001
    if model_cfg.get("backbone", {}).get("dcn") is not None:
        raise InputError(where, "model.backbone.dcn", "deformable convolutions are not supported")
    rpn = model_cfg.get("rpn_head", {})
    if (
        [float(x) for x in rpn.get("anchor_scales", [8])] != [8.0]
        or [float(x) for x in rpn.get("anchor_ratios", [0.5, 1.0, 2.0])] != [0.5, 1.0, 2.0]
        or [int(x) for x in rpn.get("anchor_strides", [4, 8, 16, 32, 64])] != [4, 8, 16, 32, 64]
    ):
        raise InputError(where, "model.rpn_head", "only anchor_scales [8], anchor_ratios [0.5, 1, 2], strides 4..64")
    for extractor, size in (("bbox_roi_extractor", 7), ("mask_roi_extractor", 14)):
        layer = mmdet2._get(model_cfg, f"{extractor}.roi_layer", {})  # noqa: SLF001
        if (
            layer.get("type", "RoIAlign") != "RoIAlign"
            or int(layer.get("out_size", size)) != size
            or int(layer.get("sample_num", 2)) != 2
        ):
            raise InputError(where, f"model.{extractor}.roi_layer", f"only RoIAlign, out_size {size}, sample_num 2")
    bbox_head = model_cfg.get("bbox_head", {})
    if [float(x) for x in bbox_head.get("target_stds", [0.1, 0.1, 0.2, 0.2])] != [0.1, 0.1, 0.2, 0.2]:
        raise InputError(where, "model.bbox_head.target_stds", "only [0.1, 0.1, 0.2, 0.2]")
    if "bbox_head.fc_cls.weight" not in w:
        raise InputError(source, "bbox_head.fc_cls.weight", "missing: no box classifier")
    if "mask_head.conv_logits.weight" not in w:
        raise InputError(source, "mask_head.conv_logits.weight", "missing: no mask head (simcal imports Mask R-CNNs)")
    rows = w["bbox_head.fc_cls.weight"].shape[0]
    num_classes = rows - 1
    declared = bbox_head.get("num_classes")
    if declared is not None and given and int(declared) != rows:
        raise InputError(
            where,
            "model.bbox_head.num_classes",
            f"{declared} (with the background), but {source} has {rows} class rows",
        )
    box_rows = w["bbox_head.fc_reg.weight"].shape[0] if "bbox_head.fc_reg.weight" in w else None
    if box_rows not in (None, 4, 4 * rows):
        raise shape_error(
            source,
            "bbox_head.fc_reg.weight",
            w["bbox_head.fc_reg.weight"].shape,
            f"4 or 4 x {rows} rows",
            "the classes",
        )
    mask_rows = w["mask_head.conv_logits.weight"].shape[0]
    if mask_rows not in (1, rows):
        raise shape_error(
            source,
            "mask_head.conv_logits.weight",
            w["mask_head.conv_logits.weight"].shape,
            f"1 or {rows} channels",
            "the classes",
        )
    box_agnostic, mask_agnostic = box_rows == 4, mask_rows == 1
    state, source_keys = renamed(w, rename, source, "mmdetection v1")
    for key, value in list(state.items()):
        state[key] = class_layout(key, value, num_classes, "background_first", box_agnostic, mask_agnostic, False)

    test = cfg.get("test_cfg", {})
    rcnn, rpn_test = test.get("rcnn", {}), test.get("rpn", {})
    if float(rpn_test.get("min_bbox_size", 0)) != 0 or float(rpn_test.get("nms_thr", 0.7)) != 0.7:
        raise InputError(where, "test_cfg.rpn", "only nms_thr 0.7 and min_bbox_size 0")
    if rpn_test.get("nms_across_levels", False):
        raise InputError(where, "test_cfg.rpn.nms_across_levels", "only False")
    if int(rpn_test.get("nms_post", 1000)) != int(rpn_test.get("max_num", 1000)):
        raise InputError(
            where, "test_cfg.rpn.nms_post", "must equal max_num (simcal keeps one count per level and overall)"
        )
    nms = rcnn.get("nms", {})
    test_data = mmdet2._get(cfg, "data.test", {})  # noqa: SLF001
    img_scale = test_data.get("img_scale", (1333, 800))
    if int(test_data.get("size_divisor", 32)) != 32:
        raise InputError(where, "data.test.size_divisor", "only 32")
    norm = cfg.get("img_norm_cfg", RELEASE["img_norm_cfg"])
    proposal_train = mmdet2._get(cfg, "train_cfg.rpn_proposal", {})  # noqa: SLF001
    sampler = mmdet2._get(cfg, "train_cfg.rcnn.sampler", {})  # noqa: SLF001
    class_agnostic = mask_agnostic and box_agnostic
    model: dict[str, Any] = {
        "arch": f"resnet{depth}_fpn",
        "roi_heads": "standard",
        "class_agnostic": class_agnostic,
        "classifier": "softmax",
        "norm": "frozen_bn",
        "pixel_format": "rgb" if norm.get("to_rgb", True) else "bgr",
        "pixel_mean": [float(v) for v in norm["mean"]],
        "pixel_std": [float(v) for v in norm["std"]],
        "resize": "mmdet_v1",
        "stride_in_1x1": style == "caffe",
        "anchors": "mmdet_v1",
        "proposals": "mmdet_v1",
        "roi_align": "mmdet_v1",
        "box_plus_one": True,
        "min_box_size": 0.0,
        "min_size": int(min(img_scale)),
        "max_size": int(max(img_scale)),
        "rpn_pre_nms_top_n_train": int(proposal_train.get("nms_pre", 2000)),
        "rpn_post_nms_top_n_train": int(proposal_train.get("max_num", 2000)),
        "rpn_pre_nms_top_n_test": int(rpn_test.get("nms_pre", 1000)),
        "rpn_post_nms_top_n_test": int(rpn_test.get("max_num", 1000)),
        "box_batch_size_per_image": int(sampler.get("num", 512)),
        "box_positive_fraction": float(sampler.get("pos_fraction", 0.25)),
        "score_thresh": float(rcnn.get("score_thr", 0.0)),
        "nms_thresh": float(nms.get("iou_thr", 0.5)) if isinstance(nms, dict) else 0.5,
        "detections_per_img": int(rcnn.get("max_per_img", 300)),
    }
    read = {
        "pixel_format": "img_norm_cfg.to_rgb",
        "pixel_mean": "img_norm_cfg.mean",
        "pixel_std": "img_norm_cfg.std",
        "stride_in_1x1": "model.backbone.style",
        "min_size": "data.test.img_scale",
        "max_size": "data.test.img_scale",
        "rpn_post_nms_top_n_test": "test_cfg.rpn.max_num",
        "score_thresh": "test_cfg.rcnn.score_thr",
        "nms_thresh": "test_cfg.rcnn.nms.iou_thr",
        "detections_per_img": "test_cfg.rcnn.max_per_img",
    }
    origin = where if given else "the SimCal release's mask_rcnn_r50_fpn_1x_lvis.py"
    settings = [(f"model.{k}", model[k], f"{v} ({origin})") for k, v in read.items()]
    if not given:
        notes.append("no config (neither --framework-config nor meta.config): the release's LVIS config is assumed")
    return Imported(state, model, num_classes, settings, notes, source_keys)
