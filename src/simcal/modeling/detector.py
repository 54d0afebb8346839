"""Builders for torchvision Mask R-CNN on long-tailed data.

``maskrcnn_resnet50_fpn`` is the paper's model (ResNet-50-FPN, torchvision's builder, weights
passed through for users who have them). ``maskrcnn_small`` is a ResNet-18-FPN with narrow
heads for CPU work (CPU-FACTS.md: about 1 s per training step of 8 images at 128 px).

Both return a :class:`LongTailMaskRCNN`: torchvision's Mask R-CNN parts (the same state-dict
keys, so checkpoints load both ways) with :class:`simcal.modeling.roi_heads.LongTailRoIHeads`,
whose box predictor owns scoring (:mod:`simcal.modeling.predictors`), and one inference API,
:meth:`LongTailMaskRCNN.detect` (several scorers from one pass). ``num_classes`` counts
foreground classes (scores have ``num_classes + 1`` columns, column 0 background).
:meth:`LongTailMaskRCNN.from_torchvision` adopts a torchvision ``MaskRCNN`` a user already holds.

The RPN's proposal counts are changed only through :func:`proposal_counts` (a context manager);
nothing outside this module touches torchvision's private attributes.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import ResNet18_Weights, ResNet50_Weights, resnet18
from torchvision.models.detection import MaskRCNN, MaskRCNN_ResNet50_FPN_Weights
from torchvision.models.detection import maskrcnn_resnet50_fpn as tv_maskrcnn_resnet50_fpn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from simcal.config import ModelConfig
from simcal.errors import InputError
from simcal.io import load_checkpoint
from simcal.modeling import predictors
from simcal.modeling.cascade import CascadeRoIHeads, HybridTaskCascadeRoIHeads
from simcal.modeling.conventions import (
    ExactAnchorGenerator,
    FrameworkRPN,
    FrameworkTransform,
    LegacyAnchorGenerator,
    LegacyBoxCoder,
    LevelRoIAlign,
    paste_masks_legacy,
    put_stride_in_1x1,
    rescale_detections,
)
from simcal.modeling.predictors import BoxPredictor
from simcal.modeling.roi_heads import LongTailRoIHeads, Scorer
from simcal.modeling.sampling import SeededBalancedSampler, install_seeded_samplers

PASTE_PIXELS = 20_000_000  # pixels of pasted masks held at once


def paste_masks(masks: Tensor, boxes: Tensor, height: int, width: int, threshold: float = 0.5) -> Tensor:
    """Paste ``M x M`` mask probabilities into the image and binarise.

    Bilinear sampling of every mask at once (``grid_sample``), in chunks of ``PASTE_PIXELS``; no
    per-mask Python loop. It differs from torchvision's resize-and-paste only along the borders.

    Args:
        masks: ``(N, M, M)`` probabilities in box coordinates.
        boxes: ``(N, 4)`` xyxy in image pixels.

    Returns:
        ``(N, height, width)`` bool.
    """
    n = masks.shape[0]
    out = torch.zeros((n, height, width), dtype=torch.bool, device=masks.device)
    if n == 0:
        return out
    chunk = max(1, PASTE_PIXELS // max(1, height * width))
    ys = torch.arange(height, device=masks.device, dtype=torch.float32) + 0.5
    xs = torch.arange(width, device=masks.device, dtype=torch.float32) + 0.5
    for s in range(0, n, chunk):
        b = boxes[s : s + chunk].float()
        x0, y0, x1, y1 = b.unbind(1)
        gy = (ys[None] - y0[:, None]) / (y1 - y0).clamp(min=1e-6)[:, None] * 2 - 1  # (n, H)
        gx = (xs[None] - x0[:, None]) / (x1 - x0).clamp(min=1e-6)[:, None] * 2 - 1  # (n, W)
        k = b.shape[0]
        grid = torch.stack([gx[:, None, :].expand(k, height, width), gy[:, :, None].expand(k, height, width)], dim=3)
        pasted = F.grid_sample(masks[s : s + chunk, None].float(), grid, align_corners=False)[:, 0]
        out[s : s + chunk] = pasted >= threshold
    return out


class LongTailMaskRCNN(GeneralizedRCNN):
    """torchvision's Mask R-CNN (``transform``, ``backbone``, ``rpn``, ``roi_heads``) with
    :class:`LongTailRoIHeads` and a multi-scorer inference API.

    ``model(images)`` / ``model(images, targets)`` behave as torchvision's ``MaskRCNN``.
    """

    roi_heads: LongTailRoIHeads

    @classmethod
    def from_torchvision(cls, model: GeneralizedRCNN, class_agnostic: bool | None = None) -> LongTailMaskRCNN:
        """Adopt a torchvision (Mask) R-CNN's parts, shared, not copied: its weights, transform and
        test settings, and its train/eval mode. Its RoI heads are rebuilt as :class:`LongTailRoIHeads`
        (a new object over the same layers, with a seeded RoI sampler); ``model`` itself is not
        changed. Seeded training also needs a seeded RPN sampler: :func:`long_tail_model`."""
        if isinstance(model, LongTailMaskRCNN):
            return model
        if class_agnostic is None:
            class_agnostic = model.roi_heads.box_predictor.bbox_pred.out_features == 4
        roi_heads = model.roi_heads
        if not isinstance(roi_heads, LongTailRoIHeads):
            roi_heads = LongTailRoIHeads.from_roi_heads(roi_heads, class_agnostic=class_agnostic)
            roi_heads.training = model.roi_heads.training
            old = roi_heads.fg_bg_sampler
            roi_heads.fg_bg_sampler = SeededBalancedSampler(old.batch_size_per_image, old.positive_fraction)
        out = cls(model.backbone, model.rpn, roi_heads, model.transform)
        out.training = model.training  # the flag only: the shared parts keep their own
        return out

    @torch.no_grad()
    def detect(
        self,
        images: list[Tensor],
        scorers: Mapping[str, Scorer],
        targets: list[dict[str, Tensor]] | None = None,
        with_masks: bool = True,
        min_scores: Mapping[str, Tensor] | None = None,
        per_class: int = 0,
        paste: bool = True,
    ) -> dict[str, list[dict[str, Tensor]]]:
        """Detections of every scorer from ONE pass of the backbone, RPN and RoI box features.

        Args:
            images: ``(3, H_i, W_i)`` float in [0, 1], any sizes.
            scorers: name -> scorer (:mod:`simcal.modeling.scoring`).
            targets: per image ``{"boxes" (N, 4) xyxy, "labels" (N,)}`` in image pixels, for the
                scorers that read the ground truth (the oracle).
            with_masks: compute masks (once per distinct RoI and class over all scorers).
            min_scores: name -> ``(C+1,)`` per-class minimum score of that scorer's candidates,
                applied before NMS (``predict --topk-per-class``'s running thresholds).
            per_class: when positive, each class's best ``per_class`` detections over the batch.
            paste: paste the masks into the image; else they stay ``(N, 1, 28, 28)`` probabilities
                in box coordinates (:func:`paste_masks` them a few at a time: with no per-image cap
                the pasted masks of one batch may not fit in memory).

        Returns:
            ``{name: [per image {"boxes" (N, 4) xyxy in original pixels, "scores" (N,),
            "labels" (N,), "masks" (N, H, W) bool (``(N, 1, 28, 28)`` without ``paste``)}]}``.
        """
        sizes = [tuple(im.shape[-2:]) for im in images]
        if targets is not None:
            device = images[0].device
            targets = [{"boxes": t["boxes"].to(device), "labels": t["labels"].to(device)} for t in targets]
        batch, targets = self.transform(images, targets)
        features = self.backbone(batch.tensors)
        proposals, _ = self.rpn(batch, features)
        out = self.roi_heads.detect(
            features,
            proposals,
            batch.image_sizes,
            scorers,
            targets,
            with_masks=with_masks,
            min_scores=min_scores,
            per_class=per_class,
        )
        clip = bool(getattr(self.transform, "clip_to_original", False))
        for result in out.values():
            for i, (resized, (h, w)) in enumerate(zip(batch.image_sizes, sizes)):
                r = result[i]
                r.pop("roi", None)
                r = result[i] = rescale_detections(r, resized, (h, w), clip, self.transform)
                if "masks" in r and paste:
                    paster = paste_masks_legacy if self.roi_heads.box_plus_one else paste_masks
                    r["masks"] = paster(r["masks"][:, 0], r["boxes"], int(h), int(w))
        return out

    @torch.no_grad()
    def proposals(self, images: list[Tensor]) -> list[Tensor]:
        """The RPN's proposals per image ``(P_i, 4)`` xyxy in original pixels, best objectness first."""
        batch, _ = self.transform(images)
        props, _ = self.rpn(batch, self.backbone(batch.tensors))
        to_original = getattr(self.transform, "to_original", resize_boxes)
        return [
            to_original(p, resized, tuple(im.shape[-2:])) for p, resized, im in zip(props, batch.image_sizes, images)
        ]


def training_proposal_counts(model: GeneralizedRCNN) -> tuple[int, int]:
    """The RPN's ``(pre-NMS, post-NMS)`` proposal counts per image in training mode."""
    rpn = model.rpn
    return rpn._pre_nms_top_n["training"], rpn._post_nms_top_n["training"]


def eval_proposal_counts(model: GeneralizedRCNN) -> tuple[int, int]:
    """The RPN's ``(pre-NMS, post-NMS)`` proposal counts per image in eval mode."""
    rpn = model.rpn
    return rpn._pre_nms_top_n["testing"], rpn._post_nms_top_n["testing"]


@contextmanager
def proposal_counts(model: GeneralizedRCNN, pre_nms: int, post_nms: int) -> Iterator[None]:
    """Within the block, the RPN keeps ``pre_nms`` / ``post_nms`` proposals per image in eval mode
    (calibration uses the training counts; the recall analysis at least 1000). The previous counts
    come back when the block ends, also on an error."""
    rpn = model.rpn
    before = dict(rpn._pre_nms_top_n), dict(rpn._post_nms_top_n)
    try:
        rpn._pre_nms_top_n = {**before[0], "testing": pre_nms}
        rpn._post_nms_top_n = {**before[1], "testing": post_nms}
        yield
    finally:
        rpn._pre_nms_top_n, rpn._post_nms_top_n = before


#: ``model.norm`` -> the normalisation layer of a ``C``-channel feature map (:data:`simcal.choices.NORMS`)
NORM_LAYERS: dict[str, Callable[[int], nn.Module]] = {
    "bn": nn.BatchNorm2d,
    "gn": lambda c: nn.GroupNorm(min(32, c), c),  # 32 groups, batch-size independent, exact under DDP
    "frozen_bn": FrozenBatchNorm2d,
}


def norm_layer(name: str) -> Callable[[int], nn.Module]:
    """``bn`` | ``gn`` (32 groups, batch-size independent, exact under DDP) | ``frozen_bn``."""
    if name not in NORM_LAYERS:
        raise InputError("model.norm", "norm", f"expected one of {', '.join(NORM_LAYERS)}, got {name!r}")
    return NORM_LAYERS[name]


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


def read_state_dict(path: str | os.PathLike[str], field: str) -> dict[str, Tensor]:
    """The state dict a weights file holds: a plain one (torchvision's files), a simcal run's
    ``model_final.pth`` / ``checkpoint_last.pth`` (``{"model": ...}``) or a ``{"state_dict": ...}``
    checkpoint; read with ``weights_only``. Anything else is an :class:`InputError` naming the file
    and ``field`` (``model.weights``): not a file torch reads, or no tensors by name in it."""
    if not os.path.isfile(path):
        raise InputError(path, field, "no such file" if not os.path.exists(path) else "not a regular file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a text file, an empty one, a truncated one: not weights
        first = str(e).split("\n")[0].split(". ")[0].strip() or type(e).__name__
        raise InputError(path, field, f"not a weights file torch can read ({type(e).__name__}: {first})") from None
    if isinstance(obj, Mapping) and obj.get("format") == _HEAD_FORMAT:
        raise InputError(path, field, "a calibrated head, not detector weights (use a run's model_final.pth)")
    for key in ("model", "state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        held = type(obj).__name__ if not isinstance(obj, Mapping) else "a dict of other things"
        raise InputError(path, field, f"holds {held}, not weights by name (a state dict)")
    return dict(obj)


def load_pretrained(module: nn.Module, source: str | os.PathLike[str] | dict[str, Tensor], field: str) -> None:
    """Load the tensors of ``source`` (a file, :func:`read_state_dict`, or a state dict) whose name and
    shape fit ``module``, and say how many: ``field: loaded N of M tensors from FILE (K of the
    model's stay as initialised; U in the file unused)``. A file of which nothing fits (another
    architecture's, a calibrated head) is an :class:`InputError`: weights are never ignored silently."""
    state = read_state_dict(source, field) if not isinstance(source, dict) else source
    name = source if not isinstance(source, dict) else "torchvision's weights"
    own = module.state_dict()
    skipped = load_matching(module, state)
    loaded = len(state) - len(skipped)
    if loaded == 0:
        raise InputError(
            name,
            field,
            f"none of its {len(state)} tensors fits this architecture (its first: {next(iter(state))!r}; the model's "
            f"first: {next(iter(own))!r}): weights of another architecture",
        )
    print(
        f"{field}: loaded {loaded} of {len(own)} tensors from {name} ({len(own) - loaded} of the model's stay as "
        f"initialised; {len(skipped)} in the file unused)"
    )


#: the format field of a calibrated head file (:mod:`simcal.modeling.calibration`), recognised here
#: so that a head passed where detector weights belong is named as such
_HEAD_FORMAT = "simcal.calibrated_head"
_CLASSIFIER = "roi_heads.box_predictor.cls_score.weight"


def load_detector_weights(
    model: nn.Module,
    path: str | os.PathLike[str],
    label_map: str | os.PathLike[str] | None = None,
    state: Any = None,
) -> dict[str, Any]:
    """Load a simcal detector checkpoint (``{"model": state dict, ...}``) into ``model``; return it.

    ``model`` was built from a run's config and label map (``label_map``: that file, named in the
    errors). A file that is not detector weights (a calibrated head, a bare state dict) or whose
    tensors do not fit ``model`` is an :class:`InputError` that names the file and what differs:
    the classifier's outputs against the label map's classes, or the first key or shape.
    """
    state = load_checkpoint(path) if state is None else state  # ``state``: ``path`` already read
    if isinstance(state, dict) and state.get("format") == _HEAD_FORMAT:
        raise InputError(
            path, "format", "a calibrated head, not detector weights: name its calibration with --calibration"
        )
    weights = state.get("model") if isinstance(state, dict) else None
    if not isinstance(weights, Mapping) or not all(isinstance(v, Tensor) for v in weights.values()):
        raise InputError(
            path, "model", "not simcal detector weights (no 'model' state dict): use a run's model_final.pth"
        )
    own = model.state_dict()
    # a stateful loss's training state (Seesaw's counts, EQLv2's statistics: ``...cls_loss.*``) is
    # restored on resume; a detector built for inference has no loss state and skips it
    weights = {k: v for k, v in weights.items() if k in own or ".cls_loss." not in k}
    # a BatchNorm's step counter where the detector has a frozen BN (a resnet50_fpn trained from scratch
    # before model.norm applied to it: in eval mode the two compute the same)
    weights = {k: v for k, v in weights.items() if k in own or not k.endswith(".num_batches_tracked")}
    if _CLASSIFIER in own and _CLASSIFIER in weights and own[_CLASSIFIER].shape != weights[_CLASSIFIER].shape:
        built = f" (from {label_map})" if label_map is not None else ""
        raise InputError(
            path,
            _CLASSIFIER,
            f"the weights classify {weights[_CLASSIFIER].shape[0]} outputs, the detector built for the run's "
            f"label map{built} {own[_CLASSIFIER].shape[0]}: weights and label map are from different runs",
        )
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    if missing or unexpected:
        first = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise InputError(
            path,
            "model",
            f"{len(missing)} tensors missing and {len(unexpected)} unexpected ({first}): "
            "the weights are of another architecture than the run's config (model.arch, model.roi_heads, "
            "model.class_agnostic)",
        )
    for key, tensor in own.items():
        if tensor.shape != weights[key].shape:
            raise InputError(
                path,
                f"model.{key}",
                f"shape {list(weights[key].shape)} in the file, {list(tensor.shape)} in the detector the run's "
                "config builds",
            )
    model.load_state_dict(weights)
    return state


def _class_agnostic_predictors(model: GeneralizedRCNN, num_classes: int) -> None:
    bp = model.roi_heads.box_predictor
    bp.bbox_pred = nn.Linear(bp.bbox_pred.in_features, 4)
    mp = model.roi_heads.mask_predictor
    mp.mask_fcn_logits = nn.Conv2d(mp.mask_fcn_logits.in_channels, 1, 1)
    nn.init.kaiming_normal_(mp.mask_fcn_logits.weight, mode="fan_out", nonlinearity="relu")
    nn.init.zeros_(mp.mask_fcn_logits.bias)


def _cascade(cls: type[CascadeRoIHeads]) -> Callable[[LongTailRoIHeads, ModelConfig], LongTailRoIHeads]:
    def build(standard: LongTailRoIHeads, cfg: ModelConfig) -> LongTailRoIHeads:
        extra: dict[str, Any] = {}
        if cfg.cascade_box_weights is not None:
            extra["stage_box_weights"] = tuple(tuple(row) for row in cfg.cascade_box_weights)
        if cls is HybridTaskCascadeRoIHeads and not cfg.mask_flow:
            extra["mask_flow"] = False
        return cls.from_standard(standard, mean_probs=cfg.cascade_mean_probs, **extra)

    return build


#: ``model.roi_heads`` -> the RoI heads built on the standard (one-stage) ones the builder made
ROI_HEADS_BUILDERS: dict[str, Callable[[LongTailRoIHeads, ModelConfig], LongTailRoIHeads]] = {
    "standard": lambda standard, cfg: standard,
    "cascade": _cascade(CascadeRoIHeads),
    "htc": _cascade(HybridTaskCascadeRoIHeads),
}


def long_tail_model(
    model: GeneralizedRCNN, class_agnostic: bool, cls_loss: nn.Module | None = None
) -> LongTailMaskRCNN:
    """simcal's detector from a torchvision Mask R-CNN the builder just made: the box predictor
    scores with the classifier's activation (:func:`simcal.modeling.predictors.build_activation`)
    and trains with ``cls_loss`` (default: its cross-entropy), and the RPN's and RoI heads'
    samplers are seeded (:func:`simcal.modeling.sampling.sampling_seeds`)."""
    predictor = BoxPredictor.from_torchvision(model.roi_heads.box_predictor, predictors.build_activation())
    if cls_loss is not None:
        predictor.set_loss(cls_loss)
    model.roi_heads.box_predictor = predictor
    out = LongTailMaskRCNN.from_torchvision(model, class_agnostic=class_agnostic)
    install_seeded_samplers(out)
    return out


@contextmanager
def eval_mode(model: nn.Module, frozen: bool = False) -> Iterator[None]:
    """Within the block ``model`` is in eval mode (BatchNorm, the RPN's test counts) and, with
    ``frozen``, no parameter takes a gradient. Every submodule's mode and every parameter's
    ``requires_grad`` come back afterwards, error or not (a model a user passed in is left as it was)."""
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    if frozen:
        for p, _ in grads:
            p.requires_grad_(False)
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
        for p, grad in grads:
            p.requires_grad_(grad)


def maskrcnn_resnet50_fpn(
    *,
    num_classes: int,
    weights: str | None = None,
    weights_backbone: str | None = None,
    trainable_backbone_layers: int | None = None,
    class_agnostic: bool = False,
    cls_loss: nn.Module | None = None,
    norm: str | None = None,
    **kwargs: Any,
) -> LongTailMaskRCNN:
    """The paper's Mask R-CNN R50-FPN (torchvision's), for ``num_classes`` foreground classes.

    Args:
        weights: torchvision ``MaskRCNN_ResNet50_FPN_Weights`` name (``COCO_V1``) or a checkpoint
            path; the class-specific predictor layers are re-initialised for ``num_classes``.
        weights_backbone: ``ResNet50_Weights`` name (``IMAGENET1K_V1``, the paper's) or a path.
        norm: the backbone's normalisation (:data:`NORM_LAYERS`); None: torchvision's rule (frozen
            with pretrained weights, BatchNorm without). Where it is torchvision's choice anyway,
            torchvision's builder makes the model; else :func:`maskrcnn_resnet_fpn`.
        kwargs: passed to torchvision's ``MaskRCNN`` (``min_size``, ``box_score_thresh``, ...).
    """
    pretrained = weights is not None or weights_backbone is not None
    if norm is not None and norm != ("frozen_bn" if pretrained else "bn"):
        return maskrcnn_resnet_fpn(
            "resnet50",
            num_classes=num_classes,
            norm=norm,
            weights=weights,
            weights_backbone=weights_backbone,
            trainable_backbone_layers=trainable_backbone_layers,
            class_agnostic=class_agnostic,
            cls_loss=cls_loss,
            **kwargs,
        )
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
        load_pretrained(model.backbone.body, wb, "model.weights_backbone")
    if w is not None:
        load_pretrained(model, w if isinstance(w, str) else w.get_state_dict(progress=True), "model.weights")
    return long_tail_model(model, class_agnostic, cls_loss)


def maskrcnn_small(
    *,
    num_classes: int,
    norm: str = "bn",
    weights: str | None = None,
    weights_backbone: str | None = None,
    class_agnostic: bool = False,
    cls_loss: nn.Module | None = None,
    fpn_channels: int = 128,
    representation_size: int = 256,
    **kwargs: Any,
) -> LongTailMaskRCNN:
    """A small Mask R-CNN for CPU work: ResNet-18 body, FPN of ``fpn_channels``, narrow heads.

    Anchors 16-256 (one size per level P2-P6, ratios 0.5/1/2); box head
    ``fpn_channels*7*7 -> representation_size -> representation_size``; mask head 2 convs of
    ``fpn_channels``. ``kwargs`` go to torchvision's ``MaskRCNN`` (sizes, RPN/RoI sample counts).
    ``weights``: a file of a whole detector of this architecture (a simcal run's ``model_final.pth``);
    layers that do not fit ``num_classes`` stay fresh.
    """
    wb = _resolve_weights(weights_backbone, ResNet18_Weights, "model.weights_backbone")
    body = resnet18(weights=None if isinstance(wb, str) else wb, norm_layer=norm_layer(norm))
    if isinstance(wb, str):
        load_pretrained(body, wb, "model.weights_backbone")
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
    if weights is not None:
        load_pretrained(model, weights, "model.weights")
    return long_tail_model(model, class_agnostic, cls_loss)


def maskrcnn_resnet_fpn(
    body: str,
    *,
    num_classes: int,
    norm: str = "frozen_bn",
    weights: str | None = None,
    weights_backbone: str | None = None,
    trainable_backbone_layers: int | None = None,
    class_agnostic: bool = False,
    cls_loss: nn.Module | None = None,
    **kwargs: Any,
) -> LongTailMaskRCNN:
    """Mask R-CNN with a torchvision ResNet / ResNeXt ``body`` (``resnet101``, ``resnext101_32x8d``,
    ``resnext101_64x4d``: the paper's HTC backbone, Sec. 5.5) in an FPN, through torchvision's
    ``resnet_fpn_backbone``, and R50-FPN's heads.

    Args:
        norm: the backbone's normalisation (:data:`NORM_LAYERS`).
        weights: a local ``.pth`` of a whole detector of this architecture (torchvision has no
            detection weights for it); layers that do not fit ``num_classes`` stay fresh.
        weights_backbone: the body's torchvision weights name (``IMAGENET1K_V1``) or a local ``.pth``.
        trainable_backbone_layers: 0-5 (default 3, as torchvision's, with pretrained weights; all 5
            from scratch).
    """
    from torchvision.models import get_model_weights
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    wb = _resolve_weights(weights_backbone, get_model_weights(body), "model.weights_backbone")
    layers = trainable_backbone_layers if trainable_backbone_layers is not None else (3 if wb is not None else 5)
    backbone = resnet_fpn_backbone(
        backbone_name=body,
        weights=None if isinstance(wb, str) else wb,
        norm_layer=norm_layer(norm),
        trainable_layers=layers,
    )
    if isinstance(wb, str):
        load_pretrained(backbone.body, wb, "model.weights_backbone")
    model = MaskRCNN(backbone, num_classes=num_classes + 1, **kwargs)
    if class_agnostic:
        _class_agnostic_predictors(model, num_classes)
    if weights is not None:
        if body == "resnet50" and not os.path.exists(weights):
            state = _resolve_weights(weights, MaskRCNN_ResNet50_FPN_Weights, "model.weights").get_state_dict(
                progress=True
            )
        elif not os.path.exists(weights):
            raise InputError(
                "model.weights", "weights", f"{weights!r}: no torchvision detection weights for this arch, give a file"
            )
        else:
            state = read_state_dict(weights, "model.weights")
        load_pretrained(model, state if not os.path.exists(weights) else weights, "model.weights")
    return long_tail_model(model, class_agnostic, cls_loss)


def maskrcnn_resnext101_64x4d_fpn(**kwargs: Any) -> LongTailMaskRCNN:
    """Mask R-CNN with a ResNeXt-101 64x4d FPN body (the paper's HTC backbone): :func:`maskrcnn_resnet_fpn`."""
    return maskrcnn_resnet_fpn("resnext101_64x4d", **kwargs)


def _resnet_fpn_arch(body: str) -> Callable[[ModelConfig, dict[str, Any]], LongTailMaskRCNN]:
    """The :data:`ARCH_BUILDERS` entry of a torchvision ResNet / ResNeXt body in an FPN."""
    return lambda cfg, common: maskrcnn_resnet_fpn(
        body,
        norm=cfg.norm,
        weights=cfg.weights,
        weights_backbone=cfg.weights_backbone,
        trainable_backbone_layers=cfg.trainable_backbone_layers,
        **common,
    )


#: ``model.arch`` -> builder ``(model config, common torchvision kwargs) -> model`` (:data:`simcal.choices.ARCHS`)
ARCH_BUILDERS: dict[str, Callable[[ModelConfig, dict[str, Any]], LongTailMaskRCNN]] = {
    "resnet50_fpn": lambda cfg, common: maskrcnn_resnet50_fpn(
        weights=cfg.weights,
        weights_backbone=cfg.weights_backbone,
        trainable_backbone_layers=cfg.trainable_backbone_layers,
        norm=cfg.norm,
        **common,
    ),
    "small": lambda cfg, common: maskrcnn_small(
        norm=cfg.norm, weights=cfg.weights, weights_backbone=cfg.weights_backbone, **common
    ),
    "resnext101_64x4d_fpn": _resnet_fpn_arch("resnext101_64x4d"),
    "resnet101_fpn": _resnet_fpn_arch("resnet101"),
    "resnet152_fpn": _resnet_fpn_arch("resnet152"),
    "resnext50_32x4d_fpn": _resnet_fpn_arch("resnext50_32x4d"),
    "resnext101_32x8d_fpn": _resnet_fpn_arch("resnext101_32x8d"),
}


def train_scales(model: GeneralizedRCNN, scales: list[int] | None, max_size: int | None) -> None:
    """Multi-scale training: in training mode each image's short edge is drawn uniformly from the
    whole pixels of ``scales`` = ``[lo, hi]`` (torchvision's transform draws one per image from
    its ``min_size`` tuple, with the global generator: seeded, and restored on resume), the long
    edge at most ``max_size``. Only for the training loop's model: torchvision's eval mode would
    take the largest of the scales, so a model for test or calibration is built without them."""
    if scales:
        model.transform.min_size = tuple(range(int(scales[0]), int(scales[1]) + 1))
    if max_size:
        model.transform.max_size = int(max_size)


def apply_conventions(model: LongTailMaskRCNN, cfg: ModelConfig) -> None:
    """Give ``model`` the home framework's math that ``cfg`` names (:mod:`simcal.modeling.conventions`).
    At the defaults (torchvision's) nothing is replaced: the model is the one torchvision builds."""
    if (
        cfg.pixel_format != "rgb"
        or cfg.pixel_mean is not None
        or cfg.pixel_std is not None
        or cfg.resize != "torchvision"
    ):
        model.transform = FrameworkTransform.from_transform(
            model.transform,
            pixel_format=cfg.pixel_format,
            pixel_mean=cfg.pixel_mean,
            pixel_std=cfg.pixel_std,
            resize=cfg.resize,
        )
    if cfg.stride_in_1x1:
        put_stride_in_1x1(model.backbone.body)
    if cfg.anchors != "torchvision":
        old = model.rpn.anchor_generator
        strides = [4 * 2**i for i in range(len(old.sizes))]  # P2.. of an FPN with its max-pooled P6
        if cfg.anchors == "exact":
            model.rpn.anchor_generator = ExactAnchorGenerator(old.sizes, old.aspect_ratios, strides)
        else:  # mmdet_v1: its scales are the sizes over the stride (8 for torchvision's 32..512)
            scales = sorted({size / stride for sizes, stride in zip(old.sizes, strides) for size in sizes})
            model.rpn.anchor_generator = LegacyAnchorGenerator(scales, old.aspect_ratios, strides)
    FrameworkRPN.adopt(model.rpn, cfg.proposals)
    roi = model.roi_heads
    if cfg.box_plus_one:
        model.rpn.box_coder = LegacyBoxCoder(model.rpn.box_coder.weights)
        roi.box_plus_one = True
        roi.box_coder = LegacyBoxCoder(roi.box_coder.weights)
        if hasattr(roi, "stage_coders"):
            roi.stage_coders = [LegacyBoxCoder(c.weights) for c in roi.stage_coders]
            roi.box_coder = roi.stage_coders[0]
    if cfg.mask_head == "normed" and roi.mask_predictor is not None:
        for owner in [roi.mask_predictor, *getattr(roi, "extra_mask_predictors", [])]:
            old_conv = owner.mask_fcn_logits
            conv = predictors.NormedConv2d(old_conv.in_channels, old_conv.out_channels, 1)
            owner.mask_fcn_logits = conv.to(old_conv.weight.device)
    if cfg.roi_align != "torchvision":
        roi.box_roi_pool = LevelRoIAlign.from_pooler(roi.box_roi_pool, cfg.roi_align)
        if roi.mask_roi_pool is not None:
            roi.mask_roi_pool = LevelRoIAlign.from_pooler(roi.mask_roi_pool, cfg.roi_align)
    roi.min_box_size = cfg.min_box_size


def build_detector(
    cfg: ModelConfig,
    num_classes: int,
    cls_loss: nn.Module | None = None,
    classifier: str | None = None,
    instance_counts: Sequence[int] | None = None,
    prior_prob: float = 0.0,
    pretrained: bool = True,
    classifier_groups: Sequence[int] | None = None,
) -> LongTailMaskRCNN:
    """The detector a config describes, with the test preset applied (score, NMS, detections).

    ``pretrained``: load ``model.weights`` / ``model.weights_backbone`` (a new training run); a
    detector whose weights come next from a run's checkpoint is built without them (the same
    modules: frozen BN as ``model.norm`` says).

    Args:
        classifier: the classifier's activation (:data:`simcal.choices.CLASSIFIERS`, resolved:
            :func:`simcal.config.classifier_of`); default ``cfg.classifier``, softmax for ``auto``.
        instance_counts: ``(C,)`` training instance counts (the group softmax groups classes by them).
        classifier_groups: ``(C,)`` the group softmax's class groups as a checkpoint saved them
            (:func:`simcal.modeling.predictors.classifier_state`); instead of ``instance_counts``.
        prior_prob: a sigmoid classifier's starting class probability (resolved:
            :func:`simcal.config.prior_prob_of`); 0 keeps the fresh layer's init.
    """
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
    if cfg.arch not in ARCH_BUILDERS:
        raise InputError("model.arch", "arch", f"expected one of {', '.join(ARCH_BUILDERS)}, got {cfg.arch!r}")
    if not pretrained and (cfg.weights is not None or cfg.weights_backbone is not None):
        cfg = dataclasses.replace(cfg, weights=None, weights_backbone=None)
    model = ARCH_BUILDERS[cfg.arch](cfg, common)
    classifier = classifier or (cfg.classifier if cfg.classifier != "auto" else "softmax")
    if classifier != "softmax" or cfg.cls_head != "linear":
        try:
            counts = None if instance_counts is None else list(instance_counts)
            groups = None if classifier_groups is None else list(classifier_groups)
            activation = predictors.build_activation(classifier, counts, groups)
        except ValueError as e:
            raise InputError("model.classifier", "classifier", str(e)) from None
        model.roi_heads.box_predictor.set_classifier(activation, normed=cfg.cls_head == "normed", prior_prob=prior_prob)
        if cls_loss is not None:
            model.roi_heads.set_loss(cls_loss)
    model.roi_heads = ROI_HEADS_BUILDERS[cfg.roi_heads](model.roi_heads, cfg)
    apply_conventions(model, cfg)
    if cfg.channels_last:
        # weights in NHWC make every convolution (and its output) NHWC; load_state_dict keeps the format
        model = model.to(memory_format=torch.channels_last)
    return model
