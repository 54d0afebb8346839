"""Analysis metrics that need no model: class-agnostic proposal recall (COCO-style AR) and the
sources of classification errors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import hotcoco
import numpy as np
from pycocotools import mask as mask_utils


def proposal_rows(image_id: int, boxes: np.ndarray) -> np.ndarray:
    """One image's proposals as the rows :func:`proposal_recall` reads: ``(P, 6)`` float64
    ``image_id, x1, y1, x2, y2, objectness``; ``boxes`` is ``(P, 4)`` xyxy, best first (the
    objectness is minus the rank: only the order counts)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    rank = -np.arange(boxes.shape[0], dtype=np.float64)
    return np.column_stack([np.full(boxes.shape[0], float(image_id)), boxes, rank])


def proposal_recall(
    gt: dict[str, Any],
    proposals: dict[int, np.ndarray] | np.ndarray,
    max_dets: Sequence[int] = (100, 1000),
    image_ids: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Class-agnostic average recall of region proposals, as COCO's AR (IoU 0.50:0.95).

    Args:
        gt: validated ground truth (crowd regions are ignored, as in COCO).
        proposals: per image id, ``(P, 5)`` rows ``x1, y1, x2, y2, objectness`` in image pixels;
            or all images' rows in one ``(N, 6)`` array ``image_id, x1, y1, x2, y2, objectness``
            (:func:`proposal_rows`; no per-detection objects, for LVIS-size splits).
        max_dets: the proposal budgets (top by objectness).
        image_ids: the images evaluated (default: the dict's keys, or the ids in the array);
            an image without proposals still counts its objects as missed.

    Returns:
        ``{"AR@100": .., "AR@1000": .., "recall_by_iou": {"100": [10 values], ...}, "iou_thresholds": [...]}``.
    """
    cat = gt["categories"][0]["id"] if gt["categories"] else 1
    if isinstance(proposals, dict):
        ids = sorted(proposals) if image_ids is None else sorted(image_ids)
        parts = [
            np.column_stack([np.full(len(p), float(i)), np.asarray(p, dtype=np.float64).reshape(-1, 5)])
            for i, p in proposals.items()
        ]
        rows = np.concatenate(parts) if parts else np.zeros((0, 6))
    else:
        rows = np.asarray(proposals, dtype=np.float64).reshape(-1, 6)
        ids = sorted(np.unique(rows[:, 0]).astype(int).tolist()) if image_ids is None else sorted(image_ids)
    # the engine's (N, 7) rows: image_id, x, y, w, h, score, category
    dets = np.column_stack([rows[:, 0], rows[:, 1:3], rows[:, 3:5] - rows[:, 1:3], rows[:, 5], np.full(len(rows), cat)])
    coco_gt = hotcoco.COCO({"images": gt["images"], "annotations": gt["annotations"], "categories": gt["categories"]})
    ev = hotcoco.COCOeval(coco_gt, coco_gt.load_res(dets), "bbox")
    ev.params.use_cats = False
    ev.params.max_dets = sorted(max_dets)
    ev.params.img_ids = [int(i) for i in ids]
    ev.evaluate()
    ev.accumulate()
    recall = np.asarray(ev.eval["recall"])  # [T, K=1, A, M]
    out: dict[str, Any] = {"iou_thresholds": [round(float(t), 2) for t in ev.params.iou_thrs], "recall_by_iou": {}}
    for m, md in enumerate(sorted(max_dets)):
        r = recall[:, 0, 0, m]
        out[f"AR@{md}"] = float(r[r > -1].mean()) if (r > -1).any() else None
        out["recall_by_iou"][str(md)] = [float(v) for v in r]
    return out


# what each evaluation of ``simcal analyze confusion`` leaves out: detections sitting on objects of these groups
CONFUSION_VARIANTS = {
    "as is": frozenset(),
    "without dets on tail objects": frozenset("rc"),
    "without dets on other-class objects": frozenset("rcf"),
}
CONFUSION_LABELS = ("as is", "-on tail", "-on other")  # short names of the variants, for tables and plots


def other_object_groups(
    gt: dict[str, Any], results: list[dict[str, Any]], group_of: dict[int, str], iou: float = 0.5
) -> list[str | None]:
    """Per detection, the frequency group of the OTHER-class object it sits on, else None.

    A detection of class c "sits on" an object of class d != c when its box overlaps that object's
    box at ``iou`` or more while it overlaps no object of c that much: a classification error
    (TIDE's "Cls" error), not a background or localisation one. Among several such objects the
    most overlapped counts. Boxes decide for ``segm`` too; the question is which object, not how
    well the mask fits.

    Args:
        gt: validated ground truth; crowd objects count as objects.
        results: detections ``{image_id, category_id, bbox, ...}``.
        group_of: category id -> ``"r"`` / ``"c"`` / ``"f"``.

    Returns:
        One entry per detection, in order: ``None`` or the group of the object it sits on.
    """
    objects: dict[int, list[dict[str, Any]]] = {}
    for a in gt["annotations"]:
        objects.setdefault(a["image_id"], []).append(a)
    by_image: dict[int, list[int]] = {}
    for k, r in enumerate(results):
        by_image.setdefault(r["image_id"], []).append(k)
    out: list[str | None] = [None] * len(results)
    for image_id, ks in by_image.items():
        objs = objects.get(image_id, [])
        if not objs:
            continue
        ious = np.asarray(
            mask_utils.iou([results[k]["bbox"] for k in ks], [o["bbox"] for o in objs], [0] * len(objs))
        ).reshape(len(ks), len(objs))
        obj_cats = np.array([o["category_id"] for o in objs])
        for row, k in zip(ious, ks):
            own = obj_cats == results[k]["category_id"]
            if (row[own] >= iou).any():
                continue
            other = np.where(~own, row, -1.0)
            j = int(other.argmax())
            if other[j] >= iou:
                out[k] = group_of[int(obj_cats[j])]
    return out
