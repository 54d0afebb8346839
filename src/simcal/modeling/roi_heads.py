"""The one RoIHeads subclass: a classification-loss hook, a scoring hook, class-agnostic heads.

torchvision's :class:`~torchvision.models.detection.roi_heads.RoIHeads` hard-codes softmax
cross-entropy and softmax scoring. Long-tail methods change exactly those two steps, so this
subclass splits the box branch into parts that other code can reuse:

- :meth:`box_features`: pooled RoI features ``(R, C_fpn, 7, 7)``, box-head features ``(R, D)``,
  class logits ``(R, C+1)`` (column 0 is background) and box deltas ``(R, 4 * (C+1))`` or
  ``(R, 4)`` when class-agnostic;
- :attr:`cls_loss`: ``(logits (R, C+1), labels (R,)) -> scalar``; cross-entropy when ``None``;
- :meth:`score`: ``(pooled, box_feats, logits) -> probabilities (R, C+1)``; softmax by default.
  Calibrated heads and score combiners replace it (they must not renormalise unless asked);
- :meth:`postprocess_detections`: class-wise NMS on probabilities (selection happens before it);
- :meth:`mask_inference`: the mask head on the final detections only.

Class-agnostic heads (the paper's r50-ag) regress one box for all classes and predict one mask
channel; the losses and inference index channel 0 instead of the label.

The state dict has exactly torchvision's keys, so a class-wise checkpoint loads into a plain
torchvision ``MaskRCNN`` with the same heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.roi_heads import (
    RoIHeads,
    maskrcnn_inference,
    project_masks_on_boxes,
)
from torchvision.ops import boxes as box_ops


class LongTailRoIHeads(RoIHeads):
    """torchvision RoIHeads with loss / scoring hooks and optional class-agnostic box and mask."""

    def __init__(self, *args, class_agnostic: bool = False, cls_loss: nn.Module | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.class_agnostic = class_agnostic
        self.cls_loss = cls_loss

    # ------------------------------------------------------------------ parts
    def box_features(
        self, features: dict[str, Tensor], proposals: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(pooled (R, C_fpn, 7, 7), box_feats (R, D), logits (R, C+1), box_deltas (R, 4K))``."""
        pooled = self.box_roi_pool(features, proposals, image_shapes)
        box_feats = self.box_head(pooled)
        logits, deltas = self.box_predictor(box_feats)
        return pooled, box_feats, logits, deltas

    def score(self, pooled: Tensor, box_feats: Tensor, logits: Tensor) -> Tensor:
        """Class probabilities ``(R, C+1)`` from the RoI features; softmax of the logits here."""
        return F.softmax(logits, -1)

    def classification_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """``logits (R, C+1)``, ``labels (R,)`` with 0 = background -> scalar."""
        if self.cls_loss is None:
            return F.cross_entropy(logits, labels)
        return self.cls_loss(logits, labels)

    def box_regression_loss(self, deltas: Tensor, labels: Tensor, targets: Tensor) -> Tensor:
        """Smooth-L1 on foreground RoIs, normalised by all sampled RoIs (torchvision's rule)."""
        pos = torch.where(labels > 0)[0]
        n = deltas.shape[0]
        deltas = deltas.reshape(n, deltas.size(-1) // 4, 4)
        channel = torch.zeros_like(labels[pos]) if self.class_agnostic else labels[pos]
        loss = F.smooth_l1_loss(deltas[pos, channel], targets[pos], beta=1 / 9, reduction="sum")
        return loss / max(labels.numel(), 1)

    def mask_loss(
        self,
        mask_logits: Tensor,
        proposals: list[Tensor],
        gt_masks: list[Tensor],
        gt_labels: list[Tensor],
        matched_idxs: list[Tensor],
    ) -> Tensor:
        """Per-pixel BCE of the positive RoIs' masks ``(P, K, M, M)``, averaged over every positive
        pixel of the GLOBAL batch.

        In one process this is exactly torchvision's ``maskrcnn_loss``. Under DDP the positive count
        is summed over processes first, so the averaged gradient equals the single-process one
        instead of weighting each process's positives by its own count.
        """
        m = mask_logits.shape[-1]
        labels = torch.cat([lab[idx] for lab, idx in zip(gt_labels, matched_idxs)])
        targets = [project_masks_on_boxes(gm, p, i, m) for gm, p, i in zip(gt_masks, proposals, matched_idxs)]
        targets = torch.cat(targets)
        count = torch.tensor(float(targets.numel()), device=mask_logits.device)
        world = 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            torch.distributed.all_reduce(count)
        if targets.numel() == 0:
            return mask_logits.sum() * 0
        logits = mask_logits[torch.arange(labels.shape[0], device=labels.device), labels]
        total = F.binary_cross_entropy_with_logits(logits, targets, reduction="sum")
        return total * world / count.clamp(min=1)

    def decode_boxes(self, deltas: Tensor, proposals: list[Tensor], num_classes: int) -> Tensor:
        """Boxes ``(R, C+1, 4)``; a class-agnostic regressor's one box is shared by every class."""
        boxes = self.box_coder.decode(deltas, proposals)
        if self.class_agnostic:
            boxes = boxes.expand(-1, num_classes, 4)
        return boxes

    def postprocess_detections(  # type: ignore[override]
        self,
        scores: Tensor,
        box_regression: Tensor,
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        return_roi_index: bool = False,
    ) -> tuple[list[Tensor], ...]:
        """Per image: threshold, remove tiny boxes, class-wise NMS, keep the top detections.

        Args:
            scores: probabilities ``(R, C+1)``, column 0 background (never a detection).
            box_regression: ``(R, 4 * (C+1))`` or ``(R, 4)`` (class-agnostic).
            return_roi_index: also return, per detection, the index of its RoI in the image.

        Returns:
            boxes ``[(N_i, 4)]`` xyxy in the resized image, scores ``[(N_i,)]``, labels ``[(N_i,)]``
            (and RoI indices ``[(N_i,)]``).
        """
        num_classes = scores.shape[-1]
        per_image = [p.shape[0] for p in proposals]
        pred_boxes = self.decode_boxes(box_regression, proposals, num_classes).split(per_image, 0)
        out_boxes, out_scores, out_labels, out_index = [], [], [], []
        for boxes, sc, shape in zip(pred_boxes, scores.split(per_image, 0), image_shapes):
            boxes = box_ops.clip_boxes_to_image(boxes, shape)
            labels = torch.arange(num_classes, device=sc.device).view(1, -1).expand_as(sc)
            index = torch.arange(sc.shape[0], device=sc.device).view(-1, 1).expand_as(sc)
            boxes, sc = boxes[:, 1:].reshape(-1, 4), sc[:, 1:].reshape(-1)
            labels, index = labels[:, 1:].reshape(-1), index[:, 1:].reshape(-1)
            keep = torch.where(sc > self.score_thresh)[0]
            keep = keep[box_ops.remove_small_boxes(boxes[keep], min_size=1e-2)]
            keep = keep[top_batched_nms(boxes[keep], sc[keep], labels[keep], self.nms_thresh, self.detections_per_img)]
            out_boxes.append(boxes[keep])
            out_scores.append(sc[keep])
            out_labels.append(labels[keep])
            out_index.append(index[keep])
        if return_roi_index:
            return out_boxes, out_scores, out_labels, out_index
        return out_boxes, out_scores, out_labels

    def mask_inference(
        self, features: dict[str, Tensor], result: list[dict[str, Tensor]], image_shapes: list[tuple[int, int]]
    ) -> None:
        """Add ``masks`` ``(N_i, 1, 28, 28)`` probabilities to each detection dict, in place."""
        boxes = [r["boxes"] for r in result]
        if sum(b.shape[0] for b in boxes) == 0:
            for r in result:
                r["masks"] = torch.zeros((0, 1, 28, 28), device=r["boxes"].device)
            return
        x = self.mask_roi_pool(features, boxes, image_shapes)
        logits = self.mask_predictor(self.mask_head(x))
        labels = [r["labels"] for r in result]
        if self.class_agnostic:
            labels = [torch.zeros_like(lab) for lab in labels]
        for r, m in zip(result, maskrcnn_inference(logits, labels)):
            r["masks"] = m

    # ------------------------------------------------------------------ forward
    def forward(  # type: ignore[override]
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        if self.training:
            if targets is None:
                raise ValueError("targets are needed in training mode")
            proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
            _, _, logits, deltas = self.box_features(features, proposals, image_shapes)
            labels_cat = torch.cat(labels)
            losses = {
                "loss_classifier": self.classification_loss(logits, labels_cat),
                "loss_box_reg": self.box_regression_loss(deltas, labels_cat, torch.cat(regression_targets)),
            }
            if self.has_mask():
                mask_props, pos_idxs = [], []
                for props, lab, idx in zip(proposals, labels, matched_idxs):
                    pos = torch.where(lab > 0)[0]
                    mask_props.append(props[pos])
                    pos_idxs.append(idx[pos])
                x = self.mask_roi_pool(features, mask_props, image_shapes)
                mask_logits = self.mask_predictor(self.mask_head(x))
                gt_labels = [t["labels"] for t in targets]
                if self.class_agnostic:
                    gt_labels = [torch.zeros_like(g) for g in gt_labels]
                gt_masks = [t["masks"] for t in targets]
                losses["loss_mask"] = self.mask_loss(mask_logits, mask_props, gt_masks, gt_labels, pos_idxs)
            return [], losses

        pooled, box_feats, logits, deltas = self.box_features(features, proposals, image_shapes)
        probs = self.score(pooled, box_feats, logits)
        boxes, scores, labels = self.postprocess_detections(probs, deltas, proposals, image_shapes)
        result = [{"boxes": b, "labels": lab, "scores": s} for b, s, lab in zip(boxes, scores, labels)]
        if self.has_mask():
            self.mask_inference(features, result, image_shapes)
        return result, {}


def top_batched_nms(boxes: Tensor, scores: Tensor, labels: Tensor, iou_threshold: float, k: int) -> Tensor:
    """``batched_nms(boxes, scores, labels, iou_threshold)[:k]``, computed on the best candidates only.

    Whether a box survives class-wise NMS depends only on the higher-scoring boxes of its class, so
    NMS over every box scoring at least the m-th best score gives exactly the survivors among those
    boxes; once k of them survive, nothing below can enter the top k. m starts at 4k and grows
    until that holds (or covers every box). At the LVIS test preset (score threshold 0, so
    R x C candidates per image) this makes inference several times cheaper and changes no output
    (up to the order of exactly tied scores, which NMS itself leaves unspecified).

    Args:
        boxes: ``(N, 4)``; scores, labels: ``(N,)``.

    Returns:
        indices into ``boxes`` ``(min(k, survivors),)``, by decreasing score.
    """
    n = scores.numel()
    m = 4 * k
    while m < n:
        threshold = torch.topk(scores, m, sorted=False).values.min()
        cand = torch.where(scores >= threshold)[0]
        kept = cand[box_ops.batched_nms(boxes[cand], scores[cand], labels[cand], iou_threshold)]
        if kept.numel() >= k:
            return kept[:k]
        m *= 4
    return box_ops.batched_nms(boxes, scores, labels, iou_threshold)[:k]
