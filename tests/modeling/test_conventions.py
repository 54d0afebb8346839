"""The home frameworks' math as model options (:mod:`simcal.modeling.conventions`): each option
against values worked out by hand or by the library that defines it (PIL, torchvision's
``roi_align``), and the defaults, which must build torchvision's own modules."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign, roi_align

from simcal.config import ModelConfig
from simcal.modeling.conventions import (
    ExactAnchorGenerator,
    FrameworkRPN,
    FrameworkTransform,
    LevelRoIAlign,
    detectron2_output_size,
    put_stride_in_1x1,
    rescale_detections,
)
from simcal.modeling.detector import build_detector
from simcal.modeling.roi_heads import selected_mask_logits


def _uint8_image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    """A random image as simcal reads one: uint8 / 255, RGB ``(3, h, w)``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8).float().div(255)


def test_detectron2_rounds_the_resized_size_where_torchvision_floors():
    # 480 x 640 to a short side of 800: 1066.67 -> 1067 (torchvision 1066); 427 x 555: 1039.81 -> 1040 (1039)
    assert detectron2_output_size(480, 640, 800, 1333) == (800, 1067)
    assert detectron2_output_size(427, 555, 800, 1333) == (800, 1040)
    assert detectron2_output_size(100, 1000, 800, 1333) == (133, 1333)  # the long side caps: 133.3 -> 133
    tv = GeneralizedRCNNTransform(800, 1333, [0.0] * 3, [1.0] * 3).eval()
    assert tv(_uint8_image(48, 64)[None].expand(1, 3, 48, 64).unbind(0))[0].image_sizes[0] == (800, 1066)


def test_bgr_input_with_a_mean_and_std_in_pixel_units():
    image = _uint8_image(32, 32)
    mean, std = [103.53, 116.28, 123.675], [1.0, 2.0, 4.0]
    t = FrameworkTransform(32, 32, pixel_format="bgr", pixel_mean=mean, pixel_std=std, resize="detectron2").eval()
    batch, _ = t([image])
    expected = (image.flip(0) * 255 - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    assert torch.equal(batch.tensors[0], expected)  # 32 x 32 stays 32 x 32: PIL copies it
    rgb = FrameworkTransform(32, 32, resize="detectron2").eval()  # defaults: torchvision's mean / std in 0-255 units
    expected = (image * 255 - 255 * torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / (
        255 * torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    )
    torch.testing.assert_close(rgb([image])[0].tensors[0], expected)


def test_detectron2_resize_is_pil_bilinear_on_the_uint8_image_and_scales_the_targets():
    image = _uint8_image(48, 64, seed=1)
    t = FrameworkTransform(80, 1333, pixel_mean=[0.0] * 3, pixel_std=[1.0] * 3, resize="detectron2").eval()
    target = {"boxes": torch.tensor([[8.0, 6.0, 40.0, 30.0]]), "masks": torch.ones((1, 48, 64), dtype=torch.uint8)}
    batch, targets = t([image], [target])
    assert batch.image_sizes[0] == (80, 107)  # 106.67 rounded
    pixels = (image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    pil = np.asarray(Image.fromarray(pixels).resize((107, 80), Image.BILINEAR)).astype(np.float32)
    assert torch.equal(batch.tensors[0, :, :80, :107], torch.from_numpy(pil).permute(2, 0, 1))
    torch.testing.assert_close(
        targets[0]["boxes"], torch.tensor([[8 * 107 / 64, 6 * 80 / 48, 40 * 107 / 64, 30 * 80 / 48]])
    )
    assert targets[0]["masks"].shape == (1, 80, 107)
    assert t.clip_to_original and not FrameworkTransform(80, 1333).clip_to_original


def test_detections_are_clipped_to_the_original_image_and_empty_ones_dropped():
    result = {
        "boxes": torch.tensor([[10.0, 10.0, 200.0, 100.0], [200.0, 10.0, 200.0, 50.0], [0.0, 0.0, 5.0, 5.0]]),
        "scores": torch.tensor([0.9, 0.8, 0.7]),
        "labels": torch.tensor([1, 2, 3]),
    }
    # resized 100 x 200 -> original 50 x 99: x scales by 0.495, y by 0.5
    out = rescale_detections({k: v.clone() for k, v in result.items()}, (100, 200), (50, 99), clip=True)
    assert out["labels"].tolist() == [1, 3]  # the second box has no width: dropped
    torch.testing.assert_close(out["boxes"][0], torch.tensor([4.95, 5.0, 99.0, 50.0]))  # 200 * 0.495 = 99
    kept = rescale_detections({k: v.clone() for k, v in result.items()}, (100, 200), (50, 99), clip=False)
    assert kept["labels"].tolist() == [1, 2, 3]  # torchvision's: scaled only


def test_exact_anchors_use_the_true_strides_and_unrounded_cells():
    levels = [torch.zeros(1, 1, 800 // s, 1088 // s) for s in (4, 8, 16, 32)] + [torch.zeros(1, 1, 13, 17)]
    images = ImageList(torch.zeros(1, 3, 800, 1088), [(800, 1067)])
    sizes, ratios = ((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5
    exact = ExactAnchorGenerator(sizes, ratios, [4, 8, 16, 32, 64])(images, levels)[0]
    tv = AnchorGenerator(sizes, ratios)(images, levels)[0]
    counts = [f.shape[-2] * f.shape[-1] * 3 for f in levels]
    p2, p6 = exact.split(counts)[0], exact.split(counts)[-1]
    w = math.sqrt(32**2 / 0.5)  # 45.25..., torchvision rounds it to 45
    torch.testing.assert_close(p2[0], torch.tensor([-w / 2, -w / 4, w / 2, w / 4]))
    assert tv.split(counts)[0][0].tolist() == [-23.0, -11.0, 23.0, 11.0]
    # P6: 13 x 17 cells, stride 64; torchvision derives the row stride as 800 // 13 = 61
    down = 17 * 3  # one row down, the same column and cell
    assert p6[down, 1].item() - p6[0, 1].item() == 64.0
    assert tv.split(counts)[-1][down, 1].item() - tv.split(counts)[-1][0, 1].item() == 61.0


def _rpn(rule: str) -> RegionProposalNetwork:
    rpn = RegionProposalNetwork(
        AnchorGenerator(((32,),), ((1.0,),)), nn.Identity(), 0.7, 0.3, 256, 0.5, {"testing": 10}, {"testing": 10}, 0.7
    ).eval()
    return FrameworkRPN.adopt(rpn, rule)


def test_rpn_filtering_of_each_framework():
    # two disjoint boxes whose logits 30 and 20 both saturate the sigmoid (1.0 in float32), and a
    # box 5e-4 px wide; the torchvision rule also drops sides under 1e-3 px
    boxes = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0], [20.0, 20.0, 20.0005, 30.0]]])
    logits = torch.tensor([[20.0, 30.0, -1.0]])
    d2, _ = _rpn("detectron2").filter_proposals(boxes, logits, [(100, 100)], [3])
    assert d2[0].tolist() == boxes[0, [1, 0, 2]].tolist()  # by logit, the sliver kept
    mm, _ = _rpn("mmdet").filter_proposals(boxes, logits, [(100, 100)], [3])
    assert len(mm[0]) == 3  # the sliver kept
    tv, _ = _rpn("torchvision").filter_proposals(boxes, logits, [(100, 100)], [3])
    assert len(tv[0]) == 2 and [20.0, 20.0] not in tv[0][:, :2].tolist()
    assert type(_rpn("torchvision")) is RegionProposalNetwork  # the default leaves torchvision's module


def test_detectron2_and_mmdet_level_mapping_and_aligned_pooling():
    names = ["0", "1", "2", "3"]
    pool = LevelRoIAlign(names, 7, "detectron2")
    # sqrt(area) 112 -> level 1 (p3) in both; just under 112 -> level 0 (p2); 224 -> level 2; huge -> 3
    boxes = torch.tensor([[0, 0, 112, 112], [0, 0, 111.99, 111.99], [0, 0, 224, 224], [0, 0, 1000, 1000.0]])
    assert pool.levels(boxes).tolist() == [1, 0, 2, 3]
    assert LevelRoIAlign(names, 7, "mmdet").levels(boxes).tolist() == [1, 0, 2, 3]
    g = torch.Generator().manual_seed(0)
    feats = {n: torch.randn(1, 4, 64 // 2**i, 64 // 2**i, generator=g) for i, n in enumerate(names)}
    rois = torch.tensor([[3.3, 4.1, 40.7, 50.2], [0.0, 0.0, 255.0, 255.0]])
    out = pool(feats, [rois], [(256, 256)])
    levels = pool.levels(rois)
    for r, lvl in zip(range(2), levels.tolist()):
        box = torch.cat([torch.zeros(1, 1), rois[r : r + 1]], 1)
        ref = roi_align(feats[names[lvl]], box, (7, 7), 1 / (4 * 2**lvl), 0, True)
        torch.testing.assert_close(out[r : r + 1], ref)
    tv = MultiScaleRoIAlign(names, 7, 2)(feats, [rois], [(256, 256)])
    assert not torch.allclose(tv, out)  # torchvision's: not aligned, 2 x 2 samples


def test_stride_on_the_1x1_conv_keeps_the_sizes_and_changes_the_features():
    from torchvision.models import resnet50

    torch.manual_seed(0)
    body = resnet50(weights=None).eval()
    x = torch.randn(1, 3, 64, 96)
    before = body.layer4(body.layer3(body.layer2(body.layer1(body.maxpool(body.relu(body.bn1(body.conv1(x))))))))
    put_stride_in_1x1(body)
    for name in ("layer2", "layer3", "layer4"):
        block = getattr(body, name)[0]
        assert block.conv1.stride == (2, 2) and block.conv2.stride == (1, 1)
    assert body.layer1[0].conv1.stride == (1, 1)
    after = body.layer4(body.layer3(body.layer2(body.layer1(body.maxpool(body.relu(body.bn1(body.conv1(x))))))))
    assert after.shape == before.shape and not torch.allclose(after, before)


def test_min_box_size_zero_keeps_a_sliver_that_torchvision_drops():
    torch.manual_seed(0)
    model = build_detector(ModelConfig(arch="small", norm="bn", min_size=64, max_size=64), 2).eval()
    rh = model.roi_heads
    proposals = [torch.tensor([[10.0, 10.0, 10.005, 30.0], [20.0, 20.0, 40.0, 40.0]])]
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.2, 0.8, 0.0]])
    deltas = torch.zeros(2, 12)
    assert len(rh.postprocess_detections(scores, deltas, proposals, [(64, 64)])[0][0]) == 1
    rh.min_box_size = 0.0
    assert len(rh.postprocess_detections(scores, deltas, proposals, [(64, 64)])[0][0]) == 2


def test_cascade_box_weights_per_stage_from_the_config():
    weights = [[10.0, 10.0, 5.0, 5.0], [20.0, 20.0, 10.0, 10.0], [1 / 0.033, 1 / 0.033, 1 / 0.067, 1 / 0.067]]
    cfg = ModelConfig(arch="small", norm="bn", roi_heads="cascade", cascade_box_weights=weights)
    model = build_detector(cfg, 3)
    assert [tuple(c.weights) for c in model.roi_heads.stage_coders] == [tuple(w) for w in weights]


def test_the_defaults_build_torchvisions_own_modules():
    model = build_detector(ModelConfig(arch="small", norm="bn"), 3)
    assert type(model.transform) is GeneralizedRCNNTransform
    assert type(model.rpn) is RegionProposalNetwork and type(model.rpn.anchor_generator) is AnchorGenerator
    assert type(model.roi_heads.box_roi_pool) is MultiScaleRoIAlign
    assert type(model.roi_heads.mask_roi_pool) is MultiScaleRoIAlign
    assert model.roi_heads.min_box_size == 1e-2
    r50 = build_detector(ModelConfig(), 3)
    assert r50.backbone.body.layer2[0].conv2.stride == (2, 2)  # torchvision's: the stride on the 3x3


def test_every_option_replaces_its_module():
    cfg = ModelConfig(
        arch="resnet50_fpn",
        pixel_format="bgr",
        resize="detectron2",
        stride_in_1x1=True,
        anchors="exact",
        proposals="detectron2",
        roi_align="mmdet",
        min_box_size=0.0,
    )
    model = build_detector(cfg, 3)
    assert isinstance(model.transform, FrameworkTransform) and model.transform.pixel_format == "bgr"
    assert isinstance(model.rpn, FrameworkRPN) and model.rpn.proposal_rule == "detectron2"
    assert isinstance(model.rpn.anchor_generator, ExactAnchorGenerator)
    assert model.rpn.anchor_generator.strides == (4, 8, 16, 32, 64)
    assert model.roi_heads.box_roi_pool.rule == "mmdet" and model.roi_heads.mask_roi_pool.output_size == (14, 14)
    assert model.backbone.body.layer3[0].conv1.stride == (2, 2)
    assert type(model.backbone.body.bn1).__name__ == "FrozenBatchNorm2d"  # model.norm's default, honoured


def test_the_mask_fast_path_never_takes_the_raw_weights_of_a_conv_subclass():
    class Doubled(nn.Conv2d):  # a layer that does not compute with its raw weights (e.g. a normalised conv)
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(x)

    predictor = nn.Module()
    predictor.conv5_mask = nn.ConvTranspose2d(4, 4, 2, 2)
    predictor.mask_fcn_logits = Doubled(4, 3, 1)
    predictor.forward = lambda x: predictor.mask_fcn_logits(torch.relu(predictor.conv5_mask(x)))
    x = torch.randn(2, 4, 7, 7)
    labels = torch.tensor([1, 2])
    full = predictor.forward(x)[torch.arange(2), labels]
    assert torch.equal(selected_mask_logits(predictor, x, labels), full)


@pytest.mark.parametrize("norm", ["frozen_bn", "bn"])
def test_resnet50_fpn_honours_model_norm(norm):
    model = build_detector(ModelConfig(arch="resnet50_fpn", norm=norm), 3)
    assert type(model.backbone.body.bn1).__name__ == {"frozen_bn": "FrozenBatchNorm2d", "bn": "BatchNorm2d"}[norm]


@pytest.mark.slow
def test_a_run_stored_before_the_options_existed_builds_the_same_modules():
    from simcal.config import Config, config_from_dict

    raw = Config().to_dict()
    for key in ("pixel_format", "pixel_mean", "pixel_std", "resize", "stride_in_1x1", "anchors", "proposals"):
        del raw["model"][key]
    for key in ("roi_align", "min_box_size", "cascade_box_weights"):
        del raw["model"][key]
    raw["model"].update(arch="small", norm="bn")
    cfg = config_from_dict(raw, "old/config.yaml")
    assert cfg.model == ModelConfig(arch="small", norm="bn")
    torch.manual_seed(0)
    old = build_detector(cfg.model, 3).eval()
    torch.manual_seed(0)
    plain = build_detector(ModelConfig(arch="small", norm="bn"), 3).eval()
    assert type(old.transform) is GeneralizedRCNNTransform and type(old.rpn) is RegionProposalNetwork
    images = [_uint8_image(64, 80)]
    with torch.no_grad():
        a, b = old(images)[0], plain(images)[0]
    assert all(torch.equal(a[k], b[k]) for k in ("boxes", "scores", "labels", "masks"))


def test_mmdet_resize_is_mmcvs_rescale_with_opencvs_bilinear():
    cv2 = pytest.importorskip("cv2")
    from simcal.modeling.conventions import mmdet_output_size

    # mmcv's rescale_size: one factor min(1333 / long, 800 / short), each side int(side * factor + 0.5)
    assert mmdet_output_size(480, 640, 800, 1333) == (800, 1067)
    assert mmdet_output_size(100, 1000, 800, 1333) == (133, 1333)
    image = _uint8_image(48, 64, seed=2)
    t = FrameworkTransform(80, 1333, pixel_mean=[0.0] * 3, pixel_std=[1.0] * 3, resize="mmdet").eval()
    batch, _ = t([image])
    assert batch.image_sizes[0] == (80, 107) and not t.clip_to_original
    pixels = (image * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    expected = cv2.resize(pixels, (107, 80), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    assert torch.equal(batch.tensors[0, :, :80, :107], torch.from_numpy(expected).permute(2, 0, 1))
    pil = np.asarray(Image.fromarray(pixels).resize((107, 80), Image.BILINEAR)).astype(np.float32)
    assert not np.array_equal(pil, expected)  # PIL's bilinear (detectron2's) is another filter


# --------------------------------------------------------------------------- mmdetection v1 (the SimCal release)
def test_mmdet_v1_anchors_are_detectron1s_rounded_cells():
    from simcal.modeling.conventions import LegacyAnchorGenerator

    gen = LegacyAnchorGenerator([8.0], [(0.5, 1.0, 2.0)] * 5, [4, 8, 16, 32, 64])
    # stride 4, size 32: centre 1.5; ratio 1: 1.5 -+ 15.5; ratio 0.5: w 45.25, h 22.63 -> -20.63 -> -21 ...
    assert gen.cell_anchors[0].tolist() == [
        [-21.0, -9.0, 24.0, 12.0],
        [-14.0, -14.0, 17.0, 17.0],
        [-9.0, -21.0, 12.0, 24.0],
    ]
    assert gen.cell_anchors[2][1].tolist() == [-56.0, -56.0, 71.0, 71.0]  # Detectron's 128-px anchor at stride 16
    images = ImageList(torch.zeros(1, 3, 64, 64), [(64, 64)])
    levels = [torch.zeros(1, 1, 64 // s, 64 // s) for s in (4, 8, 16, 32, 64)]
    anchors = gen(images, levels)[0]
    assert anchors[3].tolist() == [-17.0, -9.0, 28.0, 12.0]  # the next column: + 4 px


def test_legacy_box_coder_counts_widths_plus_one():
    from simcal.modeling.conventions import LegacyBoxCoder

    coder = LegacyBoxCoder((1.0, 1.0, 1.0, 1.0))
    box = torch.tensor([[10.0, 20.0, 29.0, 59.0]])  # 20 x 40 pixels: centre (19.5, 39.5)
    zero = coder.decode_single(torch.zeros(1, 4), box)
    assert zero.tolist() == box.tolist()
    moved = coder.decode_single(torch.tensor([[0.1, 0.0, math.log(2.0), 0.0]]), box)
    # centre 19.5 + 0.1 x 20 = 21.5, width 40: 21.5 -+ 20, moved in by 0.5
    torch.testing.assert_close(moved, torch.tensor([[2.0, 20.0, 41.0, 59.0]]))
    torch.testing.assert_close(coder.encode_single(moved, box), torch.tensor([[0.1, 0.0, math.log(2.0), 0.0]]))
    # log(w ratio) clamped at log(16 / 1000) below too: 20 x 0.016 wide, not 20 x e^-9
    shrunk = coder.decode_single(torch.tensor([[0.0, 0.0, -9.0, 0.0]]), box)
    assert shrunk[0, 2].item() == pytest.approx(19.5 + 0.5 * 20 * 0.016 - 0.5, abs=1e-5)


def test_legacy_nms_and_clipping_count_the_last_pixel():
    from simcal.modeling.conventions import clip_boxes, nms

    boxes = torch.tensor([[0.0, 0.0, 9.0, 9.0], [5.0, 0.0, 14.0, 9.0]])
    scores, idxs = torch.tensor([0.9, 0.8]), torch.zeros(2, dtype=torch.long)
    # +1 widths: 5 x 10 / (100 + 100 - 50) = 0.33; without: 4 x 9 / (81 + 81 - 36) = 0.29
    assert nms(boxes, scores, idxs, 0.3, plus_one=True).tolist() == [0]
    assert nms(boxes, scores, idxs, 0.3).tolist() == [0, 1]
    assert clip_boxes(torch.tensor([[-5.0, -5.0, 200.0, 200.0]]), (100, 150), plus_one=True).tolist() == [
        [0, 0, 149, 99]
    ]


def test_mmdet_v1_roi_align_is_torchvisions_unaligned_up_to_the_far_pixel():
    names = ["0", "1", "2", "3"]
    pool = LevelRoIAlign(names, 7, "mmdet_v1")
    assert pool.sampling_ratio == 2
    boxes = torch.tensor([[0.0, 0.0, 111.0, 111.0], [0.0, 0.0, 110.0, 110.0]])
    assert pool.levels(boxes).tolist() == [1, 0]  # sqrt(112 x 112) = 112: level 1; mmdet 2 puts 111 at 0
    assert LevelRoIAlign(names, 7, "mmdet").levels(boxes).tolist() == [0, 0]
    g = torch.Generator().manual_seed(3)
    feats = {n: torch.randn(1, 4, 64 // 2**i, 64 // 2**i, generator=g) for i, n in enumerate(names)}
    rois = torch.tensor([[3.3, 4.1, 40.7, 50.2]])
    ours = pool(feats, [rois], [(256, 256)])
    level = int(pool.levels(rois))
    grown = torch.tensor([[0.0, 3.3, 4.1, 41.7, 51.2]])  # v1 samples up to x2 + 1
    expected = roi_align(feats[names[level]], grown, (7, 7), 1 / (4 * 2**level), 2, False)
    torch.testing.assert_close(ours, expected)


def test_mmdet_v1_rpn_suppresses_each_level_then_keeps_the_best():
    rpn = _rpn("mmdet_v1")
    rpn._post_nms_top_n = {"testing": 2}
    # level 0: two boxes overlapping 0.33 with +1 widths (suppressed at 0.7? no: threshold 0.3 below)
    rpn.nms_thresh = 0.3
    boxes = torch.tensor(
        [[[0.0, 0.0, 9.0, 9.0], [5.0, 0.0, 14.0, 9.0], [50.0, 50.0, 60.0, 60.0], [70.0, 70.0, 80.0, 80.0]]]
    )
    logits = torch.tensor([[3.0, 2.0, 1.0, 2.5]])
    out, scores = rpn.filter_proposals(boxes, logits, [(100, 100)], [2, 2])
    # level 0 keeps box 0 (box 1 suppressed), level 1 keeps both; the 2 best overall: box 0, box 3
    assert out[0].tolist() == [[0.0, 0.0, 9.0, 9.0], [70.0, 70.0, 80.0, 80.0]]
    torch.testing.assert_close(scores[0], torch.sigmoid(torch.tensor([3.0, 2.5])))


def test_mmdet_v1_masks_are_pasted_at_integer_corners_and_boxes_mapped_by_one_factor():
    pytest.importorskip("cv2")
    from simcal.modeling.conventions import paste_masks_legacy

    masks = torch.full((1, 28, 28), 0.9)
    pasted = paste_masks_legacy(masks, torch.tensor([[10.7, 5.2, 19.9, 14.8]]), 30, 40)
    expected = torch.zeros(1, 30, 40, dtype=torch.bool)
    expected[0, 5:15, 10:20] = True  # corners truncated to (10, 5)-(19, 14): 10 x 10 pixels
    assert torch.equal(pasted, expected)
    t = FrameworkTransform(800, 1333, resize="mmdet_v1")
    boxes = torch.tensor([[100.0, 100.0, 1000.0, 700.0]])
    # 480 x 640 -> 800 x 1067: v1 divides by the factor 800 / 480, mmdetection 2 by each axis's ratio
    torch.testing.assert_close(t.to_original(boxes, (800, 1067), (480, 640)), boxes * 0.6)
    v2 = FrameworkTransform(800, 1333, resize="mmdet").to_original(boxes, (800, 1067), (480, 640))
    assert v2[0, 2].item() == pytest.approx(1000 * 640 / 1067, rel=1e-6)
