"""Seesaw, EQLv2, the federated loss and BAGS (METHOD.md, "Long-tail methods beyond the paper"):
values worked out by hand on two to five classes, their classifiers' scores, gradient checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import yaml

from simcal import choices
from simcal.modeling.losses import (
    EQLv2,
    FederatedLoss,
    GroupSoftmaxLoss,
    SeesawLoss,
    build_classification_loss,
    eqlv2_weights,
    federated_classes,
    group_of_counts,
    group_softmax_layout,
    group_softmax_loss,
    seesaw_factors,
    seesaw_loss,
    sigmoid_cross_entropy,
)
from simcal.modeling.predictors import GroupSoftmax, NormedLinear, Objectness, Sigmoid, build_activation

LN2, LN4 = math.log(2), math.log(4)
#: the losses that train a classifier of their own (their LOSSES rows): every such loss is run below
OWN_CLASSIFIER = [name for name, spec in choices.LOSSES.items() if spec.classifier != "softmax"]


# ------------------------------------------------------------------ Seesaw
def test_seesaw_mitigation_and_compensation_by_hand():
    """N = (100, 10, 1); a RoI of class 0 with logits (0, ln 2, ln 4), softmax (1, 2, 4) / 7.
    Mitigation: (N_j / N_0)^0.8 = 0.1^0.8, 0.01^0.8 for the rarer classes. Compensation:
    (sigma_j / sigma_0)^2 = 2^2, 4^2. A RoI of the rarest class 2 is never mitigated, and its
    compensation is 1 (the other classes score lower)."""
    cum = torch.tensor([100.0, 10.0, 1.0])
    z = torch.tensor([[0.0, LN2, LN4], [0.0, LN2, LN4]], dtype=torch.float64)
    s = seesaw_factors(z, torch.tensor([0, 2]), cum, p=0.8, q=2.0)
    want0 = [1.0, 0.1**0.8 * 4, 0.01**0.8 * 16]
    torch.testing.assert_close(s[0], torch.tensor(want0, dtype=torch.float64))
    torch.testing.assert_close(s[1], torch.ones(3, dtype=torch.float64))
    # mitigation alone (q = 0) and compensation alone (p = 0)
    assert seesaw_factors(z, torch.tensor([0, 2]), cum, p=0.8, q=0.0)[0, 1].item() == pytest.approx(0.1**0.8)
    assert seesaw_factors(z, torch.tensor([0, 2]), cum, p=0.0, q=2.0)[0, 2].item() == pytest.approx(16.0)
    # class 1 (N = 10): class 0 is more frequent (no mitigation) but scores lower (no compensation);
    # class 2 is rarer: 0.1^0.8, and scores higher: (4 / 2)^2
    s1 = seesaw_factors(z[:1], torch.tensor([1]), cum)[0]
    torch.testing.assert_close(s1, torch.tensor([1.0, 1.0, 0.1**0.8 * 4], dtype=torch.float64))


def test_seesaw_loss_by_hand_and_the_objectness_part():
    """Class-0 RoI: -log(e^0 / (e^0 + 2 S_01 + 4 S_02)); plus objectness CE towards "object";
    a background RoI adds only its objectness CE towards "background"; divided by R = 2."""
    cum = torch.tensor([100.0, 10.0, 1.0])
    logits = torch.tensor([[0.0, LN2, LN4, 1.0, -1.0], [0.3, 0.2, 0.1, 0.5, 2.0]], dtype=torch.float64)
    labels = torch.tensor([1, 0])  # label 1 is class 0
    s01, s02 = 0.1**0.8 * 4, 0.01**0.8 * 16
    cls = math.log(1 + 2 * s01 + 4 * s02)
    obj_fg = -math.log(math.exp(1.0) / (math.exp(1.0) + math.exp(-1.0)))
    obj_bg = -math.log(math.exp(2.0) / (math.exp(0.5) + math.exp(2.0)))
    got = seesaw_loss(logits, labels, cum, p=0.8, q=2.0)
    assert got.item() == pytest.approx((cls + obj_fg + obj_bg) / 2, rel=1e-12)
    # p = q = 0: the plain cross-entropy of this classifier
    plain = -math.log(1 / 7)
    assert seesaw_loss(logits, labels, cum, p=0, q=0).item() == pytest.approx((plain + obj_fg + obj_bg) / 2)


def test_seesaw_counts_accumulate_per_call_and_are_saved():
    loss = SeesawLoss(3).train()
    logits = torch.zeros(4, 5)
    loss(logits, torch.tensor([1, 1, 2, 0]))
    loss(logits, torch.tensor([3, 0, 0, 0]))
    assert loss.cum_counts.tolist() == [2.0, 1.0, 1.0]
    assert "cum_counts" in loss.state_dict()
    fresh = SeesawLoss(3)
    fresh.load_state_dict(loss.state_dict())
    assert fresh.cum_counts.tolist() == [2.0, 1.0, 1.0]
    loss.eval()(logits, torch.tensor([1, 1, 1, 1]))  # evaluation counts nothing
    assert loss.cum_counts.tolist() == [2.0, 1.0, 1.0]


def test_seesaw_loss_gradients():
    """The factors are constants of the detached scores (mmdetection detaches them): the gradient is
    the cross-entropy's with the shifted logits, softmax(z + log S) - onehot, over R; the objectness
    part's softmax(o) - onehot, over R."""
    torch.manual_seed(0)
    cum = torch.tensor([50.0, 5.0, 1.0, 20.0])
    logits = torch.randn(6, 6, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3, 4, 1])
    seesaw_loss(logits, labels, cum).backward()
    z, r = logits.detach(), 6
    want = torch.zeros_like(z)
    obj_target = F.one_hot((labels == 0).long(), 2).double()
    want[:, 4:] = (F.softmax(z[:, 4:], 1) - obj_target) / r
    fg = labels > 0
    y = labels[fg] - 1
    onehot = F.one_hot(y, 4).double()
    shifted = z[fg, :4] + seesaw_factors(z[fg, :4], y, cum).log() * (1 - onehot)
    want[fg, :4] = (F.softmax(shifted, 1) - onehot) / r
    torch.testing.assert_close(logits.grad, want)
    # and it is a gradient: the finite differences of the loss with the factors held fixed agree
    factors = seesaw_factors(z[fg, :4], y, cum)

    def fixed(x):
        obj = F.cross_entropy(x[:, 4:], (labels == 0).long(), reduction="sum")
        cls = F.cross_entropy(x[fg, :4] + factors.log() * (1 - onehot), y, reduction="sum")
        return (obj + cls) / r

    assert torch.autograd.gradcheck(fixed, (z.clone().requires_grad_(),))


def test_objectness_scores():
    """Score of class j = P(object) x softmax over the classes; background = P(background)."""
    z = torch.tensor([[0.0, LN2, LN4, 1.0, -1.0]])
    p_obj = math.exp(1) / (math.exp(1) + math.exp(-1))
    want = torch.tensor([[1 - p_obj, p_obj / 7, 2 * p_obj / 7, 4 * p_obj / 7]])
    torch.testing.assert_close(Objectness()(z), want)
    torch.testing.assert_close(Objectness().log_scores(z), want.log())


# ------------------------------------------------------------------ EQLv2
def test_eqlv2_weights_after_a_known_gradient_history():
    """pos = (2, 1), neg = (2.5, 10): g = (0.8, 0.1); f(g) = 1 / (1 + exp(-12 (g - 0.8))) =
    (0.5, 1 / (1 + e^8.4)); positive weight 1 + 4 (1 - f)."""
    pos_w, neg_w = eqlv2_weights(torch.tensor([2.0, 1.0]), torch.tensor([2.5, 10.0]))
    f1 = 1 / (1 + math.exp(8.4))
    torch.testing.assert_close(neg_w, torch.tensor([0.5, f1]))
    torch.testing.assert_close(pos_w, torch.tensor([3.0, 1 + 4 * (1 - f1)]))


def test_eqlv2_accumulates_weighted_gradient_magnitudes_then_weighs_with_them():
    """Two classes, zero logits (p = 0.5 everywhere). Call 1 weighs with no history: g = 0, negative
    weight f0 = 1 / (1 + e^9.6), positive 1 + 4 (1 - f0); each element's gradient magnitude is 0.5.
    RoIs: class 1, class 1, background: pos_grad = (2 x 0.5 x w+, 0), neg_grad = (0.5 f0, 3 x 0.5 f0)."""
    loss = EQLv2(2).train()
    z = torch.zeros(3, 2)
    labels = torch.tensor([1, 1, 0])
    f0 = 1 / (1 + math.exp(9.6))
    wp = 1 + 4 * (1 - f0)
    first = loss(z, labels)
    bce = math.log(2)
    assert first.item() == pytest.approx((2 * wp * bce + 4 * f0 * bce) / 3, rel=1e-6)
    torch.testing.assert_close(loss.pos_grad, torch.tensor([2 * 0.5 * wp, 0.0], dtype=torch.float64))
    torch.testing.assert_close(loss.neg_grad, torch.tensor([0.5 * f0, 1.5 * f0], dtype=torch.float64))
    # call 2 weighs with that history: class 0's g is huge (its negatives were tiny), so its negative
    # weight is ~1; class 1 never had a positive (g = 0): its negatives stay ~f0
    pos_w, neg_w = eqlv2_weights(loss.pos_grad, loss.neg_grad)
    assert neg_w[0] > 0.999 and neg_w[1].item() == pytest.approx(f0)
    second = loss(z, labels)
    want = (2 * pos_w[0] * bce + neg_w[0] * bce + 3 * neg_w[1] * bce) / 3
    assert second.item() == pytest.approx(want.item(), rel=1e-6)


def test_sigmoid_classifier_scores_and_cross_entropy():
    z = torch.tensor([[0.0, math.log(3)]])  # p = (0.5, 0.75)
    torch.testing.assert_close(Sigmoid()(z), torch.tensor([[0.5 * 0.25, 0.5, 0.75]]))
    # a class-2 RoI: -log 0.5 - log 0.75 (targets 0, 1); a background RoI: -log 0.5 - log 0.25
    got = sigmoid_cross_entropy(z.repeat(2, 1), torch.tensor([2, 0]))
    assert got.item() == pytest.approx((-math.log(0.5) - math.log(0.75) - math.log(0.5) - math.log(0.25)) / 2)


# ------------------------------------------------------------------ federated loss
def test_the_federated_subset_holds_the_batch_classes_and_has_size_50_or_c():
    weights = torch.arange(1, 101, dtype=torch.float64).sqrt()
    labels = torch.tensor([0, 3, 3, 77, 0])  # classes 2 and 76 (0-based) in the batch
    a = federated_classes(labels, weights, 50, torch.Generator().manual_seed(1))
    b = federated_classes(labels, weights, 50, torch.Generator().manual_seed(1))
    c = federated_classes(labels, weights, 50, torch.Generator().manual_seed(2))
    assert a.numel() == 50 and len(set(a.tolist())) == 50 and {2, 76} <= set(a.tolist())
    assert torch.equal(a, b) and not torch.equal(a, c)
    # fewer classes than 50: all of them; a class weighing 0 is drawn only if nothing else is left
    small = federated_classes(labels[:3], torch.ones(30), 50, torch.Generator().manual_seed(0))
    assert small.tolist() == list(range(30))
    zero = torch.ones(60)
    zero[10] = 0
    assert 10 not in federated_classes(labels[:3], zero, 50, torch.Generator().manual_seed(0)).tolist()


def test_the_federated_loss_counts_only_the_subset():
    """Three classes, subset size 2, batch class 0: the loss is the sigmoid CE on columns {0, j}
    only, j drawn with weights image_count^0.5 (class 2 has no image: never drawn)."""
    loss = FederatedLoss([4, 9, 0], num_classes=2).train()
    z = torch.tensor([[0.0, math.log(3), 5.0]])
    got = loss(z, torch.tensor([1]))
    want = -math.log(0.5) - math.log(0.25)  # class 0 target 1 (p 0.5), class 1 target 0 (p 0.75)
    assert got.item() == pytest.approx(want)
    assert int(loss.draws) == 1
    # the draw is seeded by the call counter (saved in checkpoints): a loss restored from another's
    # state draws what that one draws next, whatever happened in between
    a, b = (FederatedLoss([1] * 40, num_classes=5).train() for _ in range(2))
    z40 = torch.randn(3, 40, generator=torch.Generator().manual_seed(0))
    a(z40, torch.tensor([1, 0, 0]))
    b.load_state_dict(a.state_dict())
    assert int(b.draws) == 1
    assert torch.equal(a(z40, torch.tensor([1, 0, 0])), b(z40, torch.tensor([1, 0, 0])))
    values = {round(a(z40, torch.tensor([1, 0, 0])).item(), 6) for _ in range(6)}
    assert len(values) > 1  # other counters, other subsets


# ------------------------------------------------------------------ BAGS
def test_bags_groups_layout_and_labels():
    """Counts (5, 50, 500, 5000, 0): groups (0, 1, 2, 3, 0); columns [others, c1, c5 | others, c2 |
    others, c3 | others, c4 | others, bg]: K = 5 + 4 + 2 = 11."""
    groups = group_of_counts([5, 50, 500, 5000, 0])
    assert groups == [0, 1, 2, 3, 0]
    members, column = group_softmax_layout(groups, 4)
    assert members == [[1, 5], [2], [3], [4]]
    assert column.tolist() == [10, 1, 4, 6, 8, 2]
    assert build_activation("group_softmax", [5, 50, 500, 5000, 0]).num_logits(5) == 11


def test_bags_loss_by_hand_with_others_sampling():
    """Group 1 (class 2 alone) sees one in-group RoI and 20 others: all in-group RoIs and 8 x 1
    others count, its loss the mean over those 9. Logits (0, a) in group 1 for every RoI: an
    in-group RoI costs log(1 + e^-a), an "others" RoI log(1 + e^a). Groups without an in-group RoI
    add nothing; the background group counts every RoI."""
    groups = [0, 1, 2, 3, 0]
    a = 1.5
    labels = torch.tensor([2] + [0] * 20)
    logits = torch.zeros(21, 11, dtype=torch.float64)
    logits[:, 4] = a  # group 1 = columns 3 (others), 4 (class 2)
    got = group_softmax_loss(logits, labels, groups, 4, beta=8.0, generator=torch.Generator().manual_seed(0))
    group1 = (math.log(1 + math.exp(-a)) + 8 * math.log(1 + math.exp(a))) / 9
    bg_group = math.log(2)  # zero logits: every RoI costs log 2
    assert got.item() == pytest.approx(group1 + bg_group)
    # with fewer others than 8 per in-group RoI, all count
    few = group_softmax_loss(logits[:4], labels[:4], groups, 4, beta=8.0)
    assert few.item() == pytest.approx((math.log(1 + math.exp(-a)) + 3 * math.log(1 + math.exp(a))) / 4 + bg_group)
    # the draws are seeded by the module's counter (saved in checkpoints)
    loss = GroupSoftmaxLoss(groups).train()
    loss(logits, labels)
    assert int(loss.draws) == 1 and "draws" in loss.state_dict()


def test_bags_score_merge():
    """P(class) = its group's softmax x P(object) of the background group; background from that group."""
    act = GroupSoftmax([0, 1, 0])  # group 0: classes 1, 3; group 1: class 2; groups 2, 3 empty
    z = torch.zeros(1, 3 + 4 + 2)
    z[0, 1] = LN2  # group 0 = [others, c1, c3] -> softmax (1, 2, 1) / 4
    z[0, -2] = math.log(3)  # background group [others (object), bg] -> (3/4, 1/4)
    scores = act(z)[0]
    torch.testing.assert_close(scores, torch.tensor([0.25, 2 / 4 * 0.75, 1 / 2 * 0.75, 1 / 4 * 0.75]))


# ------------------------------------------------------------------ classifiers and the builder
def test_normed_linear_is_a_scaled_cosine():
    layer = NormedLinear(3, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]))
        layer.bias.zero_()
    x = torch.tensor([[3.0, 4.0, 0.0]])
    torch.testing.assert_close(layer(x), torch.tensor([[20 * 0.6, 20 * 0.8]]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(10 * x), layer(x))  # the features' scale does not matter
    assert NormedLinear(3, 2).weight.std() < 0.05  # mmdetection's N(0, 0.01) init


def test_prior_prob_starts_a_sigmoid_classifier_at_p():
    from torch import nn

    from simcal.modeling.predictors import BoxPredictor

    def predictor() -> BoxPredictor:
        torch.manual_seed(0)
        return BoxPredictor(nn.Linear(8, 5), nn.Linear(8, 20), num_classes=4)

    p = predictor()
    p.set_classifier(Sigmoid(), prior_prob=0.01)
    torch.testing.assert_close(p.cls_score.bias, torch.full((4,), -math.log(99)))
    logits, _ = p(torch.zeros(1, 8))  # no evidence: every class at 0.01, the background at 0.99 ** 4
    torch.testing.assert_close(p.activation(logits), torch.tensor([[0.99**4] + [0.01] * 4]))
    default = predictor()
    default.set_classifier(Sigmoid())  # the layer's own init: a small bias of both signs
    assert default.cls_score.bias.abs().max() < 1 and (default.cls_score.bias > 0).any()
    assert (default.cls_score.bias < 0).any()
    with pytest.raises(ValueError, match="sigmoid"):
        predictor().set_classifier(build_activation("seesaw", [5, 50, 500, 5000]), prior_prob=0.01)


@pytest.mark.parametrize(
    "overrides, p",
    [
        (["train.loss=fed"], 0.01),  # its reference code's PRIOR_PROB
        (["train.loss=fed", "model.cls_prior_prob=0"], 0.0),
        (["train.loss=eqlv2"], 0.0),  # mmdetection's init
        (["train.loss=eqlv2", "model.cls_prior_prob=0.05"], 0.05),
        (["model.classifier=sigmoid"], 0.0),
        ([], 0.0),
    ],
)
def test_the_detector_a_run_trains_starts_at_its_prior_prob(overrides, p):
    from simcal.config import Config, ModelConfig, apply_overrides, prior_prob_of
    from simcal.modeling.detector import build_detector

    cfg = apply_overrides(Config(), overrides, "test")
    assert prior_prob_of(cfg) == p
    if not p:
        return
    small = ModelConfig(arch="small", norm="gn", min_size=64, max_size=64)
    model = build_detector(small, 4, classifier="sigmoid", prior_prob=prior_prob_of(cfg))
    bias = model.roi_heads.box_predictor.cls_score.bias
    torch.testing.assert_close(bias, torch.full((4,), -math.log((1 - p) / p)))


def test_each_loss_needs_its_classifier():
    counts = [5, 50, 500]
    with pytest.raises(ValueError, match="trains a seesaw classifier"):
        build_classification_loss("seesaw", counts, activation=build_activation("softmax"))
    with pytest.raises(ValueError, match="trains a softmax classifier"):
        build_classification_loss("focal", counts, activation=build_activation("sigmoid"))
    assert isinstance(build_classification_loss("eqlv2", counts, activation=Sigmoid()), EQLv2)
    bags = build_classification_loss("bags", counts, activation=build_activation("group_softmax", counts))
    assert isinstance(bags, GroupSoftmaxLoss) and bags.groups == [0, 1, 2]
    # "ce" is each classifier's own cross-entropy
    for name in ("sigmoid", "seesaw"):
        act = build_activation(name)
        ce = build_classification_loss("ce", counts, activation=act)
        assert ce.activation == name
    gs = build_activation("group_softmax", counts)
    assert isinstance(build_classification_loss("ce", counts, activation=gs), GroupSoftmaxLoss)


@pytest.mark.parametrize("name", ["sigmoid", "seesaw", "group_softmax"])
def test_every_classifier_scores_in_0_1_with_a_background_column(name):
    act = build_activation(name, [3, 30, 300, 3000])
    z = torch.randn(7, act.num_logits(4))
    s = act(z)
    assert s.shape == (7, 5) and (s >= 0).all() and (s <= 1).all()
    torch.testing.assert_close(act.log_scores(z), s.log(), rtol=1e-5, atol=1e-6)
    if name == "seesaw":
        torch.testing.assert_close(s.sum(1), torch.ones(7))


@pytest.mark.parametrize("name", OWN_CLASSIFIER)
def test_gradients_flow_and_no_roi_is_a_connected_zero(name):
    from simcal import choices

    counts = [16, 81, 1]
    act = build_activation(choices.LOSSES[name].classifier, counts)
    loss_fn = build_classification_loss(name, counts, activation=act).train()
    k = act.num_logits(3)
    x = torch.randn(5, k, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    loss = loss_fn(x, torch.tensor([0, 1, 3, 2, 0]))
    loss.backward()
    assert loss.dim() == 0 and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    empty = torch.zeros(0, k, requires_grad=True)
    zero = loss_fn(empty, torch.zeros(0, dtype=torch.int64))
    assert zero.item() == 0.0 and zero.grad_fn is not None
    zero.backward()


@pytest.mark.parametrize("loss", OWN_CLASSIFIER)
def test_each_loss_trains_end_to_end_and_resumes_exactly(loss, tiny_config, tmp_path):
    """`train.loss=...`: the classifier follows the loss (model.classifier auto), and the loss's state
    (Seesaw's counts, EQLv2's statistics, the draw counters) is in the checkpoints, so a run stopped
    at iteration 1 and resumed ends bit-identical. (Predict on such runs, and SimCal on a Seesaw
    one: below; every method end to end and predicted: tests/test_demo.py, the leaderboard.)"""
    import shutil

    from simcal.cli import main
    from simcal.data.label_map import LabelMap
    from simcal.io import load_checkpoint
    from simcal.run import Run

    cfg = tiny_config(max_iter=3, checkpoint_period=1, steps=[])
    train_json = tmp_path / "train.json"  # a copy, deleted below: predict must not need it
    shutil.copy(yaml.safe_load(cfg.read_text())["data"]["train_json"], train_json)
    over = [f"train.loss={loss}", f"data.train_json={train_json}"]
    over += ["model.cls_head=normed"] if loss == "seesaw" else []
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["train", "--config", str(cfg), "--out", str(a), "--no-progress", *over]) == 0
    assert main(["train", "--config", str(cfg), "--out", str(b), "--no-progress", *over, "train.max_iter=1"]) == 0
    assert main(["train", "--out", str(b), "--resume", "--no-progress", "train.max_iter=3"]) == 0
    wa, wb = (load_checkpoint(Run(r).model_final)["model"] for r in (a, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    state = {k.split(".")[-1]: v for k, v in wa.items() if k.startswith("roi_heads.box_predictor.cls_loss.")}
    extra = {"seesaw": 2, "eqlv2": 0, "fed": 0, "bags": 4 + 2}[loss]  # logits beyond one per class
    outputs = wa["roi_heads.box_predictor.cls_score.weight"].shape[0]
    assert outputs - extra == LabelMap.load(a / "label_map.json").num_classes
    if loss == "seesaw":
        assert state["cum_counts"].sum() > 0
    elif loss == "eqlv2":
        assert state["pos_grad"].sum() > 0 and state["neg_grad"].sum() > 0
    else:
        assert int(state["draws"]) == 3  # one draw per training iteration
    # the classifier's state is in the checkpoint (BAGS's groups): predict needs no training json
    saved = load_checkpoint(Run(a).model_final)["classifier"]
    assert saved["name"] == {"seesaw": "seesaw", "bags": "group_softmax"}.get(loss, "sigmoid")
    assert ("groups" in saved) == (loss == "bags")
    predict = ["predict", "--run", str(a), "--max-images", "4", "--no-progress"]
    assert main(predict) == 0
    results = (Run(a).predictions("val-first4").head("orig").results).read_bytes()
    train_json.unlink()
    assert main(predict) == 0
    assert (Run(a).predictions("val-first4").head("orig").results).read_bytes() == results


def test_simcal_calibrates_a_seesaw_run_with_its_own_classifier(tiny_config, tmp_path):
    """SimCal on a detector trained end to end with Seesaw: the 3fc_ft head copies its C+2
    classifier (normalised) and trains it with that classifier's cross-entropy; predict's cal and dual."""
    import json

    from simcal.cli import main
    from simcal.engine.checkpoint import load_model
    from simcal.modeling.calibration import load_head

    cfg = tiny_config(max_iter=2, steps=[])
    run = tmp_path / "run"
    over = ["train.loss=seesaw", "model.cls_head=normed"]
    assert main(["train", "--config", str(cfg), "--out", str(run), "--no-progress", *over]) == 0
    assert main(["calibrate", "--run", str(run), "--steps", "2", "--classes-per-batch", "4", "--no-progress"]) == 0
    model, _, _ = load_model(run)
    head, meta = load_head(run / "calibration" / "3fc_ft" / "head.pth", model.roi_heads)
    assert meta["classifier"] == "seesaw" and isinstance(head.cls_score, NormedLinear)
    assert main(["predict", "--run", str(run), "--head", "orig,cal,dual", "--max-images", "4", "--no-progress"]) == 0
    for name in ("orig", "cal", "dual"):
        m = json.loads((run / "predictions" / "val-first4" / name / "metrics_bbox.json").read_text())
        assert m["num_detections"] > 0, name


# ------------------------------------------------------------------ decoupled: on the frozen detector
@pytest.mark.parametrize("name", ["seesaw", "sigmoid", "group_softmax"])
def test_a_decoupled_classifier_starts_from_the_trained_rows(name):
    """calibrate --loss seesaw|eqlv2|fed|bags on a softmax detector: the 3fc_ft head's class-score
    layer has the loss's classifier's K outputs; each label's row is the trained row of that label
    (and the background's where both have one), the rest are fresh."""
    from simcal.config import ModelConfig
    from simcal.modeling.calibration import build_calibrated_head
    from simcal.modeling.detector import build_detector

    torch.manual_seed(0)
    counts = [3, 30, 300, 3000]
    model = build_detector(ModelConfig(arch="small", norm="gn", min_size=64, max_size=64), 4)
    trained = model.roi_heads.box_predictor.cls_score
    act = build_activation(name, counts)
    head = build_calibrated_head("3fc_ft", model.roi_heads, classifier=act)
    assert head.activation is act and head.cls_score.out_features == act.num_logits(4) == head.num_outputs
    rows = act.label_rows(4)
    for label in range(1, 5):
        assert torch.equal(head.cls_score.weight[rows[label]], trained.weight[label])
    if rows[0] is not None:
        assert torch.equal(head.cls_score.weight[rows[0]], trained.weight[0])
    assert head.cls_score.weight.requires_grad and head.fc6.weight.requires_grad  # 3fc_ft all3: every layer


@pytest.mark.parametrize("loss", ["seesaw", "eqlv2"])
def test_a_stateful_loss_calibrates_decoupled_resumes_exactly_and_serves_as_a_dual_head(loss, run):
    """On the frozen (softmax) detector: `calibrate --loss ...` with the sampler of one's choice, its
    loss state in the calibration checkpoint (a run stopped after step 2 resumes to the same head),
    the head saved with its classifier and loaded back for predict's cal and dual heads. (Every
    method decoupled, BAGS with its last layer: tests/test_demo.py, the leaderboard.)"""
    import json

    from simcal.cli import main
    from simcal.engine.checkpoint import load_model
    from simcal.modeling.calibration import load_head

    common = ["calibrate", "--run", str(run), "--steps", "4", "--classes-per-batch", "4", "--no-progress"]
    over = ["--loss", loss, "--sampler", "random" if loss == "eqlv2" else "bilevel", "--name", loss]
    assert main([*common, *over, "calibration.checkpoint_period=2"]) == 0
    folder = run / "calibration" / loss
    model, _, _ = load_model(run)
    head, meta = load_head(folder / "head.pth", model.roi_heads)
    assert meta["classifier"] == choices_of(loss) and head.activation.name == choices_of(loss)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    (folder / "head.pth").unlink()
    (folder / "summary.json").unlink()
    assert main([*common, *over, "calibration.checkpoint_period=2", "--resume"]) == 0
    again, _ = load_head(folder / "head.pth", model.roi_heads)
    assert all(torch.equal(before[k], v) for k, v in again.state_dict().items())
    heads = ["predict", "--run", str(run), "--head", "cal,dual", "--calibration", loss, "--max-images", "4"]
    assert main([*heads, "--no-progress"]) == 0
    for name in ("cal", "dual"):
        m = json.loads((run / "predictions" / "val-first4" / f"{name}@{loss}" / "metrics_bbox.json").read_text())
        assert m["num_detections"] > 0, name


def choices_of(loss: str) -> str:
    from simcal import choices

    return choices.LOSSES[loss].classifier
