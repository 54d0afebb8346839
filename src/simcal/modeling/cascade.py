"""Cascade Mask R-CNN and Hybrid Task Cascade on torchvision parts (METHOD.md, "Multi-stage models").

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

:class:`HybridTaskCascadeRoIHeads` (``model.roi_heads=htc``) is the cascade with a mask head per
stage, interleaved box and mask training and the mask information flow (its docstring).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.ops import boxes as box_ops

from simcal.modeling.conventions import clip_boxes
from simcal.modeling.predictors import BoxPredictor
from simcal.modeling.roi_heads import LongTailRoIHeads, RoIBatch, selected_mask_logits
from simcal.seeds import stage_resampling_seed

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
            heads.append(_reinitialised(old.box_head))
            d = predictor.cls_score.in_features
            predictors.append(
                BoxPredictor(
                    _reinitialised(predictor.cls_score),  # the same kind of layer (linear or normalised)
                    nn.Linear(d, 4),
                    predictor.num_classes,
                    predictor.activation,
                    predictor.cls_loss,
                ).to(predictor.cls_score.weight.device)
            )
        out = cls.from_roi_heads(
            old,
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
        """Every stage's predictor trains with ``loss``, each with its own copy (a loss with state,
        Seesaw's counts or EQLv2's gradient statistics, keeps it per stage, as mmdetection's)."""
        for k in range(self.num_stages):
            self.stage_parts(k)[1].set_loss(loss if k == 0 else copy.deepcopy(loss))

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
        parts = decoded.split([len(b) for b in boxes])
        return [clip_boxes(b, s, self.box_plus_one) for b, s in zip(parts, image_shapes)]

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
        for k in range(self.num_stages):
            if k > 0:
                labels, regression_targets = self.stage_targets(k, boxes, targets)
            _, _, logits, deltas = self.stage_forward(k, features, boxes, image_shapes)
            labels_cat = torch.cat(labels)
            suffix = "" if k == 0 else f"_stage{k + 1}"
            w = self.stage_loss_weights[k]
            losses["loss_classifier" + suffix] = w * self.stage_parts(k)[1].classification_loss(logits, labels_cat)
            losses["loss_box_reg" + suffix] = w * self.box_regression_loss(
                deltas, labels_cat, torch.cat(regression_targets)
            )
            if k < self.num_stages - 1 or self.interleaved:
                boxes = self.refine(k, deltas, boxes, image_shapes)  # stage k+1's input (HTC: stage k's mask RoIs)
            if self.interleaved:
                losses["loss_mask" + suffix] = w * self.stage_mask_loss(k, features, image_shapes, targets, boxes)
        if self.has_mask() and not self.interleaved:
            losses["loss_mask"] = self._mask_training_loss(features, image_shapes, targets, *stage1)
        return [], losses

    #: HTC's interleaved execution: each stage's mask head trains on that stage's regressed boxes
    interleaved = False

    def stage_mask_loss(
        self,
        k: int,
        features: dict[str, Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]],
        boxes: list[Tensor],
    ) -> Tensor:  # pragma: no cover - only interleaved heads (HTC) train a mask head per stage
        """Stage ``k``'s mask loss on its regressed ``boxes`` (interleaved heads only)."""
        raise NotImplementedError


#: HTC's stage loss weights (mmdetection's ``htc_without_semantic``): box and mask losses of stage k
HTC_LOSS_WEIGHTS = (1.0, 0.5, 0.25)


class HybridTaskCascadeRoIHeads(CascadeRoIHeads):
    """Hybrid Task Cascade without the semantic branch (METHOD.md, "Multi-stage models"), as
    mmdetection's ``htc_without_semantic`` builds it: the cascade's three box stages, and a mask head
    per stage (torchvision's: 4 convs, then deconv + 1x1 logits), with

    - interleaved execution: at stage k, after the box branch, stage k's regressed boxes (detached,
      ground truth appended) are re-labelled at stage k's IoU threshold and re-sampled (the RoI
      batch and positive fraction, seeded per image and stage) and stage k's mask head trains on
      their positives; the next box stage takes the regressed boxes as the cascade does;
    - the mask information flow: stage k's mask head adds to its RoI features ``x`` the features of
      the mask heads before it on the same RoIs, each through a 1x1 conv + ReLU
      (``x_k = x + flow_k(f_{k-1})``, ``f_k = mask_head_k(x_k)``, ``f_{-1}`` absent);
    - stage loss weights 1 / 0.5 / 0.25 on box and mask losses;
    - test: masks are the mean of the stages' mask probabilities (with the flow) on the final boxes.

    Stage 1's mask head keeps torchvision's keys (``mask_head``, ``mask_predictor``); stages 2.. are
    ``extra_mask_heads.<k>`` / ``extra_mask_predictors.<k>`` / ``mask_flows.<k>``. Scores, boxes and
    calibration are the cascade's (the box stages are the same).
    """

    def __init__(
        self,
        *args: Any,
        extra_mask_heads: list[nn.Module],
        extra_mask_predictors: list[nn.Module],
        mask_flows: list[nn.Module],
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("stage_loss_weights", HTC_LOSS_WEIGHTS)
        super().__init__(*args, **kwargs)
        if not self.has_mask():
            raise ValueError("a Hybrid Task Cascade needs a mask head")
        if not (len(extra_mask_heads) == len(extra_mask_predictors) == self.num_stages - 1):
            raise ValueError("one mask head and mask predictor per stage after the first")
        if len(mask_flows) not in (0, self.num_stages - 1):
            raise ValueError("one flow conv per stage after the first, or none (no mask information flow)")
        self.extra_mask_heads = nn.ModuleList(extra_mask_heads)
        self.extra_mask_predictors = nn.ModuleList(extra_mask_predictors)
        self.mask_flows = nn.ModuleList(mask_flows)

    @classmethod
    def from_standard(  # type: ignore[override]
        cls, old: LongTailRoIHeads, stages: int = 3, mask_flow: bool = True, **kwargs: Any
    ) -> HybridTaskCascadeRoIHeads:
        """The cascade of :meth:`CascadeRoIHeads.from_standard`, plus mask heads and predictors for
        stages 2.. (fresh copies of ``old``'s, re-initialised) and their 1x1 flow convs (none
        without ``mask_flow``: each stage's mask head sees the RoI features alone, as in
        mmdetection's Cascade Mask R-CNN, whose test masks are the stages' mean too)."""
        if old.mask_head is None or old.mask_predictor is None:
            raise ValueError("a Hybrid Task Cascade needs a mask head")
        conv_in = next(m for m in old.mask_head.modules() if isinstance(m, nn.Conv2d))
        conv_out = [m for m in old.mask_head.modules() if isinstance(m, nn.Conv2d)][-1]
        heads, predictors, flows = [], [], []
        for _ in range(stages - 1):
            heads.append(_reinitialised(old.mask_head))
            predictors.append(_reinitialised(old.mask_predictor))
            flow = nn.Sequential(nn.Conv2d(conv_out.out_channels, conv_in.in_channels, 1), nn.ReLU(inplace=True))
            nn.init.kaiming_normal_(flow[0].weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(flow[0].bias)
            flows.append(flow.to(conv_in.weight.device))
        if not mask_flow:
            flows = []
        return super().from_standard(  # type: ignore[return-value]
            old, stages, extra_mask_heads=heads, extra_mask_predictors=predictors, mask_flows=flows, **kwargs
        )

    def mask_stage_parts(self, k: int) -> tuple[nn.Module, nn.Module, nn.Module | None]:
        """``(mask head, mask predictor, flow conv or None)`` of stage ``k`` (0-based)."""
        if k == 0:
            return self.mask_head, self.mask_predictor, None
        flow = self.mask_flows[k - 1] if len(self.mask_flows) else None
        return self.extra_mask_heads[k - 1], self.extra_mask_predictors[k - 1], flow

    def mask_features(self, x: Tensor, upto: int) -> list[Tensor]:
        """The mask heads' features ``[(N, D, M/2, M/2)]`` of stages ``0..upto`` on RoI features
        ``x`` ``(N, C_fpn, M/2, M/2)``, each stage with the flow of the one before."""
        feats: list[Tensor] = []
        for k in range(upto + 1):
            head, _, flow = self.mask_stage_parts(k)
            feats.append(head(x if flow is None else x + flow(feats[-1])))
        return feats

    def mask_logits(self, x: Tensor, stage: int = 0) -> Tensor:
        """Stage ``stage``'s mask logits ``(N, K_mask, M, M)`` (with the flow from the stages before)."""
        return self.mask_stage_parts(stage)[1](self.mask_features(x, stage)[-1])

    def mask_probs(self, x: Tensor, labels: Tensor) -> Tensor:
        """The mean over the stages of each RoI's class mask probability: ``(N, M, M)``."""
        feats = self.mask_features(x, self.num_stages - 1)
        probs = [selected_mask_logits(self.mask_stage_parts(k)[1], f, labels).sigmoid() for k, f in enumerate(feats)]
        return torch.stack(probs).mean(0)

    def resample(
        self, k: int, boxes: list[Tensor], targets: list[dict[str, Tensor]]
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Interleaved execution: ``boxes`` (per image ``(R_i, 4)``, stage ``k``'s regressed RoIs)
        with the ground truth appended, labelled at stage ``k``'s IoU threshold and sub-sampled as
        training samples RoIs (seeded per image and stage when the sampler is seeded).

        Returns:
            per image the sampled boxes ``(S_i, 4)``, their matched ground-truth indices ``(S_i,)``
            and labels ``(S_i,)`` (0 background).
        """
        all_boxes, matched, labels = [], [], []
        for b, t in zip(boxes, targets):
            gt_boxes, gt_labels = t["boxes"], t["labels"]
            b = torch.cat([b, gt_boxes])
            if gt_boxes.numel() == 0:
                idx = torch.zeros(b.shape[0], dtype=torch.int64, device=b.device)
                lab = torch.zeros_like(idx)
            else:
                m = self.stage_matchers[k](box_ops.box_iou(gt_boxes, b))
                idx = m.clamp(min=0)
                lab = gt_labels[idx].to(torch.int64)
                lab[m < 0] = 0
            all_boxes.append(b)
            matched.append(idx)
            labels.append(lab)
        sampler = self.fg_bg_sampler
        seeds = getattr(sampler, "seeds", None)
        if seeds is None:
            pos, neg = sampler(labels)
        else:
            pos, neg = sampler.sample(labels, [stage_resampling_seed(s, k) for s in seeds])
        keep = [torch.where(p.bool() | n.bool())[0] for p, n in zip(pos, neg)]
        return (
            [b[i] for b, i in zip(all_boxes, keep)],
            [m[i] for m, i in zip(matched, keep)],
            [lab[i] for lab, i in zip(labels, keep)],
        )

    interleaved = True

    def stage_mask_loss(
        self,
        k: int,
        features: dict[str, Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]],
        boxes: list[Tensor],
    ) -> Tensor:
        """Interleaved execution: stage ``k``'s regressed ``boxes`` re-sampled at its threshold
        (:meth:`resample`), stage ``k``'s mask head (with the flow) trained on their positives."""
        mask_boxes, mask_matched, mask_labels = self.resample(k, boxes, targets)
        return self._mask_training_loss(features, image_shapes, targets, mask_boxes, mask_matched, mask_labels, stage=k)


def _reinitialised(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` with fresh parameters, initialised as torchvision initialises its
    heads: convolutions (and deconvolutions) Kaiming-normal (fan out, ReLU) with zero bias (its
    mask head and predictor), every other layer by its own ``reset_parameters`` (the box head's
    linear layers, norms)."""
    out = copy.deepcopy(module)
    for m in out.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif m is not out and hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return out
