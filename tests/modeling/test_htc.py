"""Hybrid Task Cascade (``model.roi_heads=htc``): interleaved mask training, the mask information
flow, stage loss weights, test masks averaged over the stages, and a run end to end."""

from __future__ import annotations

import json

import pytest
import torch
from torchvision.ops import box_iou

from simcal.cli import main
from simcal.config import ModelConfig
from simcal.io import load_checkpoint
from simcal.modeling.cascade import HTC_LOSS_WEIGHTS, CascadeRoIHeads, HybridTaskCascadeRoIHeads
from simcal.modeling.detector import build_detector
from simcal.modeling.sampling import sampling_seeds
from simcal.run import Run
from tests.modeling.test_cascade import _cascade, _images_and_targets

torch.set_num_threads(1)


def _htc(num_classes: int = 5, **kwargs) -> torch.nn.Module:
    return _cascade(num_classes, roi_heads="htc", **kwargs)


def test_htc_is_the_cascade_with_a_mask_head_and_flow_per_stage():
    heads = _htc().roi_heads
    assert isinstance(heads, HybridTaskCascadeRoIHeads) and isinstance(heads, CascadeRoIHeads)
    assert heads.num_stages == 3 and heads.stage_ious == (0.5, 0.6, 0.7)
    assert heads.stage_loss_weights == HTC_LOSS_WEIGHTS == (1.0, 0.5, 0.25)
    keys = heads.state_dict().keys()
    assert {"mask_head.0.0.weight", "extra_mask_heads.1.0.0.weight", "mask_flows.1.0.weight"} <= set(keys)
    # each stage's mask head is its own (fresh weights, not a copy of stage 1's)
    w = [heads.mask_stage_parts(k)[0][0][0].weight for k in range(3)]
    assert not torch.equal(w[0], w[1]) and not torch.equal(w[1], w[2])
    assert heads.mask_stage_parts(0)[2] is None


def test_the_mask_information_flow_and_test_masks_are_the_stages_mean():
    """Stage k's mask head sees x + relu(conv1x1(f_{k-1})); test masks average the three stages'
    probabilities of the detection's class."""
    heads = _htc().roi_heads.eval()
    x = torch.randn(4, heads.mask_head[0][0].in_channels, 14, 14)
    labels = torch.tensor([1, 2, 3, 4])
    f0 = heads.mask_head(x)
    f1 = heads.extra_mask_heads[0](x + torch.relu(heads.mask_flows[0][0](f0)))
    f2 = heads.extra_mask_heads[1](x + torch.relu(heads.mask_flows[1][0](f1)))
    with torch.no_grad():
        for k, f in enumerate((f0, f1, f2)):
            torch.testing.assert_close(heads.mask_features(x, 2)[k], f)
        torch.testing.assert_close(heads.mask_logits(x, 2), heads.extra_mask_predictors[1](f2))
        torch.testing.assert_close(heads.mask_logits(x, 0), heads.mask_predictor(f0))
        preds = (heads.mask_predictor(f0), heads.extra_mask_predictors[0](f1), heads.extra_mask_predictors[1](f2))
        want = torch.stack([p[torch.arange(4), labels].sigmoid() for p in preds]).mean(0)
        torch.testing.assert_close(heads.mask_probs(x, labels), want, rtol=1e-5, atol=1e-6)
        # the flow matters: without it stage 3's features differ
        assert not torch.allclose(heads.extra_mask_heads[1](x), f2)


def test_detections_carry_the_averaged_masks(monkeypatch):
    model = _htc().eval()
    images, _ = _images_and_targets(1)
    calls = []

    def probs(x, labels):
        calls.append(labels.numel())
        return torch.full((labels.numel(), 28, 28), 0.75)

    monkeypatch.setattr(model.roi_heads, "mask_probs", probs)
    with torch.no_grad():
        out = model(images)[0]
    assert calls and sum(calls) == out["boxes"].shape[0] > 0
    # a constant 0.75 pasted into each box: 0.75 inside, interpolated to 0 at the edges
    m = out["masks"]
    assert torch.isclose(m.max(), torch.tensor(0.75)) and (m <= 0.75 + 1e-6).all()
    assert torch.isclose(m[m > 0], torch.tensor(0.75)).float().mean() > 0.5


def test_interleaved_training_resamples_each_stages_regressed_boxes_at_its_threshold(monkeypatch):
    """At stage k, after the box branch, stage k's regressed boxes (which are stage k+1's input)
    are re-labelled at stage k's IoU threshold and re-sampled; stage k's mask head trains on their
    positives (and only its flow chain), with weight 1, 0.5, 0.25; every parameter gets a gradient."""
    model = _htc().train()
    heads = model.roi_heads
    images, targets = _images_and_targets()
    refined, resampled, mask_stages = {}, {}, []
    real_refine, real_resample, real_loss = heads.refine, heads.resample, heads._mask_training_loss

    def refine(k, deltas, boxes, shapes):
        refined[k] = real_refine(k, deltas, boxes, shapes)
        return refined[k]

    def resample(k, boxes, tg):
        assert all(torch.equal(a, b) for a, b in zip(boxes, refined[k]))  # the boxes stage k just regressed
        resampled[k] = real_resample(k, boxes, tg)
        return resampled[k]

    def mask_loss(*args, stage=0):
        mask_stages.append(stage)
        assert all(torch.equal(a, b) for a, b in zip(args[3], resampled[stage][0]))
        return real_loss(*args, stage=stage)

    monkeypatch.setattr(heads, "refine", refine)
    monkeypatch.setattr(heads, "resample", resample)
    monkeypatch.setattr(heads, "_mask_training_loss", mask_loss)
    with sampling_seeds(model, [11, 12]):
        losses = model(images, targets)
    assert mask_stages == [0, 1, 2] and sorted(refined) == [0, 1, 2]
    assert {"loss_mask", "loss_mask_stage2", "loss_mask_stage3", "loss_classifier_stage3"} <= set(losses)
    for k, thr in enumerate((0.5, 0.6, 0.7)):
        for (boxes, matched, labels), tgt in zip(zip(*resampled[k]), targets):
            iou = box_iou(boxes, tgt["boxes"])[:, 0]
            assert ((labels > 0) == (iou >= thr)).all(), k
            assert labels[labels > 0].eq(2).all() and matched.eq(0).all()
            assert (labels > 0).sum() <= 32 * 0.25 and boxes.shape[0] <= 32
            # the ground truth is appended: at least one positive at every stage
            assert (labels > 0).any()
    sum(losses.values()).backward()
    silent = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not silent

    # the stage weights: the same step with weights (1, 1, 1) gives losses 1, 2, 4 times these
    model2 = _htc().train()
    model2.roi_heads.stage_loss_weights = (1.0, 1.0, 1.0)
    with sampling_seeds(model2, [11, 12]):
        plain = model2(images, targets)
    for name, w in (("loss_mask", 1.0), ("loss_mask_stage2", 0.5), ("loss_mask_stage3", 0.25)):
        torch.testing.assert_close(losses[name].detach(), w * plain[name].detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(losses["loss_classifier_stage3"].detach(), 0.25 * plain["loss_classifier_stage3"])


def test_the_resampling_is_seeded_per_image_and_stage():
    heads = _htc().roi_heads
    _, targets = _images_and_targets(1)
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(200, 2, generator=g) * 30
    boxes = [torch.cat([xy, xy + 20 + torch.rand(200, 2, generator=g) * 20], 1)]
    heads.fg_bg_sampler.seeds = [7]
    a, b = heads.resample(1, boxes, targets), heads.resample(1, boxes, targets)
    assert all(torch.equal(x[0], y[0]) for x, y in zip(a, b))
    heads.fg_bg_sampler.seeds = [8]
    c = heads.resample(1, boxes, targets)
    assert not torch.equal(a[0][0], c[0][0])


def test_htc_loads_a_torchvision_mask_rcnn_checkpoint(tmp_path):
    """Stage 1's box and mask heads take torchvision's keys; the later stages start fresh."""
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    torch.manual_seed(3)
    tv = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91).state_dict()
    path = tmp_path / "tv.pth"
    torch.save(tv, path)
    own = build_detector(ModelConfig(roi_heads="htc", weights=str(path), channels_last=False), 4).state_dict()
    for key in ("backbone.body.layer1.0.conv1.weight", "roi_heads.mask_head.0.0.weight", "rpn.head.conv.0.0.weight"):
        assert torch.equal(own[key], tv[key]), key
    assert not torch.equal(own["roi_heads.extra_mask_heads.0.0.0.weight"], tv["roi_heads.mask_head.0.0.weight"])


def test_an_htc_run_trains_and_resumes_exactly(tiny_config, tmp_path):
    """Interrupted at iteration 2 and resumed, an HTC run ends bit-identical to an uninterrupted one
    (the per-stage re-sampling is seeded like every sampler). Calibration, predict, the analyses and
    the report on an HTC run: tests/test_demo.py::test_demo_on_a_cascade[htc]."""
    cfg = tiny_config(max_iter=4, checkpoint_period=2, steps=[])
    straight, resumed = tmp_path / "a", tmp_path / "b"
    over = ["model.roi_heads=htc"]
    assert main(["train", "--config", str(cfg), "--out", str(straight), "--no-progress", *over]) == 0
    assert main(["train", "--config", str(cfg), "--out", str(resumed), "--no-progress", *over, "train.max_iter=2"]) == 0
    assert main(["train", "--out", str(resumed), "--resume", "--no-progress", "train.max_iter=4"]) == 0
    a, b = (load_checkpoint(Run(r).model_final)["model"] for r in (straight, resumed))
    assert any(k.startswith("roi_heads.mask_flows.1.") for k in a)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(x) for x in (straight / "train_log.jsonl").read_text().splitlines()]
    assert {"loss_mask_stage3", "loss_classifier_stage3"} <= set(log[-1])


@pytest.mark.parametrize("roi_heads", ["cascade", "htc"])
def test_a_cascade_without_a_mask_head_is_refused_for_htc_only(roi_heads):
    from simcal.modeling.roi_heads import rebuild_roi_heads

    standard = build_detector(ModelConfig(arch="small", norm="gn", min_size=64, max_size=64), 3).roi_heads
    standard = rebuild_roi_heads(standard)
    standard.mask_roi_pool = standard.mask_head = standard.mask_predictor = None
    cls = CascadeRoIHeads if roi_heads == "cascade" else HybridTaskCascadeRoIHeads
    if roi_heads == "htc":
        with pytest.raises(ValueError, match="mask head"):
            cls.from_standard(standard)
    else:
        assert cls.from_standard(standard).num_stages == 3
