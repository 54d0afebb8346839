"""Calibrated classification heads that SimCal trains on the frozen detector's RoI features.

After normal training every detector parameter is frozen; SimCal trains only a new classification
head on the pooled RoI features ``(R, C_fpn, 7, 7)`` (paper Sec. 4.2, Fig. 4b, Table 10). The head
maps them to logits ``(R, K)`` like the original ``box_head`` + ``box_predictor.cls_score``, and
to class scores ``(R, C+1)`` (column 0 background) with the original classifier's activation
(:meth:`CalibratedHead.scores`; softmax for the paper's heads, so ``K = C + 1``). Kinds
(:data:`simcal.choices.CALIBRATED_HEADS`):

- ``3fc_ft`` (default): copies of the trained ``box_head.fc6`` (``C_fpn*49 -> D``), ``box_head.fc7``
  (``D -> D``) and ``box_predictor.cls_score`` (``D -> C+1``), ReLU after fc6 and fc7. Before any
  training its logits equal the original head's, so calibration starts from the trained classifier.
- ``3fc_rand``: the same three layers, randomly initialised (seeded; PyTorch's default ``nn.Linear``
  init, which is what torchvision's ``TwoMLPHead`` and ``FastRCNNPredictor`` use).
- ``2fc_rand``: ``fc6`` (``C_fpn*49 -> D``) + ReLU + ``cls_score`` (``D -> C+1``), random init.
- ``ncm``: nearest class mean on the ``D``-d representation of frozen copies of the trained fc6/fc7:
  ``logit_c = NCM_SCALE * cos(feature, mean_c)`` for the labels ``0..C`` (background included),
  scored with a softmax whatever the detector's classifier. The means are buffers filled by
  :meth:`CalibratedHead.ncm_accumulate` + :meth:`CalibratedHead.ncm_finalize`;
  classes never seen get :data:`UNSEEN_LOGIT`. Nothing trains.

Which layers train (``layers``, :data:`simcal.choices.LAYERS`, Table 10): ``all3`` every layer, ``last2``
fc7 + cls_score, ``last1`` cls_score only; the rest get ``requires_grad=False``. For ``2fc_rand``,
``last1`` trains ``cls_score`` only and ``last2``/``all3`` both layers. ``ncm`` ignores it.

Every head holds its own tensors (never the detector's), so ``head.state_dict()`` is
self-contained; :func:`save_head` / :func:`load_head` write and read it with the kind and layers.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from simcal import choices
from simcal.errors import InputError
from simcal.io import load_checkpoint, save_checkpoint
from simcal.modeling.predictors import Activation, Softmax, activation_from_state, build_activation, classifier_state

#: Temperature of the NCM cosine logits: ``logit = NCM_SCALE * cos`` lies in ``[-16, 16]``, enough for
#: a softmax over the C+1 columns to be peaked, as in cosine classifiers with a fixed scale.
NCM_SCALE = 16.0
#: Logit of a class the NCM head never saw: finite (no NaN from ``-inf - -inf``; representable in
#: float16) and far below any cosine logit, so its softmax probability is 0 to float precision.
UNSEEN_LOGIT = -1.0e4

HEAD_FORMAT = "simcal.calibrated_head"
HEAD_FORMAT_VERSION = 1

# Which layers train, per kind and layer choice.
_TRAINABLE: dict[str, dict[str, tuple[str, ...]]] = {
    "3fc_ft": {"all3": ("fc6", "fc7", "cls_score"), "last2": ("fc7", "cls_score"), "last1": ("cls_score",)},
    "3fc_rand": {"all3": ("fc6", "fc7", "cls_score"), "last2": ("fc7", "cls_score"), "last1": ("cls_score",)},
    "2fc_rand": {"all3": ("fc6", "cls_score"), "last2": ("fc6", "cls_score"), "last1": ("cls_score",)},
    "ncm": {"all3": (), "last2": (), "last1": ()},
}


#: How each kind makes its layers: copies of the detector's trained ``(fc6, fc7, cls_score)``, or
#: seeded random ones; and which of those layers it has (in the order a random init makes them).
_MADE: dict[str, tuple[str, tuple[str, ...]]] = {
    "3fc_ft": ("copy", ("fc6", "fc7", "cls_score")),
    "ncm": ("copy", ("fc6", "fc7")),
    "3fc_rand": ("random", ("fc6", "fc7", "cls_score")),
    "2fc_rand": ("random", ("fc6", "cls_score")),
}


def _check_choice(kind: str, layers: str) -> None:
    if kind not in choices.CALIBRATED_HEADS:
        raise InputError(
            "calibration.head", "head", f"expected one of {', '.join(choices.CALIBRATED_HEADS)}, got {kind!r}"
        )
    if layers not in choices.LAYERS:
        raise InputError("calibration.layers", "layers", f"expected one of {', '.join(choices.LAYERS)}, got {layers!r}")


def _stage_parts(roi_heads: nn.Module, stage: int) -> tuple[nn.Module, nn.Module]:
    """``(box head, box predictor)`` of a cascade's ``stage``, or of the one stage of a standard head."""
    if stage == 0 and not hasattr(roi_heads, "stage_parts"):
        return roi_heads.box_head, roi_heads.box_predictor
    if not hasattr(roi_heads, "stage_parts") or stage >= roi_heads.num_stages:
        raise TypeError(f"the detector has no box stage {stage + 1}")
    return roi_heads.stage_parts(stage)


def _source_layers(roi_heads: nn.Module, stage: int = 0) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
    """The trained ``(fc6, fc7, cls_score)`` of a torchvision-style RoIHeads (of its box ``stage``
    on a cascade), shapes checked."""
    box_head, box_predictor = _stage_parts(roi_heads, stage)
    try:
        fc6, fc7 = box_head.fc6, box_head.fc7
        cls = box_predictor.cls_score
    except AttributeError:
        raise TypeError("roi_heads needs box_head.fc6, box_head.fc7 (TwoMLPHead) and box_predictor.cls_score") from None
    if not all(isinstance(m, nn.Linear) for m in (fc6, fc7, cls)):
        raise TypeError("box_head.fc6, box_head.fc7 and box_predictor.cls_score must be nn.Linear")
    d = fc6.out_features
    if fc7.in_features != d or fc7.out_features != d or cls.in_features != d:
        raise TypeError(
            f"inconsistent box head widths: fc6 -> {d}, fc7 {fc7.in_features} -> {fc7.out_features}, "
            f"cls_score {cls.in_features} -> {cls.out_features}"
        )
    return fc6, fc7, cls


class CalibratedHead(nn.Module):
    """A classification head on pooled RoI features: ``(R, C_fpn, 7, 7)`` or ``(R, C_fpn*49)`` -> logits ``(R, K)``.

    Build it with :func:`build_calibrated_head`. The head is :meth:`representation` (every layer but
    the last, ``(R, D)``) followed by :meth:`classify` (the last fc, or the NCM cosine).

    Attributes:
        kind: one of :data:`simcal.choices.CALIBRATED_HEADS`.
        layers: one of :data:`simcal.choices.LAYERS` (which layers train).
        seed: the seed of the random init (kept for the record; unused by ``3fc_ft``/``ncm``).
        in_features: ``C_fpn * 7 * 7``; ``representation_size``: ``D``; ``num_outputs``: ``K``
            (``C + 1`` for ``ncm``).
        activation: logits -> scores ``(R, C+1)``: the detector classifier's (softmax for ``ncm``).
        fc6, fc7 (absent for ``2fc_rand``), cls_score (absent for ``ncm``): the ``nn.Linear`` layers.
        ncm_sums ``(C+1, D)`` float64, ncm_counts ``(C+1,)`` int64, ncm_means ``(C+1, D)``,
        ncm_valid ``(C+1,)`` bool: NCM buffers (``ncm`` only), all in the state dict.
    """

    def __init__(
        self,
        kind: str,
        *,
        in_features: int,
        representation_size: int,
        num_outputs: int,
        layers: str = "all3",
        seed: int = 0,
        source: tuple[nn.Linear, nn.Linear, nn.Linear] | None = None,
        activation: Activation | None = None,
    ) -> None:
        """Create the layers of ``kind``: copies of ``source`` (``(fc6, fc7, cls_score)``, needed by
        ``3fc_ft`` and ``ncm``) or seeded random ones, then apply the ``layers`` freezing."""
        super().__init__()
        _check_choice(kind, layers)
        self.kind = kind
        self.layers = layers
        self.seed = seed
        self.in_features = in_features
        self.representation_size = representation_size
        self.num_outputs = num_outputs
        self.scale = NCM_SCALE
        self.activation = Softmax() if activation is None or not self.uses_classifier else activation

        made, names = _MADE[kind]
        if made == "copy":
            if source is None:
                raise ValueError(f"kind {kind!r} copies the trained layers: pass source=(fc6, fc7, cls_score)")
            trained = dict(zip(("fc6", "fc7", "cls_score"), source))
            fcs = [copy.deepcopy(trained[name]) for name in names]
        else:
            dims = {
                "fc6": (in_features, representation_size),
                "fc7": (representation_size, representation_size),
                "cls_score": (representation_size, num_outputs),
            }
            # A private RNG stream: the same seed gives the same head, and the global RNG is untouched.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                fcs = [nn.Linear(*dims[name]) for name in names]
            if source is not None:
                ref = source[0].weight
                fcs = [fc.to(device=ref.device, dtype=ref.dtype) for fc in fcs]
        for name, fc in zip(names, fcs):
            setattr(self, name, fc)

        self._buffers_of_kind()
        trainable = set(_TRAINABLE[kind][layers])
        for name, module in self.named_children():
            module.requires_grad_(name in trainable)

    def _buffers_of_kind(self) -> None:
        """State a kind keeps beyond its layers (none here; :class:`NCMHead`'s class sums)."""

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, layers={self.layers!r}"

    #: scores with the detector's (or a decoupled loss's) classifier; False: its own softmax
    uses_classifier: bool = True

    @classmethod
    def num_logits(cls, classifier: Activation, num_classes: int) -> int:
        """``K``, the head's outputs for ``num_classes`` foreground classes under ``classifier``."""
        return classifier.num_logits(num_classes)

    @property
    def copies_classifier(self) -> bool:
        """The class-score layer is a copy of the detector's (``3fc_ft``)."""
        made, names = _MADE[self.kind]
        return made == "copy" and "cls_score" in names

    # ------------------------------------------------------------------ the calibration loop's hooks
    #: the loop computes the detector's box-head features of the RoIs for :meth:`observe`
    needs_box_feats: bool = False
    #: snapshots of the head during calibration (``--snapshot-every``) mean something for this kind
    takes_snapshots: bool = True

    def observe(self, batch: Any) -> None:
        """Learn from a calibration batch without gradients (``pooled``, ``labels (R,)``, ``box_feats``);
        a kind trained by the optimiser (:meth:`trainable_parameters`) learns nothing here."""

    def sync(self, reduce: Callable[[Tensor], Tensor], rank: int, keep_on_rank0: bool) -> None:
        """Combine what :meth:`observe` gathered over the processes (``reduce``: the sum over them);
        ``keep_on_rank0``: afterwards only rank 0 holds it (a checkpoint's), else every process."""

    def resumed(self, rank: int) -> None:
        """After a checkpoint was loaded into every process: state that only rank 0 may hold is cleared."""

    def finalize(self) -> None:
        """After the last step (and :meth:`sync`): derive what the head scores with."""

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the calibration optimiser updates (empty for ``ncm``)."""
        return [p for p in self.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ forward
    def representation(self, x: Tensor) -> Tensor:
        """Pooled ``(R, C_fpn, 7, 7)`` or flat ``(R, C_fpn*49)`` -> hidden features ``(R, D)`` (after ReLU).

        For ``3fc_ft`` before training and for ``ncm`` this equals the detector's box-head features.
        """
        x = x.flatten(start_dim=1)
        x = F.relu(self.fc6(x))
        if hasattr(self, "fc7"):
            x = F.relu(self.fc7(x))
        return x

    def classify(self, feats: Tensor) -> Tensor:
        """Hidden features ``(R, D)`` -> logits ``(R, C+1)``: the last fc, or NCM cosine logits.

        NCM: ``NCM_SCALE * cos(feats, mean_c)`` for classes seen by :meth:`ncm_finalize`,
        :data:`UNSEEN_LOGIT` for the others.
        """
        return self.cls_score(feats)

    def forward(self, x: Tensor) -> Tensor:
        """Pooled RoI features ``(R, C_fpn, 7, 7)`` or ``(R, C_fpn*49)`` -> logits ``(R, K)``."""
        return self.classify(self.representation(x))

    def scores(self, x: Tensor) -> Tensor:
        """Pooled RoI features -> class scores ``(R, C+1)``, column 0 background (the activation of the logits)."""
        return self.activation(self(x))

    def batch_scores(self, batch: Any) -> Tensor:
        """Scores ``(R, C+1)`` of an inference :class:`~simcal.modeling.roi_heads.RoIBatch` (its pooled features)."""
        return self.scores(batch.pooled)

    def stage_heads(self) -> list[tuple[int, CalibratedHead]]:
        """``[(box stage, head)]``: this head calibrates the one stage of a standard detector."""
        return [(0, self)]


class NCMHead(CalibratedHead):
    """``ncm``: nearest class mean on the representation of frozen copies of the trained fc6/fc7;
    no gradient step: the loop's :meth:`observe` adds each batch's RoIs to per-class sums, and
    :meth:`finalize` turns them into means. Buffers (all in the state dict): ncm_sums ``(C+1, D)``
    float64, ncm_counts ``(C+1,)`` int64, ncm_means ``(C+1, D)``, ncm_valid ``(C+1,)`` bool."""

    needs_box_feats = True
    takes_snapshots = False  # the means exist only once the sums are complete
    uses_classifier = False  # a softmax over its cosine logits

    @classmethod
    def num_logits(cls, classifier: Activation, num_classes: int) -> int:
        return num_classes + 1  # a mean per class and the background's

    def _buffers_of_kind(self) -> None:
        ref = self.fc6.weight
        c1, d = self.num_outputs, self.representation_size
        self.register_buffer("ncm_sums", torch.zeros(c1, d, dtype=torch.float64, device=ref.device))
        self.register_buffer("ncm_counts", torch.zeros(c1, dtype=torch.int64, device=ref.device))
        self.register_buffer("ncm_means", torch.zeros(c1, d, dtype=ref.dtype, device=ref.device))
        self.register_buffer("ncm_valid", torch.zeros(c1, dtype=torch.bool, device=ref.device))

    def classify(self, feats: Tensor) -> Tensor:
        """``NCM_SCALE * cos(feats, mean_c)`` ``(R, C+1)`` for classes seen by :meth:`ncm_finalize`,
        :data:`UNSEEN_LOGIT` for the others."""
        valid = self.ncm_valid
        if not bool(valid.any()):
            raise RuntimeError("the NCM head has no class means: call ncm_accumulate and ncm_finalize first")
        means = self.ncm_means.to(feats.dtype)
        cos = F.normalize(feats, dim=1) @ F.normalize(means, dim=1).t()
        return torch.where(valid, self.scale * cos, torch.full_like(cos, UNSEEN_LOGIT))

    def observe(self, batch: Any) -> None:
        self.ncm_accumulate(batch.box_feats, batch.labels)

    def sync(self, reduce: Callable[[Tensor], Tensor], rank: int, keep_on_rank0: bool) -> None:
        self.ncm_sums.copy_(reduce(self.ncm_sums))
        self.ncm_counts.copy_(reduce(self.ncm_counts))
        if keep_on_rank0 and rank != 0:
            self.resumed(rank)

    def resumed(self, rank: int) -> None:
        if rank != 0:  # rank 0's checkpoint holds every process's sums so far
            self.ncm_sums.zero_()
            self.ncm_counts.zero_()

    def finalize(self) -> None:
        self.ncm_finalize()

    @torch.no_grad()
    def ncm_accumulate(self, features: Tensor, labels: Tensor) -> None:
        """Add RoIs to the per-class sums.

        Args:
            features: ``(R, D)`` representations, i.e. :meth:`representation` of the pooled features
                (equal to the detector's box-head features ``box_feats``).
            labels: ``(R,)`` integers in ``0..C``, 0 = background.
        """
        if features.dim() != 2 or features.shape[1] != self.representation_size:
            raise ValueError(f"features must be (R, {self.representation_size}), got {tuple(features.shape)}")
        if labels.shape != (features.shape[0],):
            raise ValueError(f"labels must be ({features.shape[0]},), got {tuple(labels.shape)}")
        if labels.numel() == 0:
            return
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"labels must be integers, got {labels.dtype}")
        labels = labels.to(device=self.ncm_sums.device, dtype=torch.int64)
        if int(labels.min()) < 0 or int(labels.max()) >= self.num_outputs:
            raise ValueError(
                f"labels must lie in 0..{self.num_outputs - 1}, got {int(labels.min())}..{int(labels.max())}"
            )
        self.ncm_sums.index_add_(0, labels, features.detach().to(self.ncm_sums))
        self.ncm_counts += torch.bincount(labels, minlength=self.num_outputs)

    @torch.no_grad()
    def ncm_finalize(self) -> None:
        """Means ``(C+1, D)`` from everything accumulated so far; classes with no RoI become invalid.

        May be called again after more :meth:`ncm_accumulate` calls (it recomputes from the sums).
        """
        counts = self.ncm_counts.clamp(min=1).to(self.ncm_sums.dtype)
        self.ncm_means.copy_(self.ncm_sums / counts[:, None])
        self.ncm_valid.copy_(self.ncm_counts > 0)


#: ``calibration.head`` -> its class (the fc kinds differ only in their layers: :data:`_TRAINABLE`)
HEAD_CLASSES: dict[str, type[CalibratedHead]] = {
    "3fc_ft": CalibratedHead,
    "2fc_rand": CalibratedHead,
    "3fc_rand": CalibratedHead,
    "ncm": NCMHead,
}


class StagedHead(nn.Module):
    """SimCal on a cascade: a :class:`CalibratedHead` for each calibrated box stage.

    Scores of an inference batch (:meth:`batch_scores`): every stage's logits on that stage's own
    input boxes (the calibrated head's on the stage's pooled features, the original classifier's
    for a stage not calibrated), averaged as the cascade averages them (logits, or probabilities
    with ``mean_probs``), then the activation: the calibrated counterpart of the cascade's score,
    so ``dual`` picks between the two averaged score vectors (METHOD.md, "Multi-stage models").

    Attributes:
        stages: the calibrated stages (0-based), ``heads``: their heads (``nn.ModuleList``, aligned).
        num_stages: the cascade's stages; mean_probs: the cascade's averaging.
        kind, layers, seed, in_features, representation_size, num_outputs: the stage heads' (equal).
    """

    def __init__(self, heads: list[CalibratedHead], stages: list[int], num_stages: int, mean_probs: bool) -> None:
        super().__init__()
        if not heads or len(heads) != len(stages):
            raise ValueError("one head per calibrated stage")
        self.heads = nn.ModuleList(heads)
        self.stages = list(stages)
        self.num_stages = num_stages
        self.mean_probs = mean_probs
        first = heads[0]
        self.kind, self.layers, self.seed = first.kind, first.layers, first.seed
        self.in_features, self.representation_size = first.in_features, first.representation_size
        self.num_outputs, self.activation = first.num_outputs, first.activation

    def extra_repr(self) -> str:
        return f"stages={[s + 1 for s in self.stages]} of {self.num_stages}"

    def stage_heads(self) -> list[tuple[int, CalibratedHead]]:
        """``[(box stage, its calibrated head)]``."""
        return list(zip(self.stages, self.heads))  # type: ignore[arg-type]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for h in self.heads for p in h.trainable_parameters()]  # type: ignore[attr-defined]

    def batch_scores(self, batch: Any) -> Tensor:
        """Scores ``(R, C+1)`` of a cascade's :class:`~simcal.modeling.roi_heads.RoIBatch`
        (``stage_pooled`` / ``stage_logits``: per stage ``(R, C_fpn, 7, 7)`` / ``(R, K)``)."""
        if batch.stage_pooled is None or len(batch.stage_pooled) != self.num_stages:
            raise ValueError(f"a {self.num_stages}-stage head needs a cascade's per-stage RoI features")
        mine = dict(zip(self.stages, self.heads))
        logits = [
            mine[k](batch.stage_pooled[k]) if k in mine else batch.stage_logits[k] for k in range(self.num_stages)
        ]
        if self.mean_probs:
            return torch.stack([self.activation(z) for z in logits]).mean(0)
        return self.activation(torch.stack(logits).mean(0))


def build_staged_head(
    kind: str,
    roi_heads: nn.Module,
    *,
    layers: str = "all3",
    seed: int = 0,
    stages: str | list[int] = "all",
    classifier: Activation | None = None,
) -> StagedHead:
    """A :class:`StagedHead` for a cascade: one :func:`build_calibrated_head` per stage of
    ``stages`` (``all``, ``last`` or a list of 0-based stages; stage k's random kinds seeded
    ``seed + k``)."""
    n = roi_heads.num_stages
    chosen = list(range(n)) if stages == "all" else [n - 1] if stages == "last" else sorted(stages)  # type: ignore[arg-type]
    heads = [
        build_calibrated_head(kind, roi_heads, layers=layers, seed=seed + k, stage=k, classifier=classifier)
        for k in chosen
    ]
    return StagedHead(heads, chosen, n, bool(getattr(roi_heads, "mean_probs", False)))


def build_calibrated_head(
    kind: str,
    roi_heads: nn.Module,
    *,
    layers: str = "all3",
    seed: int = 0,
    stage: int = 0,
    classifier: Activation | None = None,
) -> CalibratedHead:
    """The calibrated head of ``kind`` for the detector whose RoI heads are ``roi_heads`` (for its
    box ``stage`` on a cascade).

    Shapes come from the trained ``box_head.fc6`` (``C_fpn*49 -> D``) and ``box_predictor.cls_score``
    (``D -> K``); ``3fc_ft`` and ``ncm`` copy their weights (never share them), random kinds are
    seeded by ``seed``. The head scores with the box predictor's activation, and lives on the
    device and dtype of the trained layers.

    ``classifier``: a decoupled loss's own classifier (Seesaw's C+2, a sigmoid one, BAGS's group
    softmax) when it is not the detector's: the head's class-score layer then has that
    classifier's K outputs; for ``3fc_ft`` each label's row (and the background's, where both
    classifiers have one) is copied from the trained layer (:meth:`Activation.label_rows`), the
    rest (objectness, "others") start fresh, seeded by ``seed``.
    """
    _check_choice(kind, layers)
    fc6, fc7, cls = _source_layers(roi_heads, stage)
    predictor = _stage_parts(roi_heads, stage)[1]
    own, head_class = predictor.activation, HEAD_CLASSES[kind]
    if classifier is None or not head_class.uses_classifier or _same_classifier(classifier, own):
        classifier = own
    head = head_class(
        kind,
        in_features=fc6.in_features,
        representation_size=fc6.out_features,
        num_outputs=head_class.num_logits(classifier, predictor.num_classes),
        layers=layers,
        seed=seed,
        source=(fc6, fc7, cls),
        activation=classifier,
    )
    if classifier is not own and head.copies_classifier:
        head.cls_score = _transplanted(cls, own, classifier, predictor.num_classes, seed)
        head.cls_score.requires_grad_(True)
    return head


def decoupled_classifier(loss: str, instance_counts: list[int]) -> Activation | None:
    """The classifier a calibration ``loss`` trains on the frozen detector: the detector's own for
    ``ce`` (None), the loss's for the methods beyond the paper (its :data:`simcal.choices.LOSSES` row:
    Seesaw's C+2, a sigmoid one, BAGS's group softmax over ``instance_counts``), else softmax."""
    if loss == "ce":
        return None
    return build_activation(choices.LOSSES[loss].classifier, list(instance_counts))


def _same_classifier(a: Activation, b: Activation) -> bool:
    return a.name == b.name and getattr(a, "groups", None) == getattr(b, "groups", None)


def _transplanted(cls: nn.Linear, own: Activation, new: Activation, num_classes: int, seed: int) -> nn.Linear:
    """A class-score layer for ``new`` (same kind of layer as ``cls``): seeded fresh rows, then each
    label's row copied from ``cls`` (scored by ``own``) where both classifiers have one."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layer = type(cls)(cls.in_features, new.num_logits(num_classes))
    layer = layer.to(device=cls.weight.device, dtype=cls.weight.dtype)
    with torch.no_grad():
        for src, dst in zip(own.label_rows(num_classes), new.label_rows(num_classes)):
            if src is not None and dst is not None:
                layer.weight[dst] = cls.weight[src]
                layer.bias[dst] = cls.bias[src]
    for attr in ("temperature", "eps"):  # a normalised layer keeps its settings
        if hasattr(cls, attr):
            setattr(layer, attr, getattr(cls, attr))
    return layer


def save_head(head: CalibratedHead | StagedHead, path: str | os.PathLike[str], meta: Mapping[str, Any]) -> None:
    """Write ``head`` atomically with ``meta`` (any picklable fields: steps, config, ...).

    The file holds ``{"format", "version", "meta", "state_dict"}``; ``meta`` gets the head's
    ``kind``, ``layers``, ``seed`` and shapes added (a conflicting ``kind``/``layers`` in ``meta``
    is a ``ValueError``).
    """
    record = {
        "kind": head.kind,
        "layers": head.layers,
        "seed": head.seed,
        "in_features": head.in_features,
        "representation_size": head.representation_size,
        "num_outputs": head.num_outputs,
    }
    if isinstance(head, StagedHead):  # a cascade's: which stages, of how many
        record.update(stages=list(head.stages), num_stages=head.num_stages)
    own = classifier_state(head.activation)  # a decoupled loss's own classifier, or the detector's
    record["classifier"] = own["name"]
    if "groups" in own:
        record["classifier_groups"] = own["groups"]
    for key in ("kind", "layers"):
        if key in meta and meta[key] != record[key]:
            raise ValueError(f"meta[{key!r}] = {meta[key]!r} but the head's is {record[key]!r}")
    state = {
        "format": HEAD_FORMAT,
        "version": HEAD_FORMAT_VERSION,
        "meta": {**dict(meta), **record},
        "state_dict": {k: v.detach().cpu() for k, v in head.state_dict().items()},
    }
    save_checkpoint(path, state)


def load_head(path: str | os.PathLike[str], roi_heads: nn.Module) -> tuple[CalibratedHead | StagedHead, dict[str, Any]]:
    """Read a head written by :func:`save_head` for the detector whose RoI heads are ``roi_heads``.

    Returns ``(head, meta)``: the head rebuilt with the saved kind and layers (and their freezing),
    on the device of ``roi_heads``, with the saved weights. A missing, unreadable or malformed file,
    or one whose shapes do not fit ``roi_heads``, is an :class:`InputError` naming the file.
    """
    path = Path(path)
    state = load_checkpoint(path)
    if not isinstance(state, dict) or state.get("format") != HEAD_FORMAT:
        raise InputError(path, "format", f"not a calibrated head file (expected format {HEAD_FORMAT!r})")
    if state.get("version") != HEAD_FORMAT_VERSION:
        raise InputError(path, "version", f"expected {HEAD_FORMAT_VERSION}, got {state.get('version')!r}")
    meta, weights = state.get("meta"), state.get("state_dict")
    if not isinstance(meta, dict):
        raise InputError(path, "meta", "missing or not a dict")
    if not isinstance(weights, dict) or not all(isinstance(v, Tensor) for v in weights.values()):
        raise InputError(path, "state_dict", "missing or not a dict of tensors")
    kind, layers = meta.get("kind"), meta.get("layers")
    if kind not in choices.CALIBRATED_HEADS:
        raise InputError(path, "meta.kind", f"expected one of {', '.join(choices.CALIBRATED_HEADS)}, got {kind!r}")
    if layers not in choices.LAYERS:
        raise InputError(path, "meta.layers", f"expected one of {', '.join(choices.LAYERS)}, got {layers!r}")
    seed = meta.get("seed", 0)
    seed = seed if isinstance(seed, int) else 0
    classifier = None
    own = _stage_parts(roi_heads, 0)[1].activation
    # None (a head from before decoupled classifiers) or the detector's own: built from the detector
    if meta.get("classifier") not in (None, own.name):
        try:
            classifier = activation_from_state({"name": meta["classifier"], "groups": meta.get("classifier_groups")})
        except ValueError as e:
            raise InputError(path, "meta.classifier", str(e)) from None
    stages, detector_stages = meta.get("stages"), getattr(roi_heads, "num_stages", 1)
    if stages is not None or detector_stages > 1:
        if stages is None or meta.get("num_stages") != detector_stages:
            made = f"a {meta.get('num_stages')}-stage cascade" if stages is not None else "a one-stage detector"
            raise InputError(
                path, "meta.stages", f"a head calibrated for {made}, this detector has {detector_stages} box stages"
            )
        head: CalibratedHead | StagedHead = build_staged_head(
            kind, roi_heads, layers=layers, seed=seed, stages=[int(k) for k in stages], classifier=classifier
        )
    else:
        head = build_calibrated_head(kind, roi_heads, layers=layers, seed=seed, classifier=classifier)
    for key in ("in_features", "representation_size", "num_outputs"):
        if key in meta and meta[key] != getattr(head, key):
            raise InputError(path, f"meta.{key}", f"the file has {meta[key]!r}, this detector {getattr(head, key)!r}")
    try:
        head.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        msg = " ".join(str(e).split())
        raise InputError(path, "state_dict", f"does not fit a {kind} head of this detector: {msg}") from None
    return head, meta
