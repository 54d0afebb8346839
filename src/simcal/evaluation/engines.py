"""The evaluation engines, given what the protocols keep: hotcoco for box and mask AP,
faster-coco-eval for boundary IoU (hotcoco has none).

hotcoco (Rust; bit-for-bit parity with pycocotools, the LVIS rules as the official LVIS API has
them) takes the detections as columns: the ``(N, 7)`` array and, for masks, the RLEs, with no
dict per detection. Before it, the protocol's caps and the federated rule are applied on the
columns (:mod:`simcal.evaluation.protocols`), so the engine matches only what is evaluated; it
still ignores the unmatched detections of a not-exhaustive class itself. A mask's box and area are
the mask's (as lvis-api and pycocotools take them for a result without ``bbox``). Where all of a
large file's masks go to the engine (COCO rules), hotcoco reads the file itself while forked
children check it (:func:`file_precision`).

AP-pool's pools are evaluated as categories of virtual images (:func:`virtual_pools`): one per
(image, class) pair, so that matching stays per class while the engine's accumulation pools.
"""

from __future__ import annotations

import itertools
import os
import sys
import tempfile
from collections.abc import Callable
from operator import itemgetter
from typing import Any, TypeVar

import numpy as np

from simcal.choices import BOUNDARY_DILATION
from simcal.data.annotations import collector_paused
from simcal.data.results import Detections, areas_later, checked_later
from simcal.data.stats import CategoryStat
from simcal.evaluation.protocols import (
    cap_per_class,
    lvis_kept,
    per_image_cap,
    pool_partitions,
    pooled_metrics,
)

T = TypeVar("T")


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


def _hotcoco_results(coco_gt: Any, dets: Detections, iou_type: str, read: int) -> Any:
    """The detections in the engine, from their columns. Masks: each row's area is its mask's
    (:func:`~simcal.data.results.areas_later`), for the size ranges; the engine's mask IoU does
    not read the row's box (the same precision with the masks' own boxes and with zeros: tested).
    ``read``: how many detections ``dets`` were kept of."""
    if not len(dets):
        return coco_gt.load_res([])
    if iou_type == "bbox":
        return coco_gt.load_res(dets.array)
    areas = areas_later(dets, of=read)  # counted by a forked process while the engine loads the masks
    try:
        coco_dt = coco_gt.load_res(dets.array, segmentation=dets.segmentation())
    finally:
        area = areas()  # the child is waited for even where loading failed
    coco_dt.update_anns(ids=np.arange(1, len(dets) + 1), area=area)
    return coco_dt


def _hotcoco_eval(
    engine_gt: dict[str, Any], dets: Detections, iou_type: str, lvis_rules: bool, max_dets: list[int], read: int
) -> Any:
    """hotcoco's evaluator of ``dets`` against ``engine_gt`` after its per-image matching
    (``evaluate()``); ``max_dets``: the engine's (:func:`_max_dets`); ``read``: how many
    detections ``dets`` were kept of."""
    import hotcoco

    with collector_paused():
        coco_gt = hotcoco.COCO(engine_gt)
        return _matched(coco_gt, _hotcoco_results(coco_gt, dets, iou_type, read), iou_type, lvis_rules, max_dets)


def _matched(coco_gt: Any, coco_dt: Any, iou_type: str, lvis_rules: bool, max_dets: list[int]) -> Any:
    """hotcoco's evaluator of the loaded ``coco_dt`` against ``coco_gt`` after its per-image
    matching (``evaluate()``)."""
    import hotcoco

    if lvis_rules:  # capped already: marked so, or the engine's diagnostics cap at 300 again
        coco_dt = coco_dt.cap_detections_per_image(None)
    ev = hotcoco.COCOeval(coco_gt, coco_dt, iou_type, lvis_style=lvis_rules)
    ev.params.max_dets = max_dets
    ev.evaluate()
    return ev


def _accumulated(ev: Any) -> np.ndarray:
    """The precision ``[T, R, K, A]`` at the largest max-dets of an engine's evaluator after its
    matching (hotcoco's or faster-coco-eval's), accumulated."""
    ev.accumulate()
    return np.asarray(ev.eval["precision"])[..., -1]


def _max_dets(protocol: str, lvis_rules: bool, dets_per_class: int) -> list[int]:
    """The engine's max-dets per (image, class), the largest last: AP-fixed's per-class cap (all
    of a class's detections in an image), else the per-image one; COCO's 1 and 10 before 100."""
    if protocol != "lvis":
        return [dets_per_class]
    cap = per_image_cap(protocol, lvis_rules)
    return [cap] if lvis_rules else [1, 10, cap]


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
    kept = kept_detections(dets, gt, lvis_rules, protocol, dets_per_class)
    max_dets = _max_dets(protocol, lvis_rules, dets_per_class)
    return _hotcoco_eval(gt_for_engine(gt, stats), kept, iou_type, lvis_rules, max_dets, len(dets)), len(kept)


def file_precision(
    gt: dict[str, Any], path: str | os.PathLike[str], iou_type: str, stats: list[CategoryStat], *, lvis_rules: bool
) -> tuple[np.ndarray, int] | None:
    """:func:`precision` under LVIS's protocol (the caller's to ask) of a results file that hotcoco
    reads itself, and the number of its detections; None where that route is not taken (the
    caller reads the file as columns, which names anything wrong in it).

    Taken for masks under COCO rules, where every detection goes to the engine, for a file
    :func:`~simcal.data.results.read_results` would read in two processes: hotcoco parses the file
    (in Rust, on its threads) while two forked children check it as ``read_results`` does
    (:func:`~simcal.data.results.checked_later`), sending back their counts instead of the
    columns, so no RLE string crosses a pipe or becomes a Python dict. hotcoco takes every mask's
    area from its box where the file's first detection has a box, else from the mask (pycocotools'
    ``loadRes`` rule: one kind per file, from its first detection); in the first case the children
    count the masks' areas, which replace the boxes' (a mask's size range is its mask's, as on the
    columns' route). What hotcoco writes to stderr while it parses is held (:func:`_stderr_held`)
    and passed on only for a file the checks pass: for one they refuse (an unknown image id, which
    hotcoco only warns about) the columns' error line is all that is shown."""
    if iou_type != "segm" or lvis_rules:
        return None
    checked = checked_later(path, gt, iou_type, areas=_box_first)
    if checked is None:
        return None
    import hotcoco

    loaded = None
    try:
        with collector_paused():
            coco_gt = hotcoco.COCO(gt_for_engine(gt, stats))
            loaded = _stderr_held(lambda: coco_gt.load_res(os.fspath(path)))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException:  # what hotcoco refuses (a NaN score; a panic): read as columns, which name it
        pass
    finally:
        got = checked()  # the children are waited for, whatever happened here
    if got is None or loaded is None:
        return None
    (coco_dt, said), (n, areas) = loaded, got
    if said:
        sys.stderr.write(said.decode(errors="replace"))
    with collector_paused():
        if areas is not None:
            try:
                coco_dt.update_anns(ids=np.arange(1, n + 1), area=areas)
            except (KeyError, ValueError):  # hotcoco read another number of detections
                return None
        max_dets = _max_dets("lvis", lvis_rules, 0)[-1:]  # the precision read: COCO's 1 and 10 unused
        return _accumulated(_matched(coco_gt, coco_dt, iou_type, lvis_rules, max_dets)), n


def _box_first(first: Any) -> bool:
    """Whether hotcoco takes a results file's areas from the boxes, given its first detection
    (pycocotools' ``loadRes`` rule: one kind per file, from its first detection)."""
    return isinstance(first, dict) and first.get("bbox") is not None


def _stderr_held(call: Callable[[], T]) -> tuple[T, bytes]:
    """``call()`` with file descriptor 2 sent to a temporary file meanwhile, and what was written
    there (hotcoco's Rust code writes its warnings to it, past ``sys.stderr``). What another
    thread of this process writes to stderr meanwhile is held too."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            out = call()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        held.seek(0)
        return out, held.read()


def precision(
    gt: dict[str, Any],
    dets: Detections,
    iou_type: str,
    stats: list[CategoryStat],
    *,
    lvis_rules: bool,
    protocol: str,
    dets_per_class: int,
    pool_bins: int | None = None,
    dilation: float = BOUNDARY_DILATION,
) -> tuple[np.ndarray, int, dict[str, float | None] | None]:
    """The engine's precision ``[T, R, K, A]`` (IoU thresholds x recall thresholds x classes in id
    order x area ranges, at the largest max-dets) of the detections the protocol keeps, their
    number, and with ``pool_bins`` (the number of instance bins) AP-pool's metrics: hotcoco for
    ``bbox`` and ``segm``, faster-coco-eval for ``boundary`` (:func:`boundary_precision`, bands of
    ``dilation`` x the image diagonal).

    AP-pool is a second run on the pools' virtual images (:func:`virtual_pools`) with one category
    for all classes: its precision gives AP, AP50, AP75 and the sizes; the engine's re-accumulation
    of that run over the virtual images of each group's (and bin's) classes (``slice_by``, no IoU
    recomputed) gives each group's pooled AP."""
    if iou_type == "boundary":
        return boundary_precision(
            gt,
            dets,
            stats,
            lvis_rules=lvis_rules,
            protocol=protocol,
            dets_per_class=dets_per_class,
            pool_bins=pool_bins,
            dilation=dilation,
        )
    kept = kept_detections(dets, gt, lvis_rules, protocol, dets_per_class)
    max_dets = _max_dets(protocol, lvis_rules, dets_per_class)[-1:]  # the precision read: COCO's 1 and 10 unused
    engine_gt = gt_for_engine(gt, stats)
    with collector_paused():
        out = _accumulated(_hotcoco_eval(engine_gt, kept, iou_type, lvis_rules, max_dets, len(dets)))
        if pool_bins is None:
            return out, len(kept), None
        pool_of, keys = pool_partitions(stats, pool_bins, sorted(c["id"] for c in gt["categories"]))
        virtual_gt, virtual, image_class = virtual_pools(engine_gt, kept, pool_of[:, :1], 1, lvis_rules)
        ev = _hotcoco_eval(virtual_gt, virtual, iou_type, lvis_rules, max_dets, len(dets))
        virtual_precision = _accumulated(ev)
    pooled = pooled_metrics(virtual_precision, keys[:1])
    image_ids = np.array([im["id"] for im in virtual_gt["images"]], dtype=np.int64)
    member = pool_of[image_class]  # [V, 3]: each virtual image's class's pools
    slices = {key: image_ids[(member == p).any(axis=1)].tolist() for p, key in enumerate(keys) if p}
    got = ev.slice_by({key: ids for key, ids in slices.items() if ids})
    for key, ids in slices.items():
        ap = got[key]["AP"] if ids else -1.0
        pooled[key] = ap if ap >= 0 else None
    return out, len(kept), pooled


def boundary_precision(
    gt: dict[str, Any],
    dets: Detections,
    stats: list[CategoryStat],
    *,
    lvis_rules: bool,
    protocol: str,
    dets_per_class: int,
    pool_bins: int | None = None,
    dilation: float = BOUNDARY_DILATION,
) -> tuple[np.ndarray, int, dict[str, float | None] | None]:
    """:func:`precision` with boundary IoU, on faster-coco-eval: the precision ``[T, R, K,
    A]``, the number of detections kept and with ``pool_bins`` AP-pool's metrics
    (:func:`~simcal.evaluation.protocols.pooled_metrics`): the engine cannot re-accumulate over
    image subsets, so each partition of the classes (all; r/c/f; the bins) is a run of its own on
    its virtual images (:func:`virtual_pools`) with only its pools as categories (the engine
    makes an entry per image and category).

    Boundary IoU (Cheng et al. 2021, the official boundary-iou-api): the IoU of the two masks'
    boundary bands (each mask minus its erosion by ``round(dilation * image diagonal)`` pixels,
    zero outside the image), taken as ``min(mask IoU, band IoU)``; a crowd region keeps mask IoU.
    The protocol's detections (:func:`kept_detections`) go to the engine as dicts.
    """
    kept = kept_detections(dets, gt, lvis_rules, protocol, dets_per_class)
    max_dets = _max_dets(protocol, lvis_rules, dets_per_class)[-1:]
    engine_gt = gt_for_engine(gt, stats)
    out = _fce_precision(engine_gt, kept.to_dicts(), "boundary", lvis_rules, max_dets, dilation)
    if pool_bins is None:
        return out, len(kept), None
    pool_of, keys = pool_partitions(stats, pool_bins, sorted(c["id"] for c in gt["categories"]))
    pooled = np.full((*out.shape[:2], len(keys), out.shape[3]), -1.0)  # [T, R, pools, A]
    for q, (start, stop) in enumerate(((0, 1), (1, 4), (4, len(keys)))):  # all; r/c/f; the bins
        virtual_gt, virtual, _ = virtual_pools(engine_gt, kept, pool_of[:, q : q + 1] - start, stop - start, lvis_rules)
        pooled[:, :, start:stop] = _fce_precision(
            virtual_gt, virtual.to_dicts(), "boundary", lvis_rules, max_dets, dilation
        )
    return out, len(kept), pooled_metrics(pooled, keys)


def _fce_precision(
    engine_gt: dict[str, Any],
    dets: list[dict[str, Any]],
    iou_type: str,
    lvis_rules: bool,
    max_dets: list[int],
    dilation: float,
) -> np.ndarray:
    """faster-coco-eval's precision ``[T, R, K, A]`` at its largest max-dets (``max_dets``:
    :func:`_max_dets`), on copies of ``engine_gt`` and ``dets`` (fields as the engine reads them; it
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
        ev.params.maxDets = max_dets
        ev.evaluate()
        return _accumulated(ev)


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


def virtual_pools(
    engine_gt: dict[str, Any], dets: Detections, pool_of: np.ndarray, num_pools: int, lvis_rules: bool
) -> tuple[dict[str, Any], Detections, np.ndarray]:
    """AP-pool's pools as categories of virtual images, for an engine to accumulate.

    For each partition of the classes (``pool_of`` ``(K, Q)``: class ``k``'s pool in partition
    ``q``, K in category id order), every (image, class) pair that holds ground truth or a
    detection is copied as a virtual image of its own, its class relabelled as its pool: a
    category after every class, id ``max class id + 1 + pool`` (pools ``0..num_pools-1``, each a
    category even without classes). Matching stays within a class
    (one class per virtual image), while the engine's accumulation of a pool pools the true and
    false positives of its classes over their images, which is AP-pool. A virtual image keeps its
    image's size; under LVIS rules the pair's class being one of the image's negative or
    not-exhaustive classes makes the pool one of the virtual image's.

    Returns the virtual ground truth (images after ``engine_gt``'s largest image id, annotation ids
    after its largest), the ``Q`` relabelled copies of ``dets`` one after the other, and each
    virtual image's class (its index in K), in the order of the images.
    """
    images, anns, cats = engine_gt["images"], engine_gt["annotations"], engine_gt["categories"]
    cat_ids = np.array(sorted(c["id"] for c in cats), dtype=np.int64)
    span = int(cat_ids[-1]) + 1
    image_base = max((im["id"] for im in images), default=0) + 1  # also past every image id
    n = len(anns)
    ann_img = np.fromiter(map(itemgetter("image_id"), anns), dtype=np.int64, count=n)
    ann_cat = np.fromiter(map(itemgetter("category_id"), anns), dtype=np.int64, count=n)
    # class-major codes: the virtual images of a class in image order, the classes in id order, so
    # that a pool's detections meet the engine's stable sort by score as the official API's matches
    # pooled class by class (score ties across classes are ranked the same)
    codes = np.concatenate([ann_cat * image_base + ann_img, dets.category_ids * image_base + dets.image_ids])
    pairs, inverse = np.unique(codes, return_inverse=True)
    inverse = inverse.reshape(-1)
    ann_pair, det_pair = inverse[:n], inverse[n:]
    pair_class = np.searchsorted(cat_ids, pairs // image_base)
    ann_base = max((a["id"] for a in anns), default=0) + 1
    sizes = {im["id"]: (im["height"], im["width"]) for im in images}
    pair_size = [sizes[i] for i in (pairs % image_base).tolist()]

    def listed(field: str) -> np.ndarray:
        """Whether each pair's class is in its image's ``field``."""
        ids = [im.get(field, ()) for im in images]
        img = np.repeat(np.array([im["id"] for im in images], dtype=np.int64), [len(x) for x in ids])
        cat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=len(img))
        return np.isin(pairs, cat * image_base + img)

    neg = listed("neg_category_ids").tolist() if lvis_rules else []
    not_exhaustive = listed("not_exhaustive_category_ids").tolist() if lvis_rules else []
    new_images, new_anns, copies = [], [], []
    for q in range(pool_of.shape[1]):
        vid = image_base + q * len(pairs) + np.arange(len(pairs))
        pool = span + pool_of[pair_class, q]
        for j, (v, p, (h, w)) in enumerate(zip(vid.tolist(), pool.tolist(), pair_size)):
            image: dict[str, Any] = {"id": v, "height": h, "width": w}
            if lvis_rules:
                image["neg_category_ids"] = [p] if neg[j] else []
                image["not_exhaustive_category_ids"] = [p] if not_exhaustive[j] else []
            new_images.append(image)
        ann_ids = range(ann_base + q * n, ann_base + (q + 1) * n)
        for a, i, v, p in zip(anns, ann_ids, vid[ann_pair].tolist(), pool[ann_pair].tolist()):
            new_anns.append({**a, "id": i, "image_id": v, "category_id": p})
        array = dets.array.copy()
        array[:, 0], array[:, 6] = vid[det_pair], pool[det_pair]
        copies.append(Detections(array, dets.counts, dets.sizes, dets.boxes))
    new_cats = [{"id": span + p, "name": f"pool {p}", "frequency": "f"} for p in range(num_pools)]
    virtual_gt = {"images": new_images, "annotations": new_anns, "categories": new_cats}
    return virtual_gt, Detections.concatenate(copies), np.tile(pair_class, pool_of.shape[1])
