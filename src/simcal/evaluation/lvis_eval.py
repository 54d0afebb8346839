"""LVIS / COCO evaluation: AP, APr/c/f, the instance bins and per-class AP, under the LVIS
protocol, AP-fixed or AP-pool.

The detections are taken as columns (:class:`~simcal.data.results.Detections`; a list of dicts or
a results file is turned into them once; a large file of masks under COCO rules is read by the
engine itself). What each protocol keeps is :mod:`simcal.evaluation.protocols`' (LVIS's
300 per image and federated rule, AP-fixed's cap per class); the matching is the engine's
(:mod:`simcal.evaluation.engines`: hotcoco for boxes and masks, faster-coco-eval for boundary IoU).

Every summary number is computed here from the engine's precision array
``precision[T, R, K, A, M]`` (IoU thresholds x recall thresholds x categories x area ranges x
max-dets): the groups, the bins and per-class AP come from the same array as AP.

A plain COCO json (no LVIS image fields) is evaluated with COCO rules (100 detections per image
and category, no federated filtering) and still reports APr/APc/APf and the bins.
"""

from __future__ import annotations

import math
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from operator import itemgetter
from typing import Any

import numpy as np

from simcal.choices import BOUNDARY_DILATION, EVAL_IOU_TYPES, FIXED_DETS_PER_CLASS, PROTOCOLS
from simcal.data.annotations import is_lvis
from simcal.data.results import Detections, as_detections
from simcal.data.stats import BIN_PRESETS, CategoryStat, category_stats, stats_from_fields
from simcal.errors import InputError
from simcal.evaluation import engines
from simcal.evaluation.protocols import per_image_cap
from simcal.evaluation.result import EvalResult, SettingError, metric_keys

#: detections: dicts (checked as a results file is), columns or a results file
Results = list[dict[str, Any]] | Detections | str | os.PathLike[str]


def resolve_category_stats(
    gt: dict[str, Any],
    gt_source: str,
    train: dict[str, Any] | None = None,
    train_source: str = "<train>",
    edges: Sequence[float] = BIN_PRESETS["lvis"],
) -> list[CategoryStat]:
    """Training statistics for every ground-truth category, ordered by id.

    From the training annotations when given, else from the ground truth categories' own
    ``instance_count`` / ``image_count`` / ``frequency`` fields (LVIS val carries them). The
    frequency group is the ground truth's ``frequency`` field when present (as the official LVIS
    API does), else the training one, else computed from the training image count.
    """
    if train is not None:
        stats = {s.id: s for s in category_stats(train, edges)}
        missing = [c["id"] for c in gt["categories"] if c["id"] not in stats]
        if missing:
            raise InputError(train_source, "categories", f"lacks category ids {missing[:5]} of {gt_source}")
    else:
        stats = {s.id: s for s in stats_from_fields(gt, gt_source, edges)}
    out = []
    for cat in sorted(gt["categories"], key=lambda c: c["id"]):
        s = stats[cat["id"]]
        if cat.get("frequency") and cat["frequency"] != s.frequency:
            s = CategoryStat(s.id, s.name, s.instance_count, s.image_count, cat["frequency"], s.bin)
        out.append(s)
    return out


def _valid_sums(precision: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The sum and number of the valid precisions of ``precision[T, R, K, A]`` over the recall
    thresholds, each ``[T, K, A]``: every mean the summary reports is a ratio of their sums. An
    invalid precision is the engines' -1 (no ground truth), so the valid ones sum to the sum of
    all plus the number of invalid ones: two reductions over the array, no masked copy of it."""
    count = (precision > -1).sum(axis=1)
    return precision.sum(axis=1) + (precision.shape[1] - count), count


def _ratio(total: np.ndarray, count: np.ndarray) -> float | None:
    """The mean of the valid precisions that ``total`` sums and ``count`` counts; None for none."""
    n = int(count.sum())
    return float(total.sum() / n) if n else None


def _class_means(total: np.ndarray, count: np.ndarray) -> list[float | None]:
    """Each class's mean of the valid precisions from their sum ``total`` and number ``count``
    ``[K]``: ``K`` values, None for a class with no ground truth."""
    return [float(t / n) if n else None for t, n in zip(total.tolist(), count.tolist())]


def check_settings(
    iou_type: str, protocols: Sequence[str] = ("lvis",), dets_per_class: int = 1, dilation: float = BOUNDARY_DILATION
) -> None:
    """:class:`SettingError` naming the first setting out of its range (the command line names its flag)."""
    if iou_type not in EVAL_IOU_TYPES:
        raise SettingError("iou", f"expected bbox, segm or boundary, got {iou_type!r}")
    if not 0 < dilation < 1:
        raise SettingError("dilation", f"a fraction of the image diagonal in (0, 1), got {dilation}")
    for protocol in protocols:
        if protocol not in PROTOCOLS:
            raise SettingError("protocol", f"expected one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    if dets_per_class < 1:
        raise SettingError("dets_per_class", f"must be >= 1, got {dets_per_class}")


def evaluate(
    gt: dict[str, Any],
    results: Results,
    iou_type: str,
    stats: list[CategoryStat],
    edges: Sequence[float] = BIN_PRESETS["lvis"],
    *,
    lvis_rules: bool | None = None,
    protocol: str = "lvis",
    dets_per_class: int = FIXED_DETS_PER_CLASS,
    dilation: float = BOUNDARY_DILATION,
) -> EvalResult:
    """Evaluate detections against validated ground truth.

    Args:
        gt: ground truth dataset (COCO or LVIS dict); not modified.
        results: detections ``{image_id, category_id, score, bbox | segmentation}`` (checked
            against ``gt`` as a results file is), :class:`~simcal.data.results.Detections`
            (with masks for segm and boundary), or a results file's path (read as columns, or by
            the engine itself: :func:`simcal.evaluation.engines.file_precision`); not modified.
        iou_type: ``"bbox"``, ``"segm"`` or ``"boundary"`` (boundary IoU of the masks, bands of
            ``dilation`` x the image diagonal; :func:`simcal.evaluation.engines.precision`).
        stats: training statistics of every gt category (see :func:`resolve_category_stats`).
        edges: inner bin edges used for ``stats`` (AP1..AP<len(edges)+1>).
        lvis_rules: federated LVIS rules; default: when the gt is LVIS.
        protocol: ``"lvis"``: 300 detections per image (COCO rules: 100 per image and class);
            ``"fixed"`` (AP-fixed, Dave et al. 2021): no per-image cap, the ``dets_per_class``
            best of each class over the dataset; ``"pool"`` (AP-pool): AP-fixed's detections,
            and every AP of a group (all, r/c/f, sizes, bins) pools the true and false positives
            of the group's classes as if they were one class. Per-class AP is AP-fixed's.

    Returns:
        An :class:`EvalResult`.
    """
    return evaluate_protocols(
        gt,
        results,
        iou_type,
        stats,
        edges,
        lvis_rules=lvis_rules,
        protocols=(protocol,),
        dets_per_class=dets_per_class,
        dilation=dilation,
    )[protocol]


def _check_masks_of(gt: dict[str, Any], iou_type: str) -> None:
    if iou_type == "bbox":
        return
    for i, ann in enumerate(gt["annotations"]):
        if not ann.get("segmentation"):
            raise InputError("<ground truth>", f"annotations[{i}].segmentation", f"missing: cannot evaluate {iou_type}")


def evaluate_protocols(
    gt: dict[str, Any],
    results: Results,
    iou_type: str,
    stats: list[CategoryStat],
    edges: Sequence[float] = BIN_PRESETS["lvis"],
    *,
    lvis_rules: bool | None = None,
    protocols: Sequence[str] = ("lvis",),
    dets_per_class: int = FIXED_DETS_PER_CLASS,
    dilation: float = BOUNDARY_DILATION,
) -> dict[str, EvalResult]:
    """:func:`evaluate` under several protocols: ``{protocol: EvalResult}``. AP-fixed and AP-pool
    share the engine's run of AP-fixed's detections (per class the same); AP-pool's pools are a
    second run on virtual images (:func:`simcal.evaluation.engines.precision`)."""
    check_settings(iou_type, protocols, dets_per_class, dilation)
    if lvis_rules is None:
        lvis_rules = is_lvis(gt)
    _check_masks_of(gt, iou_type)
    from_file = None  # (precision, N): the engine read the file itself, every detection evaluated
    if isinstance(results, (str, os.PathLike)) and set(protocols) == {"lvis"}:
        from_file = engines.file_precision(gt, results, iou_type, stats, lvis_rules=lvis_rules)
    dets = None
    if from_file is None:
        dets = as_detections(results, gt, iou_type)
        num_in = len(dets)
    else:
        num_in = from_file[1]
    cat_ids = sorted(c["id"] for c in gt["categories"])
    out: dict[str, EvalResult] = {}
    for run in [[p for p in protocols if p == "lvis"], [p for p in protocols if p != "lvis"]]:
        if not run:
            continue
        if dets is None:
            (precision, kept), pooled = from_file, None
        else:
            precision, kept, pooled = engines.precision(
                gt,
                dets,
                iou_type,
                stats,
                lvis_rules=lvis_rules,
                protocol=run[0],
                dets_per_class=dets_per_class,
                pool_bins=len(edges) + 1 if "pool" in run else None,
                dilation=dilation,
            )
        max_dets = per_image_cap(run[0], lvis_rules)
        for protocol in run:
            result = summarize(precision, cat_ids, gt, stats, edges, iou_type, lvis_rules, max_dets, num_in, kept)
            result.protocol = protocol
            result.dets_per_class = dets_per_class if protocol != "lvis" else None
            if iou_type == "boundary":
                result.dilation = dilation
            if protocol == "pool" and pooled is not None:
                result.metrics.update({k: v for k, v in pooled.items() if k in result.metrics})
            out[protocol] = result
    return out


def engine_eval(
    gt: dict[str, Any],
    results: Results,
    iou_type: str,
    stats: list[CategoryStat],
    *,
    lvis_rules: bool | None = None,
    protocol: str = "lvis",
    dets_per_class: int = FIXED_DETS_PER_CLASS,
) -> tuple[Any, int]:
    """The engine's evaluator after its per-image matching (``evaluate()``), and the number of
    detections the protocol leaves (:func:`simcal.evaluation.engines.engine_eval`); the
    diagnostics ask it for TIDE errors, calibration and bootstrap comparisons. Arguments as
    :func:`evaluate`'s (``bbox`` or ``segm``)."""
    check_settings(iou_type, (protocol,), dets_per_class)
    if lvis_rules is None:
        lvis_rules = is_lvis(gt)
    dets = as_detections(results, gt, iou_type)
    return engines.engine_eval(
        gt, dets, iou_type, stats, lvis_rules=lvis_rules, protocol=protocol, dets_per_class=dets_per_class
    )


def summarize(
    precision: np.ndarray,
    cat_ids: list[int],
    gt: dict[str, Any],
    stats: list[CategoryStat],
    edges: Sequence[float],
    iou_type: str,
    lvis_rules: bool,
    max_dets: int,
    num_in: int,
    num_kept: int,
) -> EvalResult:
    """Summary metrics from ``precision[T, R, K, A]`` (T: IoU 0.50:0.95, A: all/small/medium/large)."""
    by_id = {s.id: s for s in stats}
    gt_count = Counter(map(itemgetter("category_id"), gt["annotations"]))
    iou50, iou75 = 0, 5  # np.linspace(0.5, 0.95, 10)
    total, count = _valid_sums(precision)  # [T, K, A] each
    metrics: dict[str, float | None] = {
        "AP": _ratio(total[..., 0], count[..., 0]),
        "AP50": _ratio(total[iou50, :, 0], count[iou50, :, 0]),
        "AP75": _ratio(total[iou75, :, 0], count[iou75, :, 0]),
        "APs": _ratio(total[..., 1], count[..., 1]),
        "APm": _ratio(total[..., 2], count[..., 2]),
        "APl": _ratio(total[..., 3], count[..., 3]),
    }
    per_class = []
    group_ap: dict[str, list[float]] = defaultdict(list)
    bin_ap: dict[int, list[float]] = defaultdict(list)
    names = {c["id"]: c.get("name", str(c["id"])) for c in gt["categories"]}
    class_ap = _class_means(total[..., 0].sum(axis=0), count[..., 0].sum(axis=0))  # K
    class_ap50 = _class_means(total[iou50, :, 0], count[iou50, :, 0])
    for k, cid in enumerate(cat_ids):
        s = by_id[cid]
        ap, ap50 = class_ap[k], class_ap50[k]
        if ap is not None:
            group_ap[s.frequency].append(ap)
            bin_ap[s.bin].append(ap)
        per_class.append(
            {
                "id": cid,
                "name": names[cid],
                "AP": ap,
                "AP50": ap50,
                "frequency": s.frequency,
                "bin": s.bin + 1,
                "train_instance_count": s.instance_count,
                "train_image_count": s.image_count,
                "eval_instance_count": gt_count[cid],
            }
        )
    for g in ("r", "c", "f"):
        metrics[f"AP{g}"] = float(np.mean(group_ap[g])) if group_ap[g] else None
    for b in range(len(edges) + 1):
        metrics[f"AP{b + 1}"] = float(np.mean(bin_ap[b])) if bin_ap[b] else None
    for key, v in metrics.items():
        if v is not None and not math.isfinite(v):  # pragma: no cover - engine invariant
            raise RuntimeError(f"non-finite metric {key}")
    return EvalResult(
        iou_type=iou_type,
        mode="lvis" if lvis_rules else "coco",
        max_dets=max_dets,
        bin_edges=tuple(edges),
        metrics={k: metrics[k] for k in metric_keys(len(edges) + 1)},
        per_class=per_class,
        num_images=len(gt["images"]),
        num_detections=num_in,
        num_detections_evaluated=num_kept,
    )
