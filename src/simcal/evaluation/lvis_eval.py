"""LVIS / COCO evaluation on hotcoco, with r/c/f groups and instance bins.

hotcoco (Rust; bit-for-bit parity with pycocotools, the LVIS rules implemented as the official
LVIS API has them) is the engine. It applies the LVIS rules itself (METHOD.md, Evaluation):

1. at most 300 detections per image, the top ones by score across all classes, BEFORE matching
   (``LVISResults(max_dets=300)``; ties in results order, as lvis-api);
2. a detection of class c in image I counts only if c is in I's ground truth or in its
   ``neg_category_ids`` (federated rule); unmatched detections of a class in I's
   ``not_exhaustive_category_ids`` are ignored.

The one thing done here before the engine: a segm result loses its ``bbox``, so the size buckets
use the mask area (with a ``bbox`` present, lvis-api and hotcoco take the box's area).

Every summary number is computed here from the engine's precision array
``precision[T, R, K, A, M]`` (IoU thresholds x recall thresholds x categories x area ranges x
max-dets): the groups, the bins and per-class AP come from the same array as AP.

A plain COCO json (no LVIS image fields) is evaluated with COCO rules (100 detections per image
and category, no federated filtering) and still reports APr/APc/APf and the bins.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any, TypeVar

import hotcoco
import numpy as np

from simcal.choices import BOUNDARY_DILATION, FIXED_DETS_PER_CLASS, PROTOCOLS
from simcal.data.annotations import BoxResults, collector_paused, is_lvis
from simcal.data.stats import BIN_PRESETS, CategoryStat, category_stats, stats_from_fields
from simcal.errors import InputError
from simcal.evaluation.result import EvalResult, SettingError, metric_keys

#: detections: validated dicts, or box detections as columns (``simcal evaluate --iou bbox``)
Results = list[dict[str, Any]] | BoxResults
R = TypeVar("R", list[dict[str, Any]], BoxResults)

LVIS_MAX_DETS = 300
COCO_MAX_DETS = 100


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


def _for_engine(results: Results, iou_type: str) -> list[dict[str, Any]] | np.ndarray:
    """The fields the engine reads (no ``bbox`` for segm: sizes by mask area); the input is not
    modified. :class:`BoxResults` go as their ``(N, 7)`` array."""
    if isinstance(results, BoxResults):
        return results.array
    keys = ("image_id", "category_id", "score", "bbox" if iou_type == "bbox" else "segmentation")
    if all(len(det) == 4 and keys[3] in det for det in results):
        return results  # nothing to leave out (the engine copies what it reads)
    return [{k: det[k] for k in keys} for det in results]


def _gt_for_engine(gt: dict[str, Any], stats: list[CategoryStat]) -> dict[str, Any]:
    freq = {s.id: s.frequency for s in stats}
    cats = [{"id": c["id"], "name": c.get("name", str(c["id"])), "frequency": freq[c["id"]]} for c in gt["categories"]]
    return {"images": gt["images"], "annotations": gt["annotations"], "categories": cats}


def _mean_valid(s: np.ndarray) -> float | None:
    v = s[s > -1]
    return float(v.mean()) if v.size else None


def per_image_cap(protocol: str, lvis_rules: bool) -> int:
    """Detections kept per image before matching: LVIS's 300, COCO's 100 (per image and class),
    -1 (none) for AP-fixed and AP-pool."""
    return -1 if protocol != "lvis" else LVIS_MAX_DETS if lvis_rules else COCO_MAX_DETS


def _columns(results: Results) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(image_id, category_id, score)`` columns of dict detections or :class:`BoxResults`."""
    if isinstance(results, BoxResults):
        return results.image_ids, results.category_ids, results.scores
    n = len(results)
    img = np.fromiter((d["image_id"] for d in results), dtype=np.int64, count=n)
    cat = np.fromiter((d["category_id"] for d in results), dtype=np.int64, count=n)
    score = np.fromiter((d["score"] for d in results), dtype=np.float64, count=n)
    return img, cat, score


def evaluated_count(results: Results, gt: dict[str, Any], max_dets: int) -> int:
    """How many detections the LVIS rules leave to match: the top ``max_dets`` of each image by
    score (ties in results order; ``max_dets`` < 0: all), of a class in the image's ground truth
    or negatives.

    The engine applies the rules; this only counts, for the ``num_detections_evaluated`` field.
    """
    return len(lvis_kept(results, gt, max_dets))


def lvis_kept(results: Results, gt: dict[str, Any], max_dets: int) -> np.ndarray:
    """The positions of the detections the LVIS rules leave (see :func:`evaluated_count`), ascending."""
    if not len(results):
        return np.zeros(0, dtype=np.int64)
    img, cat, score = _columns(results)
    order = np.lexsort((np.arange(len(results)), -score, img))  # by image, then score, then position
    sorted_img = img[order]
    first = np.searchsorted(sorted_img, sorted_img, side="left")
    kept = order[np.arange(len(order)) - first < max_dets] if max_dets >= 0 else order
    span = int(cat.max(initial=0)) + 1
    allowed = {a["image_id"] * span + a["category_id"] for a in gt["annotations"] if a["category_id"] < span}
    for im in gt["images"]:
        allowed.update(im["id"] * span + c for c in im.get("neg_category_ids", ()) if c < span)
    codes = img[kept] * span + cat[kept]
    return np.sort(kept[np.isin(codes, np.fromiter(allowed, dtype=np.int64, count=len(allowed)))])


def cap_per_class(results: R, k: int) -> R:
    """The ``k`` best detections of each category over the whole results (ties in results order),
    in results order: AP-fixed's cap, which replaces the per-image one."""
    if not len(results):
        return results
    _, cat, score = _columns(results)
    order = np.lexsort((np.arange(len(results)), -score, cat))
    sorted_cat = cat[order]
    rank = np.arange(len(order)) - np.searchsorted(sorted_cat, sorted_cat, side="left")
    kept = np.sort(order[rank < k])
    if isinstance(results, BoxResults):
        return results.take(kept)
    return [results[i] for i in kept]


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
    """Evaluate validated detections against validated ground truth.

    Args:
        gt: ground truth dataset (COCO or LVIS dict); not modified.
        results: detections ``{image_id, category_id, score, bbox | segmentation}``, or
            :class:`~simcal.data.annotations.BoxResults` for bbox; not modified.
        iou_type: ``"bbox"``, ``"segm"`` or ``"boundary"`` (boundary IoU of the masks, bands of
            ``dilation`` x the image diagonal; :func:`boundary_precision`).
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
    share one run of the engine (the same detections and matches, accumulated two ways)."""
    if iou_type not in ("bbox", "segm", "boundary"):
        raise SettingError("iou", f"expected bbox, segm or boundary, got {iou_type!r}")
    if not 0 < dilation < 1:
        raise SettingError("dilation", f"a fraction of the image diagonal in (0, 1), got {dilation}")
    for protocol in protocols:
        if protocol not in PROTOCOLS:
            raise SettingError("protocol", f"expected one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    if dets_per_class < 1:
        raise SettingError("dets_per_class", f"must be >= 1, got {dets_per_class}")
    if lvis_rules is None:
        lvis_rules = is_lvis(gt)
    if iou_type != "bbox":
        for i, ann in enumerate(gt["annotations"]):
            if not ann.get("segmentation"):
                raise InputError(
                    "<ground truth>", f"annotations[{i}].segmentation", f"missing: cannot evaluate {iou_type}"
                )
    cat_ids = sorted(c["id"] for c in gt["categories"])
    out: dict[str, EvalResult] = {}
    if iou_type == "boundary":
        for protocol in protocols:
            precision, kept, pooled = boundary_precision(
                gt, results, stats, lvis_rules, protocol, dets_per_class, dilation, len(edges) + 1
            )
            max_dets = per_image_cap(protocol, lvis_rules)
            result = summarize(precision, cat_ids, gt, stats, edges, iou_type, lvis_rules, max_dets, len(results), kept)
            result.protocol = protocol
            result.dets_per_class = dets_per_class if protocol != "lvis" else None
            result.dilation = dilation
            if pooled is not None:
                result.metrics.update({k: v for k, v in pooled.items() if k in result.metrics})
            out[protocol] = result
        return out
    for run in [[p for p in protocols if p == "lvis"], [p for p in protocols if p != "lvis"]]:
        if not run:
            continue
        max_dets = per_image_cap(run[0], lvis_rules)
        with collector_paused():
            ev, kept = engine_eval(
                gt, results, iou_type, stats, lvis_rules=lvis_rules, protocol=run[0], dets_per_class=dets_per_class
            )
            ev.accumulate()
            precision = np.asarray(ev.eval["precision"])[..., -1]  # [T, R, K, A] at the largest max-dets
            pooled = _pooled(ev, stats, len(edges) + 1) if "pool" in run else None
        for protocol in run:
            result = summarize(precision, cat_ids, gt, stats, edges, iou_type, lvis_rules, max_dets, len(results), kept)
            result.protocol = protocol
            result.dets_per_class = dets_per_class if protocol != "lvis" else None
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
    detections the rules leave; :func:`evaluate` accumulates it, the diagnostics ask it for TIDE
    errors, calibration and bootstrap comparisons. Arguments as :func:`evaluate`'s; the categories'
    ``frequency`` (the engine's r/c/f) is taken from ``stats``."""
    if lvis_rules is None:
        lvis_rules = is_lvis(gt)
    fixed = protocol != "lvis"
    max_dets = per_image_cap(protocol, lvis_rules)
    with collector_paused():
        coco_gt = hotcoco.COCO(_gt_for_engine(gt, stats))
        given = cap_per_class(results, dets_per_class) if fixed else results
        dets = _for_engine(given, iou_type)
        if lvis_rules:
            coco_dt = hotcoco.LVISResults(coco_gt, dets, max_dets=max_dets)
            kept = evaluated_count(given, gt, max_dets)
        else:
            coco_dt = coco_gt.load_res(dets)
            kept = len(dets)
        ev = hotcoco.COCOeval(coco_gt, coco_dt, iou_type, lvis_style=lvis_rules)
        per_pair = dets_per_class if fixed else max_dets  # the engine's cap per (image, class)
        ev.params.max_dets = [per_pair] if lvis_rules or fixed else [1, 10, per_pair]
        ev.evaluate()
    return ev, kept


def boundary_precision(
    gt: dict[str, Any],
    results: list[dict[str, Any]],
    stats: list[CategoryStat],
    lvis_rules: bool,
    protocol: str,
    dets_per_class: int,
    dilation: float = BOUNDARY_DILATION,
    num_bins: int = 0,
) -> tuple[np.ndarray, int, dict[str, float | None] | None]:
    """Boundary-IoU precision ``[T, R, K, A]`` (as :func:`engine_eval`'s accumulated one), the
    number of detections matched, and for ``protocol="pool"`` the pooled group metrics
    (:func:`pooled_by_virtual_images`, ``num_bins`` bins), on faster-coco-eval (hotcoco has no
    boundary IoU).

    Boundary IoU (Cheng et al. 2021, the official boundary-iou-api): the IoU of the two masks'
    boundary bands (each mask minus its erosion by ``round(dilation * image diagonal)`` pixels,
    zero outside the image), taken as ``min(mask IoU, band IoU)``; a crowd region keeps mask IoU.
    The LVIS rules the engine does not apply as lvis-api does are applied here first, as lvis-api
    applies them: the ``max_dets`` best detections per image (ties in results order), and only
    classes in the image's ground truth or negatives (the engine ignores unmatched detections of
    not-exhaustive classes itself). AP-fixed first keeps the ``dets_per_class`` best per class.
    The inputs are not modified (the engine writes RLEs into what it is given: it gets copies).
    """
    fixed = protocol != "lvis"
    max_dets = per_image_cap(protocol, lvis_rules)
    given = cap_per_class(results, dets_per_class) if fixed else results
    if lvis_rules:
        given = [given[i] for i in lvis_kept(given, gt, max_dets)]
    dets = [{k: d[k] for k in ("image_id", "category_id", "score", "segmentation")} for d in given]
    per_pair = dets_per_class if fixed else max_dets
    engine_gt = _gt_for_engine(gt, stats)
    precision = _fce_precision(engine_gt, dets, "boundary", lvis_rules, per_pair, fixed, dilation)
    pooled = None
    if protocol == "pool":
        pooled = pooled_by_virtual_images(gt, dets, stats, num_bins, "boundary", lvis_rules, per_pair, dilation)
    return precision, len(dets), pooled


def _fce_precision(
    engine_gt: dict[str, Any],
    dets: list[dict[str, Any]],
    iou_type: str,
    lvis_rules: bool,
    per_pair: int,
    fixed: bool,
    dilation: float,
) -> np.ndarray:
    """faster-coco-eval's precision ``[T, R, K, A]`` at its largest max-dets (``per_pair`` per
    image and class), on copies of ``engine_gt`` and ``dets`` (fields as the engine reads them)."""
    from faster_coco_eval import COCO as FCOCO
    from faster_coco_eval import COCOeval_faster

    if not dets:  # nothing to match: every class with ground truth has AP 0
        return _no_detections(engine_gt)
    engine_gt = {**engine_gt, "annotations": [dict(a) for a in engine_gt["annotations"]]}
    with collector_paused():
        coco_gt = FCOCO(engine_gt, print_function=lambda *a: None)
        coco_dt = coco_gt.loadRes([dict(d) for d in dets])
        ev = COCOeval_faster(
            coco_gt,
            coco_dt,
            iou_type,
            lvis_style=lvis_rules,
            print_function=lambda *a: None,
            boundary_dilation_ratio=dilation,
            boundary_cpu_count=1,
        )
        ev.params.maxDets = [per_pair] if lvis_rules or fixed else [1, 10, per_pair]
        ev.evaluate()
        ev.accumulate()
    return np.asarray(ev.eval["precision"])[..., -1]


def _no_detections(gt: dict[str, Any]) -> np.ndarray:
    """Precision ``[T, R, K, A]`` without any detection: 0 where a category has ground truth in
    the area range, -1 (undefined) where it has none."""
    cat_ids = sorted(c["id"] for c in gt["categories"])
    index = {c: k for k, c in enumerate(cat_ids)}
    ranges = [(0, 1e10), (0, 32**2), (32**2, 96**2), (96**2, 1e10)]
    has = np.zeros((len(cat_ids), 4), dtype=bool)
    for a in gt["annotations"]:
        if a.get("iscrowd", 0):
            continue
        for r, (lo, hi) in enumerate(ranges):
            if lo <= a.get("area", 0) < hi:
                has[index[a["category_id"]], r] = True
    out = np.where(has[None, None], 0.0, -1.0)
    return np.broadcast_to(out, (10, 101, len(cat_ids), 4)).copy()


def _virtual_pools(
    gt: dict[str, Any], dets: list[dict[str, Any]], pool_of: dict[int, int], lvis_rules: bool
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Ground truth and detections in which every (image, class) pair is an image of its own and
    every class is relabelled ``pool_of[class]``: matching stays within a class (one class per
    image), while the engine's accumulation of a pool id pools the true and false positives of
    its classes over their images, which is AP-pool. The pair's image keeps its size; the image's
    negative and not-exhaustive classes become their pairs' negative / not-exhaustive pool id."""
    sizes = {im["id"]: (im["height"], im["width"]) for im in gt["images"]}
    neg = {im["id"]: set(im.get("neg_category_ids", ())) for im in gt["images"]}
    nel = {im["id"]: set(im.get("not_exhaustive_category_ids", ())) for im in gt["images"]}
    pairs: dict[tuple[int, int], int] = {}

    def pair(image_id: int, cat: int) -> int:
        return pairs.setdefault((image_id, cat), len(pairs) + 1)

    anns = [
        {**a, "image_id": pair(a["image_id"], a["category_id"]), "category_id": pool_of[a["category_id"]]}
        for a in gt["annotations"]
    ]
    for image_id, cats in neg.items():
        for c in sorted(cats):
            pair(image_id, c)
    moved = [
        {**d, "image_id": pair(d["image_id"], d["category_id"]), "category_id": pool_of[d["category_id"]]} for d in dets
    ]
    images = []
    for (image_id, cat), vid in pairs.items():
        h, w = sizes[image_id]
        image: dict[str, Any] = {"id": vid, "height": h, "width": w}
        if lvis_rules:
            image["neg_category_ids"] = [pool_of[cat]] if cat in neg[image_id] else []
            image["not_exhaustive_category_ids"] = [pool_of[cat]] if cat in nel[image_id] else []
        images.append(image)
    cats = [{"id": p, "name": f"pool {p}", "frequency": "f"} for p in sorted(set(pool_of.values()))]
    return {"images": images, "annotations": anns, "categories": cats}, moved


def pooled_by_virtual_images(
    gt: dict[str, Any],
    dets: list[dict[str, Any]],
    stats: list[CategoryStat],
    num_bins: int,
    iou_type: str,
    lvis_rules: bool,
    per_pair: int,
    dilation: float = BOUNDARY_DILATION,
) -> dict[str, float | None]:
    """AP-pool's group keys (as :func:`_pooled`'s) for an engine that keeps no per-image matches:
    each partition of the classes (all; r/c/f; the bins) is one engine run on
    :func:`_virtual_pools` data, whose per-pool AP is the pooled AP. ``dets``: AP-fixed's
    detections with the LVIS rules applied (engine fields)."""
    by_id = {s.id: s for s in stats}
    out: dict[str, float | None] = {}

    def run(pool_of: dict[int, int]) -> np.ndarray:
        virtual_gt, moved = _virtual_pools(gt, dets, pool_of, lvis_rules)
        return _fce_precision(virtual_gt, moved, iou_type, lvis_rules, per_pair, True, dilation)

    def mean(p: np.ndarray) -> float | None:
        return None if (p < 0).all() else float(p[p > -1].mean())

    every = run({c: 1 for c in by_id})  # [T, R, 1, A]
    out.update(AP=mean(every[..., 0, 0]), AP50=mean(every[0, :, 0, 0]), AP75=mean(every[5, :, 0, 0]))
    for a, key in enumerate(("APs", "APm", "APl"), start=1):
        out[key] = mean(every[..., 0, a])
    for key, name, index in (("group", "AP{}", "rcf"), ("bin", "AP{}", range(num_bins))):
        labels = list(index)
        pool_of = {c: 1 + labels.index(s.frequency if key == "group" else s.bin) for c, s in by_id.items()}
        present = sorted(set(pool_of.values()))
        precision = run(pool_of)
        for label in labels:
            k = labels.index(label) + 1
            value = mean(precision[..., present.index(k), 0]) if k in present else None
            out[name.format(label if key == "group" else label + 1)] = value
    return out


def _pooled_precision(entries: list[dict[str, Any]], num_t: int, rec_thrs: np.ndarray) -> np.ndarray | None:
    """Precision ``[T, R]`` of detections pooled over several classes' (image) entries, as
    pycocotools accumulates one class; ``None`` when the pool has no ground truth."""
    gt_ignore = np.concatenate([np.asarray(e["gtIgnore"], dtype=bool).ravel() for e in entries] or [np.zeros(0)])
    npig = int((~gt_ignore.astype(bool)).sum())
    if npig == 0:
        return None
    scores = np.concatenate([np.asarray(e["dtScores"], dtype=np.float64).ravel() for e in entries])
    order = np.argsort(-scores, kind="mergesort")
    matches = np.concatenate([np.asarray(e["dtMatches"]).reshape(num_t, -1) for e in entries], axis=1)[:, order]
    ignore = np.concatenate([np.asarray(e["dtIgnore"]).reshape(num_t, -1) for e in entries], axis=1)[:, order]
    matched, ignored = matches != 0, ignore != 0
    tps = np.cumsum(matched & ~ignored, axis=1, dtype=np.float64)
    fps = np.cumsum(~matched & ~ignored, axis=1, dtype=np.float64)
    out = np.zeros((num_t, len(rec_thrs)))
    for t in range(num_t):
        tp, fp = tps[t], fps[t]
        recall = tp / npig
        precision = tp / np.maximum(tp + fp, np.spacing(1))
        precision = np.maximum.accumulate(precision[::-1])[::-1] if precision.size else precision
        idx = np.searchsorted(recall, rec_thrs, side="left")
        valid = idx < precision.size
        out[t, valid] = precision[idx[valid]]
    return out


def _pooled(ev: Any, stats: list[CategoryStat], num_bins: int) -> dict[str, float | None]:
    """AP-pool of every group key (``AP AP50 AP75 APs APm APl APr APc APf AP1..``) from the
    engine's per-(class, area, image) matches."""
    p = ev.params
    cat_ids = list(p.cat_ids)
    areas = [tuple(a) for a in p.area_rng]  # all, small, medium, large
    num_t, rec_thrs = len(p.iou_thrs), np.asarray(p.rec_thrs)
    by_pair: dict[tuple[int, int], list[dict[str, Any]]] = defaultdict(list)  # (class, area) -> entries
    for e in ev.eval_imgs:
        if e is not None:
            by_pair[e["category_id"], areas.index(tuple(e["aRng"]))].append(e)
    by_id = {s.id: s for s in stats}

    def pool(cats: list[int], area: int) -> np.ndarray | None:
        got = [e for cid in cats for e in by_pair.get((cid, area), ())]
        return _pooled_precision(got, num_t, rec_thrs) if got else None

    def mean(prec: np.ndarray | None, t: int | None = None) -> float | None:
        return None if prec is None else float((prec if t is None else prec[t]).mean())

    out: dict[str, float | None] = {}
    every = pool(cat_ids, 0)
    out.update(AP=mean(every), AP50=mean(every, 0), AP75=mean(every, 5))
    for a, key in enumerate(("APs", "APm", "APl"), start=1):
        out[key] = mean(pool(cat_ids, a))
    for g in "rcf":
        out[f"AP{g}"] = mean(pool([c for c in cat_ids if by_id[c].frequency == g], 0))
    for b in range(num_bins):
        out[f"AP{b + 1}"] = mean(pool([c for c in cat_ids if by_id[c].bin == b], 0))
    return out


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
    gt_count: dict[int, int] = defaultdict(int)
    for ann in gt["annotations"]:
        gt_count[ann["category_id"]] += 1
    iou50, iou75 = 0, 5  # np.linspace(0.5, 0.95, 10)
    p_all = precision[..., 0]  # [T, R, K]

    metrics: dict[str, float | None] = {
        "AP": _mean_valid(p_all),
        "AP50": _mean_valid(p_all[iou50]),
        "AP75": _mean_valid(p_all[iou75]),
        "APs": _mean_valid(precision[..., 1]),
        "APm": _mean_valid(precision[..., 2]),
        "APl": _mean_valid(precision[..., 3]),
    }
    per_class = []
    group_ap: dict[str, list[float]] = defaultdict(list)
    bin_ap: dict[int, list[float]] = defaultdict(list)
    names = {c["id"]: c.get("name", str(c["id"])) for c in gt["categories"]}
    for k, cid in enumerate(cat_ids):
        s = by_id[cid]
        ap = _mean_valid(p_all[:, :, k])
        ap50 = _mean_valid(p_all[iou50, :, k])
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
