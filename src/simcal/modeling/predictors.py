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

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor

from simcal.modeling.losses import ClassificationLoss, CrossEntropy, loss_fits


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


def build_activation(name: str = "softmax") -> Activation:
    """The activation of the classifier called ``name`` (``softmax``)."""
    if name != "softmax":
        raise ValueError(f"unknown classifier activation {name!r}; built in: softmax")
    return Softmax()


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


__all__ = ["Activation", "BoxPredictor", "ClassificationLoss", "Softmax", "build_activation"]
