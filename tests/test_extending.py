"""docs/extending.md's claims, checked: a loss added through the documented files only (a row in
``choices.LOSSES``, a ``ClassificationLoss`` with ``from_stats`` in ``losses.LOSS_CLASSES``; here
registered for the test) is a choice of the config and the command line, trains end to end,
calibrates a decoupled head and predicts."""

from __future__ import annotations

import json

import pytest
import torch
from torch import Tensor

from simcal import choices
from simcal.cli import main
from simcal.data.stats import TrainingStats
from simcal.modeling import losses
from simcal.run import Run

CALLS: dict[str, int] = {}


class ToyLoss(losses.ClassificationLoss):
    """Cross-entropy with each class weighted by 1 / its share of the training instances, scaled."""

    name = "toy"

    def __init__(self, weights: Tensor, scale: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("weights", weights, persistent=False)
        self.scale = scale

    @classmethod
    def from_stats(cls, stats: TrainingStats, scale: float = 1.0) -> ToyLoss:
        counts = torch.tensor([max(n, 1) for n in stats.instance_counts], dtype=torch.float32)
        return cls(torch.cat([torch.ones(1), counts.sum() / counts / stats.num_classes]), scale)

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        CALLS[self.name] = CALLS.get(self.name, 0) + 1
        return self.scale * torch.nn.functional.cross_entropy(logits.float(), labels, weight=self.weights)


@pytest.fixture
def toy_loss(monkeypatch):
    monkeypatch.setitem(choices.LOSSES, "toy", choices.LossSpec({"scale": choices.POSITIVE}))
    monkeypatch.setitem(losses.LOSS_CLASSES, "toy", ToyLoss)
    CALLS.clear()
    yield
    CALLS.clear()


def test_a_loss_added_as_documented_trains_calibrates_and_predicts(toy_loss, tiny_config, tmp_path, capsys):
    run = tmp_path / "run"
    cfg = tiny_config(max_iter=2, steps=[])
    train = ["train", "--config", str(cfg), "--out", str(run), "--no-progress"]
    assert main([*train, "train.loss=toy", "train.loss_kwargs={scale: 2.0}"]) == 0
    trained = CALLS.get("toy", 0)
    assert trained >= 2  # every training iteration (a cascade would call it per stage)
    assert Run(run).load_config().train.loss_kwargs == {"scale": 2.0}
    cal = ["calibrate", "--run", str(run), "--steps", "2", "--classes-per-batch", "4", "--no-progress"]
    assert main([*cal, "--loss", "toy", "--name", "toy"]) == 0
    assert CALLS["toy"] == trained + 2  # one call per calibration step
    predict = ["predict", "--run", str(run), "--head", "orig,cal,dual", "--calibration", "toy", "--max-images", "4"]
    assert main([*predict, "--no-progress"]) == 0
    for tag in ("orig", "cal@toy", "dual@toy"):
        metrics = json.loads(Run(run).predictions("val-first4").head(tag).metrics("bbox").read_text())
        assert metrics["num_images"] == 4
    # and its row's ranges are the config's checks: one line naming the field
    capsys.readouterr()
    assert main([*train[:-1], "--out", str(tmp_path / "bad"), "train.loss=toy", "train.loss_kwargs={scale: -1}"]) == 2
    assert "train.loss_kwargs.scale: must be > 0, got -1" in capsys.readouterr().err
