"""Classification losses of the box head: CE and the long-tail baselines of METHOD.md.

Every loss takes ``logits`` ``(R, C+1)`` and ``labels`` ``(R,)`` ``int64`` and returns a scalar
tensor. Column 0 of ``logits`` is the BACKGROUND (torchvision's convention: label 0 is the
background, foreground labels are ``1..C``). The reduction is the mean over the ``R`` RoIs; with
no RoI (``R == 0``) the result is a zero that is still connected to ``logits``'s graph
(``logits.sum() * 0``), so ``backward`` works and gives zero gradients.

Half-precision ``logits`` (bfloat16 under autocast) are computed in float32; float64 stays
float64.

* :func:`cross_entropy`: softmax cross-entropy.
* :func:`reweighted_cross_entropy` + :func:`lr_class_weights`: LR, loss re-weighting,
  ``w_j = clamp(N / N_j, 0.1, 10)``, background weight 1 [paper 4.1, supplement G.3].
* :func:`focal_loss`: FL, softmax focal loss ``-alpha (1 - p_t)^gamma log p_t``.
* :func:`class_margin_cross_entropy` + :func:`cm_margins`: CM, class-aware margin
  ``Delta_j = C / N_j^(1/4)`` subtracted from the true-class logit (training only).

Beyond the paper (METHOD.md, "Long-tail methods beyond the paper"), each on its own classifier
(its row of :data:`simcal.choices.LOSSES`, :mod:`simcal.modeling.predictors`), so their logits are
not ``(R, C+1)`` softmax logits:

* :func:`seesaw_loss` + :func:`seesaw_factors` (:class:`SeesawLoss`): ``(R, C+2)`` logits, C
  classes then objectness (object, background);
* :class:`EQLv2` and :class:`FederatedLoss` (:func:`eqlv2_weights`, :func:`federated_classes`):
  :func:`sigmoid_cross_entropy` on ``(R, C)`` logits;
* :func:`group_softmax_loss` (:class:`GroupSoftmaxLoss`, BAGS): ``(R, C + G + 2)`` logits laid out
  by :func:`group_softmax_layout`.

:func:`build_classification_loss` turns a config name into a small :class:`torch.nn.Module`
whose weights / margins are non-persistent buffers: they follow ``.to(device)`` and stay out of
the ``state_dict`` (so checkpoints do not depend on the loss). The state of the newer losses
(Seesaw's cumulative counts, EQLv2's gradient statistics, the draw counters of the federated
subset and of BAGS's "others") is in persistent buffers: it is saved with the model (training) or
the calibration checkpoint, so a resumed run continues exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from simcal import choices
from simcal.data.stats import TrainingStats
from simcal.seeds import BAGS_OTHERS, FED_CLASSES, loss_draw_seed

__all__ = [
    "LOSS_CLASSES",
    "ClassMarginCrossEntropy",
    "ClassificationLoss",
    "CrossEntropy",
    "FocalLoss",
    "ReweightedCrossEntropy",
    "build_classification_loss",
    "class_margin_cross_entropy",
    "cm_margins",
    "cross_entropy",
    "focal_loss",
    "lr_class_weights",
    "reweighted_cross_entropy",
]


# --------------------------------------------------------------------------------------------
# Functional forms
# --------------------------------------------------------------------------------------------


def _check(logits: Tensor, labels: Tensor, per_class: Tensor | None = None, what: str = "") -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be (R, C+1), got shape {tuple(logits.shape)}")
    if labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"labels must be (R,) with R = {logits.shape[0]}, got shape {tuple(labels.shape)}")
    if per_class is not None and per_class.shape != (logits.shape[1],):
        raise ValueError(
            f"{what} must have one entry per logit column ({logits.shape[1]}), got shape {tuple(per_class.shape)}"
        )


def _upcast(logits: Tensor) -> Tensor:
    """float16 / bfloat16 logits as float32; float32 and float64 unchanged."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def _empty(logits: Tensor) -> Tensor:
    """A zero scalar that keeps ``logits`` in the autograd graph."""
    return logits.sum() * 0


def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Softmax cross-entropy, mean over the RoIs.

    Args:
        logits: ``(R, C+1)``, column 0 is the background.
        labels: ``(R,)`` ``int64`` in ``0..C`` (0 = background).

    Returns:
        Scalar ``mean_r -log softmax(logits_r)[labels_r]``; a graph-connected zero if ``R == 0``.
    """
    _check(logits, labels)
    if logits.shape[0] == 0:
        return _empty(logits)
    return F.cross_entropy(_upcast(logits), labels)


def reweighted_cross_entropy(logits: Tensor, labels: Tensor, class_weights: Tensor) -> Tensor:
    """Class re-weighted cross-entropy (LR), ``mean_r w[y_r] * CE_r``.

    The mean is over the ``R`` RoIs, NOT normalised by the sum of the weights (mmdetection's
    convention, which the authors' code follows; ``torch.nn.functional.cross_entropy(weight=...)``
    divides by ``sum_r w[y_r]`` instead, which would undo most of the re-weighting).

    Args:
        logits: ``(R, C+1)``, column 0 is the background.
        labels: ``(R,)`` ``int64`` in ``0..C``.
        class_weights: ``(C+1,)``, the weight of each label (e.g. :func:`lr_class_weights`).

    Returns:
        Scalar loss; a graph-connected zero if ``R == 0``.
    """
    _check(logits, labels, class_weights, "class_weights")
    if logits.shape[0] == 0:
        return _empty(logits)
    ce = F.cross_entropy(_upcast(logits), labels, reduction="none")
    return (ce * class_weights.to(ce)[labels]).mean()


def focal_loss(logits: Tensor, labels: Tensor, gamma: float = 3.0, alpha: float = 0.5) -> Tensor:
    """Multi-class softmax focal loss (FL), ``mean_r -alpha (1 - p_t)^gamma log p_t``.

    ``p_t`` is the softmax probability of the true label (background included), computed from
    ``log_softmax`` (``1 - p_t = -expm1(log p_t)``), so it is stable for large logits. In this
    softmax form ``alpha`` is a single constant scale (it does not balance positives against
    negatives as in the sigmoid form). ``gamma = 0, alpha = 1`` is the cross-entropy.

    Args:
        logits: ``(R, C+1)``, column 0 is the background.
        labels: ``(R,)`` ``int64`` in ``0..C``.
        gamma: focusing parameter, ``>= 0`` (paper: 3).
        alpha: scale (paper: 0.5).

    Returns:
        Scalar loss; a graph-connected zero if ``R == 0``.
    """
    _check(logits, labels)
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    if logits.shape[0] == 0:
        return _empty(logits)
    logp_t = F.log_softmax(_upcast(logits), dim=1).gather(1, labels[:, None]).squeeze(1)
    if gamma == 0:
        loss = -logp_t
    else:
        # clamped away from 0 so that 0 < gamma < 1 has a finite gradient at p_t = 1
        one_minus_p = (-torch.expm1(logp_t)).clamp_min(torch.finfo(logp_t.dtype).tiny)
        loss = -one_minus_p.pow(gamma) * logp_t
    return alpha * loss.mean()


def class_margin_cross_entropy(logits: Tensor, labels: Tensor, margins: Tensor) -> Tensor:
    """Class-aware margin cross-entropy (CM), for training only.

    ``margins[y_r]`` is subtracted from the true-class logit of each RoI before the softmax
    cross-entropy: ``-log e^{z_y - D_y} / (e^{z_y - D_y} + sum_{c != y} e^{z_c})``, mean over the
    RoIs. Inference uses the plain logits.

    Args:
        logits: ``(R, C+1)``, column 0 is the background.
        labels: ``(R,)`` ``int64`` in ``0..C``.
        margins: ``(C+1,)`` per-label margins (e.g. :func:`cm_margins`; background 0).

    Returns:
        Scalar loss; a graph-connected zero if ``R == 0``.
    """
    _check(logits, labels, margins, "margins")
    if logits.shape[0] == 0:
        return _empty(logits)
    x = _upcast(logits)
    shift = F.one_hot(labels, x.shape[1]).to(x) * margins.to(x)[labels][:, None]
    return F.cross_entropy(x - shift, labels)


# --------------------------------------------------------------------------------------------
# Long-tail losses beyond the paper (METHOD.md, "Long-tail methods beyond the paper")
# --------------------------------------------------------------------------------------------


def sigmoid_cross_entropy(logits: Tensor, labels: Tensor, weights: Tensor | None = None) -> Tensor:
    """Binary cross-entropy over ``C`` sigmoid logits, summed over the classes, mean over the RoIs
    (detectron2's ``sigmoid_cross_entropy_loss``; EQLv2's normalisation).

    Args:
        logits: ``(R, C)``: one logit per foreground class, no background column.
        labels: ``(R,)`` ``int64`` in ``0..C``; a background RoI (0) has every target 0.
        weights: ``(R, C)`` per-element weights (EQLv2's, the federated class mask), or None.

    Returns:
        ``sum_{r,j} w_rj BCE(z_rj, [y_r = j]) / R``; a graph-connected zero if ``R == 0``.
    """
    if logits.dim() != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(f"logits must be (R, C) and labels (R,), got {tuple(logits.shape)} and {tuple(labels.shape)}")
    if logits.shape[0] == 0:
        return _empty(logits)
    x = _upcast(logits)
    target = F.one_hot(labels, x.shape[1] + 1)[:, 1:].to(x)
    loss = F.binary_cross_entropy_with_logits(x, target, reduction="none")
    if weights is not None:
        loss = loss * weights.to(loss)
    return loss.sum() / x.shape[0]


def seesaw_factors(
    class_logits: Tensor, labels: Tensor, cum_counts: Tensor, p: float = 0.8, q: float = 2.0, eps: float = 0.01
) -> Tensor:
    """Seesaw's ``S_ij = M_ij * C_ij`` ``(P, C)`` for foreground RoIs of classes ``labels`` (0-based).

    ``M_ij = (N_j / N_i)^p`` where ``N_j < N_i``, else 1 (mitigation; ``N`` the cumulative counts,
    at least 1); ``C_ij = (sigma_j / sigma_i)^q`` where ``sigma_j > sigma_i``, else 1
    (compensation; ``sigma`` the softmax of the detached class logits, ``sigma_i`` at least
    ``eps``). The true column is 1.

    Args:
        class_logits: ``(P, C)`` class logits (no objectness); labels: ``(P,)`` in ``0..C-1``;
        cum_counts: ``(C,)`` cumulative training counts.
    """
    n = cum_counts.to(class_logits).clamp(min=1)
    ratio = n[None, :] / n[:, None]  # [i, j] = N_j / N_i
    factors = torch.where(ratio < 1, ratio.pow(p), torch.ones_like(ratio))[labels]
    if q > 0:
        sigma = F.softmax(class_logits.detach(), dim=1)
        own = sigma.gather(1, labels[:, None]).clamp(min=eps)
        score_ratio = sigma / own
        factors = factors * torch.where(score_ratio > 1, score_ratio.pow(q), torch.ones_like(score_ratio))
    return factors


def seesaw_loss(
    logits: Tensor, labels: Tensor, cum_counts: Tensor, p: float = 0.8, q: float = 2.0, eps: float = 0.01
) -> Tensor:
    """Seesaw loss on ``C + 2`` logits (C class logits, then objectness ``(object, background)``).

    Objectness cross-entropy on every RoI plus, on the foreground RoIs, the class softmax
    cross-entropy with each other class's logit raised by ``log S_ij`` (:func:`seesaw_factors`);
    both summed and divided by ``R`` (mmdetection's ``SeesawLoss`` with ``avg_factor = R``).
    ``p = q = 0`` is the plain cross-entropy of this classifier.

    Args:
        logits: ``(R, C+2)``; labels: ``(R,)`` in ``0..C`` (0 background); cum_counts: ``(C,)``.
    """
    if logits.dim() != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(f"logits must be (R, C+2) and labels (R,), got {tuple(logits.shape)}, {tuple(labels.shape)}")
    r = logits.shape[0]
    if r == 0:
        return _empty(logits)
    x = _upcast(logits)
    c = x.shape[1] - 2
    fg = labels > 0
    loss = F.cross_entropy(x[:, c:], (~fg).long(), reduction="sum")
    if fg.any():
        y = labels[fg] - 1
        z = x[fg, :c]
        factors = seesaw_factors(z, y, cum_counts, p, q, eps)
        z = z + factors.log() * (1 - F.one_hot(y, c).to(z))
        loss = loss + F.cross_entropy(z, y, reduction="sum")
    return loss / r


def eqlv2_weights(pos_grad: Tensor, neg_grad: Tensor, gamma: float = 12.0, mu: float = 0.8, alpha: float = 4.0):
    """EQLv2's per-class ``(positive weight (C,), negative weight (C,))`` from the accumulated
    gradient magnitudes: ``g = pos / neg``, ``f(g) = 1 / (1 + exp(-gamma (g - mu)))``, negative
    weight ``f(g)``, positive weight ``1 + alpha (1 - f(g))``."""
    g = pos_grad / (neg_grad + 1e-10)
    neg_w = torch.sigmoid(gamma * (g - mu))
    return 1 + alpha * (1 - neg_w), neg_w


def federated_classes(labels: Tensor, weights: Tensor, size: int = 50, generator: torch.Generator | None = None):
    """The federated loss's class subset ``(S,)`` (0-based classes, sorted): every foreground
    class among ``labels`` (``(R,)`` in ``0..C``), plus classes drawn without replacement with
    probability proportional to ``weights`` ``(C,)`` (``image_count^0.5``) until ``size`` classes
    (all ``C`` when ``C <= size``). The batch's classes are always in it."""
    c = weights.numel()
    present = torch.unique(labels[labels > 0]) - 1
    if present.numel() >= min(size, c):
        return present.sort().values
    prob = weights.detach().double().cpu().clamp(min=0).clone()
    prob[present.cpu()] = 0
    if float(prob.sum()) <= 0:  # every remaining class weighs 0: draw uniformly among them
        prob = torch.ones(c, dtype=torch.float64)
        prob[present.cpu()] = 0
    extra = torch.multinomial(prob, min(size, c) - present.numel(), replacement=False, generator=generator)
    return torch.cat([present.cpu(), extra]).sort().values.to(labels.device)


def group_of_counts(instance_counts: Sequence[int], edges: Sequence[int] = (10, 100, 1000)) -> list[int]:
    """BAGS's group of each class (0-based group, in label order): by training instance count into
    ``[0, 10), [10, 100), [100, 1000), [1000, inf)``."""
    return [sum(n >= e for e in edges) for n in _counts(instance_counts)]


def group_softmax_layout(groups: Sequence[int], num_groups: int) -> tuple[list[list[int]], Tensor]:
    """The logit layout of BAGS's group softmax for classes in ``groups`` (0-based, label order).

    Columns: for each class group g in ``0..num_groups-1``: ``[others_g, its classes in label
    order...]``; then the background group ``[others (= any object), background]``; ``K = C +
    num_groups + 2``.

    Returns:
        ``(per group the 1-based labels of its classes, column (C+1,) of each label's own logit,
        column 0 the background's)``.
    """
    members: list[list[int]] = [[] for _ in range(num_groups)]
    for label0, g in enumerate(groups):
        members[g].append(label0 + 1)
    column = torch.zeros(len(groups) + 1, dtype=torch.int64)
    start = 0
    for g in range(num_groups):
        for k, label in enumerate(members[g]):
            column[label] = start + 1 + k
        start += 1 + len(members[g])
    column[0] = start + 1  # the background group is [others, background]
    return members, column


def group_softmax_loss(
    logits: Tensor, labels: Tensor, groups: Sequence[int], num_groups: int, beta: float = 8.0,
    generator: torch.Generator | None = None,
) -> Tensor:  # fmt: skip
    """BAGS: one softmax cross-entropy per group (:func:`group_softmax_layout`), summed.

    In class group g a RoI of one of its classes has that class's label, every other RoI (another
    group's class or background) the group's "others" label; all in-group RoIs count and
    ``beta`` times as many "others" RoIs drawn at random (all when there are fewer; none when the
    group has no RoI); the group's loss is the mean over the counted RoIs. The background group
    labels background RoIs "background" and every object "others", all RoIs counted.

    Args:
        logits: ``(R, C + num_groups + 2)``; labels: ``(R,)`` in ``0..C``; groups: ``(C,)``.
    """
    r = logits.shape[0]
    if r == 0:
        return _empty(logits)
    x = _upcast(logits)
    members, _ = group_softmax_layout(groups, num_groups)
    total = x.new_zeros(())
    start = 0
    for g in range(num_groups + 1):
        if g < num_groups:
            size = 1 + len(members[g])
            index = torch.zeros(len(groups) + 1, dtype=torch.int64, device=labels.device)
            for k, label in enumerate(members[g]):
                index[label] = k + 1
            local = index[labels]
            inside = torch.where(local > 0)[0]
            if inside.numel() == 0:
                start += size
                continue
            others = torch.where(local == 0)[0]
            n_others = int(inside.numel() * beta)
            if n_others < others.numel():
                pick = torch.randperm(others.numel(), generator=generator)[:n_others].to(others.device)
                others = others[pick]
            kept = torch.cat([inside, others])
        else:
            size = 2
            local = (labels == 0).long()  # 0 others (an object), 1 background
            kept = torch.arange(r, device=labels.device)
        total = total + F.cross_entropy(x[kept, start : start + size], local[kept])
        start += size
    return total


# --------------------------------------------------------------------------------------------
# Per-class weights and margins from the training instance counts
# --------------------------------------------------------------------------------------------


def _counts(instance_counts: Sequence[int]) -> list[int]:
    counts = [int(n) for n in instance_counts]
    if any(n < 0 for n in counts):
        raise ValueError("instance counts must be >= 0")
    return counts


def lr_class_weights(instance_counts: Sequence[int], n: float = 100.0, lo: float = 0.1, hi: float = 10.0) -> Tensor:
    """LR weights ``(C+1,)`` float32: ``[1, clamp(n / N_1, lo, hi), ..., clamp(n / N_C, lo, hi)]``.

    Args:
        instance_counts: ``(C,)`` training instance count ``N_j`` of labels ``1..C``, in label
            order.
        n: numerator ``N`` (paper: 100).
        lo, hi: clamp range (paper: ``[0.1, 10]``).

    Classes with ``N_j = 0`` get ``hi``; the background (index 0) gets weight 1.
    Example: counts ``[1, 50, 1000, 0]`` -> ``[1, 10, 2, 0.1, 10]``.
    """
    if not lo <= hi:
        raise ValueError(f"need lo <= hi, got lo={lo}, hi={hi}")
    weights = [1.0] + [hi if c == 0 else min(max(n / c, lo), hi) for c in _counts(instance_counts)]
    return torch.tensor(weights, dtype=torch.float32)


def cm_margins(instance_counts: Sequence[int], c: float = 6.0) -> Tensor:
    """CM margins ``(C+1,)`` float32: ``[0, c / N_1^(1/4), ..., c / N_C^(1/4)]``.

    Args:
        instance_counts: ``(C,)`` training instance count ``N_j`` of labels ``1..C``, in label
            order.
        c: the constant ``C`` (paper: 6.0).

    Classes with ``N_j = 0`` are treated as ``N_j = 1`` (margin ``c``); the background margin is 0.
    """
    margins = [0.0] + [c / math.pow(max(n, 1), 0.25) for n in _counts(instance_counts)]
    return torch.tensor(margins, dtype=torch.float32)


# --------------------------------------------------------------------------------------------
# Modules (what a model stores)
# --------------------------------------------------------------------------------------------


class ClassificationLoss(nn.Module):
    """Base class: ``loss(logits (R, K), labels (R,)) -> scalar tensor``.

    ``activation`` names the classifier whose logits the loss expects
    (:class:`simcal.modeling.predictors.Activation`); every loss here is a softmax loss over
    ``K = C + 1`` columns.
    """

    name: str = ""
    activation: str = "softmax"

    @classmethod
    def from_stats(cls, stats: TrainingStats, **kwargs: Any) -> ClassificationLoss:
        """The loss for a training set's statistics and its keyword arguments (this one needs none)."""
        return cls(**kwargs)

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class CrossEntropy(ClassificationLoss):
    """:func:`cross_entropy` as a module."""

    name = "ce"

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        return cross_entropy(logits, labels)


class ReweightedCrossEntropy(ClassificationLoss):
    """:func:`reweighted_cross_entropy` with a ``class_weights`` ``(C+1,)`` buffer."""

    name = "lr"
    class_weights: Tensor

    @classmethod
    def from_stats(cls, stats: TrainingStats, **kwargs: Any) -> ReweightedCrossEntropy:
        return cls(lr_class_weights(stats.instance_counts, **kwargs))

    def __init__(self, class_weights: Tensor) -> None:
        super().__init__()
        self.register_buffer("class_weights", torch.as_tensor(class_weights, dtype=torch.float32), persistent=False)

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        return reweighted_cross_entropy(logits, labels, self.class_weights)

    def extra_repr(self) -> str:
        return f"num_classes={self.class_weights.numel() - 1}"


class FocalLoss(ClassificationLoss):
    """:func:`focal_loss` with fixed ``gamma`` and ``alpha``."""

    name = "focal"

    def __init__(self, gamma: float = 3.0, alpha: float = 0.5) -> None:
        super().__init__()
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.gamma = float(gamma)
        self.alpha = float(alpha)

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        return focal_loss(logits, labels, self.gamma, self.alpha)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, alpha={self.alpha}"


class ClassMarginCrossEntropy(ClassificationLoss):
    """:func:`class_margin_cross_entropy` with a ``margins`` ``(C+1,)`` buffer."""

    name = "cm"
    margins: Tensor

    @classmethod
    def from_stats(cls, stats: TrainingStats, **kwargs: Any) -> ClassMarginCrossEntropy:
        return cls(cm_margins(stats.instance_counts, **kwargs))

    def __init__(self, margins: Tensor) -> None:
        super().__init__()
        self.register_buffer("margins", torch.as_tensor(margins, dtype=torch.float32), persistent=False)

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        return class_margin_cross_entropy(logits, labels, self.margins)

    def extra_repr(self) -> str:
        return f"num_classes={self.margins.numel() - 1}"


def _all_reduce_sum(x: Tensor) -> Tensor:
    """``x`` summed over the processes of a distributed run (itself in one process), in place."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(x)
    return x


def _draw_generator(counter: Tensor, stream: int) -> torch.Generator:
    """A generator for the ``counter``-th random draw of a loss (the counter is a buffer saved in
    checkpoints, so a resumed run draws the same), then advances the counter."""
    seed = loss_draw_seed(stream, int(counter))
    counter += 1
    return torch.Generator().manual_seed(seed)


class SigmoidCrossEntropy(ClassificationLoss):
    """:func:`sigmoid_cross_entropy`: the cross-entropy of a sigmoid classifier (C logits)."""

    name = "ce"
    activation = "sigmoid"

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        return sigmoid_cross_entropy(logits, labels)


class EQLv2(ClassificationLoss):
    """EQLv2 (Tan et al. 2021) on a sigmoid classifier: :func:`sigmoid_cross_entropy` with
    per-class positive / negative weights (:func:`eqlv2_weights`) from the gradient magnitudes
    accumulated so far (buffers ``pos_grad``, ``neg_grad`` ``(C,)``, in checkpoints; summed over
    processes). Each training call first weighs with the statistics so far, then adds its own
    weighted gradient magnitudes ``|sigmoid(z) - target|``."""

    name = "eqlv2"
    activation = "sigmoid"
    pos_grad: Tensor
    neg_grad: Tensor

    @classmethod
    def from_stats(cls, stats: TrainingStats, **kwargs: Any) -> EQLv2:
        return cls(stats.num_classes, **kwargs)

    def __init__(self, num_classes: int, gamma: float = 12.0, mu: float = 0.8, alpha: float = 4.0) -> None:
        super().__init__()
        self.gamma, self.mu, self.alpha = float(gamma), float(mu), float(alpha)
        self.register_buffer("pos_grad", torch.zeros(num_classes, dtype=torch.float64))
        self.register_buffer("neg_grad", torch.zeros(num_classes, dtype=torch.float64))

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        pos_w, neg_w = eqlv2_weights(self.pos_grad, self.neg_grad, self.gamma, self.mu, self.alpha)
        x = _upcast(logits)
        target = F.one_hot(labels, x.shape[1] + 1)[:, 1:].to(x)
        weights = pos_w.to(x) * target + neg_w.to(x) * (1 - target)
        loss = sigmoid_cross_entropy(logits, labels, weights)
        if self.training and torch.is_grad_enabled():
            with torch.no_grad():
                grad = (torch.sigmoid(x.detach()) - target).abs() * weights
                stats = torch.stack([(grad * target).sum(0), (grad * (1 - target)).sum(0)]).double()
                _all_reduce_sum(stats)
                self.pos_grad += stats[0]
                self.neg_grad += stats[1]
        return loss

    def extra_repr(self) -> str:
        return f"num_classes={self.pos_grad.numel()}, gamma={self.gamma}, mu={self.mu}, alpha={self.alpha}"


class FederatedLoss(ClassificationLoss):
    """Federated loss (Zhou et al. 2021; detectron2's ``USE_FED_LOSS``): :func:`sigmoid_cross_entropy`
    on the classes of :func:`federated_classes` only (``num_classes`` of them, weights
    ``image_count^power``), drawn anew at every call from a counter saved in checkpoints."""

    name = "fed"
    activation = "sigmoid"
    draws: Tensor
    class_weights: Tensor

    @classmethod
    def from_stats(cls, stats: TrainingStats, **kwargs: Any) -> FederatedLoss:
        return cls(stats.image_counts, **kwargs)

    def __init__(self, image_counts: Sequence[int], num_classes: int = 50, power: float = 0.5) -> None:
        super().__init__()
        self.size = int(num_classes)
        weights = torch.tensor(_counts(image_counts), dtype=torch.float64).pow(power)
        self.register_buffer("class_weights", weights, persistent=False)
        self.register_buffer("draws", torch.zeros((), dtype=torch.int64))

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        generator = _draw_generator(self.draws, FED_CLASSES) if self.training else torch.Generator().manual_seed(0)
        chosen = federated_classes(labels, self.class_weights, self.size, generator)
        mask = torch.zeros(logits.shape[1], dtype=logits.dtype, device=logits.device)
        mask[chosen] = 1
        return sigmoid_cross_entropy(logits, labels, mask[None, :].expand_as(logits))

    def extra_repr(self) -> str:
        return f"num_classes={self.size}, of={self.class_weights.numel()}"


class SeesawLoss(ClassificationLoss):
    """:func:`seesaw_loss` on the C + 2 objectness classifier, with the cumulative class counts as a
    buffer (``cum_counts`` ``(C,)``, in checkpoints, summed over processes), counted from each
    call's foreground labels before its loss."""

    name = "seesaw"
    activation = "seesaw"
    cum_counts: Tensor

    @classmethod
    def from_stats(cls, stats: TrainingStats, **kwargs: Any) -> SeesawLoss:
        return cls(stats.num_classes, **kwargs)

    def __init__(self, num_classes: int, p: float = 0.8, q: float = 2.0, eps: float = 0.01) -> None:
        super().__init__()
        self.p, self.q, self.eps = float(p), float(q), float(eps)
        self.register_buffer("cum_counts", torch.zeros(num_classes, dtype=torch.float64))

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        if self.training:
            seen = torch.bincount(labels[labels > 0] - 1, minlength=self.cum_counts.numel()).double()
            self.cum_counts += _all_reduce_sum(seen.to(self.cum_counts.device))
        return seesaw_loss(logits, labels, self.cum_counts, self.p, self.q, self.eps)

    def extra_repr(self) -> str:
        return f"num_classes={self.cum_counts.numel()}, p={self.p}, q={self.q}, eps={self.eps}"


class ObjectnessCrossEntropy(ClassificationLoss):
    """The cross-entropy of the C + 2 objectness classifier: :func:`seesaw_loss` with ``p = q = 0``."""

    name = "ce"
    activation = "seesaw"

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        return seesaw_loss(logits, labels, torch.ones(logits.shape[1] - 2), p=0.0, q=0.0)


class GroupSoftmaxLoss(ClassificationLoss):
    """BAGS (:func:`group_softmax_loss`) for classes in ``groups`` (0-based group per class); the
    "others" draws come from a counter saved in checkpoints."""

    name = "bags"
    activation = "group_softmax"
    draws: Tensor

    @classmethod
    def from_stats(cls, stats: TrainingStats, **kwargs: Any) -> GroupSoftmaxLoss:
        return cls(group_of_counts(stats.instance_counts), **kwargs)

    def __init__(self, groups: Sequence[int], num_groups: int = 4, beta: float = 8.0) -> None:
        super().__init__()
        self.groups, self.num_groups, self.beta = [int(g) for g in groups], int(num_groups), float(beta)
        self.register_buffer("draws", torch.zeros((), dtype=torch.int64))

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        generator = _draw_generator(self.draws, BAGS_OTHERS) if self.training else torch.Generator().manual_seed(0)
        return group_softmax_loss(logits, labels, self.groups, self.num_groups, self.beta, generator)

    def extra_repr(self) -> str:
        return f"groups={[self.groups.count(g) for g in range(self.num_groups)]}, beta={self.beta}"


def loss_fits(loss: Any, activation: Any) -> bool:
    """Whether a loss (module or class) suits a classifier's logits: a loss declaring its
    ``activation`` must match the classifier's; a loss that declares none is trusted."""
    wanted = getattr(loss, "activation", None)
    return wanted is None or wanted == activation.name


#: the implementation of each loss of :data:`simcal.choices.LOSSES` (its row: keyword arguments and
#: their ranges, classifier, prior, calibration layers); built by its ``from_stats``
LOSS_CLASSES: dict[str, type[ClassificationLoss]] = {
    "ce": CrossEntropy,
    "lr": ReweightedCrossEntropy,
    "focal": FocalLoss,
    "cm": ClassMarginCrossEntropy,
    "seesaw": SeesawLoss,
    "eqlv2": EQLv2,
    "fed": FederatedLoss,
    "bags": GroupSoftmaxLoss,
}


def build_classification_loss(
    name: str,
    stats: TrainingStats | Sequence[int],
    activation: Any = None,
    **kwargs: Any,
) -> nn.Module:
    """The box-head classification loss called ``name``.

    Args:
        name: a row of :data:`simcal.choices.LOSSES`: ``ce``, ``lr`` (kwargs ``n``, ``lo``, ``hi``),
            ``focal`` (``gamma``, ``alpha``), ``cm`` (``c``); beyond the paper ``seesaw`` (``p``,
            ``q``, ``eps``; C+2 classifier), ``eqlv2`` (``gamma``, ``mu``, ``alpha``; sigmoid),
            ``fed`` (``num_classes``, ``power``; sigmoid), ``bags`` (``beta``; group softmax).
        stats: the training statistics (:class:`simcal.data.stats.TrainingStats`, label order), or
            the ``(C,)`` instance counts alone (image counts then taken to be the same).
        activation: the classifier's :class:`~simcal.modeling.predictors.Activation` (default:
            softmax). ``ce`` is its own cross-entropy; every other loss needs the classifier of its
            row (softmax for lr, focal, cm).
        **kwargs: override the defaults of the chosen loss (its row's ``kwargs``).

    Returns:
        A module ``(logits (R, K), labels (R,)) -> scalar``; picklable, and its weight / margin
        buffers move with ``.to(device)``.

    Raises:
        ValueError: unknown ``name``, a keyword argument the loss does not take, or a loss that
            does not fit the classifier's logits.
    """
    spec = choices.LOSSES.get(name)
    if spec is None or name not in LOSS_CLASSES:
        valid = ", ".join(choices.LOSSES)
        raise ValueError(f"unknown classification loss {name!r}; expected one of {valid}")
    unknown = sorted(set(kwargs) - set(spec.kwargs))
    if unknown:
        allowed = ", ".join(spec.kwargs) or "none"
        raise ValueError(f"loss {name!r} does not take {', '.join(unknown)} (accepted: {allowed})")
    if name == "ce" and activation is not None:
        return activation.cross_entropy_loss()
    if activation is not None and spec.classifier != activation.name:
        raise ValueError(
            f"the {name!r} loss trains a {spec.classifier} classifier, this one is {activation.name} (model.classifier)"
        )
    return LOSS_CLASSES[name].from_stats(TrainingStats.of(stats), **kwargs)
