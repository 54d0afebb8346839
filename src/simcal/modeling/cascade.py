"""Cascade Mask R-CNN on torchvision parts (METHOD.md, "Multi-stage models").

:class:`CascadeRoIHeads` is :class:`~simcal.modeling.roi_heads.LongTailRoIHeads` with three box
stages instead of one, as detectron2's ``CascadeROIHeads`` builds them:

- stage k has its own 2-fc box head and predictor (C+1 scores, class-agnostic box deltas), its
  IoU threshold (0.5 / 0.6 / 0.7: foreground at or above it, else background) and its box-coder
  weights ((10, 10, 5, 5), (20, 20, 10, 10), (30, 30, 15, 15));
- training: stage 1 takes the sampled RoIs (the model's RoI batch and positive fraction, ground
  truth appended, seeded as every simcal sampler); stage k+1 takes stage k's regressed boxes of
  those RoIs (detached), relabelled at its own threshold, not re-sampled. Each stage's pooled
  features pass their gradient back scaled by 1 / (number of stages); each stage's losses have
  weight ``stage_loss_weights[k]`` (1, 1, 1). One mask head, trained on stage 1's positive RoIs;
- test: each stage scores its own input boxes; the score is the activation of the mean of the
  stages' logits (mmdetection, the paper's framework; ``mean_probs``: the mean of the stages'
  probabilities, detectron2's); boxes are the last stage's regression of its input boxes; the mask
  head runs on the final detections.

Stage 1 keeps torchvision's state-dict keys (``box_head``, ``box_predictor``), so the backbone,
FPN, RPN, stage-1 box head and mask head load from a torchvision Mask R-CNN checkpoint; stages 2
and 3 are ``extra_heads.<k>`` / ``extra_predictors.<k>``.

Inference is :meth:`LongTailRoIHeads.detect` unchanged: :meth:`CascadeRoIHeads.roi_batch` runs
the stages and hands the scorers one :class:`RoIBatch` whose logits are the stages' mean, so the
original head and the post-hoc scorers work on cascade runs as on standard ones.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.ops import boxes as box_ops

from simcal.modeling.predictors import BoxPredictor
from simcal.modeling.roi_heads import LongTailRoIHeads, RoIBatch

#: per stage: the IoU threshold, the box coder's weights, the weight of the stage's losses
CASCADE_IOUS = (0.5, 0.6, 0.7)
CASCADE_BOX_WEIGHTS = ((10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0), (30.0, 30.0, 15.0, 15.0))
CASCADE_LOSS_WEIGHTS = (1.0, 1.0, 1.0)


class ScaleGradient(torch.autograd.Function):
    """Identity forward; the gradient is multiplied by ``scale`` on the way back."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float) -> Tensor:  # noqa: D102
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # noqa: D102
        return grad * ctx.scale, None


class CascadeRoIHeads(LongTailRoIHeads):
    """Three box stages (see the module docstring); ``box_head`` / ``box_predictor`` are stage 1.

    Attributes:
        extra_heads, extra_predictors: stages 2.. (``nn.ModuleList``).
        stage_ious: IoU threshold per stage; stage_coders: :class:`BoxCoder` per stage.
        stage_loss_weights: weight of each stage's losses.
        mean_probs: average the stages' probabilities instead of their logits at test.
    """

    def __init__(
        self,
        *args: Any,
        extra_heads: list[nn.Module],
        extra_predictors: list[BoxPredictor],
        stage_ious: tuple[float, ...] = CASCADE_IOUS,
        stage_box_weights: tuple[tuple[float, float, float, float], ...] = CASCADE_BOX_WEIGHTS,
        stage_loss_weights: tuple[float, ...] = CASCADE_LOSS_WEIGHTS,
        mean_probs: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        stages = 1 + len(extra_heads)
        if not (len(extra_predictors) == stages - 1 == len(stage_ious) - 1 == len(stage_box_weights) - 1):
            raise ValueError("one head, predictor, IoU threshold and box-coder weights per stage")
        if len(stage_loss_weights) != stages:
            raise ValueError("one loss weight per stage")
        if not all(p.class_agnostic for p in (self.box_predictor, *extra_predictors)):
            raise ValueError("cascade stages regress class-agnostic boxes (bbox_pred with 4 outputs)")
        self.extra_heads = nn.ModuleList(extra_heads)
        self.extra_predictors = nn.ModuleList(extra_predictors)
        self.stage_ious = tuple(stage_ious)
        self.stage_coders = [det_utils.BoxCoder(w) for w in stage_box_weights]
        self.box_coder = self.stage_coders[0]  # torchvision's select_training_samples encodes with it
        self.stage_matchers = [det_utils.Matcher(t, t, allow_low_quality_matches=False) for t in stage_ious]
        self.proposal_matcher = self.stage_matchers[0]
        self.stage_loss_weights = tuple(stage_loss_weights)
        self.mean_probs = mean_probs
        self.box_agnostic = True

    @classmethod
    def from_standard(cls, old: LongTailRoIHeads, stages: int = 3, **kwargs: Any) -> CascadeRoIHeads:
        """A cascade over ``old``'s parts: ``old``'s box head and predictor become stage 1 (its box
        regressor replaced by a class-agnostic one when it was class-specific); stages 2.. get
        fresh copies of that box head (re-initialised) and new predictors. ``old``'s RoI sampler
        (seeded), pools, mask head and test settings are kept."""
        predictor = old.box_predictor
        if not predictor.class_agnostic:
            predictor.bbox_pred = nn.Linear(predictor.bbox_pred.in_features, 4).to(predictor.bbox_pred.weight.device)
        heads, predictors = [], []
        for _ in range(stages - 1):
            head = copy.deepcopy(old.box_head)
            for m in head.modules():
                if hasattr(m, "reset_parameters") and m is not head:
                    m.reset_parameters()
            heads.append(head)
            d = predictor.cls_score.in_features
            predictors.append(
                BoxPredictor(
                    nn.Linear(d, predictor.cls_score.out_features),
                    nn.Linear(d, 4),
                    predictor.num_classes,
                    predictor.activation,
                    predictor.cls_loss,
                ).to(predictor.cls_score.weight.device)
            )
        from simcal.modeling.detector import rebuild_roi_heads  # detector builds cascades: imported here

        out = rebuild_roi_heads(
            old,
            cls,
            class_agnostic=old.class_agnostic,
            extra_heads=heads,
            extra_predictors=predictors,
            **kwargs,
        )
        out.fg_bg_sampler = old.fg_bg_sampler
        out.training = old.training
        return out

    # ------------------------------------------------------------------ stages
    @property
    def num_stages(self) -> int:
        return 1 + len(self.extra_heads)

    def stage_parts(self, k: int) -> tuple[nn.Module, BoxPredictor]:
        """``(box head, predictor)`` of stage ``k`` (0-based)."""
        if k == 0:
            return self.box_head, self.box_predictor
        return self.extra_heads[k - 1], self.extra_predictors[k - 1]

    def set_loss(self, loss: nn.Module) -> None:
        """Every stage's predictor trains with ``loss``."""
        for k in range(self.num_stages):
            self.stage_parts(k)[1].set_loss(loss)

    def stage_forward(
        self, k: int, features: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Stage ``k`` on ``boxes``: ``(pooled (R, C_fpn, 7, 7), box_feats (R, D), logits (R, K),
        deltas (R, 4))``; in training the pooled features' gradient is scaled by 1 / stages."""
        head, predictor = self.stage_parts(k)
        pooled = self.pool(features, boxes, image_shapes)
        x = ScaleGradient.apply(pooled, 1.0 / self.num_stages) if self.training else pooled
        feats = head(x)
        logits, deltas = predictor(feats)
        return pooled, feats, logits, deltas

    def refine(self, k: int, deltas: Tensor, boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> list[Tensor]:
        """Stage ``k``'s regression of its input ``boxes``, clipped to the image, detached: the
        next stage's input boxes (per image ``(R_i, 4)``)."""
        decoded = self.stage_coders[k].decode(deltas.detach(), boxes).reshape(-1, 4)
        return [box_ops.clip_boxes_to_image(b, s) for b, s in zip(decoded.split([len(b) for b in boxes]), image_shapes)]

    def stage_targets(
        self, k: int, boxes: list[Tensor], targets: list[dict[str, Tensor]]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Labels (``(R_i,)``, 0 background) of ``boxes`` at stage ``k``'s IoU threshold, and the
        regression targets ``(R_i, 4)`` of stage ``k``'s coder (towards the best-overlapping
        ground truth; zero boxes in an image without any)."""
        labels, gts = [], []
        for b, t in zip(boxes, targets):
            gt_boxes, gt_labels = t["boxes"], t["labels"]
            if gt_boxes.numel() == 0:
                labels.append(torch.zeros(b.shape[0], dtype=torch.int64, device=b.device))
                gts.append(torch.zeros_like(b))
                continue
            matched = self.stage_matchers[k](box_ops.box_iou(gt_boxes, b))
            lab = gt_labels[matched.clamp(min=0)].to(torch.int64)
            lab[matched < 0] = 0
            labels.append(lab)
            gts.append(gt_boxes[matched.clamp(min=0)])
        return labels, list(self.stage_coders[k].encode(gts, boxes))

    def decode_boxes(self, deltas: Tensor, proposals: list[Tensor], num_classes: int) -> Tensor:
        """The last stage's boxes ``(R, C+1, 4)`` (its coder; one box shared by every class)."""
        return self.stage_coders[-1].decode(deltas, proposals).expand(-1, num_classes, 4)

    # ------------------------------------------------------------------ inference
    def roi_batch(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> RoIBatch:
        """Every stage on its own input boxes; the batch's boxes are the last stage's input, its
        deltas the last stage's, its logits the stages' mean (``mean_probs``: the log of their
        mean probabilities, whose softmax is that mean)."""
        boxes = proposals
        logits_all, pooled_all = [], []
        for k in range(self.num_stages):
            pooled, feats, logits, deltas = self.stage_forward(k, features, boxes, image_shapes)
            logits_all.append(logits)
            pooled_all.append(pooled)
            if k < self.num_stages - 1:
                boxes = self.refine(k, deltas, boxes, image_shapes)
        if self.mean_probs:
            probs = torch.stack([self.box_predictor.scores(z) for z in logits_all]).mean(0)
            mean = probs.clamp(min=torch.finfo(probs.dtype).tiny).log()
        else:
            mean = torch.stack(logits_all).mean(0)
        return RoIBatch(
            boxes, image_shapes, pooled, feats, mean, deltas, self.box_predictor, targets, pooled_all, logits_all
        )

    # ------------------------------------------------------------------ training
    def forward(  # type: ignore[override]
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        if not self.training:
            return super().forward(features, proposals, image_shapes, targets)
        if targets is None:
            raise ValueError("targets are needed in training mode")
        boxes, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        stage1 = (boxes, matched_idxs, labels)
        losses: dict[str, Tensor] = {}
        deltas = torch.zeros(0, 4)  # stage k's, refined into stage k+1's boxes
        for k in range(self.num_stages):
            if k > 0:
                boxes = self.refine(k - 1, deltas, boxes, image_shapes)
                labels, regression_targets = self.stage_targets(k, boxes, targets)
            _, _, logits, deltas = self.stage_forward(k, features, boxes, image_shapes)
            labels_cat = torch.cat(labels)
            suffix = "" if k == 0 else f"_stage{k + 1}"
            w = self.stage_loss_weights[k]
            losses["loss_classifier" + suffix] = w * self.stage_parts(k)[1].classification_loss(logits, labels_cat)
            losses["loss_box_reg" + suffix] = w * self.box_regression_loss(
                deltas, labels_cat, torch.cat(regression_targets)
            )
        if self.has_mask():
            losses["loss_mask"] = self._mask_training_loss(features, image_shapes, targets, *stage1)
        return [], losses
