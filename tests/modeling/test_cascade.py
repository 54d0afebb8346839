"""Cascade Mask R-CNN (``model.roi_heads=cascade``): stage labels, gradients, test scores, runs."""

from __future__ import annotations

import json

import pytest
import torch

from simcal import choices
from simcal.cli import main
from simcal.config import ModelConfig
from simcal.errors import InputError
from simcal.io import load_checkpoint
from simcal.modeling.cascade import CASCADE_BOX_WEIGHTS, CascadeRoIHeads, ScaleGradient
from simcal.modeling.detector import build_detector
from simcal.run import Run
from tests.conftest import copy_run, tiny_config_dict

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def cascade_run(tiny_data, tmp_path_factory):
    """A tiny cascade run (4 iterations, checkpoints every 2) shared by this module: copy it to change it."""
    import yaml

    tmp = tmp_path_factory.mktemp("cascade")
    cfg = tiny_config_dict(tiny_data, max_iter=4, checkpoint_period=2, steps=[])
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    over = ["model.roi_heads=cascade"]
    assert main(["train", "--config", str(tmp / "cfg.yaml"), "--out", str(tmp / "run"), "--no-progress", *over]) == 0
    return tmp / "run"


def _cascade(num_classes: int = 5, roi_heads: str = "cascade", **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(
        arch="small", norm="gn", min_size=64, max_size=64, roi_heads=roi_heads, box_batch_size_per_image=32, **kwargs
    )
    return build_detector(cfg, num_classes)


def _images_and_targets(n: int = 2):
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 64, 64, generator=g) for _ in range(n)]
    targets = []
    for _ in range(n):
        masks = torch.zeros(1, 64, 64, dtype=torch.uint8)
        masks[0, 10:40, 12:44] = 1
        targets.append({"boxes": torch.tensor([[12.0, 10.0, 44.0, 40.0]]), "labels": torch.tensor([2]), "masks": masks})
    return images, targets


def test_each_stage_labels_and_regresses_at_its_own_threshold_and_coder():
    """Boxes overlapping the object at IoU 0.45 / 0.55 / 0.65 / 0.75: foreground at stage 1
    (IoU >= 0.5) for three, at stage 2 (>= 0.6) for two, at stage 3 (>= 0.7) for one. The
    regression target of a box shifted by dx is w_x * dx / width with the stage's coder weight
    w_x (10, 20, 30)."""
    heads = _cascade().roi_heads
    assert isinstance(heads, CascadeRoIHeads) and heads.num_stages == 3 and heads.stage_ious == (0.5, 0.6, 0.7)
    gt = {"boxes": torch.tensor([[0.0, 0.0, 100.0, 100.0]]), "labels": torch.tensor([3])}
    boxes = [torch.tensor([[0.0, 0.0, w, 100.0] for w in (45.0, 55.0, 65.0, 75.0)] + [[10.0, 0.0, 110.0, 100.0]])]
    expected = {0: [0, 3, 3, 3, 3], 1: [0, 0, 3, 3, 3], 2: [0, 0, 0, 3, 3]}  # the last: IoU 90/110 = 0.82
    for k, want in expected.items():
        labels, targets = heads.stage_targets(k, boxes, [gt])
        assert labels[0].tolist() == want, k
        # the shifted box (dx = 10 of width 100): target x = -w_x * 0.1, y = 0, log-ratios 0
        torch.testing.assert_close(targets[0][4], torch.tensor([-CASCADE_BOX_WEIGHTS[k][0] * 0.1, 0.0, 0.0, 0.0]))
    no_gt = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    labels, _ = heads.stage_targets(1, boxes, [no_gt])
    assert labels[0].tolist() == [0] * 5


def test_training_trains_every_stage_on_the_previous_stages_boxes(monkeypatch):
    """One training step: three stages' losses plus the mask's; every parameter (each stage's
    head and predictor, the shared backbone) gets a gradient; stage k+1's input boxes are stage
    k's regression of its own (detached), labelled at stage k+1's threshold."""
    model = _cascade()
    heads = model.roi_heads
    seen = []
    real_refine, real_targets = heads.refine, heads.stage_targets

    def refine(k, deltas, boxes, shapes):
        out = real_refine(k, deltas, boxes, shapes)
        seen.append(("refine", k, [b.clone() for b in out]))
        assert not any(b.requires_grad for b in out)  # detached
        return out

    def stage_targets(k, boxes, targets):
        assert all(torch.equal(a, b) for a, b in zip(boxes, seen[-1][2]))  # the refined boxes
        out = real_targets(k, boxes, targets)
        seen.append(("targets", k, out[0]))
        return out

    monkeypatch.setattr(heads, "refine", refine)
    monkeypatch.setattr(heads, "stage_targets", stage_targets)
    images, targets = _images_and_targets()
    model.train()
    losses = model(images, targets)
    stage_keys = {"loss_classifier", "loss_box_reg", "loss_classifier_stage2", "loss_box_reg_stage2"}
    assert stage_keys | {"loss_classifier_stage3", "loss_box_reg_stage3", "loss_mask"} <= set(losses)
    assert [(s[0], s[1]) for s in seen] == [("refine", 0), ("targets", 1), ("refine", 1), ("targets", 2)]
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    for k in (0, 1, 2):
        head, predictor = heads.stage_parts(k)
        assert all(p.grad.abs().sum() > 0 for p in predictor.parameters()), k


def test_the_gradient_to_the_shared_features_is_scaled_per_stage():
    x = torch.ones(3, requires_grad=True)
    ScaleGradient.apply(x, 1 / 3).sum().backward()
    torch.testing.assert_close(x.grad, torch.full((3,), 1 / 3))


@pytest.mark.parametrize("mean_probs", [False, True])
def test_test_scores_are_the_stages_mean_and_boxes_the_last_stage(mean_probs):
    model = _cascade(cascade_mean_probs=mean_probs).eval()
    heads = model.roi_heads
    images, _ = _images_and_targets(1)
    with torch.no_grad():
        batch_images, _ = model.transform(images)
        features = model.backbone(batch_images.tensors)
        proposals, _ = model.rpn(batch_images, features)
        batch = heads.roi_batch(features, proposals, batch_images.image_sizes)
        boxes, logits = proposals, []
        for k in range(3):
            _, _, z, deltas = heads.stage_forward(k, features, boxes, batch_images.image_sizes)
            logits.append(z)
            if k < 2:
                boxes = heads.refine(k, deltas, boxes, batch_images.image_sizes)
    probs = [torch.softmax(z, -1) for z in logits]
    want = torch.stack(probs).mean(0) if mean_probs else torch.softmax(torch.stack(logits).mean(0), -1)
    torch.testing.assert_close(batch.scores, want)
    assert torch.equal(batch.proposals[0], boxes[0]) and torch.equal(batch.deltas, deltas)
    # the stages disagree: the mean is not any one stage's score
    assert not torch.allclose(probs[0], probs[2], atol=1e-3)


def test_a_cascade_run_trains_resumes_exactly_predicts_and_takes_an_ncm_head(cascade_run, tiny_config, tmp_path):
    cfg = tiny_config(max_iter=4, checkpoint_period=2, steps=[])
    straight, resumed = copy_run(cascade_run, tmp_path / "a"), tmp_path / "b"
    over = ["model.roi_heads=cascade"]
    assert main(["train", "--config", str(cfg), "--out", str(resumed), "--no-progress", *over, "train.max_iter=2"]) == 0
    assert main(["train", "--out", str(resumed), "--resume", "--no-progress", "train.max_iter=4"]) == 0
    a, b = (load_checkpoint(Run(r).model_final)["model"] for r in (straight, resumed))
    assert any(k.startswith("roi_heads.extra_heads.1.") for k in a)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(x) for x in (straight / "train_log.jsonl").read_text().splitlines()]
    assert "loss_classifier_stage3" in log[-1]
    assert main(["predict", "--run", str(straight), "--head", "orig,norcal", "--max-images", "6", "--no-progress"]) == 0
    metrics = json.loads((straight / "predictions" / "val-first6" / "orig" / "metrics_bbox.json").read_text())
    assert metrics["num_detections"] > 0
    # NCM on a cascade: class means per stage, on each stage's own RoIs and box head
    from simcal.engine.checkpoint import load_model
    from simcal.modeling.calibration import load_head

    cal = ["calibrate", "--run", str(straight), "--head", "ncm", "--steps", "4", "--classes-per-batch", "4"]
    assert main([*cal, "--no-progress"]) == 0
    model, _, _ = load_model(straight)
    ncm, _ = load_head(straight / "calibration" / "ncm" / "head.pth", model.roi_heads)
    assert [k for k, _ in ncm.stage_heads()] == [0, 1, 2]
    assert all(int(h.ncm_counts.sum()) > 0 and bool(h.ncm_valid[0]) for _, h in ncm.stage_heads())
    ncm_cal = ["predict", "--run", str(straight), "--head", "cal", "--calibration", "ncm", "--max-images", "6"]
    assert main([*ncm_cal, "--no-progress"]) == 0


def test_a_cascade_loads_a_torchvision_mask_rcnn_checkpoint(tmp_path):
    """Users start from Mask R-CNN weights they have: the backbone, FPN, RPN, stage 1's box head
    and the mask head load; stages 2 and 3 and the class-specific layers start fresh."""
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    torch.manual_seed(3)
    tv = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91).state_dict()
    path = tmp_path / "tv.pth"
    torch.save(tv, path)
    cfg = ModelConfig(roi_heads="cascade", weights=str(path), channels_last=False)
    own = build_detector(cfg, num_classes=4).state_dict()
    same = [
        "backbone.body.layer1.0.conv1.weight",
        "backbone.fpn.inner_blocks.0.0.weight",
        "rpn.head.conv.0.0.weight",
        "roi_heads.box_head.fc6.weight",
        "roi_heads.mask_head.0.0.weight",
    ]
    for key in same:
        assert torch.equal(own[key], tv[key]), key
    assert not torch.equal(own["roi_heads.extra_heads.0.fc6.weight"], tv["roi_heads.box_head.fc6.weight"])
    assert own["roi_heads.box_predictor.bbox_pred.weight"].shape[0] == 4  # class-agnostic regression


@pytest.mark.parametrize("mean_probs", [False, True])
def test_a_staged_3fc_ft_head_starts_as_the_cascade_itself(mean_probs):
    """Before any training a 3fc_ft head per stage (copies of each stage's layers), averaged as the
    cascade averages its stages, scores exactly as the cascade's own classifier."""
    from simcal.modeling.calibration import build_staged_head

    model = _cascade(cascade_mean_probs=mean_probs).eval()
    head = build_staged_head("3fc_ft", model.roi_heads)
    assert head.stages == [0, 1, 2] and build_staged_head("3fc_ft", model.roi_heads, stages="last").stages == [2]
    images, _ = _images_and_targets(1)
    with torch.no_grad():
        batch_images, _ = model.transform(images)
        features = model.backbone(batch_images.tensors)
        proposals, _ = model.rpn(batch_images, features)
        batch = model.roi_heads.roi_batch(features, proposals, batch_images.image_sizes)
        torch.testing.assert_close(head.batch_scores(batch), batch.scores)


@pytest.mark.slow
def test_every_scorer_and_combiner_runs_on_a_cascade_and_dual_selects_between_the_stage_means():
    """predict's scorers on a cascade's one RoI pass: every combiner, the post-hoc methods and the
    oracle give detections; `sel` picks per class between the original stages' mean and the
    calibrated stages' mean (Eq. 2 on the averaged vectors), before NMS."""
    from simcal.modeling.calibration import build_staged_head
    from simcal.modeling.combine import combine
    from simcal.modeling.scoring import build_scorer

    model = _cascade().eval()
    head = build_staged_head("3fc_ft", model.roi_heads)
    with torch.no_grad():
        for _, h in head.stage_heads():  # a calibrated head that differs from the original
            h.cls_score.weight.add_(torch.randn_like(h.cls_score.weight))
    counts = torch.tensor([1000.0, 5.0, 400.0, 2.0, 50.0])
    scorers = {f"dual-{c}": build_scorer("dual", head=head, counts=counts, combine=c) for c in choices.COMBINERS}
    scorers.update({k: build_scorer(k, head=head, counts=counts) for k in ("orig", "cal", *choices.POSTHOC)})
    scorers["oracle"] = build_scorer("oracle")
    images, targets = _images_and_targets(1)
    with torch.no_grad():
        batch_images, tg = model.transform(images, targets)
        features = model.backbone(batch_images.tensors)
        proposals, _ = model.rpn(batch_images, features)
        out = model.roi_heads.detect(features, proposals, batch_images.image_sizes, scorers, targets=tg)
        batch = model.roi_heads.roi_batch(features, proposals, batch_images.image_sizes)
        p_cal = head.batch_scores(batch)
    assert set(out) == set(scorers) and all(len(v[0]["scores"]) > 0 for v in out.values())
    assert not torch.allclose(p_cal, batch.scores, atol=1e-3)
    want = combine("sel", batch.scores, p_cal, counts, 300.0)
    torch.testing.assert_close(scorers["dual-sel"](batch), want)
    tail = counts <= 300
    torch.testing.assert_close(want[:, 1:][:, tail], p_cal[:, 1:][:, tail])
    torch.testing.assert_close(want[:, 1:][:, ~tail], batch.scores[:, 1:][:, ~tail])


def test_each_stage_calibrates_on_its_own_rois(tiny_data):
    """The bi-level batch of every stage: stage 1's RoIs are the sampled ones, stage k+1's the
    frozen stage k's regression of stage k's; each stage's kept foregrounds are of the sampled
    class and overlap its object at the stage's IoU threshold or more, its backgrounds less."""
    from simcal.data.annotations import load_dataset
    from simcal.data.dataset import DetectionDataset, LabelMap
    from simcal.data.samplers import BiLevelSampler
    from simcal.engine.calibration_batches import calibration_batches
    from simcal.engine.feature_cache import FrozenDetector

    train = load_dataset(tiny_data / "train.json")
    label_map = LabelMap.from_dataset(train)
    model = _cascade(num_classes=label_map.num_classes).eval()
    ds = DetectionDataset(train, tiny_data / "images", label_map=label_map, with_masks=False)
    frozen = FrozenDetector(model, ds, cache_mb=100, device=torch.device("cpu"))
    draws = BiLevelSampler(train, classes_per_batch=6, seed=0).batch(0)
    batches = calibration_batches(frozen, draws, [False] * 6, list(range(6)), label_map, 1, stages=3)
    assert len(batches) == 3 and all(b is not None for b in batches)
    from torchvision.ops import box_iou

    for k, (batch, thr) in enumerate(zip(batches, (0.5, 0.6, 0.7))):
        assert batch.fg == int((batch.labels > 0).sum()) and batch.bg == int((batch.labels == 0).sum())
        for i, (index, cat) in enumerate(draws):
            _, _, gt_boxes, gt_labels, _ = frozen.fetch([(index, False)])[0]
            mine = batch.slot == i
            fg = mine & (batch.labels > 0)
            assert (batch.labels[fg] == label_map.to_label(cat)).all()
            if fg.any():
                best = box_iou(batch.boxes[fg], gt_boxes[gt_labels == label_map.to_label(cat)]).max(1).values
                assert (best >= thr - 1e-6).all(), k
            bg = mine & (batch.labels == 0)
            if bg.any() and gt_boxes.numel():
                assert (box_iou(batch.boxes[bg], gt_boxes).max(1).values < thr).all(), k
    assert batches[0].fg > 0


def test_simcal_on_a_cascade_run(cascade_run, tmp_path):
    """calibrate on a cascade run: a head per stage (or the last only), the detector untouched,
    an interrupted calibration resumes to the same heads; predict orig / cal / dual."""
    import hashlib

    from simcal.engine.checkpoint import load_model
    from simcal.modeling.calibration import StagedHead, load_head

    run = copy_run(cascade_run, tmp_path / "run")
    weights = hashlib.sha256(Run(run).model_final.read_bytes()).hexdigest()
    cal = ["calibrate", "--run", str(run), "--steps", "6", "--classes-per-batch", "4", "--no-progress"]
    assert main([*cal, "calibration.checkpoint_period=3"]) == 0
    assert main([*cal, "--stages", "last"]) == 0
    assert hashlib.sha256(Run(run).model_final.read_bytes()).hexdigest() == weights
    model, _, _ = load_model(run)
    every, meta = load_head(run / "calibration" / "3fc_ft" / "head.pth", model.roi_heads)
    last, _ = load_head(run / "calibration" / "3fc_ft_stages-last" / "head.pth", model.roi_heads)
    assert isinstance(every, StagedHead) and every.stages == [0, 1, 2] and last.stages == [2]
    assert meta["stages"] == [0, 1, 2] and meta["num_stages"] == 3
    log = [json.loads(x) for x in (run / "calibration" / "3fc_ft" / "calibration_log.jsonl").read_text().splitlines()]
    assert all(len(r["fg_stages"]) == 3 and r["fg_stages"][0] == r["fg"] for r in log)
    # every stage's head trained: none is still the copy of its stage's classifier
    for k, h in every.stage_heads():
        assert not torch.equal(h.cls_score.weight, model.roi_heads.stage_parts(k)[1].cls_score.weight), k
    # stopped after the step-3 checkpoint: resumes to the same heads
    folder = run / "calibration" / "3fc_ft"
    before = {k: v.clone() for k, v in every.state_dict().items()}
    (folder / "head.pth").unlink()
    (folder / "summary.json").unlink()
    assert main([*cal, "calibration.checkpoint_period=3", "--resume"]) == 0
    again, _ = load_head(folder / "head.pth", model.roi_heads)
    assert all(torch.equal(before[k], v) for k, v in again.state_dict().items())
    assert main(["predict", "--run", str(run), "--head", "orig,cal,dual", "--no-progress"]) == 0
    for head in ("orig", "cal", "dual"):
        m = json.loads((run / "predictions" / "val" / head / "metrics_bbox.json").read_text())
        assert m["num_detections"] > 0, head
    # the decoupled baselines (Table 4) calibrate every stage through the same path
    short = ["calibrate", "--run", str(run), "--steps", "2", "--no-progress"]
    assert main([*short, "--loss", "focal", "--sampler", "random", "--name", "fl"]) == 0
    assert main([*short, "--head", "2fc_rand", "--sampler", "repeat_factor", "--name", "rand_is"]) == 0
    for name in ("fl", "rand_is"):
        h, meta = load_head(run / "calibration" / name / "head.pth", model.roi_heads)
        assert isinstance(h, StagedHead) and h.stages == [0, 1, 2], name
        log = (run / "calibration" / name / "calibration_log.jsonl").read_text().splitlines()
        assert len(json.loads(log[-1])["fg_stages"]) == 3, name


def test_the_resnext101_64x4d_fpn_arch_builds_trains_and_cascades():
    """`model.arch=resnext101_64x4d_fpn` (the paper's HTC body) is a choice orthogonal to
    `model.roi_heads`: ResNeXt-101 64x4d (64 groups of width 4: its 3x3 convs are grouped) in an FPN,
    here with a cascade on top; one training step runs and reaches every stage."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        arch="resnext101_64x4d_fpn", roi_heads="cascade", min_size=64, max_size=64, box_batch_size_per_image=16
    )
    model = build_detector(cfg, 3).train()
    body = model.backbone.body
    assert body.layer1[0].conv2.groups == 64 and body.layer4[0].conv2.in_channels == 64 * 4 * 8
    assert isinstance(model.roi_heads, CascadeRoIHeads)
    images, targets = _images_and_targets(1)
    targets[0]["labels"] = torch.tensor([1])
    losses = model(images, targets)
    assert {"loss_classifier_stage3", "loss_mask"} <= set(losses) and all(torch.isfinite(v) for v in losses.values())
    with pytest.raises(InputError, match="model.weights"):
        build_detector(ModelConfig(arch="resnext101_64x4d_fpn", weights="COCO_V1"), 3)
