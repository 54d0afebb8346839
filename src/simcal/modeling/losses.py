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

:func:`build_classification_loss` turns a config name into a small :class:`torch.nn.Module`
whose weights / margins are non-persistent buffers: they follow ``.to(device)`` and stay out of
the ``state_dict`` (so checkpoints do not depend on the loss).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from simcal import choices

__all__ = [
    "LOSS_NAMES",
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

    def __init__(self, margins: Tensor) -> None:
        super().__init__()
        self.register_buffer("margins", torch.as_tensor(margins, dtype=torch.float32), persistent=False)

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        return class_margin_cross_entropy(logits, labels, self.margins)

    def extra_repr(self) -> str:
        return f"num_classes={self.margins.numel() - 1}"


#: Accepted names of :func:`build_classification_loss` and the keyword arguments of each
#: (from :data:`simcal.choices.LOSSES`, where their accepted values are listed too).
LOSS_NAMES: dict[str, tuple[str, ...]] = {name: tuple(kwargs) for name, kwargs in choices.LOSSES.items()}


def loss_fits(loss: Any, activation: Any) -> bool:
    """Whether a loss (module or class) suits a classifier's logits: a loss declaring its
    ``activation`` must match the classifier's; a loss that declares none is trusted."""
    wanted = getattr(loss, "activation", None)
    return wanted is None or wanted == activation.name


_LOSS_CLASSES: dict[str, type[ClassificationLoss]] = {
    "ce": CrossEntropy,
    "lr": ReweightedCrossEntropy,
    "focal": FocalLoss,
    "cm": ClassMarginCrossEntropy,
}


def build_classification_loss(
    name: str, instance_counts: Sequence[int], activation: Any = None, **kwargs: Any
) -> nn.Module:
    """The box-head classification loss called ``name``.

    Args:
        name: ``ce``, ``lr`` (kwargs ``n``, ``lo``, ``hi``), ``focal`` (``gamma``, ``alpha``) or
            ``cm`` (``c``).
        instance_counts: ``(C,)`` training instance count of labels ``1..C``, in label order.
        activation: the classifier's :class:`~simcal.modeling.predictors.Activation` (default:
            softmax). ``ce`` is its own cross-entropy; the other losses need softmax logits.
        **kwargs: override the defaults of the chosen loss (see :data:`LOSS_NAMES`).

    Returns:
        A module ``(logits (R, K), labels (R,)) -> scalar``; picklable, and its weight / margin
        buffers move with ``.to(device)``.

    Raises:
        ValueError: unknown ``name``, a keyword argument the loss does not take, or a loss that
            does not fit the classifier's logits.
    """
    if name not in LOSS_NAMES:
        valid = ", ".join(LOSS_NAMES)
        raise ValueError(f"unknown classification loss {name!r}; expected one of {valid}")
    unknown = sorted(set(kwargs) - set(LOSS_NAMES[name]))
    if unknown:
        allowed = ", ".join(LOSS_NAMES[name]) or "none"
        raise ValueError(f"loss {name!r} does not take {', '.join(unknown)} (accepted: {allowed})")
    if name == "ce" and activation is not None:
        return activation.cross_entropy_loss()
    if activation is not None and not loss_fits(_LOSS_CLASSES[name], activation):
        raise ValueError(f"the {name!r} loss expects softmax logits, this classifier is {activation.name}")
    if name == "ce":
        return CrossEntropy()
    if name == "lr":
        return ReweightedCrossEntropy(lr_class_weights(instance_counts, **kwargs))
    if name == "focal":
        return FocalLoss(**kwargs)
    return ClassMarginCrossEntropy(cm_margins(instance_counts, **kwargs))
