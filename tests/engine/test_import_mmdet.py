"""``simcal import --from mmdet``: mmdetection cannot run here (its ops need a compiled mmcv), so
its rules are tested on hand-built checkpoints whose expected outputs are worked out without the
converter:

- the naming and layout: detectron2's fixture weights renamed to mmdetection's keys by this
  file's own table (the two frameworks lay a Mask R-CNN's tensors out alike: background last,
  4C box deltas, C mask channels) must import to exactly the tensors the detectron2 importer
  gives, which the reference test matches against detectron2 itself;
- Seesaw's normalised C + 2 classifier and normed mask conv, against mmdetection's formulas
  written out here; a cascade's per-stage heads, box-coder weights and averaged masks;
- the config reader (``_base_``, ``dict(**other)``, never running code) and the bad inputs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from simcal.cli import main
from simcal.errors import InputError
from tests.engine.test_importer import CASCADE, FIXTURE, LVIS, categories_json, write_d2_checkpoint

#: detectron2 key -> mmdetection key, written out for this test (not the converter's table)
D2_TO_MMDET = [
    (r"^backbone\.bottom_up\.stem\.conv1\.weight$", "backbone.conv1.weight"),
    (r"^backbone\.bottom_up\.stem\.conv1\.norm\.", "backbone.bn1."),
    (r"^backbone\.bottom_up\.res2\.", "backbone.layer1."),
    (r"^backbone\.bottom_up\.res3\.", "backbone.layer2."),
    (r"^backbone\.bottom_up\.res4\.", "backbone.layer3."),
    (r"^backbone\.bottom_up\.res5\.", "backbone.layer4."),
    (r"\.conv([123])\.norm\.", r".bn\1."),
    (r"\.shortcut\.norm\.", ".downsample.1."),
    (r"\.shortcut\.weight$", ".downsample.0.weight"),
    (r"^backbone\.fpn_lateral2\.", "neck.lateral_convs.0.conv."),
    (r"^backbone\.fpn_lateral3\.", "neck.lateral_convs.1.conv."),
    (r"^backbone\.fpn_lateral4\.", "neck.lateral_convs.2.conv."),
    (r"^backbone\.fpn_lateral5\.", "neck.lateral_convs.3.conv."),
    (r"^backbone\.fpn_output2\.", "neck.fpn_convs.0.conv."),
    (r"^backbone\.fpn_output3\.", "neck.fpn_convs.1.conv."),
    (r"^backbone\.fpn_output4\.", "neck.fpn_convs.2.conv."),
    (r"^backbone\.fpn_output5\.", "neck.fpn_convs.3.conv."),
    (r"^proposal_generator\.rpn_head\.conv\.", "rpn_head.rpn_conv."),
    (r"^proposal_generator\.rpn_head\.objectness_logits\.", "rpn_head.rpn_cls."),
    (r"^proposal_generator\.rpn_head\.anchor_deltas\.", "rpn_head.rpn_reg."),
    (r"^roi_heads\.box_head\.(\d\.)?fc1\.", r"roi_head.bbox_head.\1shared_fcs.0."),
    (r"^roi_heads\.box_head\.(\d\.)?fc2\.", r"roi_head.bbox_head.\1shared_fcs.1."),
    (r"^roi_heads\.box_predictor\.(\d\.)?cls_score\.", r"roi_head.bbox_head.\1fc_cls."),
    (r"^roi_heads\.box_predictor\.(\d\.)?bbox_pred\.", r"roi_head.bbox_head.\1fc_reg."),
    (r"^roi_heads\.mask_head\.mask_fcn1\.", "roi_head.mask_head.convs.0.conv."),
    (r"^roi_heads\.mask_head\.mask_fcn2\.", "roi_head.mask_head.convs.1.conv."),
    (r"^roi_heads\.mask_head\.mask_fcn3\.", "roi_head.mask_head.convs.2.conv."),
    (r"^roi_heads\.mask_head\.mask_fcn4\.", "roi_head.mask_head.convs.3.conv."),
    (r"^roi_heads\.mask_head\.deconv\.", "roi_head.mask_head.upsample."),
    (r"^roi_heads\.mask_head\.predictor\.", "roi_head.mask_head.conv_logits."),
]


def to_mmdet(d2: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in d2.items():
        new = key
        for pattern, repl in D2_TO_MMDET:
            new = re.sub(pattern, repl, new)
        assert new != key or key.startswith("backbone.layer"), key
        out[new] = torch.from_numpy(np.array(value))
    return out


#: an mmdetection 2 config of a caffe-style R50 LVIS v0.5 Mask R-CNN (the detectron2 fixture's network)
CAFFE_LVIS = """
_base_ = './base.py'
model = dict(
    backbone=dict(style='caffe', norm_cfg=dict(type='BN', requires_grad=False)),
    roi_head=dict(bbox_head=dict(num_classes=1230), mask_head=dict(num_classes=1230)),
    test_cfg=dict(rcnn=dict(score_thr=0.0001, max_per_img=300)))
img_norm_cfg = dict(mean=[103.530, 116.280, 123.675], std=[1.0, 1.0, 1.0], to_rgb=False)
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='MultiScaleFlipAug', img_scale=(1333, 800), flip=False, transforms=[
        dict(type='Resize', keep_ratio=True), dict(type='RandomFlip'),
        dict(type='Normalize', **img_norm_cfg), dict(type='Pad', size_divisor=32),
        dict(type='ImageToTensor', keys=['img']), dict(type='Collect', keys=['img'])])]
data = dict(test=dict(pipeline=test_pipeline))
"""
BASE = """
model = dict(
    type='MaskRCNN',
    backbone=dict(type='ResNet', depth=50, num_stages=4, out_indices=(0, 1, 2, 3), frozen_stages=1,
                  norm_cfg=dict(type='BN', requires_grad=True), norm_eval=True, style='pytorch'),
    neck=dict(type='FPN', in_channels=[256, 512, 1024, 2048], out_channels=256, num_outs=5),
    rpn_head=dict(type='RPNHead', in_channels=256, feat_channels=256,
                  anchor_generator=dict(type='AnchorGenerator', scales=[8], ratios=[0.5, 1.0, 2.0],
                                        strides=[4, 8, 16, 32, 64])),
    roi_head=dict(type='StandardRoIHead',
                  bbox_head=dict(type='Shared2FCBBoxHead', num_classes=80,
                                 bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[0., 0., 0., 0.],
                                                 target_stds=[0.1, 0.1, 0.2, 0.2]), reg_class_agnostic=False,
                                 loss_cls=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
                  mask_head=dict(type='FCNMaskHead', num_convs=4, in_channels=256, num_classes=80)),
    train_cfg=dict(rpn_proposal=dict(nms_pre=2000, max_per_img=1000, nms=dict(type='nms', iou_threshold=0.7)),
                   rcnn=dict(sampler=dict(type='RandomSampler', num=512, pos_fraction=0.25))),
    test_cfg=dict(rpn=dict(nms_pre=1000, max_per_img=1000, nms=dict(type='nms', iou_threshold=0.7), min_bbox_size=0),
                  rcnn=dict(score_thr=0.05, nms=dict(type='nms', iou_threshold=0.5), max_per_img=100,
                            mask_thr_binary=0.5)))
"""


@pytest.fixture(scope="module")
def d2_weights(tmp_path_factory) -> dict[str, dict[str, np.ndarray]]:
    import pickle

    tmp = tmp_path_factory.mktemp("d2_for_mmdet")
    out = {}
    for model in (LVIS, CASCADE):
        with open(write_d2_checkpoint(model, tmp / f"{model}.pkl"), "rb") as f:
            out[model] = pickle.load(f)["model"]
    return out


def _import(tmp: Path, framework: str, ckpt: Path, gt: Path, *extra: str, out: str = "run") -> Path:
    from simcal.engine.importer import import_checkpoint

    config = [a for a in extra if not a.startswith("data.") and "=" not in a]
    overrides = [f"data.train_json={gt}", f"data.train_images={FIXTURE / 'images'}"]
    overrides += [f"data.val_json={gt}", f"data.val_images={FIXTURE / 'images'}"]
    overrides += [a for a in extra if "=" in a]
    return import_checkpoint(framework, ckpt, tmp / out, config[0] if config else None, overrides, verbose=False)


def _state(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "model_final.pth", weights_only=False)["model"]


@pytest.mark.slow
def test_an_mmdetection_mask_rcnn_imports_to_the_tensors_detectron2s_gives(d2_weights, tmp_path):
    (tmp_path / "base.py").write_text(BASE)
    cfg = tmp_path / "mask_rcnn_r50_caffe_fpn_lvis.py"
    cfg.write_text(CAFFE_LVIS)
    ckpt = tmp_path / "epoch_24.pth"
    torch.save({"meta": {"epoch": 24}, "state_dict": to_mmdet(d2_weights[LVIS])}, ckpt)
    gt = categories_json(tmp_path / "lvis.json", list(range(1, 1231)))
    d2_pkl = tmp_path / "d2.pkl"
    import pickle

    d2_pkl.write_bytes(pickle.dumps({"model": d2_weights[LVIS]}))
    ours = _state(_import(tmp_path, "mmdet", ckpt, gt, str(cfg), out="mm"))
    theirs = _state(_import(tmp_path, "detectron2", d2_pkl, gt, out="d2"))
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
    m = __import__("yaml").safe_load((tmp_path / "mm" / "config.yaml").read_text())["model"]
    expected = dict(
        arch="resnet50_fpn", pixel_format="bgr", pixel_mean=[103.53, 116.28, 123.675], pixel_std=[1.0, 1.0, 1.0],
        stride_in_1x1=True, resize="mmdet", anchors="exact", proposals="mmdet", roi_align="mmdet", min_box_size=0.0,
        score_thresh=0.0001, nms_thresh=0.5, detections_per_img=300, min_size=800, max_size=1333,
        rpn_pre_nms_top_n_train=2000, rpn_post_nms_top_n_train=1000, classifier="softmax", norm="frozen_bn",
    )  # fmt: skip
    assert {k: m[k] for k in expected} == expected


def test_seesaw_normed_classifier_and_mask_against_mmdetections_formulas(d2_weights, tmp_path):
    """Seesaw's C + 2 classifier (NormedLinear, temperature 20) and the normed mask conv: scores
    and mask logits of the imported model equal mmdetection's formulas on the file's tensors."""
    w = to_mmdet(d2_weights[LVIS])
    g = torch.Generator().manual_seed(0)
    w["roi_head.bbox_head.fc_cls.weight"] = torch.randn(1232, 1024, generator=g)
    w["roi_head.bbox_head.fc_cls.bias"] = torch.randn(1232, generator=g)
    (tmp_path / "base.py").write_text(BASE)
    cfg = tmp_path / "seesaw.py"
    cfg.write_text(
        "_base_ = './base.py'\n"
        "model = dict(roi_head=dict(\n"
        "    bbox_head=dict(num_classes=1230, cls_predictor_cfg=dict(type='NormedLinear', tempearture=20),\n"
        "                   loss_cls=dict(type='SeesawLoss', p=0.8, q=2.0, num_classes=1230, loss_weight=1.0)),\n"
        "    mask_head=dict(num_classes=1230, predictor_cfg=dict(type='NormedConv2d', tempearture=20))))\n"
    )
    ckpt = tmp_path / "seesaw.pth"
    torch.save({"meta": {"CLASSES": [f"c{i}" for i in range(1230)]}, "state_dict": w}, ckpt)
    gt = categories_json(tmp_path / "lvis.json", list(range(1, 1231)))
    run = _import(tmp_path, "mmdet", ckpt, gt, str(cfg))
    from simcal.engine.checkpoint import load_model

    model, _, run_cfg = load_model(run)
    assert (run_cfg.model.classifier, run_cfg.model.cls_head, run_cfg.model.mask_head) == ("seesaw", "normed", "normed")
    feats = torch.randn(6, 1024, generator=g).relu()
    logits, _ = model.roi_heads.box_predictor(feats)
    scores = model.roi_heads.box_predictor.scores(logits)
    # mmdetection: NormedLinear, then SeesawLoss.get_activation (classes softmax x P(object), background P(bg))
    W, b = w["roi_head.bbox_head.fc_cls.weight"], w["roi_head.bbox_head.fc_cls.bias"]
    x = 20 * feats / (feats.norm(dim=1, keepdim=True) + 1e-6)
    mm_logits = x @ (W / (W.norm(dim=1, keepdim=True) + 1e-6)).T + b
    objectness = mm_logits[:, -2:].softmax(-1)
    mm_classes = mm_logits[:, :-2].softmax(-1) * objectness[:, :1]
    torch.testing.assert_close(scores[:, 1:], mm_classes)  # label k + 1 = mmdetection class k
    torch.testing.assert_close(scores[:, 0], objectness[:, 1])
    # NormedConv2d on the mask head's features, each detection's own class channel
    from simcal.modeling.roi_heads import selected_mask_logits

    hidden = torch.randn(3, 256, 14, 14, generator=g)
    labels = torch.tensor([1, 7, 1230])
    ours = selected_mask_logits(model.roi_heads.mask_predictor, hidden, labels)
    up = F.relu(
        F.conv_transpose2d(
            hidden, w["roi_head.mask_head.upsample.weight"], w["roi_head.mask_head.upsample.bias"], stride=2
        )
    )
    Wm, bm = w["roi_head.mask_head.conv_logits.weight"], w["roi_head.mask_head.conv_logits.bias"]
    xm = 20 * up / (up.norm(dim=1, keepdim=True) + 1e-6)
    mm_masks = F.conv2d(xm, Wm / (Wm.norm(dim=1, keepdim=True) + 1e-6), bm)
    torch.testing.assert_close(ours, mm_masks[torch.arange(3), labels - 1], rtol=1e-5, atol=1e-4)


@pytest.mark.slow
def test_a_cascade_mask_rcnn_with_a_mask_head_per_stage(d2_weights, tmp_path):
    """mmdetection's Cascade Mask R-CNN: three box stages (class-agnostic regression, target stds
    (0.1, 0.1, 0.2, 0.2) / 2 / 3), a mask head per stage whose test masks are the stages' mean."""
    d2 = d2_weights[CASCADE]
    w = {}
    for key, value in to_mmdet({k: v for k, v in d2.items() if not k.startswith("roi_heads.mask_head")}).items():
        w[key] = value
    mask = to_mmdet({k: v for k, v in d2.items() if k.startswith("roi_heads.mask_head")})
    g = torch.Generator().manual_seed(1)
    for k in range(3):  # stage k's mask head: the fixture's, scaled differently per stage
        for key, value in mask.items():
            w[key.replace("roi_head.mask_head.", f"roi_head.mask_head.{k}.")] = value * (1 + 0.1 * k)
    (tmp_path / "base.py").write_text(BASE)
    cfg = tmp_path / "cascade.py"
    stds = "[[0.1, 0.1, 0.2, 0.2], [0.05, 0.05, 0.1, 0.1], [0.033, 0.033, 0.067, 0.067]]"
    cfg.write_text(
        "_base_ = './base.py'\n"
        f"stds = {stds}\n"
        "model = dict(roi_head=dict(_delete_=True, type='CascadeRoIHead', num_stages=3,\n"
        "    bbox_head=[dict(type='Shared2FCBBoxHead', num_classes=80, reg_class_agnostic=True,\n"
        "                    bbox_coder=dict(target_stds=s)) for s in stds],\n"
        "    mask_head=dict(type='FCNMaskHead', num_classes=80)))\n"
    )
    gt = categories_json(
        tmp_path / "coco.json", [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
    )
    ckpt = tmp_path / "cascade.pth"
    torch.save({"state_dict": w}, ckpt)
    with pytest.raises(InputError, match=r"cascade.py: line 3: not read without running the config: a ListComp"):
        _import(tmp_path, "mmdet", ckpt, gt, str(cfg))  # a comprehension would run code: refused
    cfg.write_text(
        "_base_ = './base.py'\n"
        "model = dict(roi_head=dict(_delete_=True, type='CascadeRoIHead', num_stages=3,\n"
        "    bbox_head=[\n"
        "        dict(num_classes=80, reg_class_agnostic=True, bbox_coder=dict(target_stds=[0.1, 0.1, 0.2, 0.2])),\n"
        "        dict(num_classes=80, reg_class_agnostic=True, bbox_coder=dict(target_stds=[0.05, 0.05, 0.1, 0.1])),\n"
        "        dict(num_classes=80, reg_class_agnostic=True,\n"
        "             bbox_coder=dict(target_stds=[0.033, 0.033, 0.067, 0.067]))],\n"
        "    mask_head=[dict(type='FCNMaskHead', num_classes=80)] * 3))\n"
    )
    run = _import(tmp_path, "mmdet", ckpt, gt, str(cfg))
    from simcal.engine.checkpoint import load_model

    model, _, run_cfg = load_model(run)
    rh = model.roi_heads
    assert (run_cfg.model.roi_heads, run_cfg.model.mask_flow, run_cfg.model.cascade_mean_probs) == ("htc", False, False)
    weights = [tuple(c.weights) for c in rh.stage_coders]
    assert weights[2] == pytest.approx((1 / 0.033, 1 / 0.033, 1 / 0.067, 1 / 0.067))  # 30.30, 14.93
    assert len(rh.mask_flows) == 0
    # the test mask: the mean over the stages of each stage's sigmoid (mmdetection's merge_aug_masks)
    x = torch.randn(2, 256, 14, 14, generator=g)
    labels = torch.tensor([3, 80])
    expected = []
    for k in range(3):
        h = x
        for i in range(4):
            conv = f"roi_head.mask_head.{k}.convs.{i}.conv"
            h = F.relu(F.conv2d(h, w[f"{conv}.weight"], w[f"{conv}.bias"], padding=1))
        up = F.relu(
            F.conv_transpose2d(
                h, w[f"roi_head.mask_head.{k}.upsample.weight"], w[f"roi_head.mask_head.{k}.upsample.bias"], stride=2
            )
        )
        logits = F.conv2d(
            up, w[f"roi_head.mask_head.{k}.conv_logits.weight"], w[f"roi_head.mask_head.{k}.conv_logits.bias"]
        )
        expected.append(logits[torch.arange(2), labels - 1].sigmoid())
    torch.testing.assert_close(rh.mask_probs(x, labels), torch.stack(expected).mean(0), rtol=1e-4, atol=1e-5)
    # stage 2's classifier: background last in the file, first here
    cls = w["roi_head.bbox_head.1.fc_cls.weight"]
    assert torch.equal(rh.extra_predictors[0].cls_score.weight, torch.cat([cls[-1:], cls[:-1]]))


def test_the_config_is_read_without_running_it(tmp_path):
    from simcal.modeling.importers.mmdet import parse_config, read_config

    (tmp_path / "a.py").write_text("x = dict(a=1, b=dict(c=2, d=[1, 2]))\ny = (1333, 800)\nscale = 1 / 0.033\n")
    (tmp_path / "b.py").write_text(
        "_base_ = ['./a.py']\nnorm = dict(mean=[1.0, 2.0, 3.0], to_rgb=True)\n"
        "x = dict(b=dict(c=5), e=dict(**norm, std=[4, 5, 6]))\nz = [dict(k=1)] * 2\nw = -norm['mean'][2]\n"
    )
    cfg = read_config(tmp_path / "b.py")
    assert cfg["x"] == {
        "a": 1,
        "b": {"c": 5, "d": [1, 2]},
        "e": {"mean": [1.0, 2.0, 3.0], "to_rgb": True, "std": [4, 5, 6]},
    }
    assert cfg["y"] == (1333, 800) and cfg["z"] == [{"k": 1}, {"k": 1}] and cfg["w"] == -3.0
    assert cfg["scale"] == pytest.approx(30.303, rel=1e-4)
    (tmp_path / "c.py").write_text("_base_ = './a.py'\nx = dict(_delete_=True, q=1)\n")
    assert read_config(tmp_path / "c.py")["x"] == {"q": 1}  # mmcv's _delete_
    # a line of another name that would run code is skipped and listed; the model's lines must be read
    skipped = parse_config("gpu_ids = range(0, 8)\nmodel = dict(a=1)\n", "cfg.py")
    assert skipped == {"model": {"a": 1}, "__skipped__": ["gpu_ids (line 1) of cfg.py"]}
    for text, what in [
        ("import os\n", "line 1: only `name = value` lines are read"),
        ("model = __import__('os').system('true')\n", "line 1: not read without running the config: a Call"),
        ("model = open('f')\n", "line 1: not read without running the config: a Call"),
        ("model = y\n", "line 1: not read without running the config: the name 'y' (not assigned before)"),
        ("test_pipeline = lambda: 1\n", "line 1: not read without running the config: a Lambda"),
        ("def f():\n    pass\n", "line 1: only `name = value` lines are read"),
        ("x = (\n", "not a Python config"),
    ]:
        with pytest.raises(InputError) as e:
            parse_config(text, "cfg.py")
        assert what in str(e.value) and str(e.value).startswith("cfg.py: "), str(e.value)


BAD_MMDET = {
    "deformable convolutions": (
        lambda w: {**w, "backbone.layer2.0.conv2.conv_offset.weight": torch.zeros(18, 128, 3, 3)},
        "backbone.layer2.0.conv2.conv_offset.weight: deformable convolutions (DCN, as the paper's HTC X-101)",
    ),
    "a Hybrid Task Cascade": (
        lambda w: {**w, "roi_head.semantic_head.conv_logits.weight": torch.zeros(2, 2)},
        "roi_head.semantic_head.conv_logits.weight: a Hybrid Task Cascade",
    ),
    "an unknown key": (
        lambda w: {**w, "roi_head.bbox_head.fc_extra.weight": torch.zeros(2, 2)},
        "roi_head.bbox_head.fc_extra.weight: a key of no mmdetection R-CNN layout known to simcal",
    ),
    "a missing tensor": (
        lambda w: {k: v for k, v in w.items() if k != "neck.fpn_convs.2.conv.weight"},
        "neck.fpn_convs.2.conv.weight: missing",
    ),
}


@pytest.mark.parametrize("case", list(BAD_MMDET))
def test_bad_mmdetection_checkpoints_are_one_line(d2_weights, tmp_path, capsys, case):
    edit, message = BAD_MMDET[case]
    ckpt = tmp_path / "bad.pth"
    torch.save({"state_dict": edit(to_mmdet(d2_weights[LVIS]))}, ckpt)
    gt = categories_json(tmp_path / "lvis.json", list(range(1, 1231)))
    out = tmp_path / "run"
    assert main(["import", "--from", "mmdet", str(ckpt), "--out", str(out), f"data.train_json={gt}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"simcal: error: {ckpt}: {message}" in err, err
    assert not out.exists()


@pytest.mark.slow
def test_the_checkpoints_own_config_is_read_and_predict_runs(d2_weights, tmp_path, capsys):
    """Without --framework-config, the config mmdetection stores in the checkpoint (meta.config,
    flattened: no _base_) is read; the run predicts from the CLI."""
    from simcal.modeling.importers.mmdet import read_config

    (tmp_path / "base.py").write_text(BASE)
    cfg = tmp_path / "cfg.py"
    cfg.write_text(CAFFE_LVIS)
    flat = read_config(cfg)
    text = "\n".join(f"{k} = {v!r}" for k, v in flat.items())  # what mmcv's pretty_text holds, in Python syntax
    text += "\ngpu_ids = range(0, 8)\n"  # as pretty_text writes it: skipped, not run
    ckpt = tmp_path / "latest.pth"
    state = to_mmdet(d2_weights[LVIS])
    torch.save({"meta": {"config": text}, "state_dict": state, "optimizer": {"state": {}}}, ckpt)
    gt = categories_json(tmp_path / "lvis.json", list(range(1, 1231)))
    out = tmp_path / "run"
    argv = ["import", "--from", "mmdet", str(ckpt), "--out", str(out), f"data.train_json={gt}"]
    argv += [f"data.val_json={gt}", f"data.val_images={FIXTURE / 'images'}", "model.min_size=320", "model.max_size=533"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"model.stride_in_1x1 = True  [model.backbone.style ({ckpt} (meta.config))]" in printed
    assert "a training checkpoint (meta, optimizer beside the weights)" in printed
    assert "config lines not read (they would run code; not the model's): gpu_ids (line " in printed
    assert main(["predict", "--run", str(out), "--no-progress", "--no-eval", "model.detections_per_img=10"]) == 0
    results = json.loads((out / "predictions" / "val" / "orig" / "results.json").read_text())
    assert len(results) == 20 and all(len(r["bbox"]) == 4 for r in results)


# --------------------------------------------------------------------------- the SimCal release (mmdetection v1)
#: the release's v1 config (configs/mask_rcnn_r50_fpn_1x_lvis.py), the lines read, written out for the test
RELEASE_CONFIG = """
model = dict(
    type='MaskRCNN', pretrained='modelzoo://resnet50',
    backbone=dict(type='ResNet', depth=50, num_stages=4, out_indices=(0, 1, 2, 3), frozen_stages=1, style='pytorch'),
    neck=dict(type='FPN', in_channels=[256, 512, 1024, 2048], out_channels=256, num_outs=5),
    rpn_head=dict(type='RPNHead', in_channels=256, feat_channels=256, anchor_scales=[8], anchor_ratios=[0.5, 1.0, 2.0],
                  anchor_strides=[4, 8, 16, 32, 64], target_means=[.0, .0, .0, .0], target_stds=[1.0, 1.0, 1.0, 1.0]),
    bbox_roi_extractor=dict(type='SingleRoIExtractor', roi_layer=dict(type='RoIAlign', out_size=7, sample_num=2),
                            out_channels=256, featmap_strides=[4, 8, 16, 32]),
    bbox_head=dict(type='SharedFCBBoxHead', num_fcs=2, in_channels=256, fc_out_channels=1024, roi_feat_size=7,
                   num_classes=1231, target_means=[0., 0., 0., 0.], target_stds=[0.1, 0.1, 0.2, 0.2],
                   reg_class_agnostic=False),
    mask_roi_extractor=dict(type='SingleRoIExtractor', roi_layer=dict(type='RoIAlign', out_size=14, sample_num=2),
                            out_channels=256, featmap_strides=[4, 8, 16, 32]),
    mask_head=dict(type='FCNMaskHead', num_convs=4, in_channels=256, conv_out_channels=256, num_classes=1231))
train_cfg = dict(rpn_proposal=dict(nms_across_levels=False, nms_pre=2000, nms_post=2000, max_num=2000, nms_thr=0.7,
                                   min_bbox_size=0),
                 rcnn=dict(sampler=dict(type='RandomSampler', num=512, pos_fraction=0.25)))
test_cfg = dict(
    rpn=dict(nms_across_levels=False, nms_pre=1000, nms_post=1000, max_num=1000, nms_thr=0.7, min_bbox_size=0),
    rcnn=dict(score_thr=0.00, nms=dict(type='nms', iou_thr=0.5), max_per_img=300, mask_thr_binary=0.5))
img_norm_cfg = dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True)
data = dict(test=dict(type='LvisDataset', img_scale=(1333, 800), img_norm_cfg=img_norm_cfg, size_divisor=32))
work_dir = './work_dirs/mask_rcnn_r50_fpn_1x_protonet'
"""


def to_v1(d2: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """detectron2's fixture weights as an mmdetection v1 checkpoint holds them: mmdetection's names
    without ``roi_head.``, background first in the classifier, box deltas and mask channels for
    C + 1 classes (the background's zeros)."""
    out = {}
    for key, value in to_mmdet(d2).items():
        key = key.removeprefix("roi_head.")
        if key.startswith("bbox_head.fc_cls."):
            value = torch.cat([value[-1:], value[:-1]])  # background last -> first
        elif key.startswith("bbox_head.fc_reg."):
            value = torch.cat([torch.zeros_like(value[:4]), value])
        elif key.startswith("mask_head.conv_logits."):
            value = torch.cat([torch.zeros_like(value[:1]), value])
        out[key] = value
    return out


@pytest.mark.slow
def test_the_simcal_release_imports_with_the_legacy_conventions_and_predicts(d2_weights, tmp_path, capsys):
    cfg = tmp_path / "mask_rcnn_r50_fpn_1x_lvis.py"
    cfg.write_text(RELEASE_CONFIG)
    ckpt = tmp_path / "epoch_12.pth"
    meta = {"mmdet_version": "1.0rc0+d3ca926", "CLASSES": [f"c{i}" for i in range(1230)]}
    torch.save({"meta": meta, "state_dict": to_v1(d2_weights[LVIS]), "optimizer": {"state": {}}}, ckpt)
    gt = categories_json(tmp_path / "lvis.json", list(range(1, 1231)))
    import pickle

    d2_pkl = tmp_path / "d2.pkl"
    d2_pkl.write_bytes(pickle.dumps({"model": d2_weights[LVIS]}))
    ours = _state(_import(tmp_path, "simcal-v1", ckpt, gt, str(cfg), out="v1"))
    theirs = _state(_import(tmp_path, "detectron2", d2_pkl, gt, out="d2"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    m = __import__("yaml").safe_load((tmp_path / "v1" / "config.yaml").read_text())["model"]
    expected = dict(
        box_plus_one=True, anchors="mmdet_v1", proposals="mmdet_v1", roi_align="mmdet_v1", resize="mmdet_v1",
        pixel_format="rgb", stride_in_1x1=False, score_thresh=0.0, detections_per_img=300, nms_thresh=0.5,
        rpn_post_nms_top_n_train=2000, min_size=800, max_size=1333, class_agnostic=False,
    )  # fmt: skip
    assert {k: m[k] for k in expected} == expected
    # the whole legacy pipeline from the CLI (smaller images, fewer detections)
    out = tmp_path / "run"
    argv = ["import", "--from", "simcal-v1", str(ckpt), "--out", str(out), "--framework-config", str(cfg)]
    argv += [f"data.val_json={gt}", f"data.val_images={FIXTURE / 'images'}", f"data.train_json={gt}"]
    assert main([*argv, "model.min_size=320", "model.max_size=533"]) == 0
    assert "training checkpoint" in capsys.readouterr().out
    assert main(["predict", "--run", str(out), "--no-progress", "model.detections_per_img=10"]) == 0
    results = json.loads((out / "predictions" / "val" / "orig" / "results.json").read_text())
    assert len(results) == 20 and all(r["segmentation"]["counts"] for r in results)
    for r in results:  # boxes inside the image's last pixel (clipped to size - 1, mapped back by one factor)
        x, y, w, h = r["bbox"]
        size = {1: (480, 640), 2: (427, 555)}[r["image_id"]]
        assert x >= 0 and y >= 0 and x + w <= size[1] - 1 + 1e-3 and y + h <= size[0] - 1 + 1e-3


def test_an_mmdet2_checkpoint_given_as_the_release_is_named(d2_weights, tmp_path, capsys):
    ckpt = tmp_path / "v2.pth"
    torch.save({"state_dict": to_mmdet(d2_weights[LVIS])}, ckpt)
    gt = categories_json(tmp_path / "lvis.json", list(range(1, 1231)))
    assert (
        main(["import", "--from", "simcal-v1", str(ckpt), "--out", str(tmp_path / "r"), f"data.train_json={gt}"]) == 2
    )
    err = capsys.readouterr().err
    assert "an mmdetection 2+ checkpoint: use --from mmdet" in err and err.count("\n") == 1
