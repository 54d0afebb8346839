"""Detector builders, the RoIHeads hooks, class-agnostic heads and torchvision compatibility."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models.detection import maskrcnn_resnet50_fpn as tv_maskrcnn_resnet50_fpn

from simcal.config import ModelConfig
from simcal.errors import InputError
from simcal.modeling.detector import build_detector, maskrcnn_resnet50_fpn, maskrcnn_small
from simcal.modeling.roi_heads import LongTailRoIHeads

torch.set_num_threads(1)
SMALL = dict(
    min_size=64,
    max_size=64,
    rpn_pre_nms_top_n_test=50,
    rpn_post_nms_top_n_test=50,
    rpn_pre_nms_top_n_train=100,
    rpn_post_nms_top_n_train=50,
    box_batch_size_per_image=32,
    rpn_batch_size_per_image=32,
)


def _batch(n=2, size=64):
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, size, size, generator=g) for _ in range(n)]
    masks = torch.zeros(2, size, size, dtype=torch.uint8)
    masks[0, 8:30, 8:30] = 1
    masks[1, 35:60, 30:62] = 1
    targets = [
        {"boxes": torch.tensor([[8.0, 8, 30, 30], [30, 35, 62, 60]]), "labels": torch.tensor([1, 3]), "masks": masks}
        for _ in range(n)
    ]
    return images, targets


def test_lvis_test_preset_from_config():
    m = build_detector(ModelConfig(), num_classes=5)
    rh = m.roi_heads
    assert isinstance(rh, LongTailRoIHeads)
    assert (rh.score_thresh, rh.nms_thresh, rh.detections_per_img) == (0.0, 0.5, 300)
    assert m.rpn._post_nms_top_n["testing"] == 1000
    assert rh.box_predictor.cls_score.out_features == 6  # C + 1, column 0 background
    assert (m.transform.min_size, m.transform.max_size) == ((800,), 1333)


def test_classwise_checkpoint_loads_into_plain_torchvision_and_predicts_the_same():
    torch.manual_seed(0)
    ours = maskrcnn_resnet50_fpn(
        num_classes=4, min_size=64, max_size=64, box_score_thresh=0.0, box_detections_per_img=50
    ).eval()
    plain = tv_maskrcnn_resnet50_fpn(
        weights=None,
        weights_backbone=None,
        num_classes=5,
        min_size=64,
        max_size=64,
        box_score_thresh=0.0,
        box_detections_per_img=50,
    ).eval()
    plain.load_state_dict(ours.state_dict(), strict=True)
    images, _ = _batch(1)
    with torch.no_grad():
        a, b = ours(images)[0], plain(images)[0]
    assert a["boxes"].shape[0] > 0
    torch.testing.assert_close(a["boxes"], b["boxes"])
    torch.testing.assert_close(a["scores"], b["scores"])
    assert torch.equal(a["labels"], b["labels"])
    # ours applies each detection's own row of the 1x1 mask layer (an einsum), torchvision the whole
    # conv: the same values up to float rounding, which on some CPUs' kernels reaches 1.1e-5 in a
    # pasted mask probability (measured: 2 of 204,800 pixels on this session's Xeon)
    torch.testing.assert_close(a["masks"], b["masks"], rtol=1e-4, atol=5e-5)


def test_classification_loss_hook_is_used():
    calls = []

    class Recorder(nn.Module):
        def forward(self, logits, labels):
            calls.append((tuple(logits.shape), labels.clone()))
            return logits.sum() * 0 + 7.0

    torch.manual_seed(0)
    m = maskrcnn_small(num_classes=4, cls_loss=Recorder(), **SMALL).train()
    images, targets = _batch()
    losses = m(images, targets)
    assert losses["loss_classifier"].item() == pytest.approx(7.0)
    ((shape, labels),) = calls
    assert shape[1] == 5 and labels.max() <= 4 and (labels > 0).any()


def test_scorers_change_detections_and_forward_is_the_original_scorer():
    """detect() runs any scorer on the shared RoI features; the plain forward is detect() with the
    predictor's own scores, so changing the classifier's activation changes model(images) too."""
    from simcal.modeling.predictors import Activation

    torch.manual_seed(0)
    m = maskrcnn_small(num_classes=4, **SMALL, box_score_thresh=0.0).eval()
    images, _ = _batch(1)
    with torch.no_grad():
        base = m(images)[0]
    assert len(set(base["labels"].tolist())) > 1

    def only_class_3(batch):
        p = torch.zeros_like(batch.scores)
        p[:, 0], p[:, 3] = 0.5, 0.5
        return p

    out = m.detect(images, {"orig": lambda batch: batch.scores, "three": only_class_3})
    assert torch.equal(out["orig"][0]["labels"], base["labels"])
    assert set(out["three"][0]["labels"].tolist()) == {3}
    assert torch.allclose(out["three"][0]["scores"], torch.full_like(out["three"][0]["scores"], 0.5))

    class OnlyThree(Activation):
        name = "only-three"

        def num_logits(self, num_classes):
            return num_classes + 1

        def forward(self, logits):
            p = torch.zeros_like(logits)
            p[:, 0], p[:, 3] = 0.5, 0.5
            return p

    m.roi_heads.box_predictor.activation = OnlyThree()
    with torch.no_grad():
        forward = m(images)[0]
    assert set(forward["labels"].tolist()) == {3}


def test_class_agnostic_heads_train_and_share_box_and_mask():
    torch.manual_seed(0)
    m = maskrcnn_small(num_classes=4, class_agnostic=True, **SMALL)
    assert m.roi_heads.box_predictor.bbox_pred.out_features == 4
    assert m.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 1
    m.train()
    images, targets = _batch()
    losses = m(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert m.roi_heads.box_predictor.bbox_pred.weight.grad.abs().sum() > 0
    m.eval()
    m.roi_heads.score_thresh = 0.0
    with torch.no_grad():
        out = m(images[:1])[0]
    assert out["masks"].shape[1:] == (1, 64, 64)
    # the same proposal gives the same box for every class: boxes repeat across labels
    boxes = out["boxes"]
    uniq = torch.unique(boxes.round(decimals=3), dim=0)
    assert uniq.shape[0] < boxes.shape[0]


@pytest.mark.parametrize("norm", ["bn", "gn", "frozen_bn"])
def test_small_model_norms_train(norm):
    torch.manual_seed(0)
    m = maskrcnn_small(num_classes=3, norm=norm, **SMALL).train()
    images, targets = _batch()
    losses = m(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())


def test_unknown_weights_name_is_a_clear_error():
    with pytest.raises(InputError, match="model.weights: weights: unknown weights 'COCO_V9'"):
        build_detector(ModelConfig(weights="COCO_V9"), num_classes=3)


def test_backbone_weights_from_a_local_file(tmp_path):
    from torchvision.models import resnet18

    torch.manual_seed(1)
    body = resnet18()
    path = tmp_path / "r18.pth"
    torch.save(body.state_dict(), path)
    m = maskrcnn_small(num_classes=3, weights_backbone=str(path), **SMALL)
    torch.testing.assert_close(m.backbone.body.conv1.weight, body.conv1.weight)


@pytest.mark.parametrize("k", [1, 100, 300])
def test_top_batched_nms_equals_full_class_wise_nms(k):
    """The best-candidates NMS keeps exactly what full class-wise NMS keeps in its top k (same
    boxes, same score order; only exactly tied scores may swap places), including when few
    candidates survive and the candidate set must grow."""
    from torchvision.ops import batched_nms

    from simcal.modeling.roi_heads import top_batched_nms

    g = torch.Generator().manual_seed(k)
    for trial in range(40):
        n = int(torch.randint(1, 20000, (1,), generator=g))
        classes = int(torch.randint(1, 90, (1,), generator=g))
        xy = torch.rand(n, 2, generator=g) * 100
        # trial % 2: large boxes of few classes overlap heavily, so most top candidates are suppressed
        wh = torch.rand(n, 2, generator=g) * (80 if trial % 2 else 5) + 1
        boxes = torch.cat([xy, xy + wh], 1)
        scores = torch.rand(n, generator=g) ** (8 if trial % 3 == 0 else 1)
        labels = torch.randint(0, classes if trial % 2 == 0 else 3, (n,), generator=g)
        ref = batched_nms(boxes, scores, labels, 0.5)[:k]
        got = top_batched_nms(boxes, scores, labels, 0.5, k)
        assert sorted(got.tolist()) == sorted(ref.tolist())
        assert torch.equal(scores[got], scores[ref])


def test_proposal_counts_and_sampling_seeds_are_restored_even_on_error():
    from simcal.modeling.detector import eval_proposal_counts, proposal_counts, training_proposal_counts
    from simcal.modeling.sampling import sampling_seeds

    m = maskrcnn_small(num_classes=3, **SMALL)
    assert training_proposal_counts(m) == (100, 50) and eval_proposal_counts(m) == (50, 50)
    with pytest.raises(RuntimeError):
        with proposal_counts(m, 100, 50):
            assert eval_proposal_counts(m) == (100, 50) and training_proposal_counts(m) == (100, 50)
            raise RuntimeError
    assert eval_proposal_counts(m) == (50, 50)
    with pytest.raises(RuntimeError):
        with sampling_seeds(m, [7, 8]):
            # two streams of each image's seed: the RPN's 2s, the RoI heads' 2s + 1
            assert m.rpn.fg_bg_sampler.seeds == [14, 16] and m.roi_heads.fg_bg_sampler.seeds == [15, 17]
            raise RuntimeError
    assert m.rpn.fg_bg_sampler.seeds is None and m.roi_heads.fg_bg_sampler.seeds is None


def test_seeded_sampling_makes_the_losses_a_function_of_the_seeds():
    torch.manual_seed(0)
    m = maskrcnn_small(num_classes=4, **SMALL).train()
    images, targets = _batch()
    from simcal.modeling.sampling import sampling_seeds

    def losses(seeds):
        torch.manual_seed(int(torch.randint(0, 1000, (1,))))  # the global RNG must not matter
        with sampling_seeds(m, seeds), torch.no_grad():
            return {k: v.item() for k, v in m(images, targets).items()}

    a, b, c = losses([1, 2]), losses([1, 2]), losses([3, 4])
    assert a == b and a != c


def test_a_torchvision_model_is_adopted_with_its_weights_and_settings():
    from simcal.modeling.detector import LongTailMaskRCNN
    from simcal.modeling.predictors import BoxPredictor

    torch.manual_seed(0)
    plain = tv_maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=4, min_size=64, max_size=64, box_detections_per_img=7
    ).eval()
    images, _ = _batch(1)
    with torch.no_grad():
        ref = plain(images)[0]
    ours = LongTailMaskRCNN.from_torchvision(plain)
    assert isinstance(ours.roi_heads, LongTailRoIHeads) and isinstance(ours.roi_heads.box_predictor, BoxPredictor)
    assert ours.roi_heads.box_predictor.cls_score is plain.roi_heads.box_predictor.cls_score  # shared, not copied
    assert ours.roi_heads.detections_per_img == 7 and ours.state_dict().keys() == plain.state_dict().keys()
    with torch.no_grad():
        out = ours.detect(images, {"orig": lambda batch: batch.scores})["orig"][0]
    torch.testing.assert_close(out["boxes"], ref["boxes"])
    torch.testing.assert_close(out["scores"], ref["scores"])
    assert torch.equal(out["labels"], ref["labels"])


def test_mask_head_in_chunks_and_unpasted_masks_give_the_same_masks(monkeypatch):
    """The mask head run a few detections at a time (across image boundaries) gives the masks of
    one run; masks left in box coordinates and pasted later give the pasted ones."""
    import simcal.modeling.roi_heads as rh
    from simcal.modeling.detector import paste_masks

    torch.manual_seed(0)
    m = maskrcnn_small(num_classes=4, **SMALL, box_score_thresh=0.0).eval()
    images, _ = _batch(3)
    scorers = {"orig": lambda batch: batch.scores}
    whole = m.detect(images, scorers)["orig"]
    raw = m.detect(images, scorers, paste=False)["orig"]
    monkeypatch.setattr(rh, "MASK_CHUNK", 7)
    chunked = m.detect(images, scorers, paste=False)["orig"]
    assert sum(len(d["scores"]) for d in whole) > 3 * 7  # several chunks, some across two images
    for w, r, c, im in zip(whole, raw, chunked, images):
        assert r["masks"].shape == (len(w["scores"]), 1, 28, 28)
        assert torch.allclose(r["masks"], c["masks"], atol=1e-5)
        assert torch.equal(paste_masks(r["masks"][:, 0], r["boxes"], *im.shape[-2:]), w["masks"])


def test_best_per_class_keeps_each_class_k_best_over_the_images():
    from simcal.modeling.roi_heads import best_per_class

    dets = [
        {"scores": torch.tensor([0.9, 0.8, 0.3]), "labels": torch.tensor([1, 2, 1]), "roi": torch.tensor([0, 1, 2])},
        {
            "scores": torch.tensor([0.5, 0.7, 0.6, 0.2]),
            "labels": torch.tensor([1, 2, 2, 3]),
            "roi": torch.tensor([3, 4, 5, 6]),
        },
    ]
    got = best_per_class(dets, 2)
    assert got[0]["roi"].tolist() == [0, 1] and got[1]["roi"].tolist() == [3, 4, 6]
    assert best_per_class(dets, 1)[1]["roi"].tolist() == [6] and best_per_class(dets, 9) is dets
    tied = [{"scores": torch.tensor([0.5]), "labels": torch.tensor([1])}] * 2
    assert [len(d["scores"]) for d in best_per_class(tied, 1)] == [1, 0]  # a tie: the earlier image


def test_selected_mask_logits_are_the_full_predictor_at_each_detections_class():
    """Only each detection's own class channel is computed; the values are the full predictor's
    (torchvision's MaskRCNNPredictor), and another predictor runs whole and is indexed."""
    from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor

    from simcal.modeling.roi_heads import selected_mask_logits

    torch.manual_seed(0)
    predictor = MaskRCNNPredictor(16, 16, 1204)
    x = torch.randn(5, 16, 14, 14)
    labels = torch.tensor([0, 1203, 7, 7, 512])
    full = predictor(x)[torch.arange(5), labels]
    got = selected_mask_logits(predictor, x, labels)
    assert got.shape == (5, 28, 28)
    torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-5)
    other = nn.Sequential(nn.Conv2d(16, 9, 3, padding=1))  # no conv5_mask / 1x1 logits: run whole
    torch.testing.assert_close(selected_mask_logits(other, x, labels % 9), other(x)[torch.arange(5), labels % 9])
