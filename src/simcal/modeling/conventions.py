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

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
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
        if resize not in ("torchvision", "detectron2", "mmdet"):
            raise ValueError(f"resize must be torchvision, detectron2 or mmdet, got {resize!r}")
        if resize == "mmdet":
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
        size = detectron2_output_size if self.resize_rule == "detectron2" else mmdet_output_size
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
    result: dict[str, Tensor], resized: tuple[int, int], original: tuple[int, int], clip: bool
) -> dict[str, Tensor]:
    """Boxes ``(N, 4)`` of the resized frame back to the original image; with ``clip`` also
    clipped to it and the detections whose box is then empty dropped (detectron2's
    ``detector_postprocess``); every per-detection tensor of ``result`` follows."""
    boxes = resize_boxes(result["boxes"], resized, original)
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


#: ``model.proposals``: how the RPN filters each image's candidates (see :class:`FrameworkRPN`)
PROPOSAL_RULES = ("torchvision", "detectron2", "mmdet")


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


#: ``model.roi_align``: RoIAlign and the RoI -> FPN level rule (see :class:`LevelRoIAlign`)
ROI_ALIGNS = ("torchvision", "detectron2", "mmdet")


class LevelRoIAlign(nn.Module):
    """Multi-level RoIAlign with ``aligned=True`` and ``sampling_ratio`` 0 (adaptive), the
    pooler of detectron2 (``ROIAlignV2``) and mmdetection 2+ (``RoIAlign``), each with its own
    level mapping:

    - ``detectron2``: ``floor(4 + log2(sqrt(area) / 224 + 1e-8))`` clamped to the levels;
    - ``mmdet``: ``floor(log2(sqrt(area) / 56 + 1e-6))`` from the finest level, clamped.

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
        if rule not in ("detectron2", "mmdet"):
            raise ValueError(f"level rule must be detectron2 or mmdet, got {rule!r}")
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
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
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
                pooled = roi_align(f, rois[inds], self.output_size, scale, self.sampling_ratio, self.aligned)
                out.index_put_((inds,), pooled.to(out.dtype))
        return out


def put_stride_in_1x1(body: nn.Module) -> None:
    """The first block of each ResNet stage with a stride strides on its 1x1 conv (``conv1``),
    not its 3x3 (``conv2``): MSRA / caffe-style weights (detectron2's ``STRIDE_IN_1X1``). The
    output sizes are the same; the features are not."""
    for name in ("layer2", "layer3", "layer4"):
        block = getattr(body, name)[0]
        stride = block.conv2.stride
        if stride != (1, 1):
            block.conv1.stride, block.conv2.stride = stride, (1, 1)
