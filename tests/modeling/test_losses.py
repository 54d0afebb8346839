"""Classification losses against arithmetic done by hand (math.log / math.exp, not torch)."""

from __future__ import annotations

import math
import pickle

import pytest
import torch

from simcal import choices
from simcal.modeling.losses import (
    ClassificationLoss,
    build_classification_loss,
    class_margin_cross_entropy,
    cm_margins,
    cross_entropy,
    focal_loss,
    lr_class_weights,
    reweighted_cross_entropy,
)

torch.set_num_threads(1)
#: the paper's losses, on softmax logits (C+1 columns); the others: tests/modeling/test_longtail_losses.py
SOFTMAX_LOSSES = sorted(n for n, spec in choices.LOSSES.items() if spec.classifier == "softmax")

# 3 RoIs, C = 3 foreground classes (+ background column 0)
ROWS = [
    [2.0, 0.5, -1.0, 0.0],  # background RoI
    [0.1, 1.5, 0.3, -0.7],  # label 1
    [-0.2, 0.4, 0.0, 2.5],  # label 3
]
LABELS = [0, 1, 3]


def logits(requires_grad: bool = False) -> torch.Tensor:
    return torch.tensor(ROWS, dtype=torch.float64, requires_grad=requires_grad)


def labels() -> torch.Tensor:
    return torch.tensor(LABELS, dtype=torch.int64)


def log_p(row: list[float], y: int) -> float:
    """log softmax(row)[y] by hand."""
    return row[y] - math.log(sum(math.exp(v) for v in row))


def ce_rows(rows=ROWS, ys=LABELS) -> list[float]:
    return [-log_p(r, y) for r, y in zip(rows, ys, strict=True)]


def test_cross_entropy_by_hand():
    expected = sum(ce_rows()) / 3
    assert cross_entropy(logits(), labels()).item() == pytest.approx(expected, rel=1e-6)
    # one row worked out fully: [0.1, 1.5, 0.3, -0.7], y = 1
    lse = math.log(math.exp(0.1) + math.exp(1.5) + math.exp(0.3) + math.exp(-0.7))
    assert ce_rows()[1] == pytest.approx(lse - 1.5)


def test_lr_weights_from_counts_by_hand():
    # N = 100: 100/1 = 100 -> 10; 100/50 = 2; 100/1000 = 0.1; N_j = 0 -> hi = 10; background 1
    w = lr_class_weights([1, 50, 1000, 0])
    assert w.dtype == torch.float32
    assert w.tolist() == pytest.approx([1.0, 10.0, 2.0, 0.1, 10.0])
    # 100/3 = 33.3 -> 10; 100/200 = 0.5; 100/5000 = 0.02 -> 0.1
    assert lr_class_weights([3, 200, 5000]).tolist() == pytest.approx([1.0, 10.0, 0.5, 0.1])
    # overridden numerator and clamp range
    w = lr_class_weights([10, 40], n=20, lo=0.6, hi=1.5)
    assert w.tolist() == pytest.approx([1.0, 1.5, 0.6])


def test_reweighted_cross_entropy_is_mean_over_rois_not_over_weights():
    w = lr_class_weights([50, 1000, 1])  # [1, 2, 0.1, 10]
    ce = ce_rows()
    expected = (1.0 * ce[0] + 2.0 * ce[1] + 10.0 * ce[2]) / 3  # labels 0, 1, 3
    got = reweighted_cross_entropy(logits(), labels(), w)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # not torch's weighted mean (divided by the sum of the weights, 13)
    assert got.item() != pytest.approx(expected * 3 / 13, rel=1e-3)


def test_focal_by_hand():
    gamma, alpha = 3.0, 0.5
    expected = 0.0
    for r, y in zip(ROWS, LABELS, strict=True):
        p = math.exp(log_p(r, y))
        expected += -alpha * (1 - p) ** gamma * math.log(p)
    expected /= 3
    assert focal_loss(logits(), labels()).item() == pytest.approx(expected, rel=1e-6)
    g2 = 0.0
    for r, y in zip(ROWS, LABELS, strict=True):
        g2 += -0.25 * (1 - math.exp(log_p(r, y))) ** 2 * log_p(r, y)
    g2 /= 3
    got = focal_loss(logits(), labels(), gamma=2.0, alpha=0.25)
    assert got.item() == pytest.approx(g2, rel=1e-6)


def test_focal_gamma0_alpha1_is_ce():
    x, y = logits(), labels()
    got = focal_loss(x, y, gamma=0.0, alpha=1.0)
    assert got.item() == pytest.approx(cross_entropy(x, y).item(), rel=1e-6)


def test_focal_stable_for_huge_logits():
    x = torch.tensor([[1000.0, -1000.0, 0.0], [0.0, 0.0, 1e4]], requires_grad=True)
    loss = focal_loss(x, torch.tensor([1, 2]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    # RoI 0: log p = -2000, (1 - p)^3 = 1 -> 0.5 * 2000; RoI 1: p = 1 -> 0
    assert loss.item() == pytest.approx(0.5 * 2000 / 2, rel=1e-5)


def test_cm_margins_by_hand():
    # Delta_j = 6 / N_j^(1/4): 16^(1/4) = 2 -> 3; 81^(1/4) = 3 -> 2; 1 -> 6; 0 -> as 1 -> 6
    m = cm_margins([16, 81, 1, 0])
    assert m.tolist() == pytest.approx([0.0, 3.0, 2.0, 6.0, 6.0])
    assert cm_margins([10000], c=5.0).tolist() == pytest.approx([0.0, 0.5])


def test_class_margin_cross_entropy_by_hand():
    margins = cm_margins([16, 81, 1])  # [0, 3, 2, 6]
    expected = 0.0
    for r, y in zip(ROWS, LABELS, strict=True):
        shifted = list(r)
        shifted[y] -= [0.0, 3.0, 2.0, 6.0][y]
        expected += -log_p(shifted, y)
    expected /= 3
    got = class_margin_cross_entropy(logits(), labels(), margins)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # RoI 1 by hand: true logit 1.5 - 3 = -1.5
    r1 = -(-1.5 - math.log(math.exp(0.1) + math.exp(-1.5) + math.exp(0.3) + math.exp(-0.7)))
    assert -log_p([0.1, -1.5, 0.3, -0.7], 1) == pytest.approx(r1)


def test_zero_margin_is_ce():
    x, y = logits(), labels()
    got = class_margin_cross_entropy(x, y, torch.zeros(4))
    assert got.item() == pytest.approx(cross_entropy(x, y).item(), rel=1e-7)


@pytest.mark.parametrize("name", SOFTMAX_LOSSES)
def test_gradients_flow(name):
    loss_fn = build_classification_loss(name, [16, 81, 1])
    x = logits(requires_grad=True)
    loss = loss_fn(x, labels())
    assert loss.dim() == 0
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # softmax-based losses: each row's gradient sums to zero
    assert x.grad.sum(1).abs().max().item() < 1e-9


def test_ce_gradient_by_hand():
    x = logits(requires_grad=True)
    cross_entropy(x, labels()).backward()
    r, y = ROWS[1], LABELS[1]
    z = sum(math.exp(v) for v in r)
    expected = [(math.exp(v) / z - (j == y)) / 3 for j, v in enumerate(r)]
    assert x.grad[1].tolist() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("name", SOFTMAX_LOSSES)
def test_empty_input_is_connected_zero(name):
    loss_fn = build_classification_loss(name, [16, 81, 1])
    x = torch.zeros(0, 4, requires_grad=True)
    loss = loss_fn(x, torch.zeros(0, dtype=torch.int64))
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert x.grad is not None and x.grad.shape == (0, 4)


def test_build_names_kwargs_and_defaults():
    counts = [1, 50, 1000, 0]
    x = torch.randn(5, 5, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 3, 4])
    ce = cross_entropy(x, y).item()
    assert build_classification_loss("ce", counts)(x, y).item() == pytest.approx(ce)
    lr = build_classification_loss("lr", counts)
    assert lr.class_weights.tolist() == pytest.approx([1, 10, 2, 0.1, 10])
    lr1000 = build_classification_loss("lr", counts, n=1000)
    assert lr1000.class_weights.tolist() == pytest.approx([1, 10, 10, 1, 10])
    fl = build_classification_loss("focal", counts)
    assert (fl.gamma, fl.alpha) == (3.0, 0.5)
    fl0 = build_classification_loss("focal", counts, gamma=0.0, alpha=1.0)
    assert fl0(x, y).item() == pytest.approx(ce, rel=1e-6)
    cm = build_classification_loss("cm", [16, 81], c=12.0)
    assert cm.margins.tolist() == pytest.approx([0.0, 6.0, 4.0])
    for name in choices.LOSSES:
        assert isinstance(build_classification_loss(name, counts), ClassificationLoss)


def test_build_errors():
    with pytest.raises(ValueError, match="ce, lr, focal, cm"):
        build_classification_loss("eql", [1, 2])
    with pytest.raises(ValueError, match="gamma"):
        build_classification_loss("lr", [1, 2], gamma=2.0)
    with pytest.raises(ValueError, match="one entry per logit column"):
        build_classification_loss("lr", [1, 2])(torch.zeros(2, 5), torch.tensor([0, 1]))


def test_module_buffers_pickle_and_state_dict():
    loss_fn = build_classification_loss("lr", [1, 50, 1000, 0])
    assert dict(loss_fn.named_buffers()).keys() == {"class_weights"}
    assert loss_fn.state_dict() == {}  # non-persistent: checkpoints do not depend on the loss
    loss_fn = loss_fn.to(torch.float64)  # buffers follow .to()
    assert loss_fn.class_weights.dtype == torch.float64
    clone = pickle.loads(pickle.dumps(build_classification_loss("cm", [16, 81])))
    assert clone.margins.tolist() == pytest.approx([0.0, 3.0, 2.0])
    # stored on a model, the buffer moves with it
    holder = torch.nn.Module()
    holder.cls_loss = build_classification_loss("cm", [16, 81])
    assert "cls_loss.margins" in dict(holder.named_buffers())


def test_float64_kept_and_bfloat16_logits_computed_in_float32():
    assert cross_entropy(logits(), labels()).dtype == torch.float64
    x = logits().to(torch.bfloat16).requires_grad_()
    loss = build_classification_loss("lr", [50, 1000, 1])(x, labels())
    assert loss.dtype == torch.float32
    loss.backward()
    assert x.grad.dtype == torch.bfloat16
