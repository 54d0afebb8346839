"""Scorers: the ways of scoring the shared RoI features, one small class each.

A scorer maps a :class:`~simcal.modeling.roi_heads.RoIBatch` (pooled RoI features, box-head
features, the original logits, computed once per batch) to class scores ``(R, C+1)``, column 0
the background, or to a tuple of score tensors whose detections are merged after NMS (the
``det`` scheme). :meth:`LongTailRoIHeads.detect` runs any number of them on one pass; box
regression and masks always come from the original heads. The names (``simcal predict --head``)
are :data:`simcal.choices.SCORERS`:

- ``orig``: the trained classifier (:func:`original_scores`);
- ``cal``: a calibrated head alone (:class:`Calibrated`);
- ``dual``: both, merged by a combiner of :mod:`simcal.modeling.combine` (:class:`Dual`);
- ``norcal`` / ``logit-adj``: zero-training post-hoc calibration of the original scores (:class:`PostHoc`);
- ``oracle``: the analysis "props-gt": each RoI matching a ground truth at IoU >= 0.5 gets that
  class with the original foreground score (:class:`Oracle`).

Every scorer reads the original scores through the box predictor (``batch.scores``), and a
calibrated head through its own :meth:`~simcal.modeling.calibration.CalibratedHead.scores`, so a
classifier with another activation (sigmoid, C+2) needs nothing here.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from simcal import choices
from simcal.config import InferenceConfig
from simcal.errors import InputError
from simcal.modeling.combine import COMBINERS, POSTHOC, combine
from simcal.modeling.roi_heads import RoIBatch, Scorer, original_scores
from simcal.run import HeadTag


def calibrated_scores(head: nn.Module, batch: RoIBatch) -> Tensor:
    """A calibrated head's scores ``(R, C+1)`` on the batch's pooled features (a cascade's: every
    stage's, :class:`~simcal.modeling.calibration.StagedHead`), once per batch."""
    score = head.batch_scores if hasattr(head, "batch_scores") else lambda b: head.scores(b.pooled)
    return batch.memo(("cal", id(head)), lambda: score(batch))


@dataclass(frozen=True, eq=False)
class Calibrated:
    """The calibrated head alone, background column included."""

    head: nn.Module

    def __call__(self, batch: RoIBatch) -> Tensor:
        return calibrated_scores(self.head, batch)


@dataclass(frozen=True, eq=False)
class Dual:
    """Dual-head inference (Eq. 2 for ``sel``): the original and calibrated scores merged by ``combine``.

    ``counts``: ``(C,)`` training instance counts; ``T``: the head/tail threshold. ``det`` returns
    both score sets, whose detections :meth:`LongTailRoIHeads.detect` merges after NMS.
    """

    head: nn.Module
    counts: Tensor
    combine: str = "sel"
    T: float = 300.0

    def __call__(self, batch: RoIBatch) -> Tensor | tuple[Tensor, ...]:
        p_cal = calibrated_scores(self.head, batch)
        if self.combine == "det":
            return batch.scores, p_cal
        return combine(self.combine, batch.scores, p_cal, self.counts, self.T)


@dataclass(frozen=True, eq=False)
class PostHoc:
    """A post-hoc calibration (``norcal`` with gamma, ``logit-adj`` with tau = ``param``) of the original scores."""

    method: str
    counts: Tensor
    param: float = 1.0

    def __call__(self, batch: RoIBatch) -> Tensor:
        normalized = batch.predictor.activation.normalized
        return POSTHOC[self.method](batch.log_scores, self.counts, self.param, normalized=normalized)


@dataclass(frozen=True)
class Oracle:
    """props-gt: every RoI matching a ground truth at IoU >= ``iou`` takes its class, with the
    original foreground score ``1 - p_0``; other RoIs keep the original scores."""

    iou: float = 0.5

    def __call__(self, batch: RoIBatch) -> Tensor:
        matched = batch.matched_labels(self.iou)
        hit = matched > 0
        probs = batch.scores.clone()
        fg = 1 - batch.scores[hit, 0]
        probs[hit, 1:] = 0
        probs[hit, matched[hit]] = fg
        return probs


def build_scorer(
    kind: str,
    *,
    head: nn.Module | None = None,
    counts: Tensor | None = None,
    combine: str = "sel",
    T: float = 300.0,
    param: float = 1.0,
) -> Scorer:
    """The scorer called ``kind`` (:data:`simcal.choices.SCORERS`).

    ``cal`` and ``dual`` need the calibrated ``head``; ``dual`` and the post-hoc methods the
    training ``counts`` ``(C,)``.

    Raises:
        ValueError: unknown kind or combiner, or a missing head or counts.
    """
    if kind not in SCORER_KINDS:
        raise ValueError(f"unknown head {kind!r}: expected one of {', '.join(SCORER_KINDS)}")
    if kind in ("cal", "dual") and head is None:
        raise ValueError(f"{kind} needs a calibrated head: run simcal calibrate first")
    if kind in ("dual", *POSTHOC) and counts is None:
        raise ValueError(f"{kind} needs the training instance counts: the training annotations are missing")
    if kind == "dual" and combine not in (*COMBINERS, "det"):
        raise ValueError(f"unknown combiner {combine!r}: one of {', '.join(choices.COMBINERS)}")
    return SCORER_KINDS[kind](head=head, counts=counts, combine=combine, T=T, param=param)


#: name -> factory (keyword arguments as :func:`build_scorer`); the names are :data:`simcal.choices.SCORERS`
SCORER_KINDS: dict[str, Any] = {
    "orig": lambda **kw: original_scores,
    "cal": lambda head, **kw: Calibrated(head),
    "dual": lambda head, counts, combine, T, **kw: Dual(head, counts, combine, T),
    "oracle": lambda **kw: Oracle(),
    **{
        method: functools.partial(lambda method, counts, param, **kw: PostHoc(method, counts, param), method)
        for method in POSTHOC
    },
}


# ------------------------------------------------------------------ the heads of simcal predict --head
@dataclass(frozen=True)
class HeadSpec:
    """One head of ``simcal predict --head``: a scorer kind and its settings, and the folder it writes.

    ``kind``: one of :data:`simcal.choices.SCORERS`; ``combine`` / ``T``: the dual head's combiner
    and threshold; ``param``: gamma of ``norcal``, tau of ``logit-adj``; ``cal``: which calibrated
    head (``""``: the default one) for ``cal`` / ``dual``.
    """

    kind: str
    combine: str = "sel"
    T: float = 300.0
    param: float = 1.0
    cal: str = ""

    @property
    def tag(self) -> str:
        """The folder name under ``predictions/<split>/``: ``orig``, ``dual``, ``dual_avg_T100``, ``cal@NAME``..."""
        return HeadTag(self.base, self.cal if self.needs_calibrated_head else "").format()

    @property
    def base(self) -> str:
        """:attr:`simcal.run.HeadTag.base`: the scorer with the settings that are not the paper's defaults."""
        if self.kind == "dual":
            paper = InferenceConfig()  # the paper's dual head (sel, T = 300) is just "dual"
            return "dual" if (self.combine, self.T) == (paper.combine, paper.T) else f"dual_{self.combine}_T{self.T:g}"
        if self.kind in choices.POSTHOC:
            return f"{self.kind}_{self.param:g}"
        return self.kind

    @property
    def needs_calibrated_head(self) -> bool:
        return self.kind in ("cal", "dual")


def parse_heads(kinds: list[str], combine_name: str, T: float, param: float) -> list[HeadSpec]:
    """Head specs from kind names, with clear errors for unknown kinds or combiners."""
    specs = []
    for kind in kinds:
        if kind not in choices.SCORERS:
            raise InputError("--head", "head", f"unknown head {kind!r}: expected one of {', '.join(choices.SCORERS)}")
        if kind == "dual" and combine_name not in choices.COMBINERS:
            raise InputError("--combine", "combine", f"unknown {combine_name!r}: one of {', '.join(choices.COMBINERS)}")
        specs.append(HeadSpec(kind, combine_name, float(T), float(param)))
    if len({s.tag for s in specs}) != len(specs):
        raise InputError("--head", "head", "a head is listed twice")
    return specs


def build_scorers(specs: list[HeadSpec], cal_heads: dict[str, nn.Module], counts: Tensor | None) -> dict[str, Scorer]:
    """Tag -> scorer for each spec (``cal_heads``: name -> calibrated head, ``""`` the default)."""
    out = {}
    for spec in specs:
        try:
            out[spec.tag] = build_scorer(
                spec.kind, head=cal_heads.get(spec.cal), counts=counts, combine=spec.combine, T=spec.T, param=spec.param
            )
        except ValueError as e:
            raise InputError("--head", spec.kind, str(e)) from None
    return out
