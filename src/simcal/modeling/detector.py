"""Builders for torchvision Mask R-CNN on long-tailed data.

``maskrcnn_resnet50_fpn`` is the paper's model (ResNet-50-FPN, torchvision's builder, weights
passed through for users who have them). ``maskrcnn_small`` is a ResNet-18-FPN with narrow
heads for CPU work (CPU-FACTS.md: about 1 s per training step of 8 images at 128 px).

Both return a plain :class:`torchvision.models.detection.MaskRCNN` whose ``roi_heads`` is
:class:`simcal.modeling.roi_heads.LongTailRoIHeads`; ``num_classes`` counts foreground classes
(the model has ``num_classes + 1`` outputs, column 0 background).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torchvision.models import ResNet18_Weights, ResNet50_Weights, resnet18
from torchvision.models.detection import MaskRCNN, MaskRCNN_ResNet50_FPN_Weights
from torchvision.models.detection import maskrcnn_resnet50_fpn as tv_maskrcnn_resnet50_fpn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from simcal.config import ModelConfig
from simcal.errors import InputError
from simcal.modeling.roi_heads import LongTailRoIHeads
from simcal.modeling.sampling import install_seeded_samplers


def norm_layer(name: str) -> Callable[[int], nn.Module]:
    """``bn`` | ``gn`` (32 groups, batch-size independent, exact under DDP) | ``frozen_bn``."""
    if name == "bn":
        return nn.BatchNorm2d
    if name == "gn":
        return lambda c: nn.GroupNorm(min(32, c), c)
    if name == "frozen_bn":
        return FrozenBatchNorm2d
    raise InputError("model.norm", "norm", f"expected bn, gn or frozen_bn, got {name!r}")


def _resolve_weights(name: str | None, enum: Any, field: str) -> Any:
    """A torchvision weights enum member by name (``COCO_V1``, ``DEFAULT``), a .pth path, or None."""
    if name is None:
        return None
    if os.path.exists(name):
        return name
    try:
        return enum[name] if name != "DEFAULT" else enum.DEFAULT
    except KeyError:
        valid = ", ".join(["DEFAULT", *enum.__members__])
        raise InputError(field, field.split(".")[-1], f"unknown weights {name!r}: a path or one of {valid}") from None


def load_matching(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Load the entries of ``state`` whose name and shape match; return the names skipped."""
    own = model.state_dict()
    keep = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(keep, strict=False)
    return sorted(set(state) - set(keep))


def _class_agnostic_predictors(model: MaskRCNN, num_classes: int) -> None:
    bp = model.roi_heads.box_predictor
    bp.bbox_pred = nn.Linear(bp.bbox_pred.in_features, 4)
    mp = model.roi_heads.mask_predictor
    mp.mask_fcn_logits = nn.Conv2d(mp.mask_fcn_logits.in_channels, 1, 1)
    nn.init.kaiming_normal_(mp.mask_fcn_logits.weight, mode="fan_out", nonlinearity="relu")
    nn.init.zeros_(mp.mask_fcn_logits.bias)


def rebuild_roi_heads(old: RoIHeads, cls: type[RoIHeads] = LongTailRoIHeads, **kwargs: Any) -> RoIHeads:
    """A ``cls`` RoIHeads with the same parts (pools, heads, predictors) and settings as ``old``."""
    return cls(
        old.box_roi_pool,
        old.box_head,
        old.box_predictor,
        old.proposal_matcher.high_threshold,
        old.proposal_matcher.low_threshold,
        old.fg_bg_sampler.batch_size_per_image,
        old.fg_bg_sampler.positive_fraction,
        old.box_coder.weights,
        old.score_thresh,
        old.nms_thresh,
        old.detections_per_img,
        mask_roi_pool=old.mask_roi_pool,
        mask_head=old.mask_head,
        mask_predictor=old.mask_predictor,
        **kwargs,
    )


def _install_roi_heads(model: MaskRCNN, class_agnostic: bool, cls_loss: nn.Module | None) -> MaskRCNN:
    """Replace torchvision's RoIHeads by :class:`LongTailRoIHeads` with the same parts and settings."""
    model.roi_heads = rebuild_roi_heads(model.roi_heads, class_agnostic=class_agnostic, cls_loss=cls_loss)
    install_seeded_samplers(model)
    return model


def maskrcnn_resnet50_fpn(
    *,
    num_classes: int,
    weights: str | None = None,
    weights_backbone: str | None = None,
    trainable_backbone_layers: int | None = None,
    class_agnostic: bool = False,
    cls_loss: nn.Module | None = None,
    **kwargs: Any,
) -> MaskRCNN:
    """The paper's Mask R-CNN R50-FPN (torchvision's), for ``num_classes`` foreground classes.

    Args:
        weights: torchvision ``MaskRCNN_ResNet50_FPN_Weights`` name (``COCO_V1``) or a checkpoint
            path; the class-specific predictor layers are re-initialised for ``num_classes``.
        weights_backbone: ``ResNet50_Weights`` name (``IMAGENET1K_V1``, the paper's) or a path.
        kwargs: passed to torchvision's ``MaskRCNN`` (``min_size``, ``box_score_thresh``, ...).
    """
    w = _resolve_weights(weights, MaskRCNN_ResNet50_FPN_Weights, "model.weights")
    wb = _resolve_weights(weights_backbone, ResNet50_Weights, "model.weights_backbone")
    model = tv_maskrcnn_resnet50_fpn(
        weights=None,
        weights_backbone=None if isinstance(wb, str) else wb,
        num_classes=num_classes + 1,
        trainable_backbone_layers=trainable_backbone_layers if (w or wb) else None,
        **kwargs,
    )
    if class_agnostic:
        _class_agnostic_predictors(model, num_classes)
    if isinstance(wb, str):
        state = torch.load(wb, map_location="cpu", weights_only=True)
        load_matching(model.backbone.body, state)
    if w is not None:
        state = (
            torch.load(w, map_location="cpu", weights_only=True)
            if isinstance(w, str)
            else w.get_state_dict(progress=True)
        )
        load_matching(model, state)
    return _install_roi_heads(model, class_agnostic, cls_loss)


def maskrcnn_small(
    *,
    num_classes: int,
    norm: str = "bn",
    weights_backbone: str | None = None,
    class_agnostic: bool = False,
    cls_loss: nn.Module | None = None,
    fpn_channels: int = 128,
    representation_size: int = 256,
    **kwargs: Any,
) -> MaskRCNN:
    """A small Mask R-CNN for CPU work: ResNet-18 body, FPN of ``fpn_channels``, narrow heads.

    Anchors 16-256 (one size per level P2-P6, ratios 0.5/1/2); box head
    ``fpn_channels*7*7 -> representation_size -> representation_size``; mask head 2 convs of
    ``fpn_channels``. ``kwargs`` go to torchvision's ``MaskRCNN`` (sizes, RPN/RoI sample counts).
    """
    wb = _resolve_weights(weights_backbone, ResNet18_Weights, "model.weights_backbone")
    body = resnet18(weights=None if isinstance(wb, str) else wb, norm_layer=norm_layer(norm))
    if isinstance(wb, str):
        load_matching(body, torch.load(wb, map_location="cpu", weights_only=True))
    backbone = BackboneWithFPN(
        body,
        return_layers={"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
        in_channels_list=[64, 128, 256, 512],
        out_channels=fpn_channels,
        extra_blocks=LastLevelMaxPool(),
    )
    anchors = AnchorGenerator(sizes=((16,), (32,), (64,), (128,), (256,)), aspect_ratios=((0.5, 1.0, 2.0),) * 5)
    model = MaskRCNN(
        backbone,
        num_classes=None,
        rpn_anchor_generator=anchors,
        box_head=TwoMLPHead(fpn_channels * 7 * 7, representation_size),
        box_predictor=FastRCNNPredictor(representation_size, num_classes + 1),
        mask_head=MaskRCNNHeads(fpn_channels, [fpn_channels, fpn_channels], 1),
        mask_predictor=MaskRCNNPredictor(fpn_channels, fpn_channels, num_classes + 1),
        **kwargs,
    )
    if class_agnostic:
        _class_agnostic_predictors(model, num_classes)
    return _install_roi_heads(model, class_agnostic, cls_loss)


def build_detector(cfg: ModelConfig, num_classes: int, cls_loss: nn.Module | None = None) -> MaskRCNN:
    """The detector a config describes, with the test preset applied (score, NMS, detections)."""
    common = dict(
        num_classes=num_classes,
        class_agnostic=cfg.class_agnostic,
        cls_loss=cls_loss,
        min_size=cfg.min_size,
        max_size=cfg.max_size,
        rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n_train,
        rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
        rpn_batch_size_per_image=cfg.rpn_batch_size_per_image,
        box_batch_size_per_image=cfg.box_batch_size_per_image,
        box_positive_fraction=cfg.box_positive_fraction,
        box_score_thresh=cfg.score_thresh,
        box_nms_thresh=cfg.nms_thresh,
        box_detections_per_img=cfg.detections_per_img,
    )
    if cfg.arch == "resnet50_fpn":
        model = maskrcnn_resnet50_fpn(
            weights=cfg.weights,
            weights_backbone=cfg.weights_backbone,
            trainable_backbone_layers=cfg.trainable_backbone_layers,
            **common,
        )
    elif cfg.arch == "small":
        model = maskrcnn_small(norm=cfg.norm, weights_backbone=cfg.weights_backbone, **common)
    else:
        raise InputError("model.arch", "arch", f"expected resnet50_fpn or small, got {cfg.arch!r}")
    if cfg.channels_last:
        # weights in NHWC make every convolution (and its output) NHWC; load_state_dict keeps the format
        model = model.to(memory_format=torch.channels_last)
    return model
