"""The Python API: the documented example runs as written, and the API checks what it is given."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

import simcal
from simcal.errors import InputError
from tests.conftest import check_ap_of_classes

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def _example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    return blocks[0]


@pytest.mark.slow
def test_the_documented_example_runs(tiny_data, tmp_path, monkeypatch, capsys):
    (tmp_path / "data").symlink_to(tiny_data)  # the example's relative paths: data/train.json, data/images
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace: dict = {}
    exec(compile(_example(), str(DOC), "exec"), namespace)  # noqa: S102 - the documentation's own code
    metrics, head, model = namespace["metrics"], namespace["head"], namespace["model"]
    assert set(metrics) == {"orig", "cal", "dual"}
    for by_iou in metrics.values():
        assert set(by_iou) == {"bbox", "segm"}
        check_ap_of_classes({**by_iou["segm"].metrics, "per_class": by_iou["segm"].per_class})
    assert head.kind == "3fc_ft" and head.cls_score.out_features == 7
    # the detector is given back as it was: trainable, in train mode, torchvision's own parts, and
    # its classifier is not the head's
    assert all(p.requires_grad for p in model.parameters()) and all(m.training for m in model.modules())
    assert type(model.roi_heads).__name__ == "RoIHeads" and type(model.roi_heads.box_predictor).__name__ == (
        "FastRCNNPredictor"
    )
    assert type(model.rpn.fg_bg_sampler).__name__ == "BalancedPositiveNegativeSampler"
    assert not torch.equal(head.cls_score.weight, model.roi_heads.box_predictor.cls_score.weight)
    assert (tmp_path / "predictions" / "dual" / "results.json").exists()
    printed = capsys.readouterr().out
    assert "dual: mask AP" in printed and "bbox AP (LVIS rules" in printed


def test_the_api_refuses_what_does_not_fit(tiny_data, tmp_path):
    import torchvision

    model = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=4)
    with pytest.raises(InputError, match="6 categories, but the model has 3 classes"):
        simcal.calibrate(model=model, train=tiny_data / "train.json", images=tiny_data / "images", steps=1)
    with pytest.raises(InputError, match=r"\(command line\): calibration.steps: must be > 0"):
        simcal.calibrate(model=model, train=tiny_data / "train.json", images=tiny_data / "images", steps=0)
    with pytest.raises(InputError, match="pass run= or model=, not both"):
        simcal.predict(tmp_path, model=model)
    with pytest.raises(InputError, match="cannot be overridden here"):
        simcal.predict(model=model, gt=tiny_data / "val.json", images=tiny_data / "images", overrides=["train.seed=1"])
    with pytest.raises(AttributeError):
        simcal.fit  # noqa: B018 - only the four API functions are exposed


def test_evaluate_takes_objects_as_well_as_files(tiny_data):
    from simcal.data.annotations import load_dataset

    gt = load_dataset(tiny_data / "val.json")
    ann = gt["annotations"][0]
    dets = [{"image_id": ann["image_id"], "category_id": ann["category_id"], "bbox": ann["bbox"], "score": 0.9}]
    result = simcal.evaluate(gt, dets, iou="bbox", train=os.fspath(tiny_data / "train.json"))
    assert 0 < result.metrics["AP"] <= 1 and result.num_images == len(gt["images"])


def test_a_finished_head_written_by_the_api_is_never_trained_over(tiny_data, tmp_path, capsys):
    """calibrate(model=..., out=...) keeps the run's rule: a finished head is refused without
    resume and with other settings, and returned as it is with the same ones."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.detection.maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=7, min_size=64, max_size=64, rpn_post_nms_top_n_test=50
    )
    common = dict(model=model, train=tiny_data / "train.json", images=tiny_data / "images", progress=False)
    out = tmp_path / "cal"
    head = simcal.calibrate(**common, out=out, steps=2, classes_per_batch=2)
    saved = (out / "head.pth").read_bytes()
    with pytest.raises(InputError, match="already done: pass --resume"):
        simcal.calibrate(**common, out=out, steps=2, classes_per_batch=2)
    with pytest.raises(InputError, match=r"calibration.lr 0.5 \(it has 0.01\).*another --name"):
        simcal.calibrate(**common, out=out, steps=2, classes_per_batch=2, lr=0.5, resume=True)
    again = simcal.calibrate(**common, out=out, steps=2, classes_per_batch=2, resume=True)
    assert "already finished with these settings: nothing to do" in capsys.readouterr().out
    assert (out / "head.pth").read_bytes() == saved
    assert all(torch.equal(a, b) for a, b in zip(head.state_dict().values(), again.state_dict().values()))
