"""Score combiners for dual-head inference, and zero-training post-hoc calibrations.

Every function here is a pure function over class scores that a scorer of
:mod:`simcal.modeling.scoring` applies to the shared RoI features: it returns class scores
``(R, C+1)`` with column 0 = background, and class-wise NMS and the score threshold come after.
The background column is never a detection, but it is kept meaningful (a probability of the
head it comes from).

Conventions (paper Sec. 4.2, Eq. 2; supplement J, Table 8):

- ``p_orig``, ``p_cal``: class scores ``(R, C+1)`` of the original and the calibrated
  classification heads on the same RoIs (each from its classifier's activation; softmax
  probabilities for the paper's heads);
- ``counts``: training instance count per foreground class, ``(C,)``; label ``j`` is index ``j-1``;
- ``T``: head/tail boundary in training instances (paper: 300; ``T=100, strict=True`` reproduces the
  authors' released code).

Dual-head combiners (:data:`COMBINERS`, uniform signature ``(p_orig, p_cal, counts, T) -> probs``):
``orig``, ``cal-only``, ``avg``, ``sel`` (the paper's), ``sel-thr``, ``sel-scale``, ``sel-norm``.
The ``det`` scheme is not a score combiner: it runs NMS on both heads' detections separately and
merges the two sets, see :func:`merge_detections`.

Post-hoc calibrations (:data:`POSTHOC`, signature ``(log p_orig, counts, param) -> scores``):
``norcal`` (gamma) and ``logit-adj`` (tau).

No function modifies its inputs; outputs keep the inputs' device and dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torchvision.ops import batched_nms

__all__ = [
    "COMBINERS",
    "POSTHOC",
    "combine",
    "combine_avg",
    "combine_cal_only",
    "combine_orig",
    "combine_sel",
    "combine_sel_norm",
    "combine_sel_scale",
    "combine_sel_thr",
    "logit_adjustment",
    "merge_detections",
    "norcal",
    "sel_mask",
]

CountsLike = Tensor | Sequence[float]


# ----------------------------------------------------------------------------- helpers
def _counts_like(counts: CountsLike, ref: Tensor) -> Tensor:
    """``counts`` as a ``(C,)`` tensor on ``ref``'s device and in ``ref``'s floating dtype."""
    c = torch.as_tensor(counts, device=ref.device)
    dtype = ref.dtype if ref.is_floating_point() else torch.get_default_dtype()
    return c.to(dtype).reshape(-1)


def _check_pair(p_orig: Tensor, p_cal: Tensor) -> None:
    if p_orig.dim() != 2 or p_orig.shape != p_cal.shape:
        raise ValueError(f"p_orig and p_cal must both be (R, C+1), got {tuple(p_orig.shape)} and {tuple(p_cal.shape)}")


def _check_counts(counts: Tensor, num_columns: int) -> None:
    if counts.numel() != num_columns - 1:
        raise ValueError(
            f"counts must have C = {num_columns - 1} entries (one per foreground class), got {counts.numel()}"
        )


def sel_mask(counts: CountsLike, T: float = 300.0, strict: bool = False, ref: Tensor | None = None) -> Tensor:
    """Bool ``(C+1,)``: True where ``sel`` takes the calibrated column.

    Column 0 (background) is always False; foreground column ``j`` is True iff ``N_j <= T``
    (``N_j < T`` when ``strict``). ``ref`` gives the device (default: ``counts``' own).
    """
    c = torch.as_tensor(counts, device=ref.device if ref is not None else None).reshape(-1)
    tail = c < T if strict else c <= T
    return torch.cat([torch.zeros(1, dtype=torch.bool, device=tail.device), tail])


# ----------------------------------------------------------------------------- dual-head combiners
def combine_orig(p_orig: Tensor, p_cal: Tensor, counts: CountsLike | None = None, T: float = 300.0) -> Tensor:
    """The original head alone: a copy of ``p_orig`` ``(R, C+1)``. ``p_cal``, ``counts``, ``T`` unused."""
    _check_pair(p_orig, p_cal)
    return p_orig.clone()


def combine_cal_only(p_orig: Tensor, p_cal: Tensor, counts: CountsLike | None = None, T: float = 300.0) -> Tensor:
    """The calibrated head alone, background column included: a copy of ``p_cal`` ``(R, C+1)``.

    ``p_orig``, ``counts``, ``T`` unused.
    """
    _check_pair(p_orig, p_cal)
    return p_cal.clone()


def combine_avg(p_orig: Tensor, p_cal: Tensor, counts: CountsLike | None = None, T: float = 300.0) -> Tensor:
    """Elementwise mean ``(p_orig + p_cal) / 2`` of every column ``(R, C+1)``; rows still sum to 1."""
    _check_pair(p_orig, p_cal)
    return (p_orig + p_cal) / 2


def combine_sel(p_orig: Tensor, p_cal: Tensor, counts: CountsLike, T: float = 300.0, strict: bool = False) -> Tensor:
    """The paper's selection (Eq. 2): per foreground column, the calibrated head for tail classes.

    Column ``j >= 1`` comes from ``p_cal`` when ``N_j <= T`` (``N_j < T`` if ``strict``), otherwise
    from ``p_orig``; the background column always comes from ``p_orig``. No renormalisation, so
    rows need not sum to 1 (class-wise NMS does not need it).

    Args:
        p_orig, p_cal: ``(R, C+1)`` probabilities.
        counts: ``(C,)`` training instance counts.

    Returns:
        ``(R, C+1)``.
    """
    _check_pair(p_orig, p_cal)
    _check_counts(torch.as_tensor(counts), p_orig.shape[1])
    mask = sel_mask(counts, T, strict, ref=p_orig)
    return torch.where(mask.unsqueeze(0), p_cal, p_orig)


def combine_sel_thr(
    p_orig: Tensor, p_cal: Tensor, counts: CountsLike, T: float = 300.0, thr: float = 0.05, strict: bool = False
) -> Tensor:
    """``sel`` after zeroing calibrated scores below ``thr`` (supplement J: 0.05).

    Only the calibrated columns that ``sel`` takes are affected (tail classes); low-confidence
    calibrated scores then never become detections. Shapes as :func:`combine_sel`.
    """
    _check_pair(p_orig, p_cal)
    p_cal = torch.where(p_cal < thr, torch.zeros_like(p_cal), p_cal)
    return combine_sel(p_orig, p_cal, counts, T, strict)


def combine_sel_scale(
    p_orig: Tensor, p_cal: Tensor, counts: CountsLike, T: float = 300.0, strict: bool = False
) -> Tensor:
    """``sel`` after scaling the calibrated foreground scores by the ratio of mean background scores.

    ``scale = mean_r p_cal[r, 0] / mean_r p_orig[r, 0]`` over the RoIs passed in (the batch), and
    ``p_cal[:, 1:] * scale`` then goes through :func:`combine_sel`.

    Direction: supplement J scales "by ratio of average background score between calibrated and
    original head's predictions", i.e. calibrated over original. This is also the direction that
    makes the scores comparable: the original head is trained with 3 background RoIs per
    foreground, the calibrated head with 1:1, so the calibrated head puts less mass on background
    and more on the foreground classes. Then ``mean p_cal_bg < mean p_orig_bg`` and ``scale < 1``
    shrinks the inflated calibrated foreground scores towards the original head's level. The
    inverse ratio (orig / cal) would inflate them further. (The foreground-mass ratio
    ``mean(1 - p_orig_bg) / mean(1 - p_cal_bg)`` points the same way but is not what the paper
    states.) The calibrated background column is not scaled; ``sel`` never uses it.

    With no RoIs the scale is 1; the denominator is clamped to the dtype's ``tiny``.
    Shapes as :func:`combine_sel`.
    """
    _check_pair(p_orig, p_cal)
    if p_orig.shape[0] == 0:
        return combine_sel(p_orig, p_cal, counts, T, strict)
    tiny = torch.finfo(p_orig.dtype).tiny if p_orig.is_floating_point() else 1e-38
    scale = p_cal[:, 0].mean() / p_orig[:, 0].mean().clamp(min=tiny)
    p_cal = torch.cat([p_cal[:, :1], p_cal[:, 1:] * scale], dim=1)
    return combine_sel(p_orig, p_cal, counts, T, strict)


def combine_sel_norm(
    p_orig: Tensor, p_cal: Tensor, counts: CountsLike, T: float = 300.0, strict: bool = False
) -> Tensor:
    """``sel``, then each row divided by its sum over all ``C+1`` columns (rows sum to 1).

    A row summing to 0 is left at 0. Shapes as :func:`combine_sel`.
    """
    p = combine_sel(p_orig, p_cal, counts, T, strict)
    total = p.sum(dim=1, keepdim=True)
    return p / torch.where(total > 0, total, torch.ones_like(total))


COMBINERS: dict[str, Callable[..., Tensor]] = {
    "orig": combine_orig,
    "cal-only": combine_cal_only,
    "avg": combine_avg,
    "sel": combine_sel,
    "sel-thr": combine_sel_thr,
    "sel-scale": combine_sel_scale,
    "sel-norm": combine_sel_norm,
}
"""Name -> combiner, each callable as ``f(p_orig, p_cal, counts, T) -> probs (R, C+1)``."""


def combine(name: str, p_orig: Tensor, p_cal: Tensor, counts: CountsLike, T: float = 300.0, **kwargs: Any) -> Tensor:
    """Dispatch to :data:`COMBINERS`\\[``name``]; ``kwargs`` (e.g. ``strict``, ``thr``) are passed on.

    Raises:
        ValueError: unknown ``name`` (the message lists the valid names; ``det`` points to
            :func:`merge_detections`).
    """
    fn = COMBINERS.get(name)
    if fn is None:
        hint = " ('det' merges detections after NMS: use merge_detections)" if name == "det" else ""
        raise ValueError(f"unknown combiner {name!r}{hint}; valid names: {', '.join(COMBINERS)}")
    return fn(p_orig, p_cal, counts, T, **kwargs)


# ----------------------------------------------------------------------------- det: merge detections
def merge_detections(
    dets_a: dict[str, Tensor], dets_b: dict[str, Tensor], iou: float = 0.5, max_dets: int = 300
) -> dict[str, Tensor]:
    """The ``det`` scheme: merge two heads' per-image detections with class-wise NMS.

    Args:
        dets_a, dets_b: ``{"boxes" (N, 4) xyxy, "scores" (N,), "labels" (N,)}`` of one image.
        iou: NMS IoU threshold (boxes of the same label overlapping more than it are suppressed).
        max_dets: at most this many detections are kept, highest scores first (all when 0 or less).

    Returns:
        ``{"boxes" (M, 4), "scores" (M,), "labels" (M,)}`` sorted by decreasing score, ``M <= max_dets``.
        Other per-detection tensors present in both (e.g. ``roi``, the RoI index) are carried along;
        masks should be computed after the merge.
    """
    boxes = torch.cat([dets_a["boxes"], dets_b["boxes"]]).reshape(-1, 4)
    scores = torch.cat([dets_a["scores"], dets_b["scores"]])
    labels = torch.cat([dets_a["labels"], dets_b["labels"]])
    keep = batched_nms(boxes, scores, labels, iou)  # sorted by decreasing score
    if max_dets > 0:
        keep = keep[:max_dets]
    out = {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}
    for key in dets_a.keys() & dets_b.keys() - out.keys():
        a, b = dets_a[key], dets_b[key]
        if (
            torch.is_tensor(a)
            and torch.is_tensor(b)
            and a.shape[:1] == dets_a["scores"].shape
            and b.shape[:1] == dets_b["scores"].shape
        ):
            out[key] = torch.cat([a, b])[keep]
    return out


# ----------------------------------------------------------------------------- post-hoc calibration
def _reweighted_foreground(log_scores: Tensor, log_weights: Tensor, normalized: bool) -> Tensor:
    """Scores ``(R, C+1)`` whose foreground columns are multiplied by ``exp(log_weights)``; background kept.

    Computed from the log-scores, so tiny probabilities and large weights stay finite.
    ``normalized`` (the scores of a row sum to 1: softmax): the reweighted foreground is rescaled
    to keep its row sum (a softmax of ``log p_c + log w_c`` over the foreground columns, times
    their original mass). Otherwise (independent per-class scores, e.g. sigmoid): the weights are
    divided by their largest, so no score grows and every score stays in [0, 1].
    """
    log_fg = log_scores[:, 1:]
    background = torch.exp(log_scores[:, :1])
    if not normalized:
        return torch.cat([background, torch.exp(log_fg + (log_weights - log_weights.max()))], dim=1)
    mass = torch.exp(torch.logsumexp(log_fg, dim=1, keepdim=True))
    return torch.cat([background, torch.softmax(log_fg + log_weights, dim=1) * mass], dim=1)


def norcal(log_scores: Tensor, counts: CountsLike, gamma: float = 1.0, normalized: bool = True) -> Tensor:
    """NorCal post-hoc calibration of the original head's scores (no training; Pan et al. 2021).

    Foreground scores are divided by ``N_c^gamma`` with ``N_c = max(counts_c, 1)``, so frequent
    classes are down-weighted relative to rare ones while the background column (the
    object-vs-background confidence) is unchanged. With ``normalized`` scores (softmax) the
    foreground is rescaled to keep its sum, so only the split among classes moves: for the softmax
    classifier the softmax of ``z_c - gamma * log N_c`` over the foreground, times ``1 - p_0``.
    Otherwise (sigmoid scores) nothing is renormalised and the rarest class keeps its score.
    ``gamma = 0`` returns the scores.

    Args:
        log_scores: ``(R, C+1)`` log of the original head's class scores, column 0 background
            (``log_softmax`` of the logits for the softmax classifier).
        counts: ``(C,)`` training instance counts.
        normalized: whether each row of scores sums to 1 (the classifier's activation says).

    Returns:
        ``(R, C+1)`` scores.
    """
    c = _counts_like(counts, log_scores)
    _check_counts(c, log_scores.shape[1])
    return _reweighted_foreground(log_scores, -gamma * torch.log(c.clamp(min=1)), normalized)


def logit_adjustment(log_scores: Tensor, counts: CountsLike, tau: float = 1.0, normalized: bool = True) -> Tensor:
    """Post-hoc logit adjustment (Menon et al.) of the original head's scores (no training).

    Foreground logits become ``z_c - tau * log(prior_c)`` with ``prior_c = N_c / sum_k N_k`` and
    ``N_c = max(counts_c, 1)``, i.e. scores divided by ``prior_c^tau``; background and foreground
    mass are kept as in :func:`norcal`. Because the foreground is renormalised (or, for
    unnormalised scores, the weights are divided by their largest), the ``log sum N`` term cancels
    and the result equals ``norcal(log_scores, counts, gamma=tau)``; both are kept for naming
    parity with the literature. ``tau = 0`` returns the scores.

    Args:
        log_scores: ``(R, C+1)`` log of the original head's class scores, column 0 background.
        counts: ``(C,)`` training instance counts.
        normalized: whether each row of scores sums to 1 (the classifier's activation says).

    Returns:
        ``(R, C+1)`` scores.
    """
    c = _counts_like(counts, log_scores)
    _check_counts(c, log_scores.shape[1])
    c = c.clamp(min=1)
    log_prior = torch.log(c) - torch.log(c.sum())
    return _reweighted_foreground(log_scores, -tau * log_prior, normalized)


POSTHOC: dict[str, Callable[[Tensor, CountsLike, float], Tensor]] = {
    "norcal": norcal,
    "logit-adj": logit_adjustment,
}
"""Name -> post-hoc calibration, ``f(log_scores_orig (R, C+1), counts, param, normalized=True) -> scores (R, C+1)``."""
