"""The RoI box predictor: the one home of scoring.

``features (R, D) -> logits (R, K) -> class scores (R, C+1)``, column 0 the background, plus box
deltas. Everything that scores RoIs goes through here: training (the classification loss),
predict (every head), calibrate (the calibrated head scores with the same activation), and the
analysis tools. detectron2's ``FastRCNNOutputLayers.predict_probs`` is the model.

How logits become scores belongs to the classifier, as an :class:`Activation`:

- :class:`Softmax` (the paper's, and today's only built-in): ``K = C + 1`` logits, column 0 the
  background, ``scores = softmax(logits)``, trained with softmax cross-entropy.
- a sigmoid classifier has ``K = C`` logits and derives the background column; a Seesaw-style
  classifier has ``K = C + 2`` (C class logits and two objectness logits). Either is a subclass of
  :class:`Activation` with its own ``num_logits``, ``forward`` and ``cross_entropy_loss``; nothing
  outside ``modeling/`` changes (the tests run such doubles through train, calibrate and predict).

:func:`build_activation` is the factory the detector builder calls.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor

from simcal.modeling.losses import (
    ClassificationLoss,
    CrossEntropy,
    GroupSoftmaxLoss,
    ObjectnessCrossEntropy,
    SigmoidCrossEntropy,
    group_of_counts,
    group_softmax_layout,
    loss_fits,
)


class Activation:
    """Logits ``(R, K)`` -> class scores ``(R, C+1)``, column 0 background; and the classifier's own loss.

    Subclasses set :attr:`name`, :attr:`cross_entropy_loss` (the :class:`ClassificationLoss`
    class that ``loss: ce`` means for this classifier) and implement :meth:`num_logits` and
    :meth:`forward`. An activation holds no parameters (a plain object, not a module), so
    checkpoints do not depend on it.
    """

    name: str = ""
    cross_entropy_loss: type[nn.Module] = CrossEntropy
    #: whether each row of scores sums to 1 (softmax: yes; independent sigmoids: no). The post-hoc
    #: calibrations renormalise the foreground only for normalised scores.
    normalized: bool = True

    def num_logits(self, num_classes: int) -> int:  # pragma: no cover - abstract
        """K, the classifier's outputs for ``num_classes`` foreground classes."""
        raise NotImplementedError

    def forward(self, logits: Tensor) -> Tensor:  # pragma: no cover - abstract
        """Scores ``(R, C+1)`` in [0, 1]; column 0 background, column j the class of label j."""
        raise NotImplementedError

    def __call__(self, logits: Tensor) -> Tensor:
        return self.forward(logits)

    def label_rows(self, num_classes: int) -> list[int | None]:
        """The logit (row of the class-score layer) of each label ``0..C`` (0 the background), or
        None where the classifier has none of its own: how a classifier of another kind is
        initialised from this one (a decoupled loss on a trained detector)."""
        return list(range(num_classes + 1))

    def log_scores(self, logits: Tensor) -> Tensor:
        """``log`` of the scores ``(R, C+1)``, without underflow where the activation allows
        (the post-hoc calibrations reweight in log space). Default: the log of :meth:`forward`."""
        scores = self.forward(logits)
        return torch.log(scores.clamp(min=torch.finfo(scores.dtype).tiny))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Softmax(Activation):
    """``K = C + 1`` logits (column 0 background); scores are their softmax."""

    name = "softmax"
    cross_entropy_loss = CrossEntropy

    def num_logits(self, num_classes: int) -> int:
        return num_classes + 1

    def forward(self, logits: Tensor) -> Tensor:
        return F.softmax(logits, -1)

    def log_scores(self, logits: Tensor) -> Tensor:
        return F.log_softmax(logits, -1)


class Sigmoid(Activation):
    """``K = C`` logits, one independent sigmoid per class (EQLv2, the federated loss).

    Foreground scores are the sigmoids; the background column (never a detection) is the
    probability that no class fires, ``prod_j (1 - p_j)``. Rows do not sum to 1.
    """

    name = "sigmoid"
    cross_entropy_loss = SigmoidCrossEntropy
    normalized = False

    def num_logits(self, num_classes: int) -> int:
        return num_classes

    def label_rows(self, num_classes: int) -> list[int | None]:
        return [None, *range(num_classes)]

    def forward(self, logits: Tensor) -> Tensor:
        return self.log_scores(logits).exp()

    def log_scores(self, logits: Tensor) -> Tensor:
        return torch.cat([F.logsigmoid(-logits).sum(1, keepdim=True), F.logsigmoid(logits)], dim=1)


class Objectness(Activation):
    """``K = C + 2`` logits (Seesaw's classifier): C class logits, then objectness ``(object,
    background)``. Score of class j = P(object) x softmax over the classes; background = P(background)."""

    name = "seesaw"
    cross_entropy_loss = ObjectnessCrossEntropy

    def num_logits(self, num_classes: int) -> int:
        return num_classes + 2

    def label_rows(self, num_classes: int) -> list[int | None]:
        return [num_classes + 1, *range(num_classes)]

    def forward(self, logits: Tensor) -> Tensor:
        return self.log_scores(logits).exp()

    def log_scores(self, logits: Tensor) -> Tensor:
        obj = F.log_softmax(logits[:, -2:], dim=1)
        return torch.cat([obj[:, 1:], obj[:, :1] + F.log_softmax(logits[:, :-2], dim=1)], dim=1)


class GroupSoftmax(Activation):
    """BAGS's balanced group softmax: ``K = C + G + 2`` logits in groups of classes by training
    instance count (:func:`~simcal.modeling.losses.group_softmax_layout`), each with an "others"
    column, plus the background group ``(others, background)``. Score of class j = its group's
    softmax at j x P(object) of the background group; background = the background group's P(background).

    Args:
        groups: ``(C,)`` the group of each class in label order
            (:func:`~simcal.modeling.losses.group_of_counts` of the training instance counts).
    """

    name = "group_softmax"
    normalized = False

    def __init__(self, groups: list[int], num_groups: int = 4) -> None:
        self.groups, self.num_groups = [int(g) for g in groups], num_groups
        self._members, self._column = group_softmax_layout(self.groups, num_groups)
        self.cross_entropy_loss = functools.partial(GroupSoftmaxLoss, self.groups, num_groups)

    def num_logits(self, num_classes: int) -> int:
        if num_classes != len(self.groups):
            raise ValueError(f"{num_classes} classes, {len(self.groups)} class groups")
        return num_classes + self.num_groups + 2

    def label_rows(self, num_classes: int) -> list[int | None]:
        return [int(c) for c in self._column]

    def forward(self, logits: Tensor) -> Tensor:
        return self.log_scores(logits).exp()

    def log_scores(self, logits: Tensor) -> Tensor:
        parts, start = [], 0
        for members in self._members:
            parts.append(F.log_softmax(logits[:, start : start + 1 + len(members)], dim=1))
            start += 1 + len(members)
        bg = F.log_softmax(logits[:, start : start + 2], dim=1)
        per_column = torch.cat([*parts, bg], dim=1)  # log softmax within each group, in the logits' layout
        out = per_column[:, self._column.to(logits.device)]
        return torch.cat([out[:, :1], out[:, 1:] + bg[:, :1]], dim=1)

    def __repr__(self) -> str:
        return f"GroupSoftmax(groups={[self.groups.count(g) for g in range(self.num_groups)]})"


#: ``model.classifier`` -> its :class:`Activation` (GroupSoftmax needs the training counts)
ACTIVATIONS = {"softmax": Softmax, "sigmoid": Sigmoid, "seesaw": Objectness, "group_softmax": GroupSoftmax}


def build_activation(
    name: str = "softmax", instance_counts: list[int] | None = None, groups: list[int] | None = None
) -> Activation:
    """The activation of the classifier called ``name`` (:data:`ACTIVATIONS`); ``group_softmax``
    takes its class ``groups`` ``(C,)`` (label order) as saved (:func:`classifier_state`), or groups
    the classes by ``instance_counts`` ``(C,)``."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown classifier {name!r}; built in: {', '.join(ACTIVATIONS)}")
    if name == "group_softmax":
        if groups is not None:
            return GroupSoftmax([int(g) for g in groups])
        if instance_counts is None:
            raise ValueError("the group_softmax classifier needs the training instance counts")
        return GroupSoftmax(group_of_counts(instance_counts))
    return ACTIVATIONS[name]()


def classifier_state(activation: Activation) -> dict[str, Any]:
    """What rebuilds ``activation`` without the training annotations: ``{"name"}`` and, for the group
    softmax, ``"groups"`` ``(C,)``; saved in a detector checkpoint (``"classifier"``) and a
    calibrated head's meta. :func:`activation_from_state` reads it back."""
    groups = getattr(activation, "groups", None)
    return {"name": activation.name, **({"groups": [int(g) for g in groups]} if groups is not None else {})}


def activation_from_state(state: Any) -> Activation:
    """The activation :func:`classifier_state` described; ``ValueError`` for an unknown name or a
    group softmax without its groups."""
    name = state.get("name") if isinstance(state, dict) else None
    groups = state.get("groups") if isinstance(state, dict) else None
    if name not in ACTIVATIONS or (name == "group_softmax" and not isinstance(groups, list)):
        raise ValueError(f"unknown classifier {name!r} (or its groups are missing)")
    return build_activation(name, groups=groups)


class NormedLinear(nn.Linear):
    """The normalised (cosine) class-score layer (mmdetection's ``NormedLinear``, Seesaw's configs):
    ``logits = temperature * (x / |x|) (W / |W|)^T + b``, rows normalised with ``eps`` added.
    Its parameters are ``nn.Linear``'s (``weight``, ``bias``), so checkpoints keep their keys."""

    def __init__(self, in_features: int, out_features: int, temperature: float = 20.0, eps: float = 1e-6) -> None:
        super().__init__(in_features, out_features)
        self.temperature, self.eps = float(temperature), float(eps)

    def reset_parameters(self) -> None:
        """mmdetection's init of the class-score layer: weights N(0, 0.01), bias 0."""
        nn.init.normal_(self.weight, mean=0, std=0.01)
        nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight / (self.weight.norm(dim=1, keepdim=True) + self.eps)
        x = x / (x.norm(dim=1, keepdim=True) + self.eps)
        return F.linear(self.temperature * x, w, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, temperature={self.temperature}"


class NormedConv2d(nn.Conv2d):
    """The normalised mask-logits conv (mmdetection's ``NormedConv2d``, its Seesaw "normed mask"
    models): ``temperature * conv(x / |x|, W / |W|) + b``, ``x`` normalised over its channels at each
    pixel and each filter over its input channels (``eps`` added). ``nn.Conv2d``'s parameters, so
    checkpoints keep their keys."""

    def __init__(self, *args: object, temperature: float = 20.0, eps: float = 1e-6, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.temperature, self.eps = float(temperature), float(eps)

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight / (self.weight.norm(dim=1, keepdim=True) + self.eps)
        x = x / (x.norm(dim=1, keepdim=True) + self.eps)
        return self._conv_forward(self.temperature * x, w, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, temperature={self.temperature}"


class BoxPredictor(nn.Module):
    """Class logits, class scores and box deltas from the box head's features.

    Attributes (the state-dict keys are torchvision's ``FastRCNNPredictor``'s, so checkpoints
    load both ways):
        cls_score: ``nn.Linear(D, K)``, K = ``activation.num_logits(C)``.
        bbox_pred: ``nn.Linear(D, 4 * (C+1))``, or ``nn.Linear(D, 4)`` when class-agnostic.
        activation: logits -> scores (:class:`Activation`).
        cls_loss: ``(logits (R, K), labels (R,)) -> scalar``; default the activation's cross-entropy.
        num_classes: C, the foreground classes.
    """

    def __init__(
        self,
        cls_score: nn.Linear,
        bbox_pred: nn.Linear,
        num_classes: int,
        activation: Activation | None = None,
        cls_loss: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.activation = activation if activation is not None else Softmax()
        k = self.activation.num_logits(num_classes)
        if cls_score.out_features != k:
            raise ValueError(f"cls_score has {cls_score.out_features} outputs, the {self.activation.name} needs {k}")
        self.cls_score = cls_score
        self.bbox_pred = bbox_pred
        self.num_classes = num_classes
        self.set_loss(cls_loss if cls_loss is not None else self.activation.cross_entropy_loss())

    @classmethod
    def from_torchvision(
        cls, predictor: FastRCNNPredictor, activation: Activation | None = None, cls_loss: nn.Module | None = None
    ) -> BoxPredictor:
        """Wrap a torchvision ``FastRCNNPredictor``'s layers (shared, not copied).

        Its ``cls_score`` has ``C + 1`` outputs; an activation that needs another K gets a fresh
        ``nn.Linear(D, K)`` instead (default init).
        """
        activation = activation if activation is not None else Softmax()
        num_classes = predictor.cls_score.out_features - 1
        cls_score = predictor.cls_score
        k = activation.num_logits(num_classes)
        if cls_score.out_features != k:
            cls_score = nn.Linear(cls_score.in_features, k).to(cls_score.weight.device)
        return cls(cls_score, predictor.bbox_pred, num_classes, activation, cls_loss)

    def set_classifier(self, activation: Activation, normed: bool = False, prior_prob: float = 0.0) -> None:
        """Score with ``activation`` from now on, through a fresh class-score layer of its K outputs
        (:class:`NormedLinear` when ``normed``; the current layer is kept when it already is the
        right kind and size), trained with the activation's cross-entropy until :meth:`set_loss`.

        ``prior_prob`` in (0, 1): a sigmoid classifier starts scoring every class at that probability,
        its bias set to ``-log((1 - p) / p)`` (detectron2's ``PRIOR_PROB``); 0 keeps the layer's init.

        Raises:
            ValueError: ``prior_prob`` for a classifier that is not a sigmoid one.
        """
        if prior_prob and activation.name != "sigmoid":
            raise ValueError(f"prior_prob sets a sigmoid classifier's bias, this classifier is {activation.name}")
        k = activation.num_logits(self.num_classes)
        kind = NormedLinear if normed else nn.Linear
        if type(self.cls_score) is not kind or self.cls_score.out_features != k:
            w = self.cls_score.weight
            self.cls_score = kind(self.cls_score.in_features, k).to(device=w.device, dtype=w.dtype)
        if prior_prob:
            with torch.no_grad():
                self.cls_score.bias.fill_(-math.log((1 - prior_prob) / prior_prob))
        self.activation = activation
        self.set_loss(activation.cross_entropy_loss())

    # ------------------------------------------------------------------ loss
    def set_loss(self, loss: nn.Module) -> None:
        """Train with ``loss``: ``(logits (R, K), labels (R,)) -> scalar``, made for this activation.

        Raises:
            ValueError: the loss declares other logits (a softmax loss on a sigmoid classifier).
        """
        if not loss_fits(loss, self.activation):
            name = getattr(loss, "name", "") or type(loss).__name__
            raise ValueError(
                f"the {name!r} loss expects {getattr(loss, 'activation', '?')} logits, "
                f"this classifier is {self.activation.name}"
            )
        self.cls_loss = loss

    def classification_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """``logits (R, K)``, ``labels (R,)`` in ``0..C`` (0 = background) -> scalar."""
        return self.cls_loss(logits, labels)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, activation={self.activation.name}"

    # ------------------------------------------------------------------ inference
    @property
    def class_agnostic(self) -> bool:
        return self.bbox_pred.out_features == 4

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Box-head features ``(R, D)`` -> ``(logits (R, K), deltas (R, 4 * (C+1)) or (R, 4))``."""
        x = x.flatten(start_dim=1)
        return self.cls_score(x), self.bbox_pred(x)

    def scores(self, logits: Tensor) -> Tensor:
        """Class scores ``(R, C+1)`` of logits ``(R, K)``, column 0 background."""
        return self.activation(logits)


__all__ = [
    "ACTIVATIONS",
    "Activation",
    "BoxPredictor",
    "ClassificationLoss",
    "GroupSoftmax",
    "NormedLinear",
    "Objectness",
    "Sigmoid",
    "Softmax",
    "build_activation",
]
