"""Which detections an evaluation protocol keeps, and AP-pool's pooled precision: rules applied
on the detections' columns, before and after the engine (METHOD.md, Evaluation).

* LVIS's per-image cap and federated rule (:func:`lvis_kept`): the top ``max_dets`` detections of
  each image by score (ties in results order), then only classes in the image's ground truth or
  its ``neg_category_ids``; lvis-api applies them in that order.
* AP-fixed's cap per class over the whole split (:func:`cap_per_class`), in place of the
  per-image one.
* AP-pool (:func:`pooled_from_matches`): each group's true and false positives pooled over its
  classes, from the engine's per-(image, class) matches.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from operator import itemgetter
from typing import Any, TypeVar

import numpy as np

from simcal.data.results import Detections
from simcal.data.stats import CategoryStat

LVIS_MAX_DETS = 300
COCO_MAX_DETS = 100

R = TypeVar("R", list[dict[str, Any]], Detections)


def per_image_cap(protocol: str, lvis_rules: bool) -> int:
    """Detections kept per image before matching: LVIS's 300, COCO's 100 (per image and class),
    -1 (none) for AP-fixed and AP-pool."""
    return -1 if protocol != "lvis" else LVIS_MAX_DETS if lvis_rules else COCO_MAX_DETS


def _columns(results: list[dict[str, Any]] | Detections) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(image_id, category_id, score)`` columns of dict detections or :class:`Detections`."""
    if isinstance(results, Detections):
        return results.image_ids, results.category_ids, results.scores
    n = len(results)
    img = np.fromiter((d["image_id"] for d in results), dtype=np.int64, count=n)
    cat = np.fromiter((d["category_id"] for d in results), dtype=np.int64, count=n)
    score = np.fromiter((d["score"] for d in results), dtype=np.float64, count=n)
    return img, cat, score


def allowed_pairs(gt: dict[str, Any], span: int) -> np.ndarray:
    """The sorted ``image_id * span + category_id`` codes of the (image, class) pairs the federated
    rule evaluates: a class in the image's ground truth or negatives. ``span`` > every category id."""
    anns = gt["annotations"]
    n = len(anns)
    img = np.fromiter(map(itemgetter("image_id"), anns), dtype=np.int64, count=n)
    cat = np.fromiter(map(itemgetter("category_id"), anns), dtype=np.int64, count=n)
    negs = [im.get("neg_category_ids", ()) for im in gt["images"]]
    neg_img = np.repeat(np.array([im["id"] for im in gt["images"]], dtype=np.int64), [len(x) for x in negs])
    neg_cat = np.fromiter(itertools.chain.from_iterable(negs), dtype=np.int64, count=len(neg_img))
    return np.unique(np.concatenate([img * span + cat, neg_img * span + neg_cat]))


def _top_per_image(img: np.ndarray, score: np.ndarray, max_dets: int) -> np.ndarray:
    """Positions of each image's ``max_dets`` best detections by score (ties in results order),
    ascending. Only the images with more than ``max_dets`` are sorted."""
    n = len(img)
    _, inverse, counts = np.unique(img, return_inverse=True, return_counts=True)
    over = counts[inverse] > max_dets
    if not over.any():
        return np.arange(n)
    crowded = np.flatnonzero(over)
    order = crowded[np.lexsort((-score[crowded], img[crowded]))]  # stable: ties keep results order
    sorted_img = img[order]
    rank = np.arange(len(order)) - np.searchsorted(sorted_img, sorted_img, side="left")
    keep = np.ones(n, dtype=bool)
    keep[order[rank >= max_dets]] = False
    return np.flatnonzero(keep)


def lvis_kept(results: list[dict[str, Any]] | Detections, gt: dict[str, Any], max_dets: int) -> np.ndarray:
    """The positions of the detections the LVIS rules leave, ascending: the top ``max_dets`` of each
    image by score (ties in results order; ``max_dets`` < 0: all), of a class in the image's
    ground truth or negatives."""
    n = len(results)
    if not n:
        return np.zeros(0, dtype=np.int64)
    img, cat, score = _columns(results)
    kept = _top_per_image(img, score, max_dets) if max_dets >= 0 else np.arange(n)
    span = max([c["id"] for c in gt["categories"]] + [int(cat.max())]) + 1
    codes = img[kept] * span + cat[kept]
    allowed = allowed_pairs(gt, span)
    if not len(allowed):
        return np.zeros(0, dtype=np.int64)
    at = np.searchsorted(allowed, codes).clip(0, len(allowed) - 1)
    return kept[allowed[at] == codes]


def evaluated_count(results: list[dict[str, Any]] | Detections, gt: dict[str, Any], max_dets: int) -> int:
    """How many detections the LVIS rules leave to match (:func:`lvis_kept`)."""
    return len(lvis_kept(results, gt, max_dets))


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
    if isinstance(results, Detections):
        return results.take(kept) if len(kept) < len(results) else results
    return [results[i] for i in kept]


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


def pooled_from_matches(ev: Any, stats: list[CategoryStat], num_bins: int) -> dict[str, float | None]:
    """AP-pool of every group key (``AP AP50 AP75 APs APm APl APr APc APf AP1..``) from an
    evaluator's per-(class, area, image) matches (``ev.eval_imgs``, pycocotools' layout)."""
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
