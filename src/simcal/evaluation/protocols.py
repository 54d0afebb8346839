"""Which detections an evaluation protocol keeps, and AP-pool's pooled precision: rules applied
on the detections' columns, before and after the engine (METHOD.md, Evaluation).

* LVIS's per-image cap and federated rule (:func:`lvis_kept`): the top ``max_dets`` detections of
  each image by score (ties in results order), then only classes in the image's ground truth or
  its ``neg_category_ids``; lvis-api applies them in that order.
* AP-fixed's cap per class over the whole split (:func:`cap_per_class`), in place of the
  per-image one.
* AP-pool's pools (:func:`pool_partitions`) and their metrics (:func:`pooled_metrics`): each
  group's true and false positives pooled over its classes, which the engine accumulates as one
  class on virtual images (:func:`simcal.evaluation.engines.virtual_pools`).
"""

from __future__ import annotations

import itertools
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


def _top_per_key(key: np.ndarray, score: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` best detections by score of each ``key`` value (an image, a class;
    ties in results order), ascending. Only the detections of a key with more than ``k`` are
    sorted."""
    n = len(key)
    if n and key.min() >= 0 and key.max() < 4 * n + 2**16:  # ids as table positions
        counts = np.bincount(key)[key]
    else:
        _, inverse, per_key = np.unique(key, return_inverse=True, return_counts=True)
        counts = per_key[inverse.reshape(-1)]
    over = counts > k
    if not over.any():
        return np.arange(n)
    crowded = np.flatnonzero(over)
    order = crowded[np.lexsort((-score[crowded], key[crowded]))]  # stable: ties keep results order
    sorted_key = key[order]
    rank = np.arange(len(order)) - np.searchsorted(sorted_key, sorted_key, side="left")
    keep = np.ones(n, dtype=bool)
    keep[order[rank >= k]] = False
    return np.flatnonzero(keep)


def lvis_kept(results: list[dict[str, Any]] | Detections, gt: dict[str, Any], max_dets: int) -> np.ndarray:
    """The positions of the detections the LVIS rules leave, ascending: the top ``max_dets`` of each
    image by score (ties in results order; ``max_dets`` < 0: all), of a class in the image's
    ground truth or negatives."""
    n = len(results)
    if not n:
        return np.zeros(0, dtype=np.int64)
    img, cat, score = _columns(results)
    kept = _top_per_key(img, score, max_dets) if max_dets >= 0 else np.arange(n)
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
    kept = _top_per_key(cat, score, k)
    if isinstance(results, Detections):
        return results.take(kept) if len(kept) < len(results) else results
    return [results[i] for i in kept]


def pool_partitions(stats: list[CategoryStat], num_bins: int, cat_ids: list[int]) -> tuple[np.ndarray, list[str]]:
    """AP-pool's pools: each class's pool in each partition of the classes, and each pool's key.

    Returns ``pool_of`` ``(K, 3)`` int64, a row per class of ``cat_ids`` (the ground truth's, in
    the engine's order), its statistics looked up by id in ``stats``: column 0 the pool of all
    classes (``0``), column 1 the class's frequency group (``1..3`` for r/c/f), column 2 its
    instance bin (``4..``); and the ``3 + 1 + num_bins`` pools' metric keys ``["AP", "APr",
    "APc", "APf", "AP1", ...]``.
    """
    by_id = {s.id: s for s in stats}
    group = np.array(["rcf".index(by_id[c].frequency) for c in cat_ids], dtype=np.int64)
    bins = np.array([by_id[c].bin for c in cat_ids], dtype=np.int64)
    pool_of = np.stack([np.zeros(len(cat_ids), dtype=np.int64), 1 + group, 4 + bins], axis=1)
    return pool_of, ["AP", "APr", "APc", "APf", *(f"AP{b + 1}" for b in range(num_bins))]


def pooled_metrics(precision: np.ndarray, keys: list[str]) -> dict[str, float | None]:
    """AP-pool of every group key (``AP AP50 AP75 APs APm APl APr APc APf AP1..``) from the pools'
    precision ``[T, R, P, A]`` (P in :func:`pool_partitions`' order; -1 where a pool has no
    ground truth): the engine's accumulation of a pool pools the true and false positives of its
    classes as if they were one class."""

    def mean(p: np.ndarray) -> float | None:  # the masked mean, as the engine's slice_by averages: equal to it
        return None if (p < 0).all() else float(p[p > -1].mean())

    out: dict[str, float | None] = {
        "AP": mean(precision[..., 0, 0]),
        "AP50": mean(precision[0, :, 0, 0]),
        "AP75": mean(precision[5, :, 0, 0]),
    }
    for a, key in enumerate(("APs", "APm", "APl"), start=1):
        out[key] = mean(precision[..., 0, a])
    for k, key in enumerate(keys[1:], start=1):
        out[key] = mean(precision[..., k, 0])
    return out
