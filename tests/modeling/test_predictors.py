"""The box predictor is the one home of scoring: classifiers with other outputs (a sigmoid one with C
logits, a Seesaw-style one with C + 2) run through train, calibrate and predict by replacing the
activation alone, nothing outside ``simcal/modeling``."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import simcal.modeling.predictors as predictors
from simcal.cli import main
from simcal.engine.checkpoint import load_model
from simcal.modeling.calibration import load_head
from simcal.modeling.predictors import Activation, BoxPredictor
from simcal.run import Run

torch.set_num_threads(1)
CALLS: dict[str, int] = {}


def _count(what: str) -> None:
    CALLS[what] = CALLS.get(what, 0) + 1


class SigmoidCE(nn.Module):
    """Binary cross-entropy over C sigmoid logits; a background RoI's targets are all zeros."""

    activation = "sigmoid-double"

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        _count("loss")
        targets = F.one_hot(labels, logits.shape[1] + 1)[:, 1:].to(logits)
        return F.binary_cross_entropy_with_logits(logits, targets)


class SigmoidDouble(Activation):
    """C logits; background = probability that no class fires, prod(1 - p_c)."""

    name = "sigmoid-double"
    cross_entropy_loss = SigmoidCE
    normalized = False

    def num_logits(self, num_classes: int) -> int:
        return num_classes

    def forward(self, logits: Tensor) -> Tensor:
        _count("scores")
        p = torch.sigmoid(logits)
        return torch.cat([torch.prod(1 - p, dim=1, keepdim=True), p], dim=1)


class ObjectnessCE(nn.Module):
    """Objectness cross-entropy on every RoI plus class cross-entropy on the foreground ones."""

    activation = "objectness-double"

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        _count("loss")
        loss = F.cross_entropy(logits[:, -2:], (labels > 0).long())
        fg = labels > 0
        if fg.any():
            loss = loss + F.cross_entropy(logits[fg, :-2], labels[fg] - 1)
        return loss


class ObjectnessDouble(Activation):
    """C + 2 logits: C class logits, then two objectness logits (background, object), as Seesaw's."""

    name = "objectness-double"
    cross_entropy_loss = ObjectnessCE

    def num_logits(self, num_classes: int) -> int:
        return num_classes + 2

    def forward(self, logits: Tensor) -> Tensor:
        _count("scores")
        obj = F.softmax(logits[:, -2:], dim=1)
        return torch.cat([obj[:, :1], obj[:, 1:] * F.softmax(logits[:, :-2], dim=1)], dim=1)


def test_predictor_scores_and_loss_follow_the_activation():
    cls_score, bbox_pred = nn.Linear(8, 5), nn.Linear(8, 4 * 5)
    soft = BoxPredictor(cls_score, bbox_pred, num_classes=4)
    x = torch.rand(3, 8)
    logits, deltas = soft(x)
    assert logits.shape == (3, 5) and deltas.shape == (3, 20)
    torch.testing.assert_close(soft.scores(logits), torch.softmax(logits, 1))
    assert soft.classification_loss(logits, torch.tensor([0, 1, 4])).item() == pytest.approx(
        F.cross_entropy(logits, torch.tensor([0, 1, 4])).item()
    )
    sig = BoxPredictor(nn.Linear(8, 4), bbox_pred, num_classes=4, activation=SigmoidDouble())
    scores = sig.scores(sig(x)[0])
    assert scores.shape == (3, 5) and ((scores >= 0) & (scores <= 1)).all()
    with pytest.raises(ValueError, match="cls_score has 5 outputs, the sigmoid-double needs 4"):
        BoxPredictor(nn.Linear(8, 5), bbox_pred, num_classes=4, activation=SigmoidDouble())
    from simcal.modeling.losses import FocalLoss

    with pytest.raises(ValueError, match="'focal' loss expects softmax logits, this classifier is sigmoid-double"):
        sig.set_loss(FocalLoss())


@pytest.mark.parametrize("double, logits_of", [(SigmoidDouble, lambda c: c), (ObjectnessDouble, lambda c: c + 2)])
def test_another_classifier_runs_through_train_calibrate_and_predict(
    double, logits_of, tiny_config, tmp_path, monkeypatch
):
    monkeypatch.setattr(predictors, "build_activation", lambda name="softmax": double())
    CALLS.clear()
    run = tmp_path / "run"
    cfg = tiny_config(max_iter=2, checkpoint_period=2)
    assert main(["train", "--config", str(cfg), "--out", str(run), "--no-progress"]) == 0
    assert CALLS.get("loss") == 2 and "scores" not in CALLS  # the classifier's own loss, every iteration

    CALLS.clear()
    assert main(["calibrate", "--run", str(run), "--steps", "3", "--classes-per-batch", "4", "--no-progress"]) == 0
    assert CALLS.get("loss") == 3  # the calibrated head trains with the same classifier's loss

    model, label_map, _ = load_model(run)
    c = label_map.num_classes
    assert isinstance(model.roi_heads.box_predictor.activation, double)
    assert model.roi_heads.box_predictor.cls_score.out_features == logits_of(c)
    head, _ = load_head(Run(run).calibration("3fc_ft").head, model.roi_heads)
    assert isinstance(head.activation, double) and head.cls_score.out_features == logits_of(c)
    assert head.scores(torch.rand(5, head.in_features)).shape == (5, c + 1)

    CALLS.clear()
    heads = "orig,cal,dual,norcal,oracle"
    argv = ["predict", "--run", str(run), "--head", heads, "--max-images", "4", "--batch-size", "2", "--no-progress"]
    assert main(argv) == 0
    assert CALLS.get("scores", 0) >= 4  # original and calibrated scores, two batches
    for tag in ("orig", "cal", "dual", "norcal_1", "oracle"):
        results = json.loads(Run(run).predictions("val-first4").head(tag).results.read_text())
        assert results and {r["category_id"] for r in results} <= set(label_map.category_ids)
        assert all(0 <= r["score"] <= 1 for r in results)
        metrics = json.loads(Run(run).predictions("val-first4").head(tag).metrics("segm").read_text())
        assert metrics["num_images"] == 4
