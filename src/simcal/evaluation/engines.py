"""The evaluation engines, given what the protocols keep: hotcoco for box and mask AP,
faster-coco-eval for boundary IoU (hotcoco has none).

hotcoco (Rust; bit-for-bit parity with pycocotools, the LVIS rules as the official LVIS API has
them) takes the detections as columns: the ``(N, 7)`` array and, for masks, the RLEs, with no
dict per detection. Before it, the protocol's caps and the federated rule are applied on the
columns (:mod:`simcal.evaluation.protocols`), so the engine matches only what is evaluated; it
still ignores the unmatched detections of a not-exhaustive class itself. A mask's box and area are
the mask's (as lvis-api and pycocotools take them for a result without ``bbox``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from simcal.choices import BOUNDARY_DILATION
from simcal.data.annotations import collector_paused
from simcal.data.results import Detections
from simcal.data.stats import CategoryStat
from simcal.evaluation.protocols import cap_per_class, lvis_kept, per_image_cap


def gt_for_engine(gt: dict[str, Any], stats: list[CategoryStat]) -> dict[str, Any]:
    """The ground truth as the engines read it, each category's frequency group from ``stats``."""
    freq = {s.id: s.frequency for s in stats}
    cats = [{"id": c["id"], "name": c.get("name", str(c["id"])), "frequency": freq[c["id"]]} for c in gt["categories"]]
    return {"images": gt["images"], "annotations": gt["annotations"], "categories": cats}


def kept_detections(
    dets: Detections, gt: dict[str, Any], lvis_rules: bool, protocol: str, dets_per_class: int
) -> Detections:
    """The detections a protocol evaluates: AP-fixed's (and AP-pool's) ``dets_per_class`` best of
    each class first; under LVIS rules, each image's cap and the federated rule."""
    if protocol != "lvis":
        dets = cap_per_class(dets, dets_per_class)
    if lvis_rules:
        keep = lvis_kept(dets, gt, per_image_cap(protocol, lvis_rules))
        dets = dets.take(keep) if len(keep) < len(dets) else dets
    return dets


def _hotcoco_results(coco_gt: Any, dets: Detections, iou_type: str) -> Any:
    """The detections in the engine, from their columns. Masks: each row's area is its mask's
    (the engine's mask tools), for the size ranges; the engine's mask IoU does not read the row's
    box (the same precision with the masks' own boxes and with zeros: tested)."""
    import hotcoco

    if not len(dets):
        return coco_gt.load_res([])
    if iou_type == "bbox":
        return coco_gt.load_res(dets.array)
    segs = dets.segmentation()
    coco_dt = coco_gt.load_res(dets.array, segmentation=segs)
    area = np.asarray(hotcoco.mask.area(segs), dtype=np.float64).reshape(-1)
    coco_dt.update_anns(ids=np.arange(1, len(dets) + 1), area=area)
    return coco_dt


def engine_eval(
    gt: dict[str, Any],
    dets: Detections,
    iou_type: str,
    stats: list[CategoryStat],
    *,
    lvis_rules: bool,
    protocol: str,
    dets_per_class: int,
) -> tuple[Any, int]:
    """hotcoco's evaluator after its per-image matching (``evaluate()``) of the detections the
    protocol keeps (:func:`kept_detections`), and their number. ``iou_type``: ``bbox`` or ``segm``;
    the categories' ``frequency`` (the engine's r/c/f) is taken from ``stats``."""
    import hotcoco

    fixed = protocol != "lvis"
    kept = kept_detections(dets, gt, lvis_rules, protocol, dets_per_class)
    with collector_paused():
        coco_gt = hotcoco.COCO(gt_for_engine(gt, stats))
        coco_dt = _hotcoco_results(coco_gt, kept, iou_type)
        if lvis_rules:  # capped already: marked so, or the engine's diagnostics cap at 300 again
            coco_dt = coco_dt.cap_detections_per_image(None)
        ev = hotcoco.COCOeval(coco_gt, coco_dt, iou_type, lvis_style=lvis_rules)
        per_pair = dets_per_class if fixed else per_image_cap(protocol, lvis_rules)  # per (image, class)
        ev.params.max_dets = [per_pair] if lvis_rules or fixed else [1, 10, per_pair]
        ev.evaluate()
    return ev, len(kept)


def boundary_precision(
    gt: dict[str, Any],
    dets: Detections,
    stats: list[CategoryStat],
    lvis_rules: bool,
    protocol: str,
    dets_per_class: int,
    dilation: float = BOUNDARY_DILATION,
    num_bins: int = 0,
) -> tuple[np.ndarray, int, dict[str, float | None] | None]:
    """Boundary-IoU precision ``[T, R, K, A]`` (as :func:`engine_eval`'s accumulated one), the
    number of detections matched, and for ``protocol="pool"`` the pooled group metrics
    (:func:`pooled_by_virtual_images`, ``num_bins`` bins), on faster-coco-eval.

    Boundary IoU (Cheng et al. 2021, the official boundary-iou-api): the IoU of the two masks'
    boundary bands (each mask minus its erosion by ``round(dilation * image diagonal)`` pixels,
    zero outside the image), taken as ``min(mask IoU, band IoU)``; a crowd region keeps mask IoU.
    The protocol's detections (:func:`kept_detections`) go to the engine as dicts.
    """
    fixed = protocol != "lvis"
    given = kept_detections(dets, gt, lvis_rules, protocol, dets_per_class).to_dicts()
    per_pair = dets_per_class if fixed else per_image_cap(protocol, lvis_rules)
    engine_gt = gt_for_engine(gt, stats)
    precision = _fce_precision(engine_gt, given, "boundary", lvis_rules, per_pair, fixed, dilation)
    pooled = None
    if protocol == "pool":
        pooled = pooled_by_virtual_images(gt, given, stats, num_bins, "boundary", lvis_rules, per_pair, dilation)
    return precision, len(given), pooled


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
    image and class), on copies of ``engine_gt`` and ``dets`` (fields as the engine reads them; it
    writes RLEs into what it is given)."""
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
    """AP-pool's group keys (as :func:`simcal.evaluation.protocols.pooled_from_matches`') for an
    engine that keeps no per-image matches: each partition of the classes (all; r/c/f; the bins)
    is one engine run on :func:`_virtual_pools` data, whose per-pool AP is the pooled AP. ``dets``:
    AP-fixed's detections with the LVIS rules applied (engine fields)."""
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
