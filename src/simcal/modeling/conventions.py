"""The home frameworks' math as options of simcal's own detector (``model.*``; docs/import.md).

A detector trained in detectron2 or mmdetection gives its own detections only when every step
computes what its framework computes. torchvision differs from them in a few places, each a
choice here; the defaults are torchvision's, so a model built without them is unchanged (the
same modules, the same code path):

- ``model.pixel_format`` / ``pixel_mean`` / ``pixel_std``: the channel order the first conv
  expects and the normalisation, in 0-255 pixel units (detectron2's MSRA weights: BGR, the
  ImageNet mean, std 1): :class:`FrameworkTransform`.
- ``model.resize``: ``detectron2`` rounds the output size (``int(x + 0.5)``) and resizes the uint8
  image with PIL's bilinear filter, then maps boxes back clipped to the original image, dropping
  empty ones (``detector_postprocess``); ``mmdet`` rounds mmcv's way and resizes with OpenCV's
  bilinear filter; torchvision floors the size and interpolates floats.
- ``model.mask_head``: ``normed``: the mask logits of a normalised 1x1 conv (mmdetection's
  ``NormedConv2d``, temperature 20): :class:`simcal.modeling.predictors.NormedConv2d`.
- ``model.stride_in_1x1``: the stride of a ResNet stage's first block on its 1x1 conv (MSRA /
  caffe weights) instead of the 3x3 (torchvision, PyTorch-style weights): :func:`put_stride_in_1x1`.
- ``model.anchors``: ``exact`` cells (``w = sqrt(s^2 / r)``, ``h = r w``, not rounded) at the true
  level strides 4, 8, ..., offset 0 (detectron2, mmdetection 2+); torchvision rounds the cells and
  derives a level's stride as padded size // grid (P6 gets 61 instead of 64 when H / 32 is
  odd): :class:`ExactAnchorGenerator`.
- ``model.proposals``: how the RPN filters its candidates (:class:`FrameworkRPN`): detectron2
  ranks and suppresses on the objectness logits and drops boxes of zero width or height;
  mmdetection ranks and suppresses on the sigmoid scores, also dropping empty boxes; torchvision
  suppresses on sigmoid scores and drops sides under 1e-3 px.
- ``model.roi_align``: RoIAlign ``aligned=True`` with an adaptive sampling ratio (0) and the
  framework's level mapping (:class:`LevelRoIAlign`); torchvision's ``MultiScaleRoIAlign`` is
  not aligned and samples 2 x 2 points per bin.
- ``model.min_box_size``: detections narrower than this are removed before NMS (torchvision
  1e-2; detectron2 and mmdetection keep them: 0).

The cascade's per-stage box-coder weights and its test score (mean of logits or of
probabilities) are options of :mod:`simcal.modeling.cascade`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.ops import boxes as box_ops
from torchvision.ops import roi_align

#: torchvision's ImageNet normalisation of RGB images in [0, 1], in 0-255 pixel units
TORCHVISION_MEAN = (0.485, 0.456, 0.406)
TORCHVISION_STD = (0.229, 0.224, 0.225)


def mmdet_output_size(h: int, w: int, short: int, max_size: int) -> tuple[int, int]:
    """mmcv's ``rescale_size``: one scale factor, ``min(max_size / long, short / short side)``, each
    side ``int(side * factor + 0.5)``."""
    scale = min(max_size / max(h, w), short / min(h, w))
    return int(h * scale + 0.5), int(w * scale + 0.5)


def detectron2_output_size(h: int, w: int, short: int, max_size: int) -> tuple[int, int]:
    """detectron2's ``ResizeShortestEdge.get_output_shape``: the short side to ``short``, the long
    side at most ``max_size``, each rounded as ``int(x + 0.5)`` (torchvision floors)."""
    scale = short * 1.0 / min(h, w)
    newh, neww = (short * 1.0, scale * w) if h < w else (scale * h, short * 1.0)
    if max(newh, neww) > max_size:
        scale = max_size * 1.0 / max(newh, neww)
        newh, neww = newh * scale, neww * scale
    return int(newh + 0.5), int(neww + 0.5)


class FrameworkTransform(GeneralizedRCNNTransform):
    """torchvision's transform with another channel order, normalisation and resize.

    Images come in as simcal reads them, RGB ``(3, H, W)`` floats in [0, 1]; the network sees
    ``(x * 255 - mean) / std`` in ``pixel_format``'s channel order (mean and std in that order).
    With ``resize="detectron2"`` the image is resized before it is normalised, as the uint8
    image detectron2 reads, with PIL's bilinear filter to detectron2's rounded size, and
    :attr:`clip_to_original` makes the detector clip its boxes to the original image and drop
    empty ones, as ``detector_postprocess`` does.
    """

    def __init__(
        self,
        min_size: int | Sequence[int],
        max_size: int,
        pixel_format: str = "rgb",
        pixel_mean: Sequence[float] | None = None,
        pixel_std: Sequence[float] | None = None,
        resize: str = "torchvision",
        **kwargs: object,
    ) -> None:
        mean = [float(m) for m in pixel_mean] if pixel_mean is not None else [255 * m for m in TORCHVISION_MEAN]
        std = [float(s) for s in pixel_std] if pixel_std is not None else [255 * s for s in TORCHVISION_STD]
        super().__init__(min_size, max_size, mean, std, **kwargs)  # type: ignore[arg-type]
        if pixel_format not in ("rgb", "bgr"):
            raise ValueError(f"pixel_format must be rgb or bgr, got {pixel_format!r}")
        if resize not in ("torchvision", "detectron2", "mmdet", "mmdet_v1"):
            raise ValueError(f"resize must be torchvision, detectron2, mmdet or mmdet_v1, got {resize!r}")
        if resize.startswith("mmdet"):
            _cv2()  # a missing OpenCV is said when the model is built, not at the first image
        self.pixel_format = pixel_format
        self.resize_rule = resize

    @classmethod
    def from_transform(cls, old: GeneralizedRCNNTransform, **kwargs: object) -> FrameworkTransform:
        """The same sizes as ``old`` (its ``min_size`` choices, ``max_size``, padding) with ``kwargs``."""
        return cls(old.min_size, old.max_size, size_divisible=old.size_divisible, fixed_size=old.fixed_size, **kwargs)

    @property
    def clip_to_original(self) -> bool:
        """Whether detections are clipped to the original image and empty ones dropped (detectron2)."""
        return self.resize_rule == "detectron2"

    def to_original(self, boxes: Tensor, resized: tuple[int, int], original: tuple[int, int]) -> Tensor:
        """Boxes ``(N, 4)`` of the resized frame in the original image's pixels: each axis by its own
        ratio of sizes (torchvision, detectron2, mmdetection 2+), or divided by the one scale factor
        the image was resized with (mmdetection v1's ``bboxes /= scale_factor``)."""
        if self.resize_rule != "mmdet_v1":
            return resize_boxes(boxes, resized, original)
        h, w = original
        short = self.min_size[-1]
        return boxes / float(min(self.max_size / max(h, w), short / min(h, w)))

    def _normalize_255(self, image: Tensor) -> Tensor:
        """``(3, H, W)`` in 0-255, RGB -> the network's input (channel order, mean, std)."""
        if self.pixel_format == "bgr":
            image = image.flip(0)
        mean = torch.as_tensor(self.image_mean, dtype=image.dtype, device=image.device)
        std = torch.as_tensor(self.image_std, dtype=image.dtype, device=image.device)
        return (image - mean[:, None, None]) / std[:, None, None]

    def normalize(self, image: Tensor) -> Tensor:
        if not image.is_floating_point():
            raise TypeError(f"expected float images in [0, 1], got {image.dtype}")
        if self.resize_rule != "torchvision":
            return image  # resized first, as the uint8 image it was read as: see resize()
        return self._normalize_255(image * 255)

    def resize(self, image: Tensor, target: dict[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor] | None]:
        if self.resize_rule == "torchvision":
            return super().resize(image, target)
        h, w = image.shape[-2:]
        short = self.torch_choice(list(self.min_size)) if self.training else self.min_size[-1]
        size = detectron2_output_size if self.resize_rule == "detectron2" else mmdet_output_size  # v1: the same
        newh, neww = size(int(h), int(w), int(short), int(self.max_size))
        # the uint8 image simcal read (its floats are k / 255), resized as the framework resizes it:
        # PIL's bilinear filter (detectron2) or OpenCV's (mmcv's imrescale)
        pixels = (image * 255).round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        if self.resize_rule == "detectron2":
            resized = np.asarray(Image.fromarray(pixels).resize((neww, newh), Image.BILINEAR))
        else:
            cv2 = _cv2()
            resized = cv2.resize(np.ascontiguousarray(pixels), (neww, newh), interpolation=cv2.INTER_LINEAR)
        out = torch.from_numpy(resized.astype(np.float32)).permute(2, 0, 1).to(image.device)
        out = self._normalize_255(out.contiguous())
        if target is None:
            return out, target
        target["boxes"] = resize_boxes(target["boxes"], (h, w), (newh, neww))
        if "masks" in target:
            masks = target["masks"][:, None].float()
            target["masks"] = nn.functional.interpolate(masks, size=(newh, neww))[:, 0].byte()
        return out, target


def _cv2():  # noqa: ANN202 - the module
    """OpenCV, which mmdetection resizes with (``pip install opencv-python-headless``, or simcal's
    ``[mmdet]`` extra)."""
    try:
        import cv2
    except ImportError:
        from simcal.errors import InputError

        raise InputError(
            "model.resize", "resize", "mmdet resizes with OpenCV: pip install opencv-python-headless"
        ) from None
    return cv2


def rescale_detections(
    result: dict[str, Tensor], resized: tuple[int, int], original: tuple[int, int], clip: bool, transform: Any = None
) -> dict[str, Tensor]:
    """Boxes ``(N, 4)`` of the resized frame back to the original image (``transform``'s
    :meth:`FrameworkTransform.to_original` when it has one); with ``clip`` also clipped to it and
    the detections whose box is then empty dropped (detectron2's ``detector_postprocess``); every
    per-detection tensor of ``result`` follows."""
    to_original = getattr(transform, "to_original", None)
    boxes = (
        to_original(result["boxes"], resized, original)
        if to_original
        else resize_boxes(result["boxes"], resized, original)
    )
    result["boxes"] = boxes
    if not clip:
        return result
    boxes = box_ops.clip_boxes_to_image(boxes, original)
    result["boxes"] = boxes
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    if bool(keep.all()):
        return result
    n = boxes.shape[0]
    return {k: v[keep] if torch.is_tensor(v) and v.shape[:1] == (n,) else v for k, v in result.items()}


class ExactAnchorGenerator(nn.Module):
    """Anchors as detectron2's ``DefaultAnchorGenerator`` (and mmdetection 2+) make them.

    Each level ``i`` has cells of ``sizes[i]`` x ``aspect_ratios[i]`` (``w = sqrt(s^2 / r)``,
    ``h = r w``, centred at 0, not rounded) shifted by ``offset * stride`` + multiples of the
    level's stride ``strides[i]``. The order is torchvision's: row, column, then cell.

    ``forward(image_list, features)`` -> per image ``(sum_i H_i W_i A_i, 4)`` xyxy, as
    torchvision's ``AnchorGenerator``.
    """

    def __init__(
        self,
        sizes: Sequence[Sequence[float]],
        aspect_ratios: Sequence[Sequence[float]],
        strides: Sequence[int],
        offset: float = 0.0,
    ) -> None:
        super().__init__()
        if not len(sizes) == len(aspect_ratios) == len(strides):
            raise ValueError("one set of sizes, aspect ratios and a stride per level")
        self.sizes = tuple(tuple(s) for s in sizes)
        self.aspect_ratios = tuple(tuple(r) for r in aspect_ratios)
        self.strides = tuple(int(s) for s in strides)
        self.offset = float(offset)
        self.cell_anchors = [self._cells(s, r) for s, r in zip(self.sizes, self.aspect_ratios)]

    @staticmethod
    def _cells(sizes: Sequence[float], ratios: Sequence[float]) -> Tensor:
        """``(A, 4)``: detectron2's ``generate_cell_anchors`` (float64 arithmetic, float32 result)."""
        cells = []
        for size in sizes:
            area = float(size) ** 2.0
            for r in ratios:
                w = math.sqrt(area / r)
                h = r * w
                cells.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
        return torch.tensor(cells, dtype=torch.float32)

    def num_anchors_per_location(self) -> list[int]:
        return [len(s) * len(r) for s, r in zip(self.sizes, self.aspect_ratios)]

    def grid_anchors(self, grid_sizes: Sequence[Sequence[int]], device: torch.device) -> list[Tensor]:
        """Per level ``(H_i W_i A_i, 4)``."""
        out = []
        for (gh, gw), stride, cells in zip(grid_sizes, self.strides, self.cell_anchors):
            xs = torch.arange(self.offset * stride, gw * stride, step=stride, dtype=torch.float32, device=device)
            ys = torch.arange(self.offset * stride, gh * stride, step=stride, dtype=torch.float32, device=device)
            sy, sx = torch.meshgrid(ys, xs, indexing="ij")
            sx, sy = sx.reshape(-1), sy.reshape(-1)
            shifts = torch.stack((sx, sy, sx, sy), dim=1)
            out.append((shifts.view(-1, 1, 4) + cells.to(device).view(1, -1, 4)).reshape(-1, 4))
        return out

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        if len(feature_maps) != len(self.strides):
            raise ValueError(f"{len(feature_maps)} feature maps, anchors for {len(self.strides)} levels")
        grids = [tuple(f.shape[-2:]) for f in feature_maps]
        levels = self.grid_anchors(grids, feature_maps[0].device)
        anchors = torch.cat(levels).to(feature_maps[0].dtype)
        return [anchors for _ in range(image_list.tensors.shape[0])]


class LegacyAnchorGenerator(ExactAnchorGenerator):
    """mmdetection v1's anchors: cells centred at ``(stride - 1) / 2`` with corners
    ``ctr -+ (w - 1) / 2``, ``w = stride * scale / sqrt(r)``, rounded (float32, half to even as
    ``torch.round``), shifted by multiples of the stride."""

    def __init__(
        self, scales: Sequence[float], aspect_ratios: Sequence[Sequence[float]], strides: Sequence[int]
    ) -> None:
        self._scales = tuple(float(s) for s in scales)
        sizes = [tuple(stride * sc for sc in self._scales) for stride in strides]
        super().__init__(sizes, aspect_ratios, strides, offset=0.0)
        self.cell_anchors = [self._legacy_cells(st, r) for st, r in zip(self.strides, self.aspect_ratios)]

    def _legacy_cells(self, stride: int, ratios: Sequence[float]) -> Tensor:
        base = float(stride)
        ctr = 0.5 * (base - 1)
        r = torch.tensor(ratios, dtype=torch.float32)
        h_ratios = torch.sqrt(r)
        w_ratios = 1 / h_ratios
        scales = torch.tensor(self._scales, dtype=torch.float32)
        ws = (base * w_ratios[:, None] * scales[None, :]).view(-1)
        hs = (base * h_ratios[:, None] * scales[None, :]).view(-1)
        cells = torch.stack(
            [ctr - 0.5 * (ws - 1), ctr - 0.5 * (hs - 1), ctr + 0.5 * (ws - 1), ctr + 0.5 * (hs - 1)], -1
        )
        return cells.round()


class LegacyBoxCoder(BoxCoder):
    """mmdetection v1's ``delta2bbox`` / ``bbox2delta``: widths ``x2 - x1 + 1``, decoded corners
    ``ctr -+ w / 2`` moved in by 0.5, deltas times ``1 / weights`` (its ``target_stds``), ``log``
    of the size ratio clamped on both sides."""

    def decode_single(self, rel_codes: Tensor, boxes: Tensor) -> Tensor:
        boxes = boxes.to(rel_codes.dtype)
        stds = torch.tensor([1.0 / w for w in self.weights], dtype=rel_codes.dtype, device=rel_codes.device)
        d = rel_codes.reshape(rel_codes.shape[0], -1, 4) * stds
        dx, dy, dw, dh = d.unbind(-1)
        dw = dw.clamp(min=-self.bbox_xform_clip, max=self.bbox_xform_clip)
        dh = dh.clamp(min=-self.bbox_xform_clip, max=self.bbox_xform_clip)
        px, py = ((boxes[:, 0] + boxes[:, 2]) * 0.5)[:, None], ((boxes[:, 1] + boxes[:, 3]) * 0.5)[:, None]
        pw, ph = (boxes[:, 2] - boxes[:, 0] + 1.0)[:, None], (boxes[:, 3] - boxes[:, 1] + 1.0)[:, None]
        gw, gh = pw * dw.exp(), ph * dh.exp()
        gx, gy = torch.addcmul(px, pw, dx), torch.addcmul(py, ph, dy)
        out = torch.stack([gx - gw * 0.5 + 0.5, gy - gh * 0.5 + 0.5, gx + gw * 0.5 - 0.5, gy + gh * 0.5 - 0.5], -1)
        return out.reshape(rel_codes.shape[0], -1)

    def encode_single(self, reference_boxes: Tensor, proposals: Tensor) -> Tensor:
        p, g = proposals.float(), reference_boxes.float()
        pw, ph = p[:, 2] - p[:, 0] + 1.0, p[:, 3] - p[:, 1] + 1.0
        gw, gh = g[:, 2] - g[:, 0] + 1.0, g[:, 3] - g[:, 1] + 1.0
        px, py = (p[:, 0] + p[:, 2]) * 0.5, (p[:, 1] + p[:, 3]) * 0.5
        gx, gy = (g[:, 0] + g[:, 2]) * 0.5, (g[:, 1] + g[:, 3]) * 0.5
        deltas = torch.stack([(gx - px) / pw, (gy - py) / ph, torch.log(gw / pw), torch.log(gh / ph)], -1)
        stds = torch.tensor([1.0 / w for w in self.weights], dtype=deltas.dtype, device=deltas.device)
        return deltas / stds


def clip_boxes(boxes: Tensor, size: tuple[int, int], plus_one: bool = False) -> Tensor:
    """Boxes ``(..., 4)`` clipped to an image of ``size`` ``(h, w)``: to ``[0, w]`` x ``[0, h]``, or with
    mmdetection v1's ``plus_one`` to ``[0, w - 1]`` x ``[0, h - 1]``."""
    if not plus_one:
        return box_ops.clip_boxes_to_image(boxes, size)
    h, w = size
    x = boxes[..., 0::2].clamp(min=0, max=w - 1)
    y = boxes[..., 1::2].clamp(min=0, max=h - 1)
    return torch.stack((x, y), dim=-1).reshape(boxes.shape)


def nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou: float, plus_one: bool = False) -> Tensor:
    """``batched_nms``; with mmdetection v1's ``plus_one`` the areas and overlaps count ``x2 - x1 + 1``
    pixels (the same as torchvision's NMS of the boxes grown by 1 at their far corner)."""
    if plus_one:
        boxes = boxes + torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=boxes.dtype, device=boxes.device)
    return box_ops.batched_nms(boxes, scores, idxs, iou)


#: ``model.proposals``: how the RPN filters each image's candidates (see :class:`FrameworkRPN`)
PROPOSAL_RULES = ("torchvision", "detectron2", "mmdet", "mmdet_v1")


class FrameworkRPN(RegionProposalNetwork):
    """torchvision's RPN whose proposal filtering follows another framework (``rule``).

    Per level the ``pre_nms_top_n`` best candidates (by objectness logit; mmdetection sorts the
    sigmoid scores), then per image: clip to the image, drop empty boxes (width or height 0;
    torchvision: under 1e-3), NMS per level on the logits (detectron2) or on the sigmoid scores
    (mmdetection, torchvision), keep the ``post_nms_top_n`` best overall.
    """

    proposal_rule = "torchvision"

    @classmethod
    def adopt(cls, rpn: RegionProposalNetwork, rule: str) -> RegionProposalNetwork:
        """``rpn`` itself (its head, anchors, samplers and counts) filtering by ``rule``."""
        if rule not in PROPOSAL_RULES:
            raise ValueError(f"proposals must be one of {', '.join(PROPOSAL_RULES)}, got {rule!r}")
        if rule == "torchvision" and not isinstance(rpn, FrameworkRPN):
            return rpn
        rpn.__class__ = cls
        rpn.proposal_rule = rule  # type: ignore[attr-defined]
        return rpn

    def filter_proposals(  # type: ignore[override]
        self,
        proposals: Tensor,
        objectness: Tensor,
        image_shapes: list[tuple[int, int]],
        num_anchors_per_level: list[int],
    ) -> tuple[list[Tensor], list[Tensor]]:
        if self.proposal_rule == "torchvision":
            return super().filter_proposals(proposals, objectness, image_shapes, num_anchors_per_level)
        if self.proposal_rule == "mmdet_v1":
            return self._filter_v1(proposals, objectness, image_shapes, num_anchors_per_level)
        num_images = proposals.shape[0]
        device = proposals.device
        logits = objectness.detach().reshape(num_images, -1)
        ranked = logits if self.proposal_rule == "detectron2" else torch.sigmoid(logits)
        idx, levels = [], []
        offset = 0
        for level, n in enumerate(num_anchors_per_level):
            part = ranked[:, offset : offset + n]
            k = min(n, self.pre_nms_top_n())
            if self.proposal_rule == "detectron2":
                top = part.topk(k, dim=1).indices
            else:  # mmdetection sorts the scores
                top = part.sort(dim=1, descending=True).indices[:, :k]
            idx.append(top + offset)
            levels.append(torch.full((k,), level, dtype=torch.int64, device=device))
            offset += n
        top_idx = torch.cat(idx, dim=1)
        lvl_all = torch.cat(levels)
        batch = torch.arange(num_images, device=device)[:, None]
        final_boxes, final_scores = [], []
        for boxes, scores, shape in zip(proposals[batch, top_idx], ranked[batch, top_idx], image_shapes):
            lvl = lvl_all
            finite = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores)
            if not bool(finite.all()):
                boxes, scores, lvl = boxes[finite], scores[finite], lvl[finite]
            boxes = box_ops.clip_boxes_to_image(boxes, shape)
            keep = (boxes[:, 2] - boxes[:, 0] > 0) & (boxes[:, 3] - boxes[:, 1] > 0)
            if not bool(keep.all()):
                boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]
            keep = box_ops.batched_nms(boxes, scores, lvl, self.nms_thresh)[: self.post_nms_top_n()]
            final_boxes.append(boxes[keep])
            final_scores.append(torch.sigmoid(scores[keep]) if self.proposal_rule == "detectron2" else scores[keep])
        return final_boxes, final_scores

    def _filter_v1(
        self,
        proposals: Tensor,
        objectness: Tensor,
        image_shapes: list[tuple[int, int]],
        num_anchors_per_level: list[int],
    ) -> tuple[list[Tensor], list[Tensor]]:
        """mmdetection v1's ``get_bboxes_single``: per level the ``pre_nms_top_n`` best sigmoid
        scores, boxes clipped to ``[0, size - 1]``, NMS with +1 widths, its ``post_nms_top_n`` best;
        then the ``post_nms_top_n`` best of all levels (its ``nms_post`` and ``max_num``, equal in
        the SimCal release's configs)."""
        scores_all = torch.sigmoid(objectness.detach().reshape(proposals.shape[0], -1))
        final_boxes, final_scores = [], []
        for boxes_img, scores_img, shape in zip(proposals, scores_all, image_shapes):
            kept_boxes, kept_scores = [], []
            for boxes, scores in zip(boxes_img.split(num_anchors_per_level), scores_img.split(num_anchors_per_level)):
                k = min(scores.numel(), self.pre_nms_top_n())
                scores, top = scores.topk(k)
                boxes = clip_boxes(boxes[top], shape, plus_one=True)
                keep = nms(boxes, scores, torch.zeros_like(top), self.nms_thresh, plus_one=True)
                keep = keep[: self.post_nms_top_n()]
                kept_boxes.append(boxes[keep])
                kept_scores.append(scores[keep])
            boxes, scores = torch.cat(kept_boxes), torch.cat(kept_scores)
            top = scores.topk(min(scores.numel(), self.post_nms_top_n())).indices
            final_boxes.append(boxes[top])
            final_scores.append(scores[top])
        return final_boxes, final_scores


#: ``model.roi_align``: RoIAlign and the RoI -> FPN level rule (see :class:`LevelRoIAlign`)
ROI_ALIGNS = ("torchvision", "detectron2", "mmdet", "mmdet_v1")


class LevelRoIAlign(nn.Module):
    """Multi-level RoIAlign with ``aligned=True`` and ``sampling_ratio`` 0 (adaptive), the
    pooler of detectron2 (``ROIAlignV2``) and mmdetection 2+ (``RoIAlign``), each with its own
    level mapping:

    - ``detectron2``: ``floor(4 + log2(sqrt(area) / 224 + 1e-8))`` clamped to the levels;
    - ``mmdet``: ``floor(log2(sqrt(area) / 56 + 1e-6))`` from the finest level, clamped;
    - ``mmdet_v1``: mmdetection v1's, areas with +1 widths, and its RoIAlign: not aligned, from
      ``x1 * s`` to ``(x2 + 1) * s``, 2 x 2 samples per bin.

    Same call as torchvision's ``MultiScaleRoIAlign``: ``(features, boxes per image,
    image sizes) -> (sum N_i, C, output_size, output_size)``; level ``i`` of ``featmap_names``
    has stride ``4 * 2^i``.
    """

    def __init__(
        self,
        featmap_names: Sequence[str],
        output_size: int | Sequence[int],
        rule: str = "detectron2",
        sampling_ratio: int = 0,
        aligned: bool = True,
    ) -> None:
        super().__init__()
        if rule not in ("detectron2", "mmdet", "mmdet_v1"):
            raise ValueError(f"level rule must be detectron2, mmdet or mmdet_v1, got {rule!r}")
        if rule == "mmdet_v1":  # mmdetection v1's RoIAlign: not aligned, the far edge + 1, 2 x 2 samples
            sampling_ratio = 2
        self.featmap_names = list(featmap_names)
        size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
        self.output_size = tuple(int(s) for s in size)
        self.rule = rule
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        self.scales = [1.0 / (4 * 2**i) for i in range(len(self.featmap_names))]

    @classmethod
    def from_pooler(cls, pooler: nn.Module, rule: str) -> LevelRoIAlign:
        """The same levels and output size as torchvision's ``MultiScaleRoIAlign`` ``pooler``."""
        return cls(pooler.featmap_names, pooler.output_size, rule)

    def levels(self, boxes: Tensor) -> Tensor:
        """``(N,)`` level index (0 = the finest) of each box ``(N, 4)``."""
        one = 1.0 if self.rule == "mmdet_v1" else 0.0
        area = (boxes[:, 2] - boxes[:, 0] + one) * (boxes[:, 3] - boxes[:, 1] + one)
        size = torch.sqrt(area)
        last = len(self.featmap_names) - 1
        if self.rule == "detectron2":
            lvl = torch.floor(4 + torch.log2(size / 224 + 1e-8)) - 2
        else:
            lvl = torch.floor(torch.log2(size / 56 + 1e-6))
        return lvl.clamp(min=0, max=last).to(torch.int64)

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        feats = [x[name] for name in self.featmap_names]
        all_boxes = torch.cat(boxes) if boxes else feats[0].new_zeros((0, 4))
        index = torch.cat(
            [torch.full((len(b), 1), i, dtype=all_boxes.dtype, device=all_boxes.device) for i, b in enumerate(boxes)]
        )
        rois = torch.cat([index, all_boxes.to(feats[0].dtype)], dim=1)
        out = feats[0].new_zeros((rois.shape[0], feats[0].shape[1], *self.output_size))
        if rois.shape[0] == 0:
            return out
        lvl = self.levels(all_boxes)
        for i, (f, scale) in enumerate(zip(feats, self.scales)):
            inds = torch.where(lvl == i)[0]
            if inds.numel():
                level_rois = rois[inds]
                if self.rule == "mmdet_v1":
                    # v1 samples from x1 * s to (x2 + 1) * s with no half-pixel shift: aligned RoIAlign
                    # (which subtracts 0.5) of the box shifted by 0.5 / s, its far edge by 1 more
                    shift = torch.tensor([0.0, 0.5 / scale, 0.5 / scale, 1 + 0.5 / scale, 1 + 0.5 / scale])
                    level_rois = level_rois + shift.to(level_rois)
                pooled = roi_align(f, level_rois, self.output_size, scale, self.sampling_ratio, self.aligned)
                out.index_put_((inds,), pooled.to(out.dtype))
        return out


def paste_masks_legacy(masks: Tensor, boxes: Tensor, height: int, width: int, threshold: float = 0.5) -> Tensor:
    """mmdetection v1's ``get_seg_masks``: each ``M x M`` mask probability map resized with OpenCV's
    bilinear filter to its box's integer size (corners truncated, ``x2 - x1 + 1`` wide), thresholded
    above ``threshold`` and pasted at the box's corner.

    Args:
        masks: ``(N, M, M)`` probabilities; boxes: ``(N, 4)`` xyxy in image pixels.

    Returns:
        ``(N, height, width)`` bool.
    """
    cv2 = _cv2()
    out = torch.zeros((masks.shape[0], height, width), dtype=torch.bool)
    probs = masks.detach().float().cpu().numpy()
    corners = boxes.detach().cpu().numpy().astype(np.int32)
    for i, (x1, y1, x2, y2) in enumerate(corners):
        w, h = max(int(x2 - x1) + 1, 1), max(int(y2 - y1) + 1, 1)
        mask = cv2.resize(probs[i], (w, h), interpolation=cv2.INTER_LINEAR) > threshold
        x1, y1 = max(int(x1), 0), max(int(y1), 0)
        crop = mask[: max(0, height - y1), : max(0, width - x1)]
        out[i, y1 : y1 + crop.shape[0], x1 : x1 + crop.shape[1]] = torch.from_numpy(crop)
    return out.to(masks.device)


def put_stride_in_1x1(body: nn.Module) -> None:
    """The first block of each ResNet stage with a stride strides on its 1x1 conv (``conv1``),
    not its 3x3 (``conv2``): MSRA / caffe-style weights (detectron2's ``STRIDE_IN_1X1``). The
    output sizes are the same; the features are not."""
    for name in ("layer2", "layer3", "layer4"):
        block = getattr(body, name)[0]
        stride = block.conv2.stride
        if stride != (1, 1):
            block.conv1.stride, block.conv2.stride = stride, (1, 1)
