"""The one RoIHeads subclass: shared RoI features once, then any number of scorers; class-agnostic heads.

torchvision's :class:`~torchvision.models.detection.roi_heads.RoIHeads` hard-codes softmax
cross-entropy and softmax scoring. Here scoring belongs to the box predictor
(:class:`simcal.modeling.predictors.BoxPredictor`: logits -> scores ``(R, C+1)``, and its loss),
and inference is one API, :meth:`LongTailRoIHeads.detect`:

1. :meth:`roi_batch` computes what every head shares, once: pooled RoI features
   ``(R, C_fpn, 7, 7)``, box-head features ``(R, D)``, the original logits ``(R, K)`` and box
   deltas, in a :class:`RoIBatch`;
2. each *scorer* (:mod:`simcal.modeling.scoring`: original, calibrated, dual, post-hoc, oracle)
   maps the batch to scores ``(R, C+1)``, or to a tuple of them whose detections are merged by
   NMS (the ``det`` scheme);
3. per scorer: class-wise NMS on the scores (:meth:`postprocess_detections`);
4. the mask head runs once per distinct (RoI, class) over all scorers.

The plain ``forward`` in eval mode is :meth:`detect` with the original predictor's scores, so
``model(images)`` and the multi-head pass of ``simcal predict`` are one code path.

Calibration reads the same parts: :meth:`sample_rois` (the training RoI labelling and seeded
sub-sampling of one image), :meth:`pool`. Class-agnostic heads (the paper's r50-ag) regress one
box for all classes and predict one mask channel; the losses and inference index channel 0.

The state dict has exactly torchvision's keys, so a class-wise checkpoint loads into a plain
torchvision ``MaskRCNN`` with the same heads.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.roi_heads import (
    RoIHeads,
    project_masks_on_boxes,
)
from torchvision.ops import boxes as box_ops

from simcal.modeling.conventions import clip_boxes, nms
from simcal.modeling.predictors import BoxPredictor


@dataclass
class RoIBatch:
    """What the scorers of one inference batch share, computed once.

    Attributes:
        proposals: per image ``(R_i, 4)`` xyxy in the resized frame; ``R = sum R_i``.
        image_shapes: per image ``(h, w)`` of the resized frame.
        pooled: RoI-aligned features ``(R, C_fpn, 7, 7)``.
        box_feats: box-head features ``(R, D)``.
        logits: the original classifier's logits ``(R, K)``.
        deltas: box deltas ``(R, 4 * (C+1))`` or ``(R, 4)``.
        predictor: the original :class:`BoxPredictor` (its activation turns logits into scores).
        targets: per image ``{"boxes", "labels"}`` in the resized frame, when given (the oracle).
        stage_pooled, stage_logits: a cascade's per-stage pooled features ``(R, C_fpn, 7, 7)`` and
            logits ``(R, K)``, each stage on its own input boxes (``None`` for one stage); then
            ``proposals``/``pooled``/``box_feats``/``deltas`` are the last stage's and ``logits``
            the stages' mean.
    """

    proposals: list[Tensor]
    image_shapes: list[tuple[int, int]]
    pooled: Tensor
    box_feats: Tensor
    logits: Tensor
    deltas: Tensor
    predictor: BoxPredictor
    targets: list[dict[str, Tensor]] | None = None
    stage_pooled: list[Tensor] | None = None
    stage_logits: list[Tensor] | None = None
    _memo: dict[Any, Tensor] = field(default_factory=dict, repr=False)

    def memo(self, key: Any, compute: Callable[[], Tensor]) -> Tensor:
        """``compute()`` once per batch and key (scores several scorers read, e.g. a calibrated head's)."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    @property
    def scores(self) -> Tensor:
        """The original classifier's scores ``(R, C+1)``, column 0 background."""
        return self.memo("orig", lambda: self.predictor.scores(self.logits))

    @property
    def log_scores(self) -> Tensor:
        """``log`` of :attr:`scores` ``(R, C+1)``, from the logits where the activation can (no underflow)."""
        return self.memo("orig_log", lambda: self.predictor.activation.log_scores(self.logits))

    def matched_labels(self, iou: float = 0.5) -> Tensor:
        """Per RoI, the label of the ground truth it overlaps most if that is ``>= iou``, else 0: ``(R,)``."""
        if self.targets is None:
            raise ValueError("matched_labels needs the ground truth: pass targets to detect()")

        def compute() -> Tensor:
            out = []
            for props, tgt in zip(self.proposals, self.targets):  # type: ignore[arg-type]
                lab = torch.zeros(props.shape[0], dtype=torch.long, device=props.device)
                if tgt["boxes"].numel() and props.numel():
                    best, idx = box_ops.box_iou(props, tgt["boxes"]).max(1)
                    lab[best >= iou] = tgt["labels"][idx[best >= iou]]
                out.append(lab)
            return torch.cat(out)

        return self.memo(("matched", iou), compute)


#: ``(RoIBatch) -> scores (R, C+1)``, or a tuple of score tensors whose detections are merged
Scorer = Callable[[RoIBatch], "Tensor | tuple[Tensor, ...]"]


def original_scores(batch: RoIBatch) -> Tensor:
    """The trained detector's own scores: the default scorer."""
    return batch.scores


class LongTailRoIHeads(RoIHeads):
    """torchvision RoIHeads whose box predictor owns scoring and loss; a multi-scorer inference API."""

    box_predictor: BoxPredictor
    #: detections narrower or shorter than this (px, resized frame) are dropped before NMS
    #: (torchvision's 1e-2; 0 keeps them all, as detectron2 and mmdetection do: ``model.min_box_size``)
    min_box_size: float = 1e-2
    #: mmdetection v1's legacy box convention (``model.box_plus_one``): boxes clipped to ``[0, size - 1]``,
    #: NMS counting ``x2 - x1 + 1`` pixels (its box coder: :class:`simcal.modeling.conventions.LegacyBoxCoder`)
    box_plus_one: bool = False

    def __init__(self, *args: Any, class_agnostic: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.box_predictor, BoxPredictor):
            self.box_predictor = BoxPredictor.from_torchvision(self.box_predictor)
        self.class_agnostic = class_agnostic  # one box regressor and one mask channel for all classes
        self.box_agnostic = class_agnostic  # one box regressor (a cascade's stages always)

    @property
    def num_classes(self) -> int:
        """C, the foreground classes (scores have C + 1 columns)."""
        return self.box_predictor.num_classes

    @classmethod
    def from_roi_heads(cls, old: RoIHeads, **kwargs: Any) -> LongTailRoIHeads:
        """A ``cls`` with the parts and settings of ``old`` (torchvision's RoIHeads or one of ours):
        :func:`rebuild_roi_heads`."""
        return rebuild_roi_heads(old, cls, **kwargs)  # type: ignore[return-value]

    # ------------------------------------------------------------------ parts
    def pool(self, features: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        """RoIAlign of ``boxes`` (per image ``(N_i, 4)``) on the FPN features: ``(sum N_i, C_fpn, 7, 7)``."""
        return self.box_roi_pool(features, boxes, image_shapes)

    def box_features(
        self, features: dict[str, Tensor], proposals: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(pooled (R, C_fpn, 7, 7), box_feats (R, D), logits (R, K), box_deltas (R, 4K'))``."""
        pooled = self.pool(features, proposals, image_shapes)
        box_feats = self.box_head(pooled)
        logits, deltas = self.box_predictor(box_feats)
        return pooled, box_feats, logits, deltas

    def roi_batch(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> RoIBatch:
        """The shared part of inference for every scorer (see :class:`RoIBatch`)."""
        pooled, box_feats, logits, deltas = self.box_features(features, proposals, image_shapes)
        return RoIBatch(proposals, image_shapes, pooled, box_feats, logits, deltas, self.box_predictor, targets)

    def sample_rois(
        self, proposals: Tensor, gt_boxes: Tensor, gt_labels: Tensor, seed: int
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Label and sub-sample one image's RoIs exactly as training does, with a fixed seed.

        The ground-truth boxes are appended to ``proposals`` ``(P, 4)``, each box is matched at the
        heads' IoU thresholds (foreground >= 0.5, background < 0.5) and ``box_batch_size_per_image``
        RoIs are drawn with the positive fraction, from ``seed``.

        Returns:
            ``(boxes (P+N, 4), labels (P+N,) with 0 background, foreground indices, background indices)``.
        """
        boxes = torch.cat([proposals, gt_boxes])
        _, labels = self.assign_targets_to_proposals([boxes], [gt_boxes], [gt_labels])
        pos, neg = self.fg_bg_sampler.sample([labels[0]], [seed])
        return boxes, labels[0], torch.where(pos[0].bool())[0], torch.where(neg[0].bool())[0]

    def set_loss(self, loss: nn.Module) -> None:
        """Train the classifier with ``loss`` (:meth:`BoxPredictor.set_loss`)."""
        self.box_predictor.set_loss(loss)

    def classification_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """``logits (R, K)``, ``labels (R,)`` with 0 = background -> scalar (the predictor's loss)."""
        return self.box_predictor.classification_loss(logits, labels)

    def box_regression_loss(self, deltas: Tensor, labels: Tensor, targets: Tensor) -> Tensor:
        """Smooth-L1 on foreground RoIs, normalised by all sampled RoIs (torchvision's rule)."""
        pos = torch.where(labels > 0)[0]
        n = deltas.shape[0]
        deltas = deltas.reshape(n, deltas.size(-1) // 4, 4)
        channel = torch.zeros_like(labels[pos]) if self.box_agnostic else labels[pos]
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
        if self.box_agnostic:
            boxes = boxes.expand(-1, num_classes, 4)
        return boxes

    def postprocess_detections(  # type: ignore[override]
        self,
        scores: Tensor,
        box_regression: Tensor,
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        return_roi_index: bool = False,
        min_scores: Tensor | None = None,
    ) -> tuple[list[Tensor], ...]:
        """Per image: threshold, remove tiny boxes (:attr:`min_box_size`), class-wise NMS, keep the top detections
        (``detections_per_img`` of them; every survivor when it is 0 or less).

        Args:
            scores: ``(R, C+1)``, column 0 background (never a detection).
            box_regression: ``(R, 4 * (C+1))`` or ``(R, 4)`` (class-agnostic).
            return_roi_index: also return, per detection, the index of its RoI in the image.
            min_scores: ``(C+1,)``: candidates of class c scoring below ``min_scores[c]`` are dropped
                before NMS (the running per-class threshold of ``predict --topk-per-class``; exact,
                since whether a box survives NMS depends only on higher-scoring boxes of its class).

        Returns:
            boxes ``[(N_i, 4)]`` xyxy in the resized image, scores ``[(N_i,)]``, labels ``[(N_i,)]``
            (and RoI indices ``[(N_i,)]``).
        """
        num_classes = scores.shape[-1]
        per_image = [p.shape[0] for p in proposals]
        pred_boxes = self.decode_boxes(box_regression, proposals, num_classes).split(per_image, 0)
        out_boxes, out_scores, out_labels, out_index = [], [], [], []
        for boxes, sc, shape in zip(pred_boxes, scores.split(per_image, 0), image_shapes):
            boxes = clip_boxes(boxes, shape, self.box_plus_one)
            labels = torch.arange(num_classes, device=sc.device).view(1, -1).expand_as(sc)
            index = torch.arange(sc.shape[0], device=sc.device).view(-1, 1).expand_as(sc)
            boxes, sc = boxes[:, 1:].reshape(-1, 4), sc[:, 1:].reshape(-1)
            labels, index = labels[:, 1:].reshape(-1), index[:, 1:].reshape(-1)
            above = sc > self.score_thresh
            if min_scores is not None:
                above &= sc >= min_scores.to(sc.device)[labels]
            keep = torch.where(above)[0]
            if self.min_box_size > 0:
                keep = keep[box_ops.remove_small_boxes(boxes[keep], min_size=self.min_box_size)]
            keep = keep[
                top_batched_nms(
                    boxes[keep], sc[keep], labels[keep], self.nms_thresh, self.detections_per_img, self.box_plus_one
                )
            ]
            out_boxes.append(boxes[keep])
            out_scores.append(sc[keep])
            out_labels.append(labels[keep])
            out_index.append(index[keep])
        if return_roi_index:
            return out_boxes, out_scores, out_labels, out_index
        return out_boxes, out_scores, out_labels

    def _detections(self, scores: Tensor, batch: RoIBatch, min_scores: Tensor | None = None) -> list[dict[str, Tensor]]:
        """Per image ``{"boxes", "scores", "labels", "roi"}`` after class-wise NMS of ``scores (R, C+1)``."""
        boxes, sc, labels, index = self.postprocess_detections(
            scores, batch.deltas, batch.proposals, batch.image_shapes, return_roi_index=True, min_scores=min_scores
        )
        return [{"boxes": b, "scores": s, "labels": lab, "roi": i} for b, s, lab, i in zip(boxes, sc, labels, index)]

    def mask_inference(
        self, features: dict[str, Tensor], result: list[dict[str, Tensor]], image_shapes: list[tuple[int, int]]
    ) -> None:
        """Add ``masks`` ``(N_i, 1, 28, 28)`` probabilities to each detection dict, in place.

        The mask head runs on at most :data:`MASK_CHUNK` detections at a time (its activations are
        ``fpn_channels x 14 x 14`` floats per detection; with no per-image cap a batch may hold
        tens of thousands of detections)."""
        boxes = [r["boxes"] for r in result]
        labels = [r["labels"] for r in result]
        if self.class_agnostic:
            labels = [torch.zeros_like(lab) for lab in labels]
        counts = [b.shape[0] for b in boxes]
        total = sum(counts)
        if total == 0:
            for r in result:
                r["masks"] = torch.zeros((0, 1, 28, 28), device=r["boxes"].device)
            return
        starts = [sum(counts[:i]) for i in range(len(counts))]
        parts: list[list[Tensor]] = [[] for _ in result]
        for s in range(0, total, MASK_CHUNK):
            e = min(s + MASK_CHUNK, total)
            cut = [(min(max(s - o, 0), n), min(max(e - o, 0), n)) for o, n in zip(starts, counts)]
            x = self.mask_roi_pool(features, [b[a:z] for b, (a, z) in zip(boxes, cut)], image_shapes)
            chunk_labels = [lab[a:z] for lab, (a, z) in zip(labels, cut)]
            probs = self.mask_probs(x, torch.cat(chunk_labels))
            for i, m in enumerate(probs[:, None].split([len(lab) for lab in chunk_labels])):
                parts[i].append(m)
        for r, p in zip(result, parts):
            r["masks"] = p[0] if len(p) == 1 else torch.cat(p)

    def mask_probs(self, x: Tensor, labels: Tensor) -> Tensor:
        """Mask probabilities ``(N, M, M)`` of each RoI's class ``labels`` ``(N,)`` from its
        RoI-aligned features ``x`` ``(N, C_fpn, M/2, M/2)`` (HTC: the mean over its stages)."""
        return selected_mask_logits(self.mask_predictor, self.mask_head(x), labels).sigmoid()

    def mask_logits(self, x: Tensor, stage: int = 0) -> Tensor:
        """Every class's mask logits ``(N, K_mask, M, M)`` of the mask head of ``stage`` (one here)
        on RoI-aligned features ``x`` ``(N, C_fpn, M/2, M/2)``: what the mask loss trains."""
        return self.mask_predictor(self.mask_head(x))

    def _shared_masks(
        self, features: dict[str, Tensor], out: dict[str, list[dict[str, Tensor]]], image_shapes: list
    ) -> None:
        """Run the mask head once per distinct (RoI, class) over all scorers, then hand out the masks.

        A detection's box and mask depend only on its RoI and class, never on the scorer that kept
        it, so scorers that keep the same detections share their mask computation.
        """
        width = self.num_classes + 1
        union = []
        for i in range(len(image_shapes)):
            dets = [result[i] for result in out.values()]
            keys = torch.cat([d["roi"] * width + d["labels"] for d in dets])
            uniq, inverse = torch.unique(keys, return_inverse=True)
            first = torch.full((uniq.numel(),), -1, dtype=torch.long, device=keys.device)
            first.scatter_(0, inverse.flip(0), torch.arange(keys.numel() - 1, -1, -1, device=keys.device))
            all_boxes = torch.cat([d["boxes"] for d in dets])
            all_labels = torch.cat([d["labels"] for d in dets])
            union.append(
                ({"boxes": all_boxes[first], "labels": all_labels[first]}, inverse, [len(d["labels"]) for d in dets])
            )
        shared = [u[0] for u in union]
        self.mask_inference(features, shared, image_shapes)
        for i, (u, inverse, lengths) in enumerate(union):
            for r, part in zip((res[i] for res in out.values()), inverse.split(lengths)):
                r["masks"] = u["masks"][part]

    # ------------------------------------------------------------------ inference
    def detect(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        scorers: Mapping[str, Scorer],
        targets: list[dict[str, Tensor]] | None = None,
        with_masks: bool = True,
        min_scores: Mapping[str, Tensor] | None = None,
        per_class: int = 0,
    ) -> dict[str, list[dict[str, Tensor]]]:
        """Detections of every scorer from one pass of the shared RoI features.

        Args:
            scorers: name -> scorer (``RoIBatch -> scores (R, C+1)`` or a tuple of them, whose
                detections are merged by class-wise NMS).
            targets: per image ground truth in the resized frame (only scorers that read it).
            with_masks: run the mask head (once per distinct RoI and class over all scorers).
            min_scores: name -> ``(C+1,)`` per-class minimum score of that scorer's candidates
                (see :meth:`postprocess_detections`).
            per_class: when positive, only each class's ``per_class`` best detections over the
                batch's images are kept, before masks (:func:`best_per_class`).

        Returns:
            ``{name: [per image {"boxes" (N, 4) xyxy resized frame, "scores" (N,), "labels" (N,),
            "roi" (N,) RoI index in its image, "masks" (N, 1, 28, 28) probabilities}]}``.
        """
        from simcal.modeling.combine import merge_detections

        batch = self.roi_batch(features, proposals, image_shapes, targets)
        out: dict[str, list[dict[str, Tensor]]] = {}
        for name, scorer in scorers.items():
            scores = scorer(batch)
            floor = None if min_scores is None else min_scores.get(name)
            if isinstance(scores, tuple):  # several score sets: NMS each, then merge their detections
                sets = [self._detections(s, batch, floor) for s in scores]
                merged = sets[0]
                for other in sets[1:]:
                    merged = [
                        merge_detections(a, b, iou=self.nms_thresh, max_dets=self.detections_per_img)
                        for a, b in zip(merged, other)
                    ]
                out[name] = merged
            else:
                out[name] = self._detections(scores, batch, floor)
            if per_class > 0:
                out[name] = best_per_class(out[name], per_class)
        if with_masks and self.has_mask():
            self._shared_masks(features, out, image_shapes)
        return out

    # ------------------------------------------------------------------ forward
    def forward(  # type: ignore[override]
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        if not self.training:
            result = self.detect(features, proposals, image_shapes, {"": original_scores})[""]
            for r in result:
                r.pop("roi")
            return result, {}
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
            losses["loss_mask"] = self._mask_training_loss(
                features, image_shapes, targets, proposals, matched_idxs, labels
            )
        return [], losses

    def _mask_training_loss(
        self,
        features: dict[str, Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]],
        proposals: list[Tensor],
        matched_idxs: list[Tensor],
        labels: list[Tensor],
        stage: int = 0,
    ) -> Tensor:
        """The mask loss of ``stage``'s mask head (:meth:`mask_logits`) on the positive RoIs of the
        sampled ``proposals`` (their ``labels`` and ``matched_idxs`` into the ground truth)."""
        mask_props, pos_idxs = [], []
        for props, lab, idx in zip(proposals, labels, matched_idxs):
            pos = torch.where(lab > 0)[0]
            mask_props.append(props[pos])
            pos_idxs.append(idx[pos])
        x = self.mask_roi_pool(features, mask_props, image_shapes)
        mask_logits = self.mask_logits(x, stage)
        gt_labels = [t["labels"] for t in targets]
        if self.class_agnostic:
            gt_labels = [torch.zeros_like(g) for g in gt_labels]
        gt_masks = [t["masks"] for t in targets]
        return self.mask_loss(mask_logits, mask_props, gt_masks, gt_labels, pos_idxs)


def selected_mask_logits(predictor: nn.Module, x: Tensor, labels: Tensor) -> Tensor:
    """Each detection's mask logits for its own class only: ``(N, M, M)`` from the mask head's
    features ``x`` ``(N, D, M/2, M/2)`` and ``labels`` ``(N,)``.

    torchvision's predictor (``conv5_mask``, ReLU, a 1x1 ``mask_fcn_logits`` to C+1 channels)
    computes every class's mask and inference keeps one: at LVIS's 1,204 channels that last
    layer was 88 % of inference time on the CPU. Here it is applied with each detection's own
    row of weights (the same values up to float rounding); another predictor runs whole, and so does
    a last layer of another kind than a plain ``nn.Conv2d`` (a subclass, e.g. a normalised conv,
    does not compute with its raw weights).
    """
    last = getattr(predictor, "mask_fcn_logits", None)
    if type(last) is not nn.Conv2d or last.kernel_size != (1, 1) or not hasattr(predictor, "conv5_mask"):
        logits = predictor(x)
        return logits[torch.arange(labels.numel(), device=labels.device), labels]
    hidden = F.relu(predictor.conv5_mask(x))
    weight = last.weight[labels, :, 0, 0]  # (N, D)
    out = torch.einsum("ndhw,nd->nhw", hidden, weight)
    return out if last.bias is None else out + last.bias[labels][:, None, None]


#: detections the mask head runs on at a time (:meth:`LongTailRoIHeads.mask_inference`)
MASK_CHUNK = 2048


def best_per_class(dets: list[dict[str, Tensor]], k: int) -> list[dict[str, Tensor]]:
    """Each class's ``k`` best detections over several images (ties: the earlier image first);
    every per-detection tensor of a kept detection is kept, in its image's order.

    Args:
        dets: per image ``{"scores" (N_i,), "labels" (N_i,), ...}``.
    """
    if not dets:
        return dets
    scores = torch.cat([d["scores"] for d in dets])
    labels = torch.cat([d["labels"] for d in dets])
    if scores.numel() <= k:
        return dets
    pos = torch.arange(scores.numel(), device=scores.device)
    order = pos[torch.argsort(-scores, stable=True)]
    order = order[torch.argsort(labels[order], stable=True)]  # by class, then score, then position
    sorted_labels = labels[order]
    first = torch.searchsorted(sorted_labels, sorted_labels, right=False)
    keep = torch.zeros_like(scores, dtype=torch.bool)
    keep[order[pos - first < k]] = True
    out, start = [], 0
    for d in dets:
        n = d["scores"].numel()
        mask = keep[start : start + n]
        start += n
        out.append({key: v[mask] if torch.is_tensor(v) and v.shape[:1] == (n,) else v for key, v in d.items()})
    return out


def top_batched_nms(
    boxes: Tensor, scores: Tensor, labels: Tensor, iou_threshold: float, k: int, plus_one: bool = False
) -> Tensor:
    """``batched_nms(boxes, scores, labels, iou_threshold)[:k]``, computed on the best candidates only.

    Whether a box survives class-wise NMS depends only on the higher-scoring boxes of its class, so
    NMS over every box scoring at least the m-th best score gives exactly the survivors among those
    boxes; once k of them survive, nothing below can enter the top k. m starts at 4k and grows
    until that holds (or covers every box). At the LVIS test preset (score threshold 0, so
    R x C candidates per image) this makes inference several times cheaper and changes no output
    (up to the order of exactly tied scores, which NMS itself leaves unspecified).

    Args:
        boxes: ``(N, 4)``; scores, labels: ``(N,)``.
        plus_one: mmdetection v1's overlaps with ``x2 - x1 + 1`` widths (:func:`simcal.modeling.conventions.nms`).

    Returns:
        indices into ``boxes`` ``(min(k, survivors),)``, by decreasing score (every survivor when
        ``k`` is 0 or less).
    """
    if k <= 0:
        return nms(boxes, scores, labels, iou_threshold, plus_one)
    n = scores.numel()
    m = 4 * k
    while m < n:
        threshold = torch.topk(scores, m, sorted=False).values.min()
        cand = torch.where(scores >= threshold)[0]
        kept = cand[nms(boxes[cand], scores[cand], labels[cand], iou_threshold, plus_one)]
        if kept.numel() >= k:
            return kept[:k]
        m *= 4
    return nms(boxes, scores, labels, iou_threshold, plus_one)[:k]


def rebuild_roi_heads(old: RoIHeads, cls: type[RoIHeads] = LongTailRoIHeads, **kwargs: Any) -> RoIHeads:
    """A ``cls`` RoIHeads with the same parts (pools, heads, predictors) and settings as ``old``.

    The box predictor is shared as it is: a :class:`BoxPredictor` returns ``(logits, deltas)`` like
    torchvision's ``FastRCNNPredictor``, so torchvision's own ``RoIHeads`` runs with it too (the
    training-step benchmark compares the two).
    """
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
